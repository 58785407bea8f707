"""A learner rank killed while it writes a checkpoint: the run stops with one clear message, the previous
checkpoint stays intact and loadable, and `--resume` continues from it. Real actors, a real SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from actors.checkpoint import latest_checkpoint, step_dir_name
from pipeline.config import load_config
from pipeline.driver import train
from pipeline.errors import TrainingAborted

pytestmark = pytest.mark.integration


def _learner_pids() -> list[int]:
    """This test run's learner processes: Ray names them after the actor class ("ray::LearnerRank..."),
    and the local cluster's processes descend from this one."""
    mine = {p.pid for p in psutil.Process().children(recursive=True)}
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if p.pid in mine and p.info["cmdline"] and p.info["cmdline"][0].startswith("ray::LearnerRank")]


def test_learner_killed_during_checkpoint_write_stops_cleanly_and_resumes(ray_local, tmp_path: Path,
                                                                         tiny_reasoner_dir, tiny_listener_dir):
    run_dir = tmp_path / "run"
    cfg = load_config(None, [f"trainer.output_dir={run_dir}", "trainer.steps=4", "reward.drop_zero_variance=false",
                             f"model.reasoner={tiny_reasoner_dir}", f"model.listener={tiny_listener_dir}",
                             f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"])
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = train(cfg)
        except BaseException as exc:  # noqa: BLE001 - checked below
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    staging = run_dir / "checkpoints" / f".tmp-{step_dir_name(2)}"
    deadline = time.monotonic() + 600
    while not staging.exists() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert staging.exists(), "the run never began writing checkpoint 2"
    pids = _learner_pids()
    assert pids, "no learner process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    written_before_kill = (run_dir / "checkpoints" / step_dir_name(2)).exists()
    thread.join(timeout=300)
    error = box.get("error")
    assert isinstance(error, TrainingAborted), error
    assert "--resume" in str(error) and "\n" not in str(error)
    assert not written_before_kill, "the kill was meant to land during the write of checkpoint 2"
    latest = latest_checkpoint(run_dir / "checkpoints")
    assert latest is not None and latest.name == step_dir_name(1), "checkpoint 1 must be intact and the latest"
    assert train(cfg, resume=run_dir) == 0
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-3:] == [1, 2, 3]  # resumed at step 1 (after checkpoint 1) and ran to the end
    assert latest_checkpoint(run_dir / "checkpoints").name == step_dir_name(4)
