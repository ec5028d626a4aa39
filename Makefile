# Orchardist developer targets. `make` alone lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: help venv system-deps kubebins runtimes test-deps test unit lint crds bench demo clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(BIN)/orchardist: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

venv: $(BIN)/orchardist ## create .venv with orchardist (editable) and the dev tools

system-deps: ## install the Debian packages the tests and the demo use (registry, openssl)
	bash hack/install-system-deps.sh

kubebins: ## build etcd, kube-apiserver, kube-controller-manager, kubectl, helm (cached by version)
	bash hack/build-kubebins.sh

runtimes: venv ## install the engine runtimes the tests start (mlx-lm, vLLM CPU), cached by version
	bash hack/install-runtimes.sh mlx-lm vllm

test-deps: venv system-deps kubebins runtimes

test: test-deps lint ## install what the tests need, lint, then run every test tier
	ORCHARDIST_KUBEBINS="$$(bash hack/build-kubebins.sh 2>/dev/null)" \
	  $(BIN)/pytest tests $(PYTEST_ARGS)

unit: venv ## the fast pure tests only
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

lint: venv ## ruff + mypy (strict) + the CRD drift check
	$(BIN)/ruff check operator agent tests
	$(BIN)/ruff format --check operator agent tests
	$(BIN)/mypy
	$(BIN)/orchardist crds --check

crds: venv ## regenerate crds/ from the API types
	$(BIN)/orchardist crds --write

bench: test-deps ## benchmarks: print ratios measured in one run
	ORCHARDIST_KUBEBINS="$$(bash hack/build-kubebins.sh 2>/dev/null)" $(BIN)/python -m hack.bench

demo: venv system-deps kubebins ## set up everything and serve a tiny model end to end
	bash hack/install-runtimes.sh mlx-lm
	$(BIN)/orchardist dev up --demo

clean: ## stop dev processes and remove local state (keeps the binary caches)
	-$(BIN)/orchardist dev down
	rm -rf .state
