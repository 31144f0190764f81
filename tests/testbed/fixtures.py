"""
Pytest fixtures of the test bed; ``tests/conftest.py`` imports them.

One real control plane per test session (``control_plane``); each test that uses it gets the
``default`` namespace empty (``apiserver``), our kubelet for the fake Nodes (``kubelet``), a real
Prometheus discovering the engines through the API server, a load balancer that reads the
Service's EndpointSlices as kube-proxy does, and `ebbtide activator` processes.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ebbtide.api.crd import crd
from ebbtide.sim.engine_server import free_port
from tests.testbed import podnetwork
from tests.testbed.activator import ActivatorProcess
from tests.testbed.controlplane import ControlPlane, ControlPlaneError
from tests.testbed.exporter import FakeVllmExporter
from tests.testbed.kubeapi import KubeApi
from tests.testbed.kubelet import Kubelet
from tests.testbed.loadbalancer import LoadBalancer
from tests.testbed.operator import running_operator
from tests.testbed.prometheus import MISSING_BINARY, PrometheusServer, prometheus_binary
from tests.testbed.waiting import wait_for

NAMESPACE = "default"
# What a test leaves in the namespace, deleted before the next one (collections, in this order).
LEFTOVERS = ("apps/v1/deployments", "apps/v1/replicasets", "v1/services", "policy/v1/poddisruptionbudgets",
             "v1/events", "coordination.k8s.io/v1/leases")


class Cluster:
    """The session's control plane as one test sees it."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self.kubeconfig_path = plane.kubeconfig
        self._clients: list[Any] = []
        self.server = KubeApi(self.api_client())

    @property
    def url(self) -> str:
        return self.plane.url

    @property
    def env(self) -> dict[str, str]:
        return {"KUBECONFIG": str(self.kubeconfig_path)}

    def api_client(self) -> Any:
        import kubernetes.config
        client = kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig_path))
        self._clients.append(client)
        return client

    def register_crd(self, definition: dict) -> dict:
        return self.server.register_crd(definition)

    @contextlib.contextmanager
    def as_default_kubeconfig(self) -> Iterator[pathlib.Path]:
        """
        Make this cluster the default of code that loads the default kubeconfig (kopf's login).
        $KUBECONFIG alone is not enough in a test process: the official client reads it once, at import.
        """
        import kubernetes.config.kube_config as kube_config
        saved_env, saved_default = os.environ.get("KUBECONFIG"), kube_config.KUBE_CONFIG_DEFAULT_LOCATION
        os.environ["KUBECONFIG"] = kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(self.kubeconfig_path)
        try:
            yield self.kubeconfig_path
        finally:
            kube_config.KUBE_CONFIG_DEFAULT_LOCATION = saved_default
            if saved_env is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = saved_env

    def empty_namespace(self, namespace: str = NAMESPACE) -> None:
        """Delete what a test left: InferenceServices (their finalizers too: no operator runs now) and the rest."""
        api = self.server
        for isvc in api.list_objects("ebbtide.dev/v1alpha1/inferenceservices", namespace):
            name = isvc["metadata"]["name"]
            api.patch_object("ebbtide.dev/v1alpha1/inferenceservices", namespace, name,
                             {"metadata": {"finalizers": None}})
            api.delete_object("ebbtide.dev/v1alpha1/inferenceservices", namespace, name)
        for resource in LEFTOVERS:
            api.request("DELETE", _collection(resource, namespace))
        api.request("DELETE", _collection("v1/configmaps", namespace),
                    query={"fieldSelector": "metadata.name!=kube-root-ca.crt"})

        def empty() -> bool:
            # Pods at once and again until their ReplicaSets are gone (one may still create a pod):
            # their kubelet has stopped, nothing would finish a graceful deletion.
            api.request("DELETE", _collection("v1/pods", namespace), {"gracePeriodSeconds": 0})
            return not any(api.list_objects(resource, namespace) for resource in (
                "apps/v1/replicasets", "v1/pods", "ebbtide.dev/v1alpha1/inferenceservices"))
        wait_for(empty, timeout=60, interval=0.5, what=f"an empty namespace {namespace}")

    def close(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()


def _collection(resource: str, namespace: str) -> str:
    from tests.testbed.kubeapi import path_of
    return path_of(resource, namespace)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd, kube-apiserver, kube-controller-manager and kube-scheduler, once per session."""
    if shutil.which("go") is None and not os.environ.get("EBBTIDE_CONTROLPLANE_BIN"):
        pytest.skip("Go is not installed: the control plane is built from its Go modules (tools/controlplane)")
    if reason := podnetwork.missing_requirement():
        pytest.skip(reason)
    plane = ControlPlane(tmp_path_factory.mktemp("controlplane"), crds=(crd(),))
    try:
        plane.start()
    except ControlPlaneError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture()
def apiserver(control_plane: ControlPlane) -> Iterator[Cluster]:
    """The real API server with an empty ``default`` namespace and the InferenceService CRD."""
    cluster = Cluster(control_plane)
    try:
        yield cluster
    finally:
        cluster.empty_namespace()
        cluster.close()


@pytest.fixture()
def prometheus_server() -> Iterator[PrometheusServer]:
    """
    A real Prometheus scraping every second the file_sd targets set with ``.set_targets([...])``.
    Skips the test if the binary is not installed. Target changes apply up to ~5 s late.
    """
    if prometheus_binary() is None:
        pytest.skip(MISSING_BINARY)
    with PrometheusServer() as server:
        yield server


@pytest.fixture()
def cluster_prometheus(apiserver: Cluster) -> Iterator[PrometheusServer]:
    """A real Prometheus finding the engines' pods through the API server (docs/prometheus-scrape.yaml)."""
    if prometheus_binary() is None:
        pytest.skip(MISSING_BINARY)
    with PrometheusServer(kubeconfig=apiserver.kubeconfig_path) as server:
        yield server


@pytest.fixture()
def fake_vllm_exporter() -> Iterator[FakeVllmExporter]:
    """One HTTP server with settable fake vLLM pods at ``/<name>/metrics`` (see exporter.py)."""
    with FakeVllmExporter() as exporter:
        yield exporter


@pytest.fixture()
def kubelet_factory(apiserver: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Kubelet]]:
    """
    Start `Kubelet`s: ``kubelet_factory(**kwargs)``; test defaults ``startup_delay=1.0``,
    ``max_grace_seconds=5``, engine logs in a temp dir. At teardown every kubelet stops, its
    Nodes go (left behind, a later test's pods were scheduled onto them and never ran), and the
    test fails if an engine it started is still alive.
    """
    started: list[Kubelet] = []

    def make(**kwargs: Any) -> Kubelet:
        kwargs.setdefault("startup_delay", 1.0)
        kwargs.setdefault("max_grace_seconds", 5.0)
        kwargs.setdefault("log_dir", tmp_path_factory.mktemp("pods"))
        kubelet = Kubelet(apiserver.api_client(), **kwargs)
        started.append(kubelet)
        return kubelet.start()

    yield make
    for kubelet in started:
        kubelet.stop()
        for node in kubelet.nodes:
            apiserver.server.delete_object("v1/nodes", None, node)
    leftovers = {pid for kubelet in started for pid in kubelet.live_pids()}
    if leftovers:
        pytest.fail(f"engine processes left behind by the kubelet: {sorted(leftovers)}")


