"""The kind backend (``E2E_CLUSTER=kind``): the real thing, where Docker exists.

Runs `install_commands()`, which README.md shows verbatim under "Install on a cluster"
(e2e/test_install_docs.py compares them): builds the two images from docker/, creates a kind
cluster from e2e/kind-cluster.yaml (one worker labelled as a Karpenter spot node, one as
on-demand), loads the images into it, installs Prometheus (the prometheus-community chart: its
``kubernetes-pods`` job scrapes the ``prometheus.io/*`` annotations the operator puts on engine
pods) and charts/ebbtide with helm. It reaches Prometheus through ``kubectl port-forward``, and
the model servers through ``kubectl proxy`` (the API server's service proxy: each request goes to
one of the Service's endpoints, as in the cluster) and the engines through its pod proxy. Command
output goes to ``artifacts/e2e-kind/``. ``E2E_KEEP_CLUSTER=1`` keeps the cluster.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

from e2e.backend import ROOT, Backend, kubectl_binary
from e2e.processes import ManagedProcess
from ebbtide.sim.engine_server import free_port

CLUSTER = os.environ.get("E2E_KIND_CLUSTER", "ebbtide-e2e")
VERSION = yaml.safe_load((ROOT / "charts" / "ebbtide" / "Chart.yaml").read_text())["appVersion"]
OPERATOR_IMAGE = f"ebbtide/operator:{VERSION}"
ENGINE_IMAGE = f"ebbtide/engine-sim:{VERSION}"
CLUSTER_CONFIG = "e2e/kind-cluster.yaml"


def install_commands(cluster: str = CLUSTER) -> list[list[str]]:
    """What installs Ebbtide on a new kind cluster, run from the repository root with KUBECONFIG set.

    README.md's "Install on a cluster" is a copy (e2e/test_install_docs.py checks it).
    `operator.tickSeconds=1` (default 5) is the scenarios' faster loop.
    """
    return [
        ["docker", "build", "-f", "docker/operator.Dockerfile", "-t", OPERATOR_IMAGE, "."],
        ["docker", "build", "-f", "docker/engine-sim.Dockerfile", "-t", ENGINE_IMAGE, "."],
        ["kind", "create", "cluster", "--name", cluster, "--config", CLUSTER_CONFIG, "--wait", "180s"],
        ["kind", "load", "docker-image", OPERATOR_IMAGE, "--name", cluster],
        ["kind", "load", "docker-image", ENGINE_IMAGE, "--name", cluster],
        ["helm", "repo", "add", "prometheus-community", "https://prometheus-community.github.io/helm-charts",
         "--force-update"],
        ["helm", "upgrade", "--install", "prometheus", "prometheus-community/prometheus",
         "--namespace", "monitoring", "--create-namespace", "--wait", "--timeout", "5m",
         "--set", "alertmanager.enabled=false", "--set", "prometheus-pushgateway.enabled=false",
         "--set", "kube-state-metrics.enabled=false", "--set", "prometheus-node-exporter.enabled=false",
         "--set", "server.persistentVolume.enabled=false", "--set", "server.global.scrape_interval=5s",
         "--set", "server.global.evaluation_interval=5s"],
        # The chart's default prometheus.url is this release's Service: http://prometheus-server.monitoring.svc:80
        ["helm", "upgrade", "--install", "ebbtide", "charts/ebbtide", "--namespace", "ebbtide-system",
         "--create-namespace", "--wait", "--timeout", "5m", "--set", f"image.tag={VERSION}",
         "--set", "operator.tickSeconds=1"],
        ["kubectl", "rollout", "status", "deployment", "-n", "ebbtide-system", "--timeout", "180s",
         "-l", "app.kubernetes.io/instance=ebbtide"],
    ]


def helm_binary() -> str | None:
    local = ROOT / "tools" / "bin" / "helm"
    return str(local) if local.exists() else shutil.which("helm")


def missing_requirement() -> str | None:
    """Why the kind backend cannot run here, or None."""
    if shutil.which("kind") is None:
        return "E2E_CLUSTER=kind needs the `kind` binary on PATH (https://kind.sigs.k8s.io)"
    if shutil.which("docker") is None:
        return "E2E_CLUSTER=kind needs Docker: no `docker` command"
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "E2E_CLUSTER=kind needs a running Docker engine: `docker info` failed"
    if helm_binary() is None or kubectl_binary() is None:
        return "E2E_CLUSTER=kind needs helm and kubectl: run `make tools`"
    return None


class KindBackend(Backend):
    name = "kind"
    engine = {
        "image": ENGINE_IMAGE,
        "gpus": 0,
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
        # docker/vllm-shim.py appends these to `ebbtide engine-sim`: the tiny preset, a 1 s cold start.
        "env": [{"name": "EBBTIDE_ENGINE_SIM_ARGS", "value": "--preset tiny --startup-delay 1"}],
    }

    def __init__(self, artifacts: Path) -> None:
        super().__init__(artifacts)
        self.logs = artifacts / "e2e-kind"
        self.kubeconfig = self.logs / "kubeconfig"
        self.prometheus_url = ""
        self.forwards: dict[tuple[str, str], tuple[ManagedProcess, str]] = {}
        self.proxy: ManagedProcess | None = None
        self.proxy_url = ""
        self.created = False

    def _run(self, *argv: str, timeout: float = 900) -> None:
        # helm and kubectl from tools/bin/ when there (see helm_binary, kubectl_binary)
        argv = ({"helm": helm_binary(), "kubectl": kubectl_binary()}.get(argv[0]) or argv[0], *argv[1:])
        with (self.logs / "commands.log").open("a") as log:
            log.write(f"\n$ {' '.join(argv)}\n")
            log.flush()
            subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=timeout, cwd=ROOT,
                           env={**os.environ, "KUBECONFIG": str(self.kubeconfig)})

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self._run("kind", "delete", "cluster", "--name", CLUSTER)
        self.created = True
        for command in install_commands():  # kind writes the cluster's kubeconfig to $KUBECONFIG
            self._run(*command)
        self.prometheus_url = self._forward("monitoring", "prometheus-server", 80)
        port = free_port()
        self.proxy = ManagedProcess("kubectl-proxy", [kubectl_binary(), "--kubeconfig", str(self.kubeconfig),
                                                      "proxy", "--port", str(port)], self.logs / "kubectl-proxy.log")
        self.proxy.wait_for_line(r"Starting to serve on", timeout=60)
        self.proxy_url = f"http://127.0.0.1:{port}"

    def _forward(self, namespace: str, service: str, port: int) -> str:
        """`kubectl port-forward svc/...` on a free local port; its URL."""
        key = (namespace, service)
        if key not in self.forwards:
            local = free_port()
            process = ManagedProcess(f"port-forward-{namespace}-{service}",
                                     [kubectl_binary(), "--kubeconfig", str(self.kubeconfig), "port-forward",
                                      "-n", namespace, f"svc/{service}", f"{local}:{port}"],
                                     self.logs / f"port-forward-{namespace}-{service}.log")
            process.wait_for_line(r"Forwarding from", timeout=60)
            self.forwards[key] = (process, f"http://127.0.0.1:{local}")
        return self.forwards[key][1]

    def service_url(self, name: str, namespace: str = "default") -> str:
        # Not a port-forward: that sticks to one pod, which may be the one put to sleep.
        return f"{self.proxy_url}/api/v1/namespaces/{namespace}/services/{name}:http/proxy"

    def set_taint(self, node: str, taint: dict, present: bool) -> None:
        self._run("kubectl", "taint", "node", node, f"{taint['key']}:{taint['effect']}{'' if present else '-'}")

    def stop(self) -> None:
        for process, _ in self.forwards.values():
            process.stop(grace=5)
        self.forwards.clear()
        if self.proxy is not None:
            self.proxy.stop(grace=5)
            self.proxy = None
        if self.created and not os.environ.get("E2E_KEEP_CLUSTER"):
            self._run("kind", "delete", "cluster", "--name", CLUSTER, timeout=300)
