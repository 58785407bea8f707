# The two commands of the README quickstart: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo bench clean

setup:
	@bash scripts/setup_venv.sh

# Unit tests first (a unit failure shows within a minute and stops there), then the e2e, integration and
# GPU tiers; both on TEST_WORKERS pytest-xdist workers, one test file per worker at a time (a module's
# fixtures run once). The second tier keeps the order tests/conftest.py gives its files (longest first;
# xdist would otherwise reorder files by their number of tests). pytest exit code 5 means no tests ran:
# a failure, not a pass.
TEST_WORKERS ?= 2
XDIST = -n $(TEST_WORKERS) --dist loadfile
test: setup
	@$(PY) -m pytest tests/unit $(XDIST) $(PYTEST_ARGS) && \
	$(PY) -m pytest tests/e2e tests/integration tests/gpu $(XDIST) --no-loadscope-reorder --durations=15 $(PYTEST_ARGS); \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "make test: no tests ran" >&2; exit 1; fi; exit $$rc

test-fast: setup
	@$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# The demo starts from the warm starts and the informative listener (configs/demo_cpu.yaml).
demo: setup
	@$(PY) -m pipeline train --config configs/demo_cpu.yaml

bench: setup
	@$(PY) -m bench

clean:
	rm -rf runs .pytest_cache .hypothesis
