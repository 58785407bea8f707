"""E2E fixtures: a real `ray start --head` cluster on 127.0.0.1 with token auth, torn down on its own.

`ray stop` would stop every Ray process on the machine (including the session cluster of other tests),
so the head runs with `--block` in its own process session and is torn down by signalling that session.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests_e2e_helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RayHead:
    address: str  # job server, for `ray job submit --address`
    gcs_address: str
    env: dict[str, str]  # what a client needs: PATH with the venv, token auth
    process: subprocess.Popen


@pytest.fixture
def ray_head(tmp_path: Path):
    """A separate local Ray cluster (head only) with the job server bound to 127.0.0.1."""
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port, dash = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    process = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1",
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "8",
         # Every port free, not Ray's defaults: another cluster on this machine (the test session's own)
         # may hold those, and a head whose job agent cannot bind accepts no job.
         "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
         "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
         "--ray-client-server-port", str(free_port()),
         "--resources", '{"rollout": 8, "listener": 8, "learner": 8}', "--disable-usage-stats",
         "--temp-dir", temp_dir],
        # A `ray start --block` head drains for RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (30 s) on SIGTERM,
        # waiting for work to migrate to other nodes; a test head has none, so it stops at once.
        env={**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}, cwd=REPO,
        stdout=(tmp_path / "head.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # 401 without the token: the job server is up
            break
        except OSError as exc:
            if process.poll() is not None:
                raise RuntimeError((tmp_path / "head.log").read_text()[-3000:]) from exc
            time.sleep(1)
    else:
        raise RuntimeError("ray head did not start")
    yield RayHead(address=address, gcs_address=f"127.0.0.1:{port}", env=env, process=process)
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)
