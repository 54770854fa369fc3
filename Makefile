# kubetune — developer entry points. See README.md.
SHELL := /bin/bash
.DEFAULT_GOAL := help

UV_VERSION ?= 0.13.8
PYTHON ?= python3
STATE ?= .kubetune
# Keep the uv download cache outside the repo so a warm machine installs nothing anew.
export UV_CACHE_DIR ?= $(HOME)/.cache/uv
export UV_LINK_MODE ?= copy
# Precompile bytecode at install time: with PYTHONDONTWRITEBYTECODE set (as on
# these machines) every process would otherwise recompile torch/transformers/trl.
export UV_COMPILE_BYTECODE ?= 1
# uv from PyPI, run through the Python that installed it (no PATH or shim needed).
UV := $(PYTHON) -m uv
UV_DIR = $$($(PYTHON) -c 'import os, uv; print(os.path.dirname(uv.find_uv_bin()))')
VENV_PY := .venv/bin/python
PYTEST_ARGS ?=
# make bench: FineTuneJobs per scale-benchmark run (all of make bench took 3 min 37 s on 2 cores at 100; the full
# size is BENCH_JOBS=1000, about 5 min a mode) and the steady mode's rate per second.
BENCH_JOBS ?= 100
BENCH_RATE ?= 10
# pytest-xdist workers for make test, each taking whole test files (module fixtures stay on one).
TEST_WORKERS ?= 2

.PHONY: help setup tools crds test lint bench logs cluster-up cluster-down cluster-status demo clean
.PHONY: image-tools images test-images

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

setup: ## install Python deps from uv.lock into .venv (and uv itself if missing)
	@$(PYTHON) -c "import importlib.metadata as m, sys; sys.exit(m.version('uv') != '$(UV_VERSION)')" 2>/dev/null || \
	  $(PYTHON) -m pip install --quiet "uv==$(UV_VERSION)" || \
	  { echo "kubetune: error: could not install uv $(UV_VERSION) with '$(PYTHON) -m pip': install Python 3.11 with pip"; exit 1; }
	$(UV) sync --frozen --all-extras

# What `make test` needs built before pytest starts (kwok and kube-scheduler serve only bench/).
# kueue (tests/controlplane/test_kueue.py) is the slowest cold build: about 5 minutes on 2 cores.
TEST_TOOLS := etcd kube-apiserver kube-controller-manager kubectl helm versitygw kube-score kueue actionlint

tools: setup ## build the pinned Go binaries (etcd, kube-apiserver, kcm, kube-scheduler, kubectl, helm, versitygw, kwok, kube-score, kueue, actionlint) into ~/.cache/kubetune
	$(VENV_PY) -m kubetune_localenv build

crds: setup ## regenerate the CRD (crds/ and the chart's copy) and docs/api.md from the API models in api/kubetune_api
	$(VENV_PY) -m kubetune_api
	hack/sync-chart-crds.sh

lint: setup ## ruff + mypy --strict + the import contract (lint-imports) + generated files up to date
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	.venv/bin/lint-imports
	$(VENV_PY) -m kubetune_api --check

test: lint ## the test suite: lint, type check, import contract, then unit, API-server and end-to-end tests
	$(VENV_PY) -m kubetune_localenv build $(TEST_TOOLS)
	PATH="$(UV_DIR):$$PATH" $(VENV_PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

demo: setup ## the main job end to end: control plane, S3, node agent, operator, a tiny QLoRA fine-tune on CPU
	$(VENV_PY) -m kubetune_localenv.demo $(DEMO_ARGS)

bench: setup tools ## the benchmarks (figures and how they were taken: docs/benchmarks.md)
	$(VENV_PY) bench/bench_operator_scale.py --mode burst --jobs $(BENCH_JOBS)
	$(VENV_PY) bench/bench_operator_scale.py --mode steady --rate $(BENCH_RATE) --jobs $(BENCH_JOBS)
	$(VENV_PY) bench/bench_cpu_precision.py --steps 20
	$(VENV_PY) bench/bench_batching.py --steps 20
	$(VENV_PY) bench/bench_transfers.py --size-mb 512 --rounds 3

# make images: both images with buildah, no Docker engine, no registry (docs/images.md).
IMAGE_TOOLS := buildah crun mmdebstrap
image-tools: ## apt-get install what is missing of buildah, crun, mmdebstrap (make images, the node agent's OCI mode)
	@missing=$$(for p in $(IMAGE_TOOLS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "kubetune: apt-get install" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

images: image-tools ## build ghcr.io/kubetune/{operator,trainer}:<appVersion> into ~/.cache/kubetune/images (buildah, local Debian base)
	hack/build-images.sh

test-images: setup ## the image tests (tests/images: real images under crun through the node agent; needs make images)
	$(VENV_PY) -m kubetune_localenv build etcd kube-apiserver kube-controller-manager kubectl helm versitygw
	PATH="$(UV_DIR):$$PATH" $(VENV_PY) -m pytest -m images tests/images $(PYTEST_ARGS)

cluster-up: setup ## start etcd, kube-apiserver, kcm, S3 and the node agent on 127.0.0.1; writes $(STATE)/kubeconfig and $(STATE)/s3.env
	$(VENV_PY) -m kubetune_localenv up --state $(STATE)

cluster-down: ## stop everything cluster-up started
	@if [ -x $(VENV_PY) ]; then $(VENV_PY) -m kubetune_localenv down --state $(STATE); fi

LINES ?= 40
logs: ## container logs kept by the node agent: make logs [POD=tiny-chat] [STATE=.kubetune/demo] [LINES=40]
	@found=$$(find $(STATE) -path '*/nodes/*/pods/*' -name '*.log' 2>/dev/null | grep -F -- '$(POD)' | sort); \
	if [ -z "$$found" ]; then echo "kubetune: no container logs under $(STATE) matching '$(POD)'"; exit 1; fi; \
	for f in $$found; do echo "==> $$f <=="; tail -n $(LINES) "$$f"; echo; done

cluster-status: ## show what cluster-up runs
	$(VENV_PY) -m kubetune_localenv status --state $(STATE)

clean: cluster-down ## remove local state (not the caches)
	rm -rf $(STATE) .pytest_cache .mypy_cache .ruff_cache