@pytest.fixture()
def kubelet(kubelet_factory: Callable[..., Kubelet]) -> Kubelet:
    """A started `Kubelet` with the test defaults (see ``kubelet_factory``)."""
    return kubelet_factory()


@pytest.fixture()
def load_balancer_factory(apiserver: Cluster) -> Iterator[Callable[..., LoadBalancer]]:
    """Start `LoadBalancer`s on a Service's EndpointSlices: ``load_balancer_factory(service, namespace='default')``."""
    started: list[LoadBalancer] = []

    def make(service: str, namespace: str = NAMESPACE, **kwargs: Any) -> LoadBalancer:
        balancer = LoadBalancer(service, namespace, api_client=apiserver.api_client(), **kwargs)
        started.append(balancer)
        return balancer.start()

    yield make
    for balancer in started:
        balancer.stop()


@pytest.fixture()
def activator_factory(apiserver: Cluster, tmp_path: pathlib.Path) -> Iterator[Callable[..., ActivatorProcess]]:
    """Run `ebbtide activator` processes: ``activator_factory(service, *options, namespace='default')``."""
    started: list[ActivatorProcess] = []

    def make(service: str, *options: str, namespace: str = NAMESPACE) -> ActivatorProcess:
        log_path = tmp_path / f"activator-{service}-{len(started)}.log"
        started.append(ActivatorProcess(apiserver.kubeconfig_path, log_path, service, namespace, *options))
        return started[-1]

    yield make
    for activator in started:
        activator.stop()


@pytest.fixture()
def cluster(apiserver, cluster_prometheus, kubelet_factory, load_balancer_factory):
    """The whole loop: the control plane, our kubelet, Prometheus discovering the engines, the operator."""
    kubelet = kubelet_factory()

    class Loop:
        server = apiserver.server
        api = apiserver
        prometheus = cluster_prometheus
        pods = kubelet
        metrics_port = free_port()

        @staticmethod
        def operator(**env: str):
            return running_operator(apiserver, EBBTIDE_PROMETHEUS_URL=cluster_prometheus.url,
                                    EBBTIDE_TICK_SECONDS="0.5", EBBTIDE_METRICS_PORT=str(Loop.metrics_port), **env)

        @staticmethod
        def balancer(name="chat"):
            return load_balancer_factory(name)

    return Loop
