# --- test bed: emulated Kubernetes API (owner: tests/testbed/apiserver.py) ---
from tests.testbed.fixtures import apiserver  # noqa: F401
# --- end of test bed: emulated Kubernetes API ---
