#!/usr/bin/env bash
# `make test`: the unit tier, then the e2e, integration and GPU tiers, each on TEST_WORKERS (default 2)
# pytest-xdist workers, one test file per worker at a time (a module's fixtures run once).
#
# - The two tiny warm starts the later tiers use (two 300-step SFT runs, `python -m pipeline warm-starts`)
#   build from the start, into a temporary directory the later tiers read (TEST_WARM_STARTS). The build
#   holds DIR.lock, which the test fixture waits on (tests/conftest.py `tiny_sft_dirs`): the later tiers
#   start their files that do not need the warm starts meanwhile (built inside the tiers, they held up
#   every file that needs them).
# - A unit failure stops the run before the later tiers (and stops the build).
# - The later tiers keep the file order tests/conftest.py gives them (longest first); xdist would otherwise
#   reorder files by their number of tests.
# - pytest's exit code 5 (no tests ran) is a failure, not a pass.
# PYTEST_ARGS: extra pytest arguments for both tiers.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${VENV:-.venv}/bin/python"
# Each pytest worker's runs thread over their share of the cores, not all of them (pipeline/placement.py
# local_cores): the workers' runs overlap.
export LISTENER_GRPO_CORES="${LISTENER_GRPO_CORES:-$(( $(nproc) / ${TEST_WORKERS:-2} > 0 ? $(nproc) / ${TEST_WORKERS:-2} : 1 ))}"
XDIST=(-n "${TEST_WORKERS:-2}" --dist loadfile)
read -r -a EXTRA <<< "${PYTEST_ARGS:-}"

warm="$(cd "$(mktemp -d -t warm-starts.XXXXXX)" && pwd -P)"  # resolved: the build and the fixture lock DIR.lock
build=""
cleanup() {
  [[ -n "$build" ]] && kill "$build" 2>/dev/null
  rm -rf "$warm" "$warm.log" "$warm.lock"
}
trap cleanup EXIT

checked() {  # pytest's exit code, with 5 (no tests ran) made a failure
  local rc=$1
  if [[ $rc -eq 5 ]]; then echo "make test: no tests ran" >&2; return 1; fi
  return "$rc"
}

"$PY" -m pipeline warm-starts --out "$warm" > "$warm.log" 2>&1 &
build=$!
"$PY" -m pytest tests/unit "${XDIST[@]}" "${EXTRA[@]}"
checked $? || exit $?
TEST_WARM_STARTS="$warm" "$PY" -m pytest tests/e2e tests/integration tests/gpu "${XDIST[@]}" --no-loadscope-reorder \
  --durations=15 "${EXTRA[@]}"
checked $? || exit $?
if ! wait "$build"; then  # the fixture built them itself then; still, say so
  build=""
  echo "make test: building the warm starts failed:" >&2
  tail -n 40 "$warm.log" >&2
  exit 1
fi
build=""
