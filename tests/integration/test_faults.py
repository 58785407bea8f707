"""Faults the driver survives, or stops on cleanly: real actors in a real local Ray cluster, killed for real.

The reasoner is the format warm start (`tiny_reasoner_sft_dir`), so every step here is a real learning
step (rewards vary within groups) and the weights the workers must be re-synced with differ from the
checkpoint a restarted worker loads.

- A rollout worker killed mid-step: Ray restarts it, it gets the current weights before it generates
  again, and the step completes with every pair exactly once; the restart is a metric. Afterwards its
  greedy tokens are those of the worker that was never restarted.
- A rollout worker killed during a weight sync (each transport): the sync reports the failure, the driver
  aborts the open updates, waits for the restart and syncs every worker again.
- More rollout deaths than `rollout.max_restarts`: the run stops with one line.
- A listener killed mid-step: the pool restarts it and retries its requests; no score is lost.
(The learner rank killed during a checkpoint write: tests/integration/test_faults_learner.py.)
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from actors.weight_sync import TRANSPORTS
from pipeline.config import load_config
from pipeline.driver import PolicyState, grpo_step, recover_rollout_workers
from pipeline.errors import TrainingAborted
from pipeline.placement import create_actors
from pipeline.synthetic import synthetic_pairs

pytestmark = pytest.mark.integration

PAIRS = 16  # 8 pairs x G=8 per worker: a generation long enough for a kill to land in it
BUSY_STEP = ["rollout.num_workers=2", "rollout.group_size=8", "rollout.max_new_tokens=40",
             f"data.pairs_per_step={PAIRS}", "learner.num_ranks=1",
             "rollout.max_restarts=10"]  # the module's tests restart workers 4 times between them
GREEDY_TOKENS = 40


@pytest.fixture(scope="module")
def busy_run(ray_local, tiny_reasoner_sft_dir, tiny_listener_dir):
    cfg = load_config(None, BUSY_STEP)
    actors = create_actors(cfg, str(tiny_reasoner_sft_dir), str(tiny_listener_dir))
    start = actors.learner.gathered_state_dict()
    policy = PolicyState()
    result = grpo_step(0, list(synthetic_pairs(0, PAIRS)), actors, cfg, policy)  # version 1: weights the base lacks
    assert_learned(result.metrics)
    assert policy.version == 1
    trained = actors.learner.gathered_state_dict()
    changed = [name for name in start if not np.array_equal(start[name], trained[name])]
    assert changed and all(not name.startswith("visual") for name in changed)  # vision frozen, the rest learns
    yield cfg, actors, policy
    actors.shutdown()


def assert_learned(metrics: dict[str, float]) -> None:
    assert metrics["learn/skipped"] == 0.0
    assert metrics["loss"] != 0.0 and metrics["grad_norm"] > 0.0


def _in_thread(fn):
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test
            import traceback

            box["error"] = f"{exc!r}\n{traceback.format_exc()[-3000:]}"

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def greedy_tokens(ray, workers) -> list[list[list[int]]]:
    """Per worker, the greedy completion tokens of the same held-out pairs."""
    pairs = list(synthetic_pairs(7, 4))
    groups = ray.get([w.generate.remote(pairs, 1, GREEDY_TOKENS, 0.0) for w in workers])
    return [[g.completions[0].token_ids.tolist() for g in per_worker] for per_worker in groups]


def test_rollout_worker_killed_mid_step_is_restarted_with_current_weights(busy_run, ray_local) -> None:
    cfg, actors, policy = busy_run
    pairs = list(synthetic_pairs(0, PAIRS, start=100))
    thread, box = _in_thread(lambda: grpo_step(1, pairs, actors, cfg, policy))
    time.sleep(0.5)  # the shards are generating now
    ray_local.kill(actors.rollout[1], no_restart=False)
    thread.join(timeout=600)
    assert "error" not in box, box.get("error")
    result = box["result"]
    assert result.metrics["rollout/restarts"] == 1
    assert_learned(result.metrics)
    ids = [(s.group.pair_id, c.completion_index) for s in result.scored for c in s.group.completions]
    assert sorted(ids) == sorted((p.pair_id, i) for p in pairs for i in range(cfg.rollout.group_size))
    # Every completion, the regenerated shard's included, was sampled from the current weights (1), and
    # after the step's sync both workers serve version 2.
    assert {c.policy_version for s in result.scored for c in s.group.completions} == {1}
    assert ray_local.get([w.policy_version.remote() for w in actors.rollout]) == [2, 2]
    assert policy.version == 2
    # The restarted process serves the trained weights, not the checkpoint it loaded: its greedy tokens
    # are those of the worker that never died.
    survivor, restarted = greedy_tokens(ray_local, actors.rollout)
    assert restarted == survivor


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_rollout_worker_killed_during_a_weight_sync_is_resynced(busy_run, ray_local, transport) -> None:
    cfg, actors, policy = busy_run
    sync = cfg.sync.model_copy(update={"transport": transport})
    actors.learner.sync_weights(actors.rollout, policy.version, sync)  # the transport's group is formed
    # The worker dies as the next sync starts: the learner's sends to it fail, and the survivor may be
    # left holding a half-applied update.
    ray_local.kill(actors.rollout[1], no_restart=False)
    synced = actors.learner.sync_weights(actors.rollout, policy.version + 1, sync)
    assert synced.error, "a sync to a dead worker must report the failure"
    restarts = policy.rollout_restarts
    cfg_sync = cfg.model_copy(update={"sync": sync})
    synced = recover_rollout_workers(range(len(actors.rollout)), actors, cfg_sync, policy, policy.version + 1)
    assert not synced.error and synced.version == policy.version + 1
    policy.version = synced.version
    assert policy.rollout_restarts == restarts + 1
    assert ray_local.get([w.policy_version.remote() for w in actors.rollout]) == [policy.version] * 2
    survivor, restarted = greedy_tokens(ray_local, actors.rollout)
    assert restarted == survivor


def test_more_rollout_deaths_than_max_restarts_stop_the_run_in_one_line(busy_run) -> None:
    cfg, actors, policy = busy_run
    limited = cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"max_restarts": policy.rollout_restarts})})
    before = policy.rollout_restarts
    with pytest.raises(TrainingAborted) as error:
        recover_rollout_workers([0], actors, limited, policy, policy.version)
    assert str(error.value) == (f"rollout workers died {before + 1} times (rollout.max_restarts={before}); "
                                f"the run stopped")


def test_listener_killed_mid_step_loses_no_score(busy_run, ray_local) -> None:
    cfg, actors, policy = busy_run
    pairs = list(synthetic_pairs(0, PAIRS, start=200))
    before = ray_local.get(actors.listener_pool.stats.remote())
    (listener,) = ray_local.get(actors.listener_pool.workers.remote())
    thread, box = _in_thread(lambda: grpo_step(3, pairs, actors, cfg, policy))
    # Killed as the step starts: its score requests come only once a shard is generated, so they meet the
    # dead worker. (Killing it 1 s in raced the listener, which scores a shard in one engine call and was
    # sometimes done by then.)
    ray_local.kill(listener, no_restart=True)
    thread.join(timeout=600)
    assert "error" not in box, box.get("error")
    assert_learned(box["result"].metrics)
    after = ray_local.get(actors.listener_pool.stats.remote())
    assert after.restarts == before.restarts + 1
    assert after.failed == before.failed
    assert after.completed - before.completed == len(pairs) * cfg.rollout.group_size
    assert result_groups(box["result"]) == len(pairs)


def result_groups(result) -> int:
    return len({s.group.pair_id for s in result.scored})
