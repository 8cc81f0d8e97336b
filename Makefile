# dan-layers developer commands. Everything installs into .venv; nothing global.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of torch: an exact pin, so pip takes the local CPU wheel instead of
# a multi-GB CUDA build. The package itself only asks for torch>=2.1.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# the demo needs the package and the examples extra only (no test, export or docs tools)
DEMO_STAMP := $(VENV)/.installed-examples
PYTEST_ARGS ?=
# The suite on every core, one test module per worker (module fixtures built once);
# PYTEST_PARALLEL= runs it in one process.
PYTEST_PARALLEL ?= -n auto --dist loadscope

.PHONY: help venv install test test-fast demo docs bench wheel lint clean

help:
	@echo "make test   - create .venv, install, run the whole test suite"
	@echo "make demo   - train + evaluate DAN on the built-in synthetic faces (replaces runs/demo/)"
	@echo "make docs   - build the documentation site with mkdocs --strict (site/)"
	@echo "make bench  - run the CPU benchmarks (benchmarks/results/)"
	@echo "make wheel  - build the wheel into dist/"
	@echo "make lint   - ruff + mypy on the library"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml dan_layers/__init__.py | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[test,examples,export,docs]"
	@touch $(STAMP) $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml dan_layers/__init__.py | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[examples]"
	@touch $(DEMO_STAMP)

venv install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests dan_layers examples $(PYTEST_PARALLEL) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest tests dan_layers -m "not slow" $(PYTEST_PARALLEL) $(PYTEST_ARGS)

demo: $(DEMO_STAMP)
	$(PY) examples/train_dan.py --preset demo --out runs/demo --overwrite

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --clean

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

wheel: $(STAMP)
	$(PIP) install --quiet build
	$(PY) -m build --wheel --outdir dist .

lint: $(STAMP)
	$(PIP) install --quiet ruff mypy
	$(PY) -m ruff check dan_layers
	$(PY) -m mypy dan_layers --ignore-missing-imports

clean:
	rm -rf $(VENV) build dist site .pytest_cache .hypothesis runs
