# --- test bed: emulated Kubernetes API (owner: tests/testbed/apiserver.py) ---
from tests.testbed.fixtures import apiserver  # noqa: F401
# --- end of test bed: emulated Kubernetes API ---
# --- test bed: Prometheus and a settable vLLM exporter (owner: tests/testbed/prometheus.py) ---
from tests.testbed.fixtures import fake_vllm_exporter, prometheus_server  # noqa: E402, F401
# --- end of test bed: Prometheus ---
# --- test bed: emulated cluster (owner: tests/testbed/podrunner.py) ---
from tests.testbed.fixtures import load_balancer_factory, pod_runner, pod_runner_factory  # noqa: E402, F401
# --- end of test bed: emulated cluster ---
