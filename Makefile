# Two entry points, each doing its own set-up from scratch on a fresh machine:
#   make bench   - the benchmark suite (lowrank bench) on its built-in defaults
#   make test    - ruff + the test suite
# Both create .venv, install torch==2.13.0 (the CPU build) and the other dependencies,
# and compile the C++ extension against that torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lowrank-installed
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h)

.PHONY: install bench test lint clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel ninja
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet --no-build-isolation -e ".[all]"
	touch $(STAMP)

bench: $(STAMP)
	$(VENV)/bin/lowrank bench

lint: $(STAMP)
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest

clean:
	rm -rf build dist $(VENV) lowrank_kernels/*.so lowrank_kernels/lib *.egg-info
