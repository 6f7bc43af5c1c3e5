# One venv for everything; `make run` and `make test` set it up on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test bench

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
	$(BIN)/python -m pytest

bench: $(STAMP)
	for b in data_loading coupling coupling_scale step_overhead quality gpu; do $(BIN)/python benchmarks/$$b.py || exit 1; done
