"""Fixtures of the test bed (tests/testbed/): the emulated Kubernetes API, Prometheus, a settable
vLLM exporter, and the emulated cluster (pod runner, load balancer)."""

from tests.testbed.fixtures import (  # noqa: F401
    apiserver,
    cluster,
    fake_vllm_exporter,
    load_balancer_factory,
    pod_runner,
    pod_runner_factory,
    prometheus_server,
)
