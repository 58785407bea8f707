"""pipeline/placement.py thread_plan: actors' intra-op threads follow the cores the run has (issue 26 item 2)."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.placement import ThreadPlan, _with_threads, local_cores, thread_plan


@pytest.mark.parametrize("cores, overrides, plan", [
    (2, [], ThreadPlan(rollout=1, listener=1, learner=2)),          # the default run on this machine kind
    (8, [], ThreadPlan(rollout=4, listener=4, learner=8)),
    (8, ["listener.num_workers=3"], ThreadPlan(rollout=2, listener=2, learner=8)),
    (8, ["learner.num_ranks=2"], ThreadPlan(rollout=4, listener=4, learner=4)),
    (1, [], ThreadPlan(rollout=1, listener=1, learner=1)),          # never below one thread
    (2, ["rollout.num_cpus=3", "learner.num_cpus=4"], ThreadPlan(rollout=3, listener=1, learner=4)),  # a floor
])
def test_threads_split_the_cores_among_engines_and_give_the_learner_all(cores, overrides, plan) -> None:
    assert thread_plan(load_config(None, overrides), cores) == plan


def test_on_an_existing_cluster_each_actor_gets_its_reservation() -> None:
    cfg = load_config(None, ["rollout.num_cpus=2", "listener.num_cpus=1.5", "learner.num_cpus=6"])
    assert thread_plan(cfg, None) == ThreadPlan(rollout=2, listener=1, learner=6)


def test_only_a_local_cluster_counts_this_machines_cores() -> None:
    assert local_cores({"RAY_ADDRESS": "http://head:8265"}) is None
    assert local_cores({}) >= 1


def test_an_actor_reads_its_planned_threads_while_ray_reserves_the_configured_cpus() -> None:
    from actors.engine import intra_op_threads

    cfg = load_config(None, [])
    learner = _with_threads(cfg.learner, 2)
    assert intra_op_threads(learner.num_cpus) == 2 and cfg.learner.num_cpus == 1
    assert learner.model_dump(exclude={"num_cpus"}) == cfg.learner.model_dump(exclude={"num_cpus"})


def test_local_cores_capped_by_the_environment_never_raised() -> None:
    cores = local_cores({})
    assert local_cores({"LISTENER_GRPO_CORES": "1"}) == 1
    assert local_cores({"LISTENER_GRPO_CORES": str(cores + 8)}) == cores  # a cap, not more cores
    assert local_cores({"LISTENER_GRPO_CORES": ""}) == cores
