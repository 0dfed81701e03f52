# Two entry points, each doing its own set-up from scratch on a fresh machine:
#   make bench   - the benchmark suite (lowrank bench) on its built-in defaults
#   make test    - lint (ruff check, ruff format --check, clang-format over csrc/) + the test suite,
#                  twice: native and portable code paths
# Both create .venv, install torch==2.13.0 (the CPU build) and the other dependencies,
# and compile the C++ extension against that torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lowrank-installed
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)

CXX_SOURCES = $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.hpp')

.PHONY: install bench test lint format clean

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
	$(PY) -m ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

# Apply both formatters (what `make lint` checks).
format: $(STAMP)
	$(PY) -m ruff format .
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

# The suite runs twice: on the best instruction set this CPU has, then with the portable
# (non-SIMD) code paths forced, so the fallback every other CPU may take is tested too.
test: lint
	$(PY) -m pytest
	LOWRANK_CPU_CAPABILITY=default $(PY) -m pytest -q

clean:
	rm -rf build $(VENV) lowrank_kernels/*.so *.egg-info
