"""The CLI refuses what it cannot run with one line, exit code 2 and no traceback (issue 10, bad configuration).

- More GPUs than the cluster has: `python -m pipeline train rollout.num_gpus=1` on a machine without GPUs
  starts its local Ray cluster, finds no GPU in it (`placement.check_cluster_fits`) and stops before any
  actor or MLflow run is created.
- A missing model path: refused before Ray starts.
(Unknown keys, wrong types and negative sizes: tests/unit/test_config.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def _train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": "", "CUDA_VISIBLE_DEVICES": ""}  # a local cluster, no GPU even on a GPU box
    command = [sys.executable, "-m", "pipeline", "train", f"trainer.output_dir={tmp_path / 'run'}", "trainer.steps=1",
               f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", *overrides]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=180)


def _fake_checkpoint(tmp_path: Path) -> Path:
    """Enough for the path check (a config.json): the run is refused before any engine would load it."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    return ckpt


def _assert_one_line_refusal(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert all(text in lines[0] for text in expected), lines[0]
    assert "Traceback" not in result.stderr


def test_more_gpus_than_the_cluster_has_is_one_line_and_exit_2(tmp_path: Path) -> None:
    ckpt = _fake_checkpoint(tmp_path)
    result = _train(tmp_path, "rollout.num_gpus=1", f"model.reasoner={ckpt}", f"model.listener={ckpt}")
    _assert_one_line_refusal(result, "needs 1 GPU", "Ray cluster has 0")
    assert not (tmp_path / "run" / "mlflow_run_id").exists()  # refused before any MLflow run was made


def test_a_missing_model_path_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = _train(tmp_path, f"model.reasoner={tmp_path / 'no-such-checkpoint'}")
    _assert_one_line_refusal(result, "model.reasoner", "no-such-checkpoint")
