"""Fixtures of the test bed (tests/testbed/): a real Kubernetes control plane with our kubelet for fake
Nodes, a real Prometheus, a settable vLLM exporter, a load balancer on EndpointSlices."""

from tests.testbed.fixtures import (  # noqa: F401
    activator_factory,
    apiserver,
    cluster,
    cluster_prometheus,
    control_plane,
    fake_vllm_exporter,
    kubelet,
    kubelet_factory,
    load_balancer_factory,
    prometheus_server,
)
