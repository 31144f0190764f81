"""
Pytest fixtures of the test bed; ``tests/conftest.py`` imports them.
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.testbed.apiserver import ApiServerThread


@pytest.fixture()
def apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServerThread]:
    """
    A fresh emulated Kubernetes API on a free loopback port, served from a background thread.

    Yields an `ApiServerThread`: ``.url``, ``.kubeconfig_path``, ``.env`` (``KUBECONFIG``),
    ``.server`` (the `EmulatedApiServer`: ``register_crd``, ``get_object``, ``list_objects``...),
    and ``.api_client()`` for the official client. Fails the test if the emulator answered
    any request with HTTP 500 (an emulator bug or a broken injected reaction).
    """
    kubeconfig_path = tmp_path_factory.mktemp('apiserver') / 'kubeconfig'
    with ApiServerThread(kubeconfig_path=kubeconfig_path) as handle:
        yield handle
    if handle.server.unexpected_errors:
        errors = '\n'.join(repr(e) for e in handle.server.unexpected_errors)
        pytest.fail(f'The emulated API server failed on some requests:\n{errors}')


# --- test bed: Prometheus and fake vLLM exporters (owner: tests/testbed/prometheus.py, exporter.py) ---
from tests.testbed.exporter import FakeVllmExporter  # noqa: E402
from tests.testbed.prometheus import MISSING_BINARY, PrometheusServer, prometheus_binary  # noqa: E402


@pytest.fixture()
def prometheus_server() -> Iterator[PrometheusServer]:
    """
    A real Prometheus on a free loopback port, scraping every second the file_sd targets set
    with ``.set_targets([...])``; ``.url``, ``.query()``, ``.http_requests()``, ``.stop()``,
    ``.start()``, ``.pause()``, ``.resume()``. Skips the test if the binary is not installed.
    Prometheus applies target changes up to ~5 s late (its discovery throttle): use
    ``.wait_for_targets_up(n)``.
    """
    if prometheus_binary() is None:
        pytest.skip(MISSING_BINARY)
    with PrometheusServer() as server:
        yield server


@pytest.fixture()
def fake_vllm_exporter() -> Iterator[FakeVllmExporter]:
    """
    One HTTP server with settable fake vLLM pods at ``/<name>/metrics``: ``.add_pod(name)``
    returns a `FakeVllmPod` (``.set(waiting=, running=, kv_cache_usage=, asleep=)``,
    ``.observe_ttft()``, ``.observe_itl()``, ``.add_tokens()``, ``.up = False``);
    ``.target_group(name, namespace=, pod=)`` is the file_sd entry for Prometheus.
    """
    with FakeVllmExporter() as exporter:
        yield exporter
# --- end of test bed: Prometheus and fake vLLM exporters ---


# --- the emulated cluster: pod runner and load balancer (owner: tests/testbed/podrunner.py) ---
# Imported here, not at the top, to keep the apiserver fixture's section untouched.
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

from tests.testbed.loadbalancer import LoadBalancer  # noqa: E402
from tests.testbed.podrunner import PodRunner  # noqa: E402


@pytest.fixture()
def pod_runner_factory(apiserver: ApiServerThread,
                       tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., PodRunner]]:
    """
    Start `PodRunner`s against the ``apiserver``: ``pod_runner_factory(**kwargs)``.

    Defaults for tests: ``startup_delay=1.0``, ``max_grace_seconds=5``, engine logs in a temp
    dir. At teardown every runner stops, and the test fails if any engine process it started
    is still alive.
    """
    started: list[tuple[PodRunner, Any]] = []

    def make(**kwargs: Any) -> PodRunner:
        kwargs.setdefault('startup_delay', 1.0)
        kwargs.setdefault('max_grace_seconds', 5.0)
        kwargs.setdefault('log_dir', tmp_path_factory.mktemp('pods'))
        client = apiserver.api_client()
        runner = PodRunner(client, **kwargs)
        started.append((runner, client))
        return runner.start()

    yield make
    for runner, client in started:
        runner.stop()
        client.close()
    leftovers = {pid for runner, _ in started for pid in runner.live_pids()}
    if leftovers:
        pytest.fail(f'engine processes left behind by the pod runner: {sorted(leftovers)}')


@pytest.fixture()
def pod_runner(pod_runner_factory: Callable[..., PodRunner]) -> PodRunner:
    """A started `PodRunner` with the test defaults (see ``pod_runner_factory``)."""
    return pod_runner_factory()


@pytest.fixture()
def load_balancer_factory(apiserver: ApiServerThread) -> Iterator[Callable[..., LoadBalancer]]:
    """Start `LoadBalancer`s reading the ``apiserver``: ``load_balancer_factory(service, namespace='default')``."""
    started: list[tuple[LoadBalancer, Any]] = []

    def make(service: str, namespace: str = 'default', **kwargs: Any) -> LoadBalancer:
        client = apiserver.api_client()
        balancer = LoadBalancer(service, namespace, api_client=client, **kwargs)
        started.append((balancer, client))
        return balancer.start()

    yield make
    for balancer, client in started:
        balancer.stop()
        client.close()
# --- end of the emulated cluster's fixtures ---


# --- the whole loop: API, pod runner, Prometheus, operator (closed-loop and lifecycle tests) ---
from ebbtide.sim.engine_server import free_port  # noqa: E402
from tests.testbed.operator import running_operator  # noqa: E402


@pytest.fixture()
def cluster(apiserver, prometheus_server, pod_runner_factory, load_balancer_factory):
    """The emulated cluster with Prometheus scraping every engine the pod runner starts."""
    runner = pod_runner_factory(publish_targets=prometheus_server.set_targets, nodes=[])

    class Cluster:
        server = apiserver.server
        prometheus = prometheus_server
        pods = runner

        metrics_port = free_port()

        @staticmethod
        def operator():
            return running_operator(apiserver, EBBTIDE_PROMETHEUS_URL=prometheus_server.url,
                                    EBBTIDE_TICK_SECONDS="0.5", EBBTIDE_METRICS_PORT=str(Cluster.metrics_port))

        @staticmethod
        def balancer(name="chat"):
            return load_balancer_factory(name)

    return Cluster
