"""Security checks that need no running system: what the code may load, run and expose, and what it logs.

- Weights come only from safetensors or from DeepSpeed checkpoints loaded with `weights_only=True`: every
  `torch.load` call passes `weights_only=True` literally, and nothing unpickles (pickle/dill/joblib/
  cloudpickle loads, `np.load(allow_pickle=True)`, `pandas.read_pickle`, unsafe `yaml.load`). The runtime
  guard for DeepSpeed's own loads is tested in tests/unit/test_weight_buckets.py.
- No checkpoint code runs unless the config asks: no call passes `trust_remote_code=True` literally, the
  config's default is False, and the vLLM arguments we build leave it at vLLM's default (False).
- No secrets in configs or MLflow params: configs/*.yaml hold no secret-like values, and the redaction
  `pipeline/tracking.py` applies to params, tags and the logged URI removes them (a real MLflow store:
  tests/integration/test_tracking_secrets.py).
- The local Ray dashboard and job server are bound to 127.0.0.1 or not started: the driver's local cluster
  has no dashboard, every other `ray.init` that starts a cluster turns it off, Ray's own default host is
  localhost, and every `ray start` in tests and docs passes `--dashboard-host 127.0.0.1`.
  (Containers run as non-root: tests/unit/test_docker.py::test_image_runs_as_non_root and
  tests/unit/test_deploy.py::test_every_container_runs_as_non_root.)
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import yaml

from pipeline.config import RunConfig, flatten_config, load_config
from pipeline.tracking import REDACTED, redact_params, redact_value, secret_key

REPO = Path(__file__).resolve().parents[2]
CODE_DIRS = ("pipeline", "actors", "bench", "scripts")
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def python_files() -> list[Path]:
    return sorted(path for name in CODE_DIRS for path in (REPO / name).rglob("*.py"))


# ---------------------------------------------------------------- an AST view of calls


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted origin, from the module's imports (`import torch as th`, `from pickle import loads`)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                names[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""
    return ".".join([aliases.get(node.id, node.id), *reversed(parts)])


def calls(source: str) -> list[tuple[str, ast.Call]]:
    """(dotted callee, call) for every call in `source`, import aliases resolved."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    return [(_dotted(node.func, aliases), node) for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value
        if keyword.arg is None and isinstance(keyword.value, ast.Dict):  # **{"name": value}
            for key, value in zip(keyword.value.keys, keyword.value.values):
                if isinstance(key, ast.Constant) and key.value == name:
                    return value
    return None


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


UNPICKLERS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "dill.load",
              "dill.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load", "pandas.read_pickle",
              "pd.read_pickle", "yaml.unsafe_load", "yaml.full_load", "torch.serialization.load", "shelve.open",
              "marshal.loads", "marshal.load"}


def unsafe_loads(source: str) -> list[str]:
    """Calls that could run code from a file: unpicklers, torch.load without weights_only=True, unsafe YAML."""
    found = []
    for name, call in calls(source):
        if name in UNPICKLERS:
            found.append(name)
        elif name == "torch.load" and not _is_true(_keyword(call, "weights_only")):
            found.append("torch.load without weights_only=True")
        elif name in ("numpy.load", "np.load") and _is_true(_keyword(call, "allow_pickle")):
            found.append("np.load(allow_pickle=True)")
        elif name == "yaml.load":
            loader = _keyword(call, "Loader") or (call.args[1] if len(call.args) > 1 else ast.Constant(""))
            if "Safe" not in ast.unparse(loader):
                found.append("yaml.load without a SafeLoader")
    return found


def remote_code(source: str) -> list[str]:
    return [name for name, call in calls(source) if _is_true(_keyword(call, "trust_remote_code"))]


@pytest.mark.parametrize("source, expected", [
    ("import torch\ntorch.load('x.pt')", ["torch.load without weights_only=True"]),
    ("import torch as th\nth.load('x.pt', weights_only=False)", ["torch.load without weights_only=True"]),
    ("from torch import load\nload('x.pt', map_location='cpu')", ["torch.load without weights_only=True"]),
    ("import torch\ntorch.load('x.pt', weights_only=True)", []),
    ("import pickle\npickle.loads(b'')", ["pickle.loads"]),
    ("from pickle import load as l\nl(open('f', 'rb'))", ["pickle.load"]),
    ("import numpy as np\nnp.load('a.npy', allow_pickle=True)", ["np.load(allow_pickle=True)"]),
    ("import numpy as np\nnp.load('a.npy')", []),
    ("import yaml\nyaml.load(s, Loader=yaml.Loader)", ["yaml.load without a SafeLoader"]),
    ("import yaml\nyaml.load(s, yaml.CSafeLoader)", []),
    ("import yaml\nyaml.safe_load(s)", []),
])
def test_the_unsafe_load_scanner_flags_what_it_should(source: str, expected: list[str]) -> None:
    assert unsafe_loads(source) == expected


