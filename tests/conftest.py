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


# The order the e2e/integration tier starts its files in under `make test` (2 pytest-xdist workers, one file
# per worker at a time, `--no-loadscope-reorder`: xdist's default reorders files by their number of tests,
# which started the learning run last). `make test` builds the warm starts (`tiny_sft_dirs`) while its unit
# tier runs, and that build goes on for a while into this tier (scripts/run_tests.sh): long files that do not
# need them first, then the learning run (the longest) and the other files that need them, longest first;
# the short files last, so no worker sits idle at the end while the other runs a long one. Durations under
# `make test` on Dec 3. Without xdist the order stays unit -> integration -> e2e.
SLOW_FIRST = ("integration/test_learner.py", "integration/test_listener_pool.py", "integration/test_weight_sync.py",
              "integration/test_listener_autoscale.py", "e2e/test_learning.py", "integration/test_faults.py", "e2e/test_train.py",
              "integration/test_staleness.py", "integration/test_faults_learner.py", "e2e/test_scale_listeners.py",
              "e2e/test_ray_job.py", "integration/test_evaluate.py", "integration/test_evaluate_hub_layouts.py",
              "integration/test_listener.py",
              "integration/test_tiny_checkpoint.py")


def pytest_collection_modifyitems(config, items) -> None:
    if not getattr(config.option, "numprocesses", None):
        return
    rank = {name: index for index, name in enumerate(SLOW_FIRST)}
    tests_dir = Path(__file__).parent
    items.sort(key=lambda item: rank.get(item.path.relative_to(tests_dir).as_posix(), len(rank)))  # stable


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
def tiny_sft_dirs(tmp_path_factory, request) -> dict[str, Path]:
    """The two warm starts, built once per test run on the session's Ray cluster, side by side
    (`pipeline.models.resolve_checkpoints`, as the driver builds them):

    - `reasoner`: the format warm start (`tiny://reasoner-sft`: make-tiny + `pipeline.sft` with the default
      settings). It writes the answer format, so rewards vary within groups and GRPO steps are taken (a random
      tiny reasoner's steps are all skipped).
    - `listener`: the informative listener (`tiny://listener-sft`: `pipeline.sft --role listener` with the
      default settings, docs/listener.md).

    Under pytest-xdist the workers share them: the first to get here builds them, the others wait for it
    (a file lock in the run's common temporary directory) and reuse them.

    TEST_WARM_STARTS names a directory to take them from: they are built there if missing and reused while
    built with today's default settings (`built_with_default_settings`). `make test` builds them into a fresh
    directory from its start (`python -m pipeline warm-starts`, which holds the same lock until it is done)
    and points TEST_WARM_STARTS at it (scripts/run_tests.sh); set it by hand to keep them between runs of
    plain pytest (a local edit-test loop)."""
    from filelock import FileLock

    from pipeline.models import resolve_checkpoints

    specs = {"reasoner": "tiny://reasoner-sft", "listener": "tiny://listener-sft"}
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: .../pytest-N/popen-gwK
    # Resolved, as `python -m pipeline warm-starts` resolves its --out: both lock the same DIR.lock.
    models = Path(os.environ["TEST_WARM_STARTS"]).resolve() if os.environ.get("TEST_WARM_STARTS") else \
        shared / "warm-starts"
    with FileLock(str(models) + ".lock"):
        request.getfixturevalue("ray_local")  # built on this worker's cluster (started here if not yet)
        return {role: Path(path) for role, path in resolve_checkpoints(specs, models).items()}


@pytest.fixture(scope="session")
def tiny_reasoner_sft_dir(tiny_sft_dirs: dict[str, Path]) -> Path:
    """The format warm start (see `tiny_sft_dirs`)."""
    return tiny_sft_dirs["reasoner"]


@pytest.fixture(scope="session")
def tiny_listener_sft_dir(tiny_sft_dirs: dict[str, Path]) -> Path:
    """The informative listener (see `tiny_sft_dirs`)."""
    return tiny_sft_dirs["listener"]


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster for the test run (logical CPUs and the pool's custom resource), its processes
    started with the environment the driver gives a local cluster (tcmalloc where installed)."""
    import ray

    from pipeline.placement import local_cluster_env, tcmalloc_path

    if not ray.is_initialized():
        os.environ.update(local_cluster_env(tcmalloc=tcmalloc_path()))
        ray.init(num_cpus=8, resources={"rollout": 8, "listener": 8, "learner": 8}, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with a sqlite store; `stop()`/`start()` simulate an outage."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()
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


class RayHead:
    """A separate `ray start --head --block` cluster on 127.0.0.1 with token auth (as Ray 2.60 clusters run),
    every port free (another cluster on this machine, e.g. the session's own, may hold Ray's defaults), torn
    down by signalling its own process session: `ray stop` would stop every Ray process on the machine."""

    def __init__(self, log: Path, num_cpus: int, resources: str) -> None:
        import secrets
        import subprocess
        import sys
        import tempfile

        venv_bin = str(Path(sys.executable).parent)
        self.env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        port, dash = _free_port(), _free_port()
        self.gcs_address = f"127.0.0.1:{port}"
        self.address = f"http://127.0.0.1:{dash}"  # job server, for `ray job submit --address`
        self.temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")  # Ray's socket paths must stay < 108 bytes
        self.log = log
        self.process = subprocess.Popen(
            ["ray", "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1",
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", str(num_cpus),
             "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
             "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
             "--ray-client-server-port", str(_free_port()),
             "--resources", resources, "--disable-usage-stats", "--temp-dir", self.temp_dir],
            # A `ray start --block` head drains for RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (30 s) on SIGTERM,
            # waiting for work to migrate to other nodes; a test head has none, so it stops at once.
            env={**self.env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}, cwd=Path(__file__).resolve().parents[1],
            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Until the job server answers (401 without the token still means it is up)."""
        import time
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{self.address}/api/version", timeout=2)
                return
            except urllib.error.HTTPError:
                return
            except OSError as exc:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ray head did not start: {self.log.read_text()[-3000:]}") from exc
                time.sleep(1)

    def stop(self) -> None:
        import shutil
        import signal
        import subprocess

        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def ray_head_factory(tmp_path: Path):
    """start(num_cpus, resources_json) -> a ready RayHead; every head started is stopped after the test."""
    heads: list[RayHead] = []

    def start(num_cpus: int = 8, resources: str = '{"rollout": 8, "listener": 8, "learner": 8}') -> RayHead:
        head = RayHead(tmp_path / f"head-{len(heads)}.log", num_cpus, resources)
        heads.append(head)
        head.wait_ready()
        return head

    yield start
    for head in heads:
        head.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
