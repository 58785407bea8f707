"""Helpers shared by the e2e tests (importable because tests/e2e is on sys.path, see conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

REQUIRED_METRICS = [
    "reward/mean", "reward/format", "reward/accuracy", "reward/listener", "listener/contradiction_rate",
    "listener/brier", "loss", "kl", "clip_fraction", "grad_norm", "lr", "time/rollout_s", "time/listener_s",
    "time/reward_s", "time/learn_s", "time/sync_s", "time/step_s", "throughput/samples_per_s",
    "throughput/rollout_tokens_per_s",
]
# Settings of an e2e run on the format warm start: its completions fit in 40 tokens (configs/learn_cpu.yaml),
# and 8 samples per pair: with 4, every group of a step sometimes ties (the warm start is peaked), a skipped step.
LEARNING = ("rollout.max_new_tokens=40", "rollout.group_size=8")


def metric_steps(tracking_uri: str, run_id: str) -> dict[str, list[int]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    return {key: sorted(m.step for m in client.get_metric_history(run_id, key)) for key in REQUIRED_METRICS}


def train_rows(run_dir: Path) -> list[dict]:
    """The per-step rows of `run_dir/metrics.jsonl` (held-out evaluation rows left out)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "learn/skipped" in row]


def assert_every_step_learned(rows: list[dict]) -> None:
    """Every step took a learner step (none skipped for zero reward variance) with a real loss and gradient."""
    assert rows, "no step was logged"
    assert [row["learn/skipped"] for row in rows] == [0.0] * len(rows), [row["step"] for row in rows]
    assert all(row["loss"] != 0.0 and row["grad_norm"] > 0.0 and row["lr"] > 0.0 for row in rows), rows


def changed_tensors(start_dir: Path, policy_dir: Path) -> list[str]:
    """Names of the tensors of `policy_dir` that differ from `start_dir`'s (same names and shapes asserted)."""
    import torch
    from safetensors.torch import load_file

    def load(directory: Path) -> dict:
        tensors = {}
        for path in sorted(directory.glob("*.safetensors")):
            tensors.update(load_file(path))
        return tensors

    start, trained = load(start_dir), load(policy_dir)
    assert start and set(start) == set(trained)
    assert all(start[k].shape == trained[k].shape for k in start)
    return [k for k in start if not torch.equal(start[k].float(), trained[k].float())]
