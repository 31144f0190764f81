"""The kind backend (``E2E_CLUSTER=kind``): the real thing, where Docker exists.

Builds the two images from docker/, creates a kind cluster, loads the images into it, installs
Prometheus (the prometheus-community chart: its ``kubernetes-pods`` job scrapes the
``prometheus.io/*`` annotations the operator puts on engine pods) and charts/ebbtide with
helm, then reaches Prometheus and the model servers through ``kubectl port-forward``.
Command output goes to ``artifacts/e2e-kind/``. ``E2E_KEEP_CLUSTER=1`` keeps the cluster.
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
        self.created = False

    def _run(self, *argv: str, timeout: float = 900) -> None:
        with (self.logs / "commands.log").open("a") as log:
            log.write(f"\n$ {' '.join(argv)}\n")
            log.flush()
            subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=timeout, cwd=ROOT,
                           env={**os.environ, "KUBECONFIG": str(self.kubeconfig)})

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        helm, kubectl = helm_binary(), kubectl_binary()
        self._run("docker", "build", "-f", "docker/operator.Dockerfile", "-t", OPERATOR_IMAGE, ".")
        self._run("docker", "build", "-f", "docker/engine-sim.Dockerfile", "-t", ENGINE_IMAGE, ".")
        self._run("kind", "delete", "cluster", "--name", CLUSTER)
        self.created = True
        self._run("kind", "create", "cluster", "--name", CLUSTER, "--kubeconfig", str(self.kubeconfig),
                  "--wait", "180s")
        for image in (OPERATOR_IMAGE, ENGINE_IMAGE):
            self._run("kind", "load", "docker-image", image, "--name", CLUSTER)
        self._run(helm, "repo", "add", "prometheus-community", "https://prometheus-community.github.io/helm-charts",
                  "--force-update")
        self._run(helm, "upgrade", "--install", "prometheus", "prometheus-community/prometheus",
                  "--namespace", "monitoring", "--create-namespace", "--wait", "--timeout", "5m",
                  "--set", "alertmanager.enabled=false", "--set", "prometheus-pushgateway.enabled=false",
                  "--set", "kube-state-metrics.enabled=false", "--set", "prometheus-node-exporter.enabled=false",
                  "--set", "server.persistentVolume.enabled=false", "--set", "server.global.scrape_interval=5s",
                  "--set", "server.global.evaluation_interval=5s")
        # The chart's default prometheus.url is this release's Service: http://prometheus-server.monitoring.svc:80
        self._run(helm, "upgrade", "--install", "ebbtide", "charts/ebbtide", "--namespace", "ebbtide-system",
                  "--create-namespace", "--wait", "--timeout", "5m", "--set", f"image.tag={VERSION}",
                  "--set", "operator.tickSeconds=1")
        self._run(kubectl, "rollout", "status", "deployment", "-n", "ebbtide-system", "--timeout", "180s",
                  "-l", "app.kubernetes.io/instance=ebbtide")
        self.prometheus_url = self._forward("monitoring", "prometheus-server", 80)

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
        # A port-forward to a Service sticks to one pod: new replicas get no load through it.
        # The scenario only needs the backlog it builds on the first replica.
        return self._forward(namespace, name, int((self.engine or {}).get("port", 8000)))

    def stop(self) -> None:
        for process, _ in self.forwards.values():
            process.stop(grace=5)
        self.forwards.clear()
        if self.created and not os.environ.get("E2E_KEEP_CLUSTER"):
            self._run("kind", "delete", "cluster", "--name", CLUSTER, timeout=300)
