# Everything installs into .venv/ at the repo root.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL ?=
STAGES ?= 2
PORT ?= 9000
HTTP_PORT ?= 8000

.PHONY: venv demo serve test bench clean

$(BIN)/jamba: pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned, so nothing later can pull the CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# the client distribution (client/pyproject.toml), which the server's depends on
	$(BIN)/pip install -q -e ./client
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/jamba

venv: $(BIN)/jamba

demo: venv
	$(BIN)/python -m cluster.cli.demo --stages $(STAGES) --grpc-port $(PORT) $(if $(MODEL),--model $(MODEL))

# The service in the foreground, gRPC on PORT and the OpenAI API on HTTP_PORT:
#   make serve MODEL=/path/to/checkpoint STAGES=2 PORT=9000 HTTP_PORT=8000
serve: venv
	$(BIN)/jamba serve --model $(if $(MODEL),$(MODEL),demo) --stages $(STAGES) --grpc-port $(PORT) --http-port $(HTTP_PORT)

test: venv
	$(BIN)/python -m pytest -q --durations=25 tests

bench: venv
	$(BIN)/python bench/model_vs_hf.py

clean:
	rm -rf $(VENV) .jamba
