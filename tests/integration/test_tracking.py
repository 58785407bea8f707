"""MLflow tracking against a real `mlflow server` on 127.0.0.1: an outage loses no metric."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.tracking import Tracker

pytestmark = pytest.mark.integration


def _tracker(tmp_path: Path, uri: str) -> Tracker:
    return Tracker(tmp_path / "run", uri, experiment="test-exp", run_name="outage",
                   params={"trainer.steps": "4", "reward.w_listener": "0.5"}, tags={"git_commit": "abc"})


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_metrics_logged_during_an_outage_arrive_when_the_server_returns(tmp_path, mlflow_server) -> None:
    tracker = _tracker(tmp_path, mlflow_server.uri)
    tracker.log_metrics(0, {"loss": 1.0, "reward/mean": 0.1})
    assert tracker.pending_metrics == 0
    mlflow_server.stop()
    tracker.log_metrics(1, {"loss": 0.9, "reward/mean": 0.2})
    tracker.log_metrics(2, {"loss": 0.8, "reward/mean": 0.3})
    assert tracker.pending_metrics == 4 and tracker.flush_failures >= 2
    mlflow_server.start()
    tracker.log_metrics(3, {"loss": 0.7, "reward/mean": 0.4})
    assert tracker.close()
    assert _history(mlflow_server.uri, tracker.run_id, "loss") == [(0, 1.0), (1, 0.9), (2, 0.8), (3, 0.7)]
    from mlflow.tracking import MlflowClient

    run = MlflowClient(mlflow_server.uri).get_run(tracker.run_id)
    assert run.data.params["reward.w_listener"] == "0.5"
    assert run.data.tags["git_commit"] == "abc"
    assert run.info.status == "FINISHED"


def test_server_down_from_the_start_and_never_back_keeps_everything_locally(tmp_path, caplog) -> None:
    tracker = _tracker(tmp_path, "http://127.0.0.1:9")  # discard port: nothing listens
    for step in range(3):
        tracker.log_metrics(step, {"loss": 1.0 - step / 10})
    assert tracker.close() is False
    assert "never came back" in caplog.text
    rows = [json.loads(line) for line in tracker.metrics_file.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(0, 1.0), (1, 0.9), (2, 0.8)]


def test_resumed_tracker_logs_into_the_same_run_and_tables_arrive(tmp_path, mlflow_server) -> None:
    first = _tracker(tmp_path, mlflow_server.uri)
    first.log_metrics(0, {"loss": 1.0})
    first.close()
    second = _tracker(tmp_path, mlflow_server.uri)
    second.log_metrics(1, {"loss": 0.5})
    second.log_table("samples/step_1.json", {"prompt": ["a red circle"], "reward": [1.5]})
    assert second.close()
    assert second.run_id == first.run_id
    assert _history(mlflow_server.uri, first.run_id, "loss") == [(0, 1.0), (1, 0.5)]
    from mlflow.tracking import MlflowClient

    artifacts = [a.path for a in MlflowClient(mlflow_server.uri).list_artifacts(first.run_id, "samples")]
    assert artifacts == ["samples/step_1.json"]
