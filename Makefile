# The two entry points for a fresh machine:
#   make reproduce   set up .venv and run the workflow (snakemake --cores all, embedded CPU default)
#   make test        set up .venv if missing and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export MORPHSERVE_DATA_MIRROR ?= $(abspath ../shared/data)
PYTEST_ARGS ?=

.PHONY: reproduce test venv clean-artifacts bench-compare bench-baseline

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

reproduce: venv
	$(BIN)/snakemake --cores all --rerun-incomplete

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean-artifacts:
	rm -rf results logs
	find artifacts -mindepth 1 ! -name README.md -exec rm -rf {} +

# Regression benchmarks (tests/bench): compare with the stored baseline of this machine class; fails when any
# benchmark's median is more than 25% slower.  Run on an otherwise idle machine.
BENCH_ARGS := tests/bench -p no:cacheprovider --benchmark-enable --benchmark-only --benchmark-storage=file://benchmarks/baseline

bench-compare: venv
	$(BIN)/python -m pytest $(BENCH_ARGS) --benchmark-compare --benchmark-compare-fail=median:25%

bench-baseline: venv
	$(BIN)/python -m pytest $(BENCH_ARGS) --benchmark-save=cpu
