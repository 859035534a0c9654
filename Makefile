# Netfence developer entry points. Every target sets up what it needs first.
SHELL := /bin/bash
VENV  := .venv/bin
SCENARIOS ?= tests/conformance ../shared/conformance/scenarios
IP_FAMILY ?= dual

.PHONY: setup test lint unit integration conformance demo bench clean crds golden node-e2e

setup:
	@hack/setup.sh

## test: everything CI runs: lint, type check, unit, integration and conformance tests
test: setup lint
	$(VENV)/pytest -q -p no:cacheprovider --durations=15 tests

lint: setup
	$(VENV)/ruff check operator lab tests bench hack
	$(VENV)/mypy

unit: setup
	$(VENV)/pytest -q tests/unit

integration: setup
	$(VENV)/pytest -q tests/integration

conformance: setup
	$(VENV)/netfence conformance run --ip-family $(IP_FAMILY) $(SCENARIOS)

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

## node-e2e: a real node on this machine (containerd + kubelet, hack/setup-node.sh), the images built
## locally (hack/node-images.sh), then helm install/test/upgrade/rollback/uninstall with probes
## (lab/netfence_lab/node_e2e.py); not part of `make test`
## Tags: the install, an upgrade of the same code, an upgrade reporting another version (TAG=VERSION).
NODE_TAGS := 0.1.0,0.1.0-b,0.1.0-c=0.1.0+c
node-e2e: setup
	@hack/setup-node.sh >/dev/null
	@tags='$(NODE_TAGS)'; hack/node-images.sh $${NETFENCE_CACHE:-$$HOME/.cache/netfence}/node-images $${tags//,/ } >/dev/null
	$(VENV)/python -m netfence_lab.node_e2e --tags '$(NODE_TAGS)'

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache build dist
