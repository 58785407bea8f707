"""Helpers shared by the e2e tests (importable because tests/e2e is on sys.path, see conftest.py)."""

from __future__ import annotations

REQUIRED_METRICS = [
    "reward/mean", "reward/format", "reward/accuracy", "reward/listener", "listener/contradiction_rate",
    "listener/brier", "loss", "kl", "clip_fraction", "grad_norm", "lr", "time/rollout_s", "time/listener_s",
    "time/reward_s", "time/learn_s", "time/sync_s", "time/step_s", "throughput/samples_per_s",
    "throughput/rollout_tokens_per_s",
]


def metric_steps(tracking_uri: str, run_id: str) -> dict[str, list[int]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    return {key: sorted(m.step for m in client.get_metric_history(run_id, key)) for key in REQUIRED_METRICS}
