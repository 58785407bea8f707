"""`trainer.max_staleness`: the driver's loop on real actors (tiny checkpoints, a real local Ray cluster).

- 0 is the on-policy loop, unchanged: its metrics and final weights equal, bit for bit, those of a plain
  sequential reference written here with the actors alone (generate -> score -> reward -> train -> sync).
- 1 overlaps the stages: the groups of every step after the first were sampled one policy version behind
  the learner's (never more), read from the logged per-group versions; the pairs come in the source's
  order; a checkpoint taken while the next step's batch was prefetched resumes on exactly that batch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.batching import train_batch_from_groups
from pipeline.config import load_config
from pipeline.data import PairSource
from pipeline.driver import training_loop
from pipeline.placement import create_actors
from pipeline.tracking import Tracker

pytestmark = pytest.mark.integration

# Groups kept whatever their rewards (the random tiny listener's p varies, so advantages do too): every
# step trains and syncs. fp32 engines: the same on every machine.
SMALL = ["data.pairs_per_step=3", "rollout.group_size=2", "rollout.max_new_tokens=12",
         "reward.drop_zero_variance=false", "learner.lr=1e-3", "trainer.checkpoint_every=1",
         "rollout.engine.dtype=float32", "listener.engine.dtype=float32"]


def is_timing(key: str) -> bool:
    """Wall-clock metrics (time/*, throughput/*, the learner's step_seconds and tokens_per_s) differ run to run."""
    return key.startswith(("time/", "throughput/")) or key in ("step_seconds", "tokens_per_s")


def _config(run_dir: Path, *overrides: str):
    return load_config(None, [*SMALL, f"trainer.output_dir={run_dir}", *overrides])


def _driver_run(run_dir: Path, dirs: tuple[Path, Path], *overrides: str) -> tuple[list[dict], dict]:
    """`training_loop` on fresh actors; (its metric rows, the learner's final trainable weights)."""
    cfg = _config(run_dir, *overrides)
    actors = create_actors(cfg, str(dirs[0]), str(dirs[1]))
    tracker = Tracker(run_dir, f"sqlite:///{run_dir.parent}/mlflow.db", "staleness", run_dir.name, params={}, tags={})
    try:
        training_loop(cfg, actors, tracker, run_dir)
        weights = actors.learner.gathered_state_dict(include_frozen=False)
    finally:
        tracker.close("FINISHED")
        actors.shutdown()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "learn/skipped" in row], weights


def _sequential_reference(run_dir: Path, dirs: tuple[Path, Path], *overrides: str) -> tuple[list[dict], dict]:
    """The on-policy algorithm, one stage after the other, on fresh actors: no driver code."""
    import ray

    cfg = _config(run_dir, *overrides)
    actors = create_actors(cfg, str(dirs[0]), str(dirs[1]))
    source = PairSource.from_config(cfg.data, cfg.model)
    rows, version = [], 0
    try:
        for step in range(cfg.trainer.steps):
            pairs = source.next_batch(cfg.data.pairs_per_step)
            groups = ray.get(actors.rollout[0].generate.remote(
                pairs, cfg.rollout.group_size, cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p))
            scores = ray.get(actors.listener_pool.score.remote(groups))
            scored, metrics = ray.get(actors.reward.score.remote(groups, scores))
            metrics.update(actors.learner.train_step(train_batch_from_groups(step, version, scored)).values)
            version = actors.learner.sync_weights(actors.rollout, version + 1, cfg.sync).version
            rows.append(metrics)
        weights = actors.learner.gathered_state_dict(include_frozen=False)
    finally:
        actors.shutdown()
    return rows, weights


def _pair_ids_by_step(run_dir: Path) -> dict[int, list[str]]:
    """Each step's pair ids, in order, once each, from its sample table."""
    out = {}
    for table in sorted((run_dir / "samples").glob("step_*.json")):
        columns = json.loads(table.read_text())
        out[int(table.stem.split("_")[1])] = list(dict.fromkeys(columns["pair_id"]))
    return out


def _source_batches(run_dir: Path, count: int) -> list[list[str]]:
    cfg = _config(run_dir)
    source = PairSource.from_config(cfg.data, cfg.model)
    return [[pair.pair_id for pair in source.next_batch(cfg.data.pairs_per_step)] for _ in range(count)]


def test_staleness_0_equals_the_sequential_reference_bit_for_bit(ray_local, tmp_path, tiny_reasoner_sft_dir,
                                                                   tiny_listener_dir) -> None:
    # The format warm start writes answers (the random reasoner's rewards are all 0: no gradient to compare);
    # its completions fit in 40 tokens.
    dirs, overrides = (tiny_reasoner_sft_dir, tiny_listener_dir), ("trainer.steps=2", "rollout.max_new_tokens=40")
    reference, ref_weights = _sequential_reference(tmp_path / "reference", dirs, *overrides)
    rows, weights = _driver_run(tmp_path / "driver", dirs, *overrides, "trainer.max_staleness=0")
    assert len(rows) == len(reference) == 2
    for step, (row, ref) in enumerate(zip(rows, reference)):
        compared = {k: v for k, v in ref.items() if not is_timing(k)}
        assert {k: row[k] for k in compared} == pytest.approx(compared, rel=0, abs=0, nan_ok=True), step
        assert row["policy/staleness"] == 0.0 and row["rollout/policy_version_min"] == step
    assert rows[0]["grad_norm"] > 0 and rows[1]["grad_norm"] > 0  # both steps updated the weights compared
    assert weights.keys() == ref_weights.keys()
    import torch

    differing = [name for name in weights if not torch.equal(torch.as_tensor(weights[name]),
                                                             torch.as_tensor(ref_weights[name]))]
    assert differing == []


def test_staleness_1_trains_one_version_behind_in_source_order_and_resumes_on_the_prefetched_batch(
        ray_local, tmp_path, tiny_reasoner_dir, tiny_listener_dir) -> None:
    dirs = (tiny_reasoner_dir, tiny_listener_dir)
    run_dir = tmp_path / "stale"
    rows, _ = _driver_run(run_dir, dirs, "trainer.steps=3", "trainer.max_staleness=1")
    assert [row["step"] for row in rows] == [0, 1, 2]
    # Step t trains with the learner at version t (every step updates): its groups were sampled at t - 1.
    assert [row["policy/staleness"] for row in rows] == [0.0, 1.0, 1.0]
    assert [row["rollout/policy_version_min"] for row in rows] == [0.0, 0.0, 1.0]
    assert [row["policy/version"] for row in rows] == [1.0, 2.0, 3.0]
    for step in range(3):  # every completion the sample tables show (2 per group, every group kept)
        versions = json.loads((run_dir / "samples" / f"step_{step:06d}.json").read_text())["policy_version"]
        assert versions and all(step - 1 <= v <= step for v in versions), (step, versions)
    batches = _source_batches(run_dir, 3)
    assert _pair_ids_by_step(run_dir) == {0: batches[0], 1: batches[1], 2: batches[2]}

    # The checkpoint after step 1 was written while batch 2 was already read and generating: resuming from
    # it must train batch 2, not batch 3 and not batch 1 again.
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-00000002", "step-00000003"]
    shutil.rmtree(checkpoints[-1])
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run_dir / "checkpoints", resumed_dir / "checkpoints")
    resumed, _ = _driver_run(resumed_dir, dirs, "trainer.steps=3", "trainer.max_staleness=1")
    assert [row["step"] for row in resumed] == [2]
    assert _pair_ids_by_step(resumed_dir) == {2: batches[2]}
    assert resumed[0]["policy/staleness"] == 0.0 and resumed[0]["rollout/policy_version_min"] == 2.0
