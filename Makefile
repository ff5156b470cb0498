# One-command set-up: `make test` builds .venv with Python >= 3.12, installs the
# project with its test extra and runs the suite. Re-running is fast: the venv is
# rebuilt only when pyproject.toml changes. (--no-compile: Python byte-compiles the
# modules the suite imports on first use instead of pip compiling all of transformers,
# jax, ... up front: half the install time.)
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# First Python >= 3.12 found: python3.12/3.13 on PATH, pyenv's, then python3.
FIND_PYTHON := for p in python3.12 python3.13 /root/.pyenv/versions/3.12.1/bin/python \
	$$HOME/.pyenv/versions/3.12.1/bin/python python3; do \
	  if command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; \
	  then command -v $$p; break; fi; done
# Two workers; tests/conftest.py groups the tests (one file per worker, but the files of
# independent kernel tests) and puts the slow ones first, in the order xdist must keep.
# Compiled programs persist in ~/.cache/jaxattn/jax-compile (jaxattn/compile_cache.py).
PYTEST_ARGS ?= -n 2 --dist loadgroup --no-loadscope-reorder

.PHONY: test install serve gpu clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@base=$$($(FIND_PYTHON)); \
	if [ -z "$$base" ]; then echo "error: jaxattn needs Python >= 3.12 (jax 0.11.2); none found." \
	  "Install one (e.g. pyenv install 3.12) and re-run." >&2; exit 1; fi; \
	echo "using $$base"; \
	[ -x $(PY) ] || $$base -m venv $(VENV); \
	$(PY) -m pip install -q --upgrade pip && \
	$(PY) -m pip install -q --no-compile -e '.[test]'
	@touch $@

test: install
	$(PY) -m pytest $(PYTEST_ARGS) tests

serve: install
	$(PY) -m jaxattn.serve

clean:
	rm -rf $(VENV) build *.egg-info

# On a Hopper GPU machine (the image provides jax[cuda]); see benchmarks/gpu.sh.
gpu:
	bash benchmarks/gpu.sh all
