# Two commands do everything on a fresh machine:
#   make bench   installs what the benchmark needs, builds the package, runs benchmarks/bench_loss.py
#   make test    installs what the tests need as well, builds the package, runs ruff and the tests
# The virtual environment sees system packages, so a machine's own (CUDA) torch is used when it
# has one; only where torch is absent does it install torch==2.13.0 (the CPU wheel on this disk).
# ruff and triton are pinned to the releases the checks and the interpreter tests were written for.
# The benchmark writes to benchmarks/results/ (ignored by git): a run changes no tracked file.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lsr_fused-installed
TEST_STAMP := $(VENV)/.lsr_fused-test-installed
BENCH_ARGS ?=
PYTEST_ARGS ?=

# What the package and its benchmark need (ninja builds the C++ extension, matplotlib the plot).
BENCH_PACKAGES := numpy ninja matplotlib
# What only the checks and tests need (scikit-learn: the example's smoke test; transformers and
# accelerate: lsr_fused.integrations.transformers against the stock Trainer).
TEST_PACKAGES := pytest ruff==0.17.6 scikit-learn transformers accelerate

.PHONY: install bench test lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py lsr_fused/_build_config.py $(shell find csrc -type f 2>/dev/null)
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install $(BENCH_PACKAGES)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install $(TEST_PACKAGES)
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install triton==3.9.0
	touch $(TEST_STAMP)

bench: $(STAMP)
	$(PY) benchmarks/bench_loss.py $(BENCH_ARGS)

lint: $(TEST_STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

format: $(TEST_STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf build *.egg-info lsr_fused/*.so $(VENV)
