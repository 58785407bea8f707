"""Faults the driver survives, or stops on cleanly: real actors in a real local Ray cluster, killed for real.

- A rollout worker killed mid-step: Ray restarts it, it gets the current weights before it generates
  again, and the step completes with every pair exactly once; the restart is a metric.
- A listener killed mid-step: the pool restarts it and retries its requests; no score is lost.
(The learner rank killed during a checkpoint write: tests/integration/test_faults_learner.py.)
"""

from __future__ import annotations

import threading
import time
import pytest

from pipeline.config import load_config
from pipeline.driver import PolicyState, grpo_step
from pipeline.placement import create_actors
from pipeline.synthetic import synthetic_pairs

pytestmark = pytest.mark.integration

# Long enough generations (the random tiny model rarely stops early) that a kill lands mid-generation.
BUSY_STEP = ["rollout.num_workers=2", "rollout.group_size=8", "rollout.max_new_tokens=192",
             "data.pairs_per_step=8", "reward.drop_zero_variance=false", "learner.num_ranks=1"]


@pytest.fixture(scope="module")
def busy_run(ray_local, tiny_reasoner_dir, tiny_listener_dir):
    cfg = load_config(None, BUSY_STEP)
    actors = create_actors(cfg, str(tiny_reasoner_dir), str(tiny_listener_dir))
    policy = PolicyState()
    grpo_step(0, list(synthetic_pairs(0, 8)), actors, cfg, policy)  # version 1: weights the base lacks
    assert policy.version == 1
    yield cfg, actors, policy
    actors.shutdown()


def _in_thread(fn):
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def test_rollout_worker_killed_mid_step_is_restarted_with_current_weights(busy_run, ray_local) -> None:
    cfg, actors, policy = busy_run
    pairs = list(synthetic_pairs(0, 8, start=100))
    thread, box = _in_thread(lambda: grpo_step(1, pairs, actors, cfg, policy))
    time.sleep(1.5)  # the shards are generating now
    ray_local.kill(actors.rollout[1], no_restart=False)
    thread.join(timeout=600)
    assert "error" not in box, box.get("error")
    result = box["result"]
    assert result.metrics["rollout/restarts"] == 1
    ids = [(s.group.pair_id, c.completion_index) for s in result.scored for c in s.group.completions]
    assert sorted(ids) == sorted((p.pair_id, i) for p in pairs for i in range(cfg.rollout.group_size))
    # Every completion, the regenerated shard's included, was sampled from the current weights (1), and
    # after the step's sync both workers serve version 2.
    assert {c.policy_version for s in result.scored for c in s.group.completions} == {1}
    assert ray_local.get([w.policy_version.remote() for w in actors.rollout]) == [2, 2]
    assert policy.version == 2


def test_listener_killed_mid_step_loses_no_score(busy_run, ray_local) -> None:
    cfg, actors, policy = busy_run
    pairs = list(synthetic_pairs(0, 8, start=200))
    before = ray_local.get(actors.listener_pool.stats.remote())
    thread, box = _in_thread(lambda: grpo_step(2, pairs, actors, cfg, policy))
    time.sleep(1.0)  # rollouts running; the listener's requests come when a shard is done
    (listener,) = ray_local.get(actors.listener_pool.workers.remote())
    ray_local.kill(listener, no_restart=True)
    thread.join(timeout=600)
    assert "error" not in box, box.get("error")
    after = ray_local.get(actors.listener_pool.stats.remote())
    assert after.restarts == before.restarts + 1
    assert after.failed == before.failed
    assert after.completed - before.completed == len(pairs) * cfg.rollout.group_size
    assert result_groups(box["result"]) == len(pairs)


def result_groups(result) -> int:
    return len({s.group.pair_id for s in result.scored})
