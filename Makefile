# Two set-up commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
STAMP := .cache/install.stamp

.PHONY: install demo test test-cluster test-megatron lint bench clean

# torch first, pinned: on these machines 2.13.0 is a local CPU build; an unpinned torch pulls CUDA wheels.
# With the build backend already installed (setuptools >= 68) the editable install skips pip's isolated build
# environment (about 5 s of 16); otherwise, or if that fails, it takes the standard isolated build.
$(STAMP): pyproject.toml
	@mkdir -p .cache
	$(PYTHON) -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
		|| $(PIP) install -q torch==2.13.0
	$(PYTHON) -c "import setuptools, sys; sys.exit(0 if int(setuptools.__version__.split('.')[0]) >= 68 else 1)" \
		2>/dev/null && $(PIP) install -q --no-build-isolation -e '.[dev]' \
		|| $(PIP) install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(PYTHON) -m slime.embedded.demo

test: install
	$(PYTHON) -m pytest -q -m "not cluster"

# A real 3-node Ray cluster on this machine (ray start: head + 2 workers): roles placed per node, the suite through
# RAY_ADDRESS, a node lost mid-step (tests/cluster, docs/scaling.md). Minutes on 2 cores: a target of its own.
test-cluster: install
	$(PYTHON) -m pytest -q -m cluster tests/cluster

# Megatron-core backend tests on CPU over gloo (megatron-core 0.16.x is pure Python: ~3 MB wheel, ~17 MB
# installed, seconds to install; it needs no CUDA torch). The same tests run in `make test` once it is installed.
test-megatron: install
	$(PIP) install -q -e '.[megatron]'
	$(PYTHON) -m pytest -q -m megatron

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

bench: install
	$(PYTHON) benchmarks/run_all.py

clean:
	rm -rf .cache/install.stamp build *.egg-info
