"""Shared fixtures: the tiny offline checkpoints, built once per test run, and an offline environment."""

from __future__ import annotations

import os

# No hub or network at test time; CPU-only engines with the measured-good settings (docs/design.md).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_reasoner_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-VL reasoner checkpoint (seed 0), built once per test run."""
    from pipeline.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "reasoner", role="reasoner")


@pytest.fixture(scope="session")
def tiny_listener_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-VL listener checkpoint (seed 1), built once per test run."""
    from pipeline.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "listener", role="listener")


@pytest.fixture(scope="session")
def tiny_reasoner_sft_dir(tmp_path_factory, request) -> Path:
    """The format warm start (`tiny://reasoner-sft`: make-tiny + `pipeline.sft` with the default settings),
    built once per test run on the session's Ray cluster. A reasoner that writes the answer format, so
    rewards vary within groups and GRPO steps are taken (a random tiny reasoner's steps are all skipped).

    TEST_TINY_SFT_DIR names one already built by this code (a local edit-test loop; CI builds it)."""
    from pipeline.models import built_with_default_settings, resolve_checkpoint

    prebuilt = os.environ.get("TEST_TINY_SFT_DIR")
    if prebuilt:
        assert built_with_default_settings(Path(prebuilt)), f"TEST_TINY_SFT_DIR={prebuilt} is not a current warm start"
        return Path(prebuilt)
    request.getfixturevalue("ray_local")  # built on the session's cluster (started here if not yet)
    return Path(resolve_checkpoint("tiny://reasoner-sft", "model.reasoner", tmp_path_factory.mktemp("models")))


@pytest.fixture(scope="session")
def tiny_listener_sft_dir(tmp_path_factory, request) -> Path:
    """The informative listener (`tiny://listener-sft`: make-tiny + `pipeline.sft --role listener` with the
    default settings, docs/listener.md), built once per test run on the session's Ray cluster."""
    from pipeline.models import resolve_checkpoint

    request.getfixturevalue("ray_local")
    return Path(resolve_checkpoint("tiny://listener-sft", "model.listener", tmp_path_factory.mktemp("models")))


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster for the test run (logical CPUs and the pool's custom resource)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, resources={"rollout": 8, "listener": 8, "learner": 8}, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with a sqlite store; `stop()`/`start()` simulate an outage."""

    def __init__(self, root: Path) -> None:
        import socket

        self.root = root
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self, timeout_s: float = 90.0) -> None:
        import subprocess
        import sys
        import time
        import urllib.request

        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
             "--artifacts-destination", str(self.root / "artifacts")],
            env=env, stdout=subprocess.DEVNULL, stderr=(self.root / "server.log").open("a"),
            start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not become ready")

    def stop(self) -> None:
        import signal

        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        self.process = None


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow tracking server for one test."""
    server = MlflowServer(tmp_path)
    server.start()
    yield server
    server.stop()
