# One venv for everything; `make run` and `make test` set it up on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast coverage bench

# pip writes the bytecode one file after another (half the install's time): compileall does it on every core;
# a few files are for other Python versions and do not compile, which pip ignores too
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --no-compile --progress-bar off -e '.[dev]'
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true
	$(BIN)/pip check
	touch $@

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/loomcfm run

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

# after each edit: every test that starts no Ray, runs no kfp.local pipeline and starts no loomcfm process
# (tests/cost.py keeps the markers honest); `make test` runs them all
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder -m "not ray and not kfp_local and not process"

# line and branch coverage of loomcfm_core over the whole suite: `coverage run` measures the pytest process and,
# through `patch = subprocess` (pyproject.toml), every Python process started under it from its first line (the
# xdist workers, which import the library before a plugin could start measuring them; loomcfm commands;
# kfp.local steps; Ray workers); the last lines it prints
coverage: $(STAMP)
	rm -rf .coverage-data && mkdir .coverage-data
	LOOMCFM_COVERAGE_DIR=$(CURDIR)/.coverage-data $(BIN)/coverage run -m pytest -n 2 --dist loadfile --no-loadscope-reorder
	LOOMCFM_COVERAGE_DIR=$(CURDIR)/.coverage-data $(BIN)/coverage combine --quiet
	LOOMCFM_COVERAGE_DIR=$(CURDIR)/.coverage-data $(BIN)/coverage report | tail -3

bench: $(STAMP)
	for b in data_loading coupling coupling_scale step_overhead quality gpu; do $(BIN)/python benchmarks/$$b.py || exit 1; done
