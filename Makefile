# Everything installs into .venv/ at the repo root.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL ?=

.PHONY: venv demo test bench clean

$(BIN)/jamba: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned, so nothing later can pull the CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/jamba

venv: $(BIN)/jamba

demo: venv
	$(BIN)/python -m cluster.demo $(if $(MODEL),--model $(MODEL))

test: venv
	$(BIN)/python -m pytest -q tests

bench: venv
	$(BIN)/python bench/model_vs_hf.py

clean:
	rm -rf $(VENV) .jamba
