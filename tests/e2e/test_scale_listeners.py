"""`python -m pipeline scale-listeners` resizes the live listener pool of a running training job.

A real `ray start --head` cluster with room for two listeners (as a KubeRay listener group at its
maxReplicas), a training job joined to it (as `ray job submit` would run it), and the CLI run from another
process: the pool grows 1 -> 2; asked for 3, which the cluster cannot place, the CLI gives up within its
`--timeout` with one `error:` line naming the missing `listener` resource (it used to wait forever holding
the pool's resize lock); the scale-down to 1 that follows then works. Training continues throughout and every
listener request is answered exactly once. The reasoner is the format warm start, so every step is a
learning step (the pool is resized while the learner steps and syncs, as in a real run).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests_e2e_helpers import assert_every_step_learned

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e
# Long enough to outlast the resizes (a listener engine's start-up, then the refused growth's 10 s): 40 steps
# took 23 s once MLflow sent from its own thread, and the run ended while the growth to 3 was still waiting.
STEPS, PAIRS, GROUP = 120, 4, 8


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, "training ended before the pool was resized"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _scale(ray_head, replicas: int, *options: str, code: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "pipeline", "scale-listeners", "--address",
                             ray_head.gcs_address, "--replicas", str(replicas), *options],
                            capture_output=True, text=True, cwd=REPO, env=ray_head.env, timeout=300)
    assert result.returncode == code, result.stderr[-3000:]
    return result


def test_pool_grows_and_shrinks_during_training_without_losing_requests(ray_head_factory, tmp_path: Path,
                                                                        tiny_reasoner_sft_dir: Path,
                                                                        tiny_listener_dir: Path) -> None:
    ray_head = ray_head_factory(num_cpus=8, resources='{"rollout": 8, "listener": 2, "learner": 8}')
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "pipeline", "train", f"trainer.steps={STEPS}", f"trainer.output_dir={run_dir}",
               f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"data.pairs_per_step={PAIRS}",
               f"rollout.group_size={GROUP}", "rollout.max_new_tokens=128", "trainer.checkpoint_every=100",
               f"model.reasoner={tiny_reasoner_sft_dir}", f"model.listener={tiny_listener_dir}"]
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.gcs_address}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=(tmp_path / "train.log").open("w"))
    try:
        _wait_for(lambda: len(_rows(run_dir)) >= 1, process)
        assert "1 -> 2 workers" in _scale(ray_head, 2).stdout
        _wait_for(lambda: any(r["listener/ready_workers"] == 2 for r in _rows(run_dir)), process)
        start = time.monotonic()
        beyond = _scale(ray_head, 3, "--timeout", "10", code=1)  # no room for a third listener
        assert time.monotonic() - start < 10 + 60  # the timeout, plus joining the cluster
        errors = [line for line in beyond.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in beyond.stderr, beyond.stderr[-3000:]
        assert errors[0].startswith("error: asked for 3 listener workers, 2 serving: 1 of 1 new listener workers "
                                    "were not up within 10 s (the cluster lacks listener (needs 1, 0 free)")
        assert "2 -> 1 workers" in _scale(ray_head, 1, "--timeout", "120").stdout  # the lock was released
        assert process.wait(timeout=900) == 0, (tmp_path / "train.log").read_text()[-4000:]
    finally:
        if process.poll() is None:
            process.kill()
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == list(range(STEPS))
    assert max(r["listener/ready_workers"] for r in rows) == 2 and rows[-1]["listener/num_workers"] == 1
    assert all(r["listener/failed"] == 0 for r in rows)
    assert_every_step_learned(rows)
    # Each completion is scored once: the pool's answered count is exactly the completions sampled.
    assert rows[-1]["listener/completed"] == STEPS * PAIRS * GROUP
