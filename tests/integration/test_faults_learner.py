"""A learner rank killed while it writes a checkpoint: `python -m pipeline train` (its own local Ray cluster,
real actors, a real SIGKILL) exits with code 3 and one `error:` line that names `--resume`, its MLflow run is
FAILED, the previous checkpoint stays intact and loadable, a resumed run's rollout workers serve the restored
weights, and `--resume` continues from it into the same MLflow run. The reasoner is the format warm start, so
every step learns and the checkpoints hold trained weights. (Ctrl-C/SIGTERM -> exit 130 and KILLED:
tests/e2e/test_train.py::test_stop_after_a_checkpoint_then_resume_continues_step_and_data.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from actors.checkpoint import latest_checkpoint, step_dir_name
from pipeline.config import load_config
from pipeline.driver import _restore, train

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def _learners_of(root: int) -> list[psutil.Process]:
    """The learner processes of the run started as `root`: Ray names them after the actor class
    ("ray::LearnerRank..."), and the run's local Ray cluster descends from its driver."""
    found = []
    for process in psutil.Process(root).children(recursive=True):
        try:
            if process.cmdline() and process.cmdline()[0].startswith("ray::LearnerRank"):
                found.append(process)
        except psutil.Error:
            continue
    return found


def _greedy(ray, worker) -> tuple[list[list[int]], np.ndarray]:
    """Greedy tokens of 4 held-out pairs, and their logprobs (which move with any weight change)."""
    from pipeline.synthetic import synthetic_pairs

    groups = ray.get(worker.generate.remote(list(synthetic_pairs(7, 4)), 1, 40, 0.0))
    return ([g.completions[0].token_ids.tolist() for g in groups],
            np.concatenate([g.completions[0].logprobs for g in groups]))


def _same_policy(a, b) -> bool:
    return a[0] == b[0] and np.allclose(a[1], b[1], atol=1e-4)


def _resume_serves_the_restored_weights(ray, cfg, run_dir: Path) -> None:
    """What a resumed run does before its first step (`driver._restore`), checked against an engine that
    loaded the checkpoint's exported policy from disk: the same greedy tokens."""
    from actors.rollout import RolloutWorker
    from pipeline.placement import create_actors

    actors = create_actors(cfg, cfg.model.reasoner, cfg.model.listener)
    policy = latest_checkpoint(run_dir / "checkpoints") / "policy"
    fresh = ray.remote(RolloutWorker).options(num_cpus=1, resources={"rollout": 1}).remote(
        str(policy), cfg.rollout.engine, seed=0)
    try:
        before = _greedy(ray, actors.rollout[0])  # the warm start the workers loaded
        assert _restore(actors, cfg, run_dir)[0] == 1
        after = _greedy(ray, actors.rollout[0])
        assert _same_policy(after, _greedy(ray, fresh))
        assert not _same_policy(after, before), "the restored weights are not the warm start's"
        assert ray.get(actors.rollout[0].policy_version.remote()) == 1
    finally:
        ray.kill(fresh)
        actors.shutdown()


def test_learner_killed_during_checkpoint_write_exits_3_and_resumes(ray_local, tmp_path: Path,
                                                                    tiny_reasoner_sft_dir, tiny_listener_dir):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    overrides = [f"trainer.output_dir={run_dir}", "trainer.steps=4", "rollout.max_new_tokens=40",
                 "rollout.group_size=8",  # 4 x 4 from the peaked warm start can all tie: a skipped step
                 f"model.reasoner={tiny_reasoner_sft_dir}",
                 # fp32 engines on every machine: with `auto`, a CPU with bf16 units runs bf16, whose
                 # logprobs differ by up to 0.03 between two engines holding the same weights.
                 "rollout.engine.dtype=float32", "listener.engine.dtype=float32",
                 f"model.listener={tiny_listener_dir}",
                 f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    cfg = load_config(None, overrides)
    log = tmp_path / "train.log"  # a file, not a pipe: nothing reads stderr while the run goes on
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "train", *overrides], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=log.open("w"), env={**os.environ, "RAY_ADDRESS": ""})
    try:
        staging = run_dir / "checkpoints" / f".tmp-{step_dir_name(2)}"
        deadline = time.monotonic() + 600
        while not staging.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        assert staging.exists(), ("the run never began writing checkpoint 2", log.read_text()[-3000:])
        learners = _learners_of(process.pid)
        assert learners, "no learner process found"
        for learner in learners:
            learner.send_signal(signal.SIGKILL)
        written_before_kill = (run_dir / "checkpoints" / step_dir_name(2)).exists()
        process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    stderr = log.read_text()
    assert process.returncode == 3, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: an actor died ("), errors
    assert errors[0].endswith(f"the run stopped. Continue from the last complete checkpoint: "
                              f"python -m pipeline train --resume {run_dir.resolve()}")
    assert not written_before_kill, "the kill was meant to land during the write of checkpoint 2"
    latest = latest_checkpoint(run_dir / "checkpoints")
    assert latest is not None and latest.name == step_dir_name(1), "checkpoint 1 must be intact and the latest"
    client = MlflowClient(cfg.tracking.tracking_uri)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).info.status == "FAILED"
    _resume_serves_the_restored_weights(ray_local, cfg, run_dir)
    assert train(cfg, resume=run_dir) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows][-3:] == [1, 2, 3]  # resumed at step 1 (after checkpoint 1), ran to the end
    learned = [(row["step"], row.get("learn/skipped"), row.get("loss")) for row in rows if "loss" in row]
    assert learned and all(skipped == 0.0 and loss != 0.0 for _, skipped, loss in learned), learned
    assert latest_checkpoint(run_dir / "checkpoints").name == step_dir_name(4)
    assert (run_dir / "mlflow_run_id").read_text().strip() == run_id  # the same MLflow run, finished
    assert client.get_run(run_id).info.status == "FINISHED"
