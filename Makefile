# The two commands of the README quickstart: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
TEST_WORKERS ?= 2

.PHONY: setup test test-fast demo bench bench-setup clean

setup:
	@bash scripts/setup_venv.sh

# Unit tests first (a unit failure shows within a minute and stops there) while the warm starts build, then
# the e2e, integration and GPU tiers; both on TEST_WORKERS pytest-xdist workers (scripts/run_tests.sh).
test: setup
	@VENV=$(VENV) TEST_WORKERS=$(TEST_WORKERS) PYTEST_ARGS="$(PYTEST_ARGS)" bash scripts/run_tests.sh

test-fast: setup
	@$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# The demo starts from the warm starts and the informative listener (configs/demo_cpu.yaml).
demo: setup
	@$(PY) -m pipeline train --config configs/demo_cpu.yaml

bench: bench-setup
	@$(PY) -m bench

# TRL for bench.e2e's single-process reference (the `bench` extra): pinned, --no-deps, so no runtime package
# changes (its requirements are already in requirements/cpu.lock).
bench-setup: setup
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps --require-hashes -r requirements/bench.lock

clean:
	rm -rf runs .pytest_cache .hypothesis
