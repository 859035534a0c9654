# Netfence developer entry points. Every target sets up what it needs first.
SHELL := /bin/bash
VENV  := .venv/bin
SCENARIOS ?= tests/conformance ../shared/conformance/scenarios

.PHONY: setup test lint unit integration conformance demo bench clean crds golden

setup:
	@hack/setup.sh

## test: everything CI runs: lint, type check, unit, integration and conformance tests
test: setup lint
	$(VENV)/pytest -q -p no:cacheprovider tests

lint: setup
	$(VENV)/ruff check operator tests bench hack
	$(VENV)/mypy

unit: setup
	$(VENV)/pytest -q tests/unit

integration: setup
	$(VENV)/pytest -q tests/integration

conformance: setup
	$(VENV)/netfence conformance run $(SCENARIOS)

## demo: the local demo (control plane, controller, two nodes, the classic policies)
demo: setup
	$(VENV)/netfence demo

bench: setup
	$(VENV)/python bench/controller_bench.py
	$(VENV)/python bench/dataplane_bench.py
	$(VENV)/python bench/agent_bench.py

## crds: write the generated CRD copies (helm/netfence/files/, operator/netfence/crds/) from crds/
crds:
	python3 hack/gen_crds.py

## golden: rewrite the renderer's golden files (tests/unit/dataplane/golden/); review the diff
golden: setup
	$(VENV)/python hack/update_golden.py

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache build dist