@pytest.mark.parametrize("source, flagged", [
    ("from transformers import AutoModel\nAutoModel.from_pretrained(p, trust_remote_code=True)", True),
    ("from vllm import LLM\nLLM(model=p, **{'trust_remote_code': True})", True),
    ("from vllm import LLM\nLLM(model=p, trust_remote_code=cfg.trust_remote_code)", False),
    ("from vllm import LLM\nLLM(model=p)", False),
])
def test_the_remote_code_scanner_flags_what_it_should(source: str, flagged: bool) -> None:
    assert bool(remote_code(source)) is flagged


def test_code_loads_weights_only_from_safe_formats() -> None:
    found = {f"{path.relative_to(REPO)}: {what}" for path in python_files()
             for what in unsafe_loads(path.read_text())}
    assert found == set()


def test_torch_load_calls_exist_and_all_pass_weights_only() -> None:
    # The DeepSpeed checkpoint engine loads with torch.load: the scan above must actually see those calls.
    loads = [call for path in python_files() for name, call in calls(path.read_text()) if name == "torch.load"]
    assert loads and all(_is_true(_keyword(call, "weights_only")) for call in loads)


def test_no_code_passes_trust_remote_code_true() -> None:
    found = {f"{path.relative_to(REPO)}: {name}" for path in python_files() for name in remote_code(path.read_text())}
    assert found == set()


def test_remote_code_is_off_by_default_and_the_engine_arguments_leave_it_off() -> None:
    from actors.engine import engine_kwargs

    assert RunConfig().model.trust_remote_code is False
    assert all(load_config(path).model.trust_remote_code is False for path in CONFIGS)
    kwargs = engine_kwargs(RunConfig().rollout.engine, seed=0, max_images=2, mm_processor_kwargs=None)
    assert kwargs.get("trust_remote_code", False) is False


# ---------------------------------------------------------------- secrets


@pytest.mark.parametrize("key, secret", [
    ("tracking.auth_token", True), ("mlflow.password", True), ("aws.secret_access_key", True), ("api-key", True),
    ("HF_TOKEN", True), ("rollout.max_new_tokens", False), ("learner.micro_batch_tokens", False),
    ("tracking.tracking_uri", False), ("data.shuffle_buffer", False), ("keep_checkpoints", False),
])
def test_secret_keys_are_told_by_word_not_by_substring(key: str, secret: bool) -> None:
    assert secret_key(key) is secret


@pytest.mark.parametrize("value, leaked", [
    ("http://alice:hunter2@mlflow.internal:5000", "hunter2"),
    ("https://bob@mlflow.internal", "bob"),
    ("postgresql+psycopg2://mlflow:pa55word@db:5432/mlflow", "pa55word"),
    ("s3://bucket/x?X-Amz-Signature=deadbeef&X-Amz-Date=1", "deadbeef"),
    ("https://h/api?token=abc123&page=2", "abc123"),
    ("run-hf_AbCdEfGhIjKlMnOpQrStUvWx", "hf_AbCdEfGhIjKlMnOpQrStUvWx"),
    ("AKIAABCDEFGHIJKLMNOP", "AKIAABCDEFGHIJKLMNOP"),
    ("sk-proj-abcdefghijklmnopqrstuvwx", "abcdefghijklmnopqrstuvwx"),
])
def test_redaction_removes_credentials_from_values(value: str, leaked: str) -> None:
    redacted = redact_value(value)
    assert leaked not in redacted and REDACTED in redacted


@pytest.mark.parametrize("value", ["sqlite:///./mlflow.db", "http://127.0.0.1:5000", "file:///tmp/a@b/mlruns",
                                   "Qwen/Qwen2.5-VL-7B-Instruct", "tiny://reasoner", "runs/tiny", "user@example.com",
                                   "https://h/api?page=2&sort=asc", "https://h/?design=flat&keys_sorted=1", "0.5",
                                   ""])
def test_redaction_leaves_ordinary_values_alone(value: str) -> None:
    assert redact_value(value) == value


