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
    assert tracker.flush() and tracker.pending_metrics == 0
    mlflow_server.stop()
    tracker.log_metrics(1, {"loss": 0.9, "reward/mean": 0.2})
    tracker.log_metrics(2, {"loss": 0.8, "reward/mean": 0.3})
    assert tracker.flush() is False
    assert tracker.pending_metrics == 4 and tracker.flush_failures >= 1
    mlflow_server.start()
    tracker.log_metrics(3, {"loss": 0.7, "reward/mean": 0.4})
    assert tracker.close()
    assert _history(mlflow_server.uri, tracker.run_id, "loss") == [(0, 1.0), (1, 0.9), (2, 0.8), (3, 0.7)]
    from mlflow.tracking import MlflowClient

    run = MlflowClient(mlflow_server.uri).get_run(tracker.run_id)
    assert run.data.params["reward.w_listener"] == "0.5"
    assert run.data.tags["git_commit"] == "abc"
    assert run.info.status == "FINISHED"


def test_a_run_killed_during_an_outage_sends_its_unsent_metrics_when_resumed(tmp_path, mlflow_server) -> None:
    """The chaos soak's case: a learner rank dies while the server is down, so the driver exits with metrics
    still buffered. The resumed run's tracker sends them first (from metrics.jsonl), with their own steps."""
    first = _tracker(tmp_path, mlflow_server.uri)
    first.log_metrics(0, {"loss": 1.0})
    assert first.flush()  # step 0 is on the server before the outage
    mlflow_server.stop()
    first.log_metrics(1, {"loss": 0.9})
    first.log_metrics(2, {"loss": 0.8})
    with first.metrics_file.open("a") as out:
        out.write('{"step": 3, "timestamp_ms": 17')  # the killed process's last line, cut short
    del first  # killed: no close(), the buffer is gone with the process
    mlflow_server.start()
    resumed = _tracker(tmp_path, mlflow_server.uri)
    assert resumed.pending_metrics == 2  # steps 1 and 2; the cut line is skipped
    resumed.log_metrics(3, {"loss": 0.7})
    assert resumed.close()
    assert _history(mlflow_server.uri, resumed.run_id, "loss") == [(0, 1.0), (1, 0.9), (2, 0.8), (3, 0.7)]
    again = _tracker(tmp_path, mlflow_server.uri)  # everything is on the server now: nothing to resend
    assert again.pending_metrics == 0
    lines = again.metrics_file.read_text().splitlines()  # the cut line stays cut; the next row has its own
    assert lines[-2] == '{"step": 3, "timestamp_ms": 17' and json.loads(lines[-1])["loss"] == 0.7


def test_logged_metrics_reach_the_store_without_the_caller_flushing(tmp_path, mlflow_server) -> None:
    """The sender thread delivers them: the training loop only appends to metrics.jsonl."""
    import time

    tracker = _tracker(tmp_path, mlflow_server.uri)
    for step in range(3):
        tracker.log_metrics(step, {"loss": 1.0 - step / 10})
    deadline = time.monotonic() + 60
    while tracker.pending_metrics and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tracker.pending_metrics == 0 and tracker.run_id is not None
    assert _history(mlflow_server.uri, tracker.run_id, "loss") == [(0, 1.0), (1, 0.9), (2, 0.8)]
    assert tracker.close()


def test_a_store_that_never_answers_does_not_hold_up_logging(tmp_path) -> None:
    """A server that accepts the connection and then says nothing: each send waits out the HTTP timeout
    (MLFLOW_HTTP_REQUEST_TIMEOUT, 5 s), in the sender thread; log_metrics returns at once all the same."""
    import socket
    import time

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        tracker = _tracker(tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}")
        start = time.monotonic()
        for step in range(3):
            tracker.log_metrics(step, {"loss": 1.0 - step / 10})
        assert time.monotonic() - start < 1.0
        assert tracker.pending_metrics == 3  # none reached a store
        assert tracker.close() is False
    finally:
        silent.close()
    rows = [json.loads(line) for line in tracker.metrics_file.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(0, 1.0), (1, 0.9), (2, 0.8)]


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


@pytest.mark.parametrize("round_", range(6))  # the interrupt lands at a random point: several tries
def test_a_stop_signal_during_writes_ends_the_sqlite_run_killed(tmp_path, round_) -> None:
    """SIGTERM while the driver logs (most of the time inside a sqlite commit): the run is marked KILLED and
    every metric logged before the stop is in the store. Before pipeline/stopping.py held the signal during
    writes, about 1 try in 6 left the store locked, the final flush failed and the run stayed RUNNING. Since
    the sender thread commits, the signal lands while it writes: close waits for it, then sends the rest."""
    import os
    import signal
    import threading
    import time

    from mlflow.tracking import MlflowClient

    from pipeline.stopping import stop_on_signals

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    stop_on_signals()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = _tracker(tmp_path, uri)
    tracker.flush()  # the store's tables exist before the timed part
    stopper = threading.Timer(0.5 + 0.1 * round_, os.kill, (os.getpid(), signal.SIGTERM))
    step = 0
    try:
        stopper.start()
        with pytest.raises(KeyboardInterrupt):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                tracker.log_metrics(step, {f"m{i}": float(step) for i in range(50)})
                step += 1
                time.sleep(0.005)  # a step's own work: the sender keeps up and commits as the rows come
        assert tracker.close("KILLED")
    finally:
        stopper.cancel()
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.info.status == "KILLED"
    logged = {m.step for m in MlflowClient(uri).get_metric_history(tracker.run_id, "m0")}
    assert logged == set(range(step + 1)) or logged == set(range(step)), (step, max(logged))


def test_a_sample_table_every_step_keeps_arriving_past_the_tags_limit(tmp_path, mlflow_server) -> None:
    """MLflow's `log_table` appended each table to the run's `mlflow.loggedArtifacts` tag without a bound: with
    one sample table per step the tag reached its 8000-character limit at the 147th table, and from then on every
    flush failed and no table arrived. Every table now arrives; the tag lists the newest that fit."""
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

    tracker = _tracker(tmp_path, mlflow_server.uri)
    steps = 170
    for step in range(steps):
        tracker.log_metrics(step, {"loss": 1.0})
        tracker.log_table(f"samples/step_{step:06d}.json", {"prompt": [f"pair {step}"], "reward": [step / 2]})
        assert tracker.flush(), f"flush failed at step {step}"
    assert tracker.close() and tracker.flush_failures == 0
    client = MlflowClient(mlflow_server.uri)
    stored = [a.path for a in client.list_artifacts(tracker.run_id, "samples")]
    assert stored == [f"samples/step_{step:06d}.json" for step in range(steps)]
    registered = json.loads(client.get_run(tracker.run_id).data.tags[MLFLOW_LOGGED_ARTIFACTS])
    assert len(json.dumps(registered)) <= 8000 and registered[-1]["path"] == f"samples/step_{steps - 1:06d}.json"
    assert len(registered) < steps  # the oldest fell off the list, not out of the store
    import mlflow

    experiment_id, previous = client.get_run(tracker.run_id).info.experiment_id, mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_server.uri)  # load_table finds the run through the global URI's search
    try:
        last = client.load_table(experiment_id, f"samples/step_{steps - 1:06d}.json", run_ids=[tracker.run_id])
    finally:
        mlflow.set_tracking_uri(previous)
    assert last["prompt"].tolist() == [f"pair {steps - 1}"] and last["reward"].tolist() == [(steps - 1) / 2]
