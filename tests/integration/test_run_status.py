"""How a run ends, as the CLI reports it and MLflow records it, when an actor dies for real.

`python -m pipeline train` (its own local Ray cluster, real actors) has its learner rank SIGKILLed after
its first step: the command exits with code 3 and one `error:` line that names `--resume`, and the MLflow
run is marked FAILED. (Ctrl-C/SIGTERM -> exit 130, KILLED, then `--resume` into the same MLflow run:
tests/e2e/test_train.py::test_stop_after_a_checkpoint_then_resume_continues_step_and_data.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _processes_named(root: int, prefix: str) -> list[psutil.Process]:
    """Descendants of `root` (the driver's local Ray cluster descends from it) named `prefix...` by Ray."""
    found = []
    for process in psutil.Process(root).children(recursive=True):
        try:
            if process.cmdline() and process.cmdline()[0].startswith(prefix):
                found.append(process)
        except psutil.Error:
            continue
    return found


def test_an_actor_dying_ends_the_run_with_exit_code_3_and_mlflow_failed(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    run_dir, tracking = tmp_path / "run", f"sqlite:///{tmp_path}/mlflow.db"
    command = [sys.executable, "-m", "pipeline", "train", "trainer.steps=200", f"trainer.output_dir={run_dir}",
               f"tracking.tracking_uri={tracking}", "trainer.checkpoint_every=100"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "RAY_ADDRESS": ""})
    try:
        deadline = time.monotonic() + 900
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().strip()) and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[1][-3000:]
            time.sleep(0.2)
        learners = _processes_named(process.pid, "ray::LearnerRank")
        assert learners, "no learner process found"
        for learner in learners:
            learner.send_signal(signal.SIGKILL)
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 3, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: an actor died (")
    assert errors[0].endswith(f"the run stopped. Continue from the last complete checkpoint: "
                              f"python -m pipeline train --resume {run_dir.resolve()}")
    run = MlflowClient(tracking).get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FAILED"