def test_secret_named_params_keep_their_key_but_not_their_value() -> None:
    assert redact_params({"auth_token": "t0k", "empty_password": "", "trainer.steps": "3"}) == \
        {"auth_token": REDACTED, "empty_password": "", "trainer.steps": "3"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_configs_hold_no_secrets(path: Path) -> None:
    """Credentials come from the environment (MLFLOW_TRACKING_*, HF_TOKEN, Kubernetes Secrets), never a config:
    no secret-named key carries a value and no value looks like a credential, in the file or resolved."""
    raw = yaml.safe_load(path.read_text()) or {}
    flat = {**_flatten(raw), **flatten_config(load_config(path))}
    assert {k: v for k, v in flat.items() if v and secret_key(k)} == {}
    assert {k: v for k, v in flat.items() if redact_value(v) != v} == {}


def _flatten(node: object, prefix: str = "") -> dict[str, str]:
    if isinstance(node, dict):
        return {k: v for name, child in node.items() for k, v in _flatten(child, f"{prefix}{name}.").items()}
    return {prefix.rstrip("."): str(node)}


# ---------------------------------------------------------------- the Ray dashboard and job server


# The driver's own `_connect_ray` on a real local cluster, in a fresh process (no other Ray in it): the
# cluster is started (not joined), Ray reports no web UI, and the dashboard process it keeps for its head
# modules serves no web UI or job API: its only listening port is Ray's Prometheus metrics exporter
# (ray.dashboard.consts.DASHBOARD_METRIC_PORT, read-only metrics, which Ray always starts).
DRIVER_CLUSTER = r"""
import json, os
import psutil, ray
from pipeline import driver
from pipeline.config import load_config
started = driver._connect_ray(load_config())
node = ray._private.worker.global_worker.node
listening = [f"{c.laddr.ip}:{c.laddr.port}" for kind, procs in node.all_processes.items() if kind == "dashboard"
             for info in procs for c in psutil.Process(info.process.pid).net_connections(kind="inet")
             if c.status == psutil.CONN_LISTEN]
from ray.dashboard.consts import DASHBOARD_METRIC_PORT
print("RESULT", json.dumps({"started": started, "webui_url": node.address_info.get("webui_url"),
                            "dashboard_listens_on": [a for a in listening
                                                     if not a.endswith(f":{DASHBOARD_METRIC_PORT}")]}))
ray.shutdown()
"""


def test_the_drivers_local_cluster_starts_no_dashboard() -> None:
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([sys.executable, "-c", DRIVER_CLUSTER], capture_output=True, text=True, cwd=REPO,
                            env=env, timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    assert json.loads(lines[0].removeprefix("RESULT ")) == {"started": True, "webui_url": "",
                                                            "dashboard_listens_on": []}


def _inside_ray_address_branch(tree: ast.AST, target: ast.Call) -> bool:
    """Whether `target` sits under an `if` that tests RAY_ADDRESS (it joins a cluster, starts none)."""
    return any(isinstance(node, ast.If) and "RAY_ADDRESS" in ast.unparse(node.test)
               and any(child is target for child in ast.walk(node)) for node in ast.walk(tree))


def test_every_ray_init_that_starts_a_cluster_turns_the_dashboard_off() -> None:
    offenders = []
    for path in python_files():
        tree = ast.parse(path.read_text())
        aliases = _aliases(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and _dotted(node.func, aliases) == "ray.init"):
                continue
            joins = _keyword(node, "address") is not None or _inside_ray_address_branch(tree, node)
            dashboard_off = isinstance(_keyword(node, "include_dashboard"), ast.Constant) and \
                _keyword(node, "include_dashboard").value is False
            if not (joins or dashboard_off):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_rays_own_default_dashboard_host_is_localhost() -> None:
    import ray

    # A bare `ray start --head` or `ray.init(include_dashboard=True)` binds locally too (Ray 2.60's default).
    assert inspect.signature(ray.init).parameters["dashboard_host"].default in ("127.0.0.1", "::1", "localhost")


def _ray_start_commands() -> list[tuple[str, str]]:
    """(file, command) for each `ray start` in the test fixtures (argument lists) and the docs (shell lines)."""
    found = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        for name, call in calls(path.read_text()):
            if call.args and isinstance(call.args[0], ast.List) and "'ray', 'start'" in ast.unparse(call.args[0]):
                found.append((str(path.relative_to(REPO)), " ".join(
                    str(e.value) for e in call.args[0].elts if isinstance(e, ast.Constant))))
    docs = [REPO / "README.md", *sorted((REPO / "deploy").rglob("*.md")), *sorted((REPO / "docs").rglob("*.md"))]
    for path in docs:
        for line in path.read_text().splitlines():
            if re.search(r"\bray start\b.*--head", line):
                found.append((str(path.relative_to(REPO)), line))
    return found


def test_every_local_ray_start_binds_the_dashboard_to_localhost() -> None:
    commands = _ray_start_commands()
    assert any(file == "tests/conftest.py" for file, _ in commands), "the tests' RayHead was not found"
    assert [(f, c) for f, c in commands if not re.search(r"--dashboard-host[ =]127\.0\.0\.1", c)] == []
