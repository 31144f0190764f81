"""The small interface the end-to-end scenarios are written against, and what both backends share.

A backend is a running cluster with the Ebbtide operator and a Prometheus in it:

* ``apply(manifest)``, ``get``, ``patch``, ``delete``, ``list``: kubectl-like, through the
  official kubernetes client (its dynamic client) with the backend's kubeconfig;
* ``kubectl(*args)``: the real kubectl binary (tools/bin/kubectl, else one on PATH), for
  ``describe`` in the end-to-end log;
* ``service_url(name, namespace)``: a base URL on this machine that reaches the model server's
  Service (a load balancer reading its EndpointSlices on the local control plane, the API
  server's service proxy on kind);
* ``prometheus_url``: the Prometheus the operator reads;
* ``engine``: what the scenario puts in ``spec.engine`` so replicas run the engine simulator;
* ``engine_get(pod, path)``: a GET on a pod's engine (``/is_sleeping``) through the API server's pod proxy;
* ``reclaim_spot_node()`` / ``end_spot_reclaim(node)``: the reclaim notice Karpenter puts on a spot
  node (the taint ``karpenter.sh/disrupted:NoSchedule``), and its removal;
* the faults of the counted scenarios (e2e/faults.py): ``kill_operator()`` / ``start_operator()``,
  ``restart_component(name)`` (etcd, kube-apiserver), ``pause_prometheus(paused)``,
  ``partition_node(node, partitioned)`` (its kubelet stops renewing the Lease),
  ``pause_engine(pod, paused)``; a backend that cannot raises `Unsupported` (the scenario skips).

Both backends install Ebbtide with the Helm chart; the local one (e2e/local.py) runs a real
control plane on this machine, the kind one (e2e/kind.py) a kind cluster where Docker exists.
"""

from __future__ import annotations

import abc
import datetime
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import kubernetes.client
import kubernetes.config
import kubernetes.dynamic
from kubernetes.dynamic.exceptions import NotFoundError

ROOT = Path(__file__).resolve().parents[1]
MERGE_PATCH = "application/merge-patch+json"
# Both backends label one node as Karpenter labels its spot nodes (the test bed kubelet's
# testbed-spot-0, the kind worker in e2e/kind-cluster.yaml).
SPOT_NODE_SELECTOR = "karpenter.sh/capacity-type=spot"
# What Karpenter v1 puts on a node it is about to take back (a spot interruption included).
RECLAIM_TAINT = {"key": "karpenter.sh/disrupted", "effect": "NoSchedule"}


class Unsupported(NotImplementedError):
    """A fault this backend cannot produce: the scenario that needs it is skipped, saying so."""


def kubectl_binary() -> str | None:
    local = ROOT / "tools" / "bin" / "kubectl"
    return str(local) if local.exists() else shutil.which("kubectl")


