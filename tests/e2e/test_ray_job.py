"""`ray job submit` against a real `ray start --head` cluster: the same training runs as a Ray job.

This is the documented cluster path (README, deploy/README.md) on a local head bound to 127.0.0.1 with
Ray's token authentication, as KubeRay clusters run it. The reasoner is the format warm start, so the job
takes real learning steps.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests_e2e_helpers import LEARNING, assert_every_step_learned, changed_tensors, metric_steps, train_rows

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def test_ray_job_submit_trains_and_logs_to_mlflow(ray_head, tmp_path: Path, tiny_reasoner_sft_dir: Path,
                                                   tiny_listener_dir: Path) -> None:
    from actors.checkpoint import latest_checkpoint

    run_dir = tmp_path / "run"
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    command = ["ray", "job", "submit", "--address", ray_head.address, "--working-dir", str(REPO), "--",
               "python", "-m", "pipeline", "train", "trainer.steps=2", f"trainer.output_dir={run_dir}",
               f"tracking.tracking_uri={tracking}", "tracking.run_name=ray-job",
               f"model.reasoner={tiny_reasoner_sft_dir}", f"model.listener={tiny_listener_dir}", *LEARNING]
    for _ in range(24):  # a fresh head answers "No available agent" until its job agent has registered
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=ray_head.env,
                                timeout=1200)
        if "No available agent" not in result.stdout + result.stderr:
            break
        time.sleep(5)
    assert result.returncode == 0, (result.stdout[-5000:], result.stderr[-3000:])
    assert "succeeded" in result.stdout
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    steps = metric_steps(tracking, run_id)
    assert {key: value for key, value in steps.items() if value != [0, 1]} == {}
    assert_every_step_learned(train_rows(run_dir))
    assert changed_tensors(tiny_reasoner_sft_dir, latest_checkpoint(run_dir / "checkpoints") / "policy")
