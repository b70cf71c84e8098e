# `make run`: set up .venv (reused if present), then the main job.
# `make test`: set up .venv with the test extra, then the whole suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

# llama-cpp-python compiles llama.cpp from source. Build only what PocketLM calls: the llama and
# ggml libraries, not the multimodal (mtmd/llava) library. Native CPU flags stay on; Apple
# builds get Metal by themselves; `make setup GPU=cuda` (or your own CMAKE_ARGS) adds CUDA.
GPU ?=
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF $(if $(filter cuda,$(GPU)),-DGGML_CUDA=ON) $(if $(filter metal,$(GPU)),-DGGML_METAL=ON)
export CMAKE_ARGS := $(LLAMA_CMAKE_ARGS) $(CMAKE_ARGS)
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 2)

.PHONY: run test lint format bench fidelity setup setup-test clean

run: $(VENV)/.installed
	$(PY) -m pocketlm.cli.demo $(MODEL)

test: $(VENV)/.installed-test
	$(PY) -m pytest -q $(PYTEST_ARGS)

# ruff, configured in pyproject.toml: `make lint` checks, `make format` rewrites.
lint: $(VENV)/.installed-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.installed-test
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# Speed/memory and fidelity figures (benchmarks/README.md is regenerated from the results).
# On an idle machine: `make bench` takes 30-60 minutes, `make fidelity` about 10.
bench: $(VENV)/.installed-bench
	$(PY) benchmarks/convert_bench.py
	$(PY) benchmarks/speed_bench.py $(BENCH_ARGS)
	$(PY) benchmarks/ray_bench.py $(BENCH_ARGS)

fidelity: $(VENV)/.installed-bench
	$(PY) benchmarks/fidelity_bench.py $(BENCH_ARGS)

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# llama-cpp-python compiles from source (~3 min on 2 cores): done once per venv, and pip's
# wheel cache makes a rebuilt venv fast. Stamps re-run the install only when pyproject changes.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -e .
	touch $@

# The network fault tests also run against the lowest huggingface_hub pyproject allows.
HUB_MIN := $(shell sed -n 's/.*"huggingface_hub>=\([0-9.]*\),.*/\1/p' pyproject.toml)

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PIP) install -e '.[test]'
	rm -rf $(VENV)/hub-min
	$(PIP) install --no-deps --target $(VENV)/hub-min 'huggingface_hub==$(HUB_MIN)'
	touch $(VENV)/.installed $@

$(VENV)/.installed-bench: pyproject.toml | $(PY)
	$(PIP) install -e '.[bench]'
	touch $(VENV)/.installed $@

clean:
	rm -rf $(VENV) build *.egg-info
