# Two commands do everything on a fresh machine:
#   make bench   installs what is missing, builds the package, runs benchmarks/bench_loss.py
#   make test    installs what is missing, builds the package, runs ruff and the test suite
# The virtual environment sees system packages, so a machine's own (CUDA) torch is used when it
# has one; only where torch is absent does it install torch==2.13.0 (the CPU wheel on this disk).
# ruff and triton are pinned to the releases the checks and the interpreter tests were written for.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lsr_fused-installed
BENCH_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install bench test lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py lsr_fused/_build_config.py $(shell find csrc -type f 2>/dev/null)
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install numpy pytest ruff==0.17.6 ninja matplotlib scikit-learn
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install triton==3.9.0
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $(STAMP)

bench: $(STAMP)
	$(PY) benchmarks/bench_loss.py $(BENCH_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf build *.egg-info lsr_fused/*.so $(VENV)
