"""A run submitted to a cluster that can never hold it stops within `trainer.startup_timeout_s`, with one
line naming the missing resources (instead of waiting forever for its actors under `ray job submit`).

A real local Ray cluster (`ray start --head`) is started with `rollout` and `learner` units but no
`listener` unit (a KubeRay cluster whose listener group is missing, or misnamed); the real CLI joins it
through RAY_ADDRESS, exactly as under `ray job submit`.

    .venv/bin/python -m pytest tests/integration/test_startup_timeout.py -q
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.placement import actor_bundles, missing_resources

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny_cpu.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_missing_resources_are_named_with_amounts():
    cfg = load_config(TINY)  # 1 rollout worker, 1 listener, 1 learner rank, 1 CPU each (the defaults)
    assert actor_bundles(cfg) == [{"CPU": 1.0, "rollout": 1.0}, {"CPU": 1.0, "listener": 1.0},
                                  {"CPU": 1.0, "learner": 1.0}]
    have = {"CPU": 4.0, "rollout": 1.0, "learner": 1.0}
    assert missing_resources(cfg, have) == {"listener": (1.0, 0.0)}
    assert missing_resources(cfg, {**have, "listener": 1.0}) == {}
    assert missing_resources(cfg, {"CPU": 2.0, "listener": 1.0, "rollout": 1.0, "learner": 1.0}) == {"CPU": (3.0, 2.0)}


@pytest.fixture
def cluster_without_listeners(tmp_path):
    """A `ray start --head` cluster (token auth, as Ray 2.60 clusters run) with rollout and learner units
    and no listener unit; yields (GCS address, env for its drivers)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    port, dash = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayst-", dir="/tmp")  # Ray's socket paths must stay < 108 bytes
    ports = [flag for name in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                               "--runtime-env-agent-port", "--metrics-export-port", "--ray-client-server-port")
             for flag in (name, str(_free_port()))]
    process = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1",
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "4", *ports,
         "--resources", '{"rollout": 1, "learner": 1}', "--disable-usage-stats", "--temp-dir", temp_dir],
        env=env, cwd=ROOT, stdout=(tmp_path / "head.log").open("w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # 401 without the token: the head is up
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, \
                    (tmp_path / "head.log").read_text()[-3000:]
                time.sleep(1)
        yield f"127.0.0.1:{port}", env
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_run_stops_with_one_line_naming_the_missing_resource(cluster_without_listeners, tmp_path,
                                                              tiny_reasoner_dir, tiny_listener_dir):
    address, env = cluster_without_listeners
    env = {**env, "RAY_ADDRESS": address}
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
