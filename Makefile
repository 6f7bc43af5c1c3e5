# One venv for everything; `make run` and `make test` set it up on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast coverage bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --progress-bar off -e '.[dev]'
	$(BIN)/pip check
	touch $@

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/loomcfm run

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

# after each edit: every test that starts no Ray and runs no kfp.local pipeline (tests/cost.py keeps the
# markers honest); `make test` runs them all
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder -m "not ray and not kfp_local"

# line and branch coverage of loomcfm_core over the whole suite (subprocesses included): the last lines it prints
coverage: $(STAMP)
	rm -rf .coverage-data && mkdir .coverage-data
	LOOMCFM_COVERAGE_DIR=$(CURDIR)/.coverage-data $(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder --cov --cov-report=
	-LOOMCFM_COVERAGE_DIR=$(CURDIR)/.coverage-data $(BIN)/coverage combine --quiet  # pytest-cov has combined the workers already
	LOOMCFM_COVERAGE_DIR=$(CURDIR)/.coverage-data $(BIN)/coverage report | tail -3

bench: $(STAMP)
	for b in data_loading coupling coupling_scale step_overhead quality gpu; do $(BIN)/python benchmarks/$$b.py || exit 1; done
