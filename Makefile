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
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h)

CXX_SOURCES = $(shell find csrc examples -name '*.cpp' -o -name '*.h' -o -name '*.hpp')

.PHONY: install bench test lint format clean wheel test-oldest gpu-check

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
	LOWRANK_CPU_CAPABILITY=default $(PY) -m pytest -q -m "not slow"

clean:
	rm -rf build dist $(VENV) lowrank_kernels/*.so lowrank_kernels/lib *.egg-info

# The wheel, built against the torch in .venv with portable CPU flags, into dist/.
wheel: $(STAMP)
	LOWRANK_CPU_ARCH=generic $(PY) -m pip wheel --no-build-isolation --no-deps -w dist .

# The test suite against the oldest supported torch (2.11, the CUDA build from the index: about
# 3 GB; it runs without a GPU), in its own virtualenv. The source is copied into
# $(OLDEST_VENV)/src so that its in-place build does not replace the one .venv uses.
OLDEST_VENV ?= .venv-oldest
OLDEST_TORCH ?= torch==2.11.*
test-oldest:
	test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install --quiet --upgrade pip wheel ninja
# numpy < 2.4: the Triton interpreter of triton 3.6 (torch 2.11's) fails on numpy 2.4 in the CPU
# tests of the Triton kernels (int() of a 1-element array); on a GPU the interpreter is not used.
	$(OLDEST_VENV)/bin/python -m pip install --quiet "$(OLDEST_TORCH)" "numpy<2.4"
# the virtualenv's own setuptools where it has one (65 on Python 3.11); torch 2.11 wants < 82
	$(OLDEST_VENV)/bin/python -m pip install --quiet "setuptools>=64,<82"
	rm -rf $(OLDEST_VENV)/src && mkdir -p $(OLDEST_VENV)/src
	tar -c --exclude='./.venv*' --exclude=./.git --exclude=./build --exclude=./dist --exclude='*.so' \
		--exclude=__pycache__ --exclude='*.egg-info' --exclude=./gpu-check-out . | tar -x -C $(OLDEST_VENV)/src
	cd $(OLDEST_VENV)/src && ../bin/python -m pip install --quiet --no-build-isolation -e ".[all]"
	cd $(OLDEST_VENV)/src && ../bin/python -c "import torch; print('torch', torch.__version__)" && ../bin/python -m pytest

# On a CUDA machine with torch and triton installed (no network needed): build in place, GPU tests,
# Triton compile check, GPU benchmarks; results in gpu-check-out/ (see docs/deployment.md).
gpu-check:
	PYTHON=$(PYTHON) bash tools/gpu_check.sh gpu-check-out
