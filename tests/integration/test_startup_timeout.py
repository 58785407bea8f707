"""A run submitted to a cluster that can never hold it stops within `trainer.startup_timeout_s`, with one
line naming the missing resources (instead of waiting forever for its actors under `ray job submit`).

A real local Ray cluster (`ray start --head`) is started with `rollout` and `learner` units but no
`listener` unit (a KubeRay cluster whose listener group is missing, or misnamed); the real CLI joins it
through RAY_ADDRESS, exactly as under `ray job submit`.

    .venv/bin/python -m pytest tests/integration/test_startup_timeout.py -q
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from pipeline.config import load_config
from pipeline.placement import actor_bundles, missing_resources

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny_cpu.yaml"


def test_missing_resources_are_named_with_amounts():
    cfg = load_config(TINY)  # 1 rollout worker, 1 listener, 1 learner rank, 1 CPU each (the defaults)
    assert actor_bundles(cfg) == [{"CPU": 1.0, "rollout": 1.0}, {"CPU": 1.0, "listener": 1.0},
                                  {"CPU": 1.0, "learner": 1.0}]
    have = {"CPU": 4.0, "rollout": 1.0, "learner": 1.0}
    assert missing_resources(cfg, have) == {"listener": (1.0, 0.0)}
    assert missing_resources(cfg, {**have, "listener": 1.0}) == {}
    assert missing_resources(cfg, {"CPU": 2.0, "listener": 1.0, "rollout": 1.0, "learner": 1.0}) == {"CPU": (3.0, 2.0)}


def test_run_stops_with_one_line_naming_the_missing_resource(ray_head_factory, tmp_path,
                                                              tiny_reasoner_dir, tiny_listener_dir):
    # rollout and learner units, no listener unit: a KubeRay cluster whose listener group is missing
    head = ray_head_factory(num_cpus=4, resources='{"rollout": 1, "learner": 1}')
    env = {**head.env, "RAY_ADDRESS": head.gcs_address}
    command = [sys.executable, "-m", "pipeline", "train", "--config", str(TINY),
               f"trainer.output_dir={tmp_path / 'run'}", "trainer.startup_timeout_s=3",
               f"model.reasoner={tiny_reasoner_dir}", f"model.listener={tiny_listener_dir}",
               f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=240)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert errors == ["error: the Ray cluster did not provide the run's resources within 3 s "
                      "(trainer.startup_timeout_s): listener (needs 1, cluster has 0); check that a worker "
                      "group advertises each and can grow that far"], result.stderr[-3000:]
    assert time.monotonic() - started < 200  # it stopped, it did not wait for the actors
    assert not (tmp_path / "mlflow.db").exists()  # refused before any MLflow run was opened
