# Orchardist developer targets. `make` alone lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
LOCK_ARGS ?=

.PHONY: help venv lock system-deps kubebins image runtimes test-deps test unit lint crds bench demo demo-in-cluster clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

# The venv holds exactly the locked versions (requirements/*.txt, exported from uv.lock): the
# stamp is older than the lock whenever the lock changes, so the next target that needs the venv
# reinstalls. Build backend first, then the project itself without resolving anything.
LOCKED := uv.lock requirements/build.txt requirements/dev.txt
STAMP := $(VENV)/.orchardist-locked
PIP := $(BIN)/python -m pip install -q

$(STAMP): pyproject.toml $(LOCKED)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --require-hashes -r requirements/build.txt
	$(PIP) --require-hashes -r requirements/dev.txt
	$(PIP) --no-deps --no-build-isolation -e .
	@touch $@

$(VENV)/.orchardist-bench: $(STAMP) requirements/bench.txt
	$(PIP) --require-hashes -r requirements/bench.txt
	@touch $@

venv: $(STAMP) ## create .venv with orchardist (editable) and the dev tools, at the locked versions

lock: venv ## re-resolve uv.lock from pyproject.toml, re-export requirements/ (LOCK_ARGS=--upgrade: newest)
	UV=$(BIN)/uv bash hack/lock.sh write $(LOCK_ARGS)

system-deps: ## install the Debian packages the tests and the demo use (registry, openssl)
	bash hack/install-system-deps.sh

kubebins: ## build etcd, kube-apiserver, kube-controller-manager, kubectl, helm (cached by version)
	bash hack/build-kubebins.sh

image: venv system-deps ## build the operator image (OCI layout) without a container engine, cached by its inputs
	bash hack/build-image.sh

runtimes: venv ## install the engine runtimes the tests start (mlx-lm, vLLM CPU), cached by version
	bash hack/install-runtimes.sh mlx-lm vllm

test-deps: venv system-deps kubebins runtimes image
	bash hack/build-kubebins.sh --node >/dev/null

test: test-deps lint ## install what the tests need, lint, then run every test tier
	ORCHARDIST_KUBEBINS="$$(bash hack/build-kubebins.sh 2>/dev/null)" \
	  $(BIN)/pytest tests $(PYTEST_ARGS)

unit: venv ## the fast pure tests only
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

lint: venv ## ruff + mypy (strict) + import layers + the CRD and lock drift checks
	UV=$(BIN)/uv bash hack/lock.sh check
	$(BIN)/ruff check operator agent tests
	$(BIN)/ruff format --check operator agent tests
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/orchardist crds --check

crds: venv ## regenerate crds/ from the API types
	$(BIN)/orchardist crds --write

bench: test-deps $(VENV)/.orchardist-bench ## benchmarks, ratios measured in one run (adds the bench extra: oras-py)
	ORCHARDIST_KUBEBINS="$$(bash hack/build-kubebins.sh 2>/dev/null)" $(BIN)/python -m hack.bench

demo: venv system-deps kubebins ## set up everything and serve a tiny model end to end
	bash hack/install-runtimes.sh mlx-lm
	$(BIN)/orchardist dev up --demo

demo-in-cluster: venv system-deps kubebins image ## the demo with the operator as a Pod from the chart on a real local node (root)
	bash hack/build-kubebins.sh --node >/dev/null
	bash hack/install-runtimes.sh mlx-lm
	$(BIN)/orchardist dev up --in-cluster --demo

clean: ## stop dev processes and remove local state (keeps the binary caches)
	-$(BIN)/orchardist dev down
	rm -rf .state