class StoryLog:
    """The end-to-end log: timestamped scenario steps, appended to a file and kept in memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.started = time.monotonic()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def step(self, message: str) -> None:
        now = datetime.datetime.now(datetime.UTC).strftime("%H:%M:%S.%f")[:-3]
        line = f"{now} +{time.monotonic() - self.started:6.1f}s  {message}\n"
        with self.path.open("a") as f:
            f.write(line)

    def heading(self, title: str) -> None:
        """The start of a scenario: one log holds every scenario of the session."""
        with self.path.open("a") as f:
            f.write(f"\n##### {title}\n")

    def section(self, title: str, text: str) -> None:
        with self.path.open("a") as f:
            f.write(f"\n===== {title} =====\n{text.rstrip()}\n")


class Backend(abc.ABC):
    name: str
    kubeconfig: Path
    prometheus_url: str
    engine: dict[str, Any] | None = None

    def __init__(self, artifacts: Path) -> None:
        self.artifacts = artifacts
        self._api_client: kubernetes.client.ApiClient | None = None
        self._dynamic: kubernetes.dynamic.DynamicClient | None = None

    # ------------------------------------------------------------------ lifecycle (per backend)

    @abc.abstractmethod
    def start(self) -> None:
        """Bring the cluster, Prometheus and the operator up; set kubeconfig and prometheus_url."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Tear everything down; raise if a process was left behind."""

    @abc.abstractmethod
    def service_url(self, name: str, namespace: str = "default") -> str:
        """A base URL on this machine for the model server's Service."""

    def activator_url(self, name: str, namespace: str = "default") -> str:
        """A base URL of `ebbtide activator` in front of the Service, scraped by Prometheus (its
        ``ebbtide_activator_pending_requests`` is what an activation query reads)."""
        raise Unsupported(f"{type(self).__name__}: no activator process")

    def close_service_url(self, name: str, namespace: str = "default") -> None:
        """Stop what `service_url` or `activator_url` started for this Service, if anything."""
        return None

    # The faults of the counted scenarios: what this backend cannot do, it says.
    def kill_operator(self) -> None:
        raise Unsupported(f"{self.name}: kill -9 of the operator")

    def start_operator(self) -> None:
        raise Unsupported(f"{self.name}: starting the operator again")

    def restart_component(self, component: str) -> None:
        raise Unsupported(f"{self.name}: restarting {component}")

    def pause_prometheus(self, paused: bool) -> None:
        raise Unsupported(f"{self.name}: a Prometheus outage")

    def partition_node(self, node: str, partitioned: bool) -> None:
        raise Unsupported(f"{self.name}: a node that stops renewing its Lease")

    def pause_engine(self, pod: dict, paused: bool) -> None:
        raise Unsupported(f"{self.name}: an engine that stops answering")

    @abc.abstractmethod
    def set_taint(self, node: str, taint: dict, present: bool) -> None:
        """Add (present) or remove a taint on a node, as `kubectl taint` does."""

    def __enter__(self) -> Backend:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._api_client is not None:
            self._api_client.close()
            self._api_client = self._dynamic = None
        self.stop()

    # ------------------------------------------------------------------ kubectl-like, official client

    @property
    def dynamic(self) -> kubernetes.dynamic.DynamicClient:
        if self._dynamic is None:
            self._api_client = kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))
            self._dynamic = kubernetes.dynamic.DynamicClient(self._api_client)
        return self._dynamic

    def _resource(self, api_version: str, kind: str):
        return self.dynamic.resources.get(api_version=api_version, kind=kind)

    def get(self, api_version: str, kind: str, name: str, namespace: str = "default") -> dict | None:
        try:
            return self._resource(api_version, kind).get(name=name, namespace=namespace).to_dict()
        except NotFoundError:
            return None

    def list(self, api_version: str, kind: str, namespace: str = "default", **selectors: str) -> list[dict]:
        found = self._resource(api_version, kind).get(namespace=namespace, **selectors).to_dict()
        return found.get("items") or []

    def apply(self, manifest: dict) -> dict:
        """Create the object, or merge-patch it if it exists (client-side, like a first `kubectl apply`)."""
        resource = self._resource(manifest["apiVersion"], manifest["kind"])
        meta = manifest["metadata"]
        namespace = meta.get("namespace", "default")
        if self.get(manifest["apiVersion"], manifest["kind"], meta["name"], namespace) is None:
            return resource.create(body=manifest, namespace=namespace).to_dict()
        return resource.patch(body=manifest, name=meta["name"], namespace=namespace,
                              content_type=MERGE_PATCH).to_dict()

    def patch(self, api_version: str, kind: str, name: str, patch: dict, namespace: str = "default") -> dict:
        return self._resource(api_version, kind).patch(body=patch, name=name, namespace=namespace,
                                                       content_type=MERGE_PATCH).to_dict()

    def delete(self, api_version: str, kind: str, name: str, namespace: str = "default") -> None:
        try:
            self._resource(api_version, kind).delete(name=name, namespace=namespace)
        except NotFoundError:
            pass

    def kubectl(self, *args: str, timeout: float = 60) -> str:
        """Run the real kubectl against this cluster; its stdout (or a line saying why not)."""
        binary = kubectl_binary()
        if binary is None:
            return "(no kubectl: run `make tools` to put one in tools/bin/)"
        done = subprocess.run([binary, "--kubeconfig", str(self.kubeconfig), *args], capture_output=True,
                              text=True, timeout=timeout)
        if done.returncode != 0:
            return f"(kubectl {' '.join(args)} failed with {done.returncode})\n{done.stdout}{done.stderr}"
        return done.stdout

    # ------------------------------------------------------------------------------ nodes and engines

    def spot_node(self) -> str:
        nodes = self.list("v1", "Node", label_selector=SPOT_NODE_SELECTOR)
        assert nodes, f"no node labelled {SPOT_NODE_SELECTOR}"
        return nodes[0]["metadata"]["name"]

    def reclaim_spot_node(self) -> str:
        """Announce that the spot node is going away (RECLAIM_TAINT); its name."""
        node = self.spot_node()
        self.set_taint(node, RECLAIM_TAINT, present=True)
        return node

    def end_spot_reclaim(self, node: str) -> None:
        self.set_taint(node, RECLAIM_TAINT, present=False)

    def engine_get(self, pod: dict, path: str) -> dict | None:
        """GET `path` on a pod's engine through the API server's pod proxy, as JSON; None if no answer."""
        meta = pod["metadata"]
        answer = self.kubectl("get", "--raw", f"/api/v1/namespaces/{meta['namespace']}/pods/"
                                              f"{meta['name']}:{engine_port(pod)}/proxy{path}", timeout=10)
        try:
            return json.loads(answer)
        except ValueError:
            return None


def engine_port(pod: dict) -> int | None:
    """The engine container's port (its `http` port: the engine listens on podIP:containerPort)."""
    containers = pod["spec"].get("containers") or []
    container = next((c for c in containers if c.get("name") == "vllm"), containers[0] if containers else {})
    ports = container.get("ports") or [{}]
    return ports[0].get("containerPort")
