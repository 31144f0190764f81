"""The test bed's fake Nodes: their objects, status and Leases, as a kubelet registers them."""
from __future__ import annotations

import dataclasses
from typing import Any

from tests.testbed.engines import call_api, now_rfc3339

CAPACITY_TYPE_LABEL = "karpenter.sh/capacity-type"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"  # as NVIDIA's GPU feature discovery labels a node's GPU type
KUBE_VERSION = "v1.36.3"


@dataclasses.dataclass
class FakeNode:
    name: str
    capacity_type: str  # 'on-demand' or 'spot': the pool set_capacity() switches
    labels: dict[str, str]
    taints: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    gpus: int = 16


def pool_labels(name: str, capacity: str) -> dict[str, str]:
    """The labels Karpenter, EKS, GKE and AKS put on a GPU node of a capacity pool."""
    out = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "node.kubernetes.io/instance-type": "p5.48xlarge",
        "topology.kubernetes.io/zone": "testbed-a",
        "nvidia.com/gpu.present": "true",
        CAPACITY_TYPE_LABEL: capacity,
        "karpenter.sh/nodepool": capacity,
        "eks.amazonaws.com/capacityType": "SPOT" if capacity == "spot" else "ON_DEMAND",
    }
    if capacity == "spot":
        out["cloud.google.com/gke-spot"] = "true"
        out["kubernetes.azure.com/scalesetpriority"] = "spot"
    return out


def default_nodes() -> list[FakeNode]:
    """One node per capacity pool."""
    return [FakeNode(name, capacity, pool_labels(name, capacity))
            for name, capacity in (("testbed-ondemand-0", "on-demand"), ("testbed-spot-0", "spot"))]


def accelerator_node(name: str, product: str, capacity: str, pool: str | None = None, gpus: int = 8) -> FakeNode:
    """A GPU node of one accelerator type (its gpu.product label) in a capacity pool; `pool` (default:
    the name) is what set_capacity() switches, so each accelerator's nodes can run out on their own."""
    return FakeNode(name, pool or name, pool_labels(name, capacity) | {GPU_PRODUCT_LABEL: product}, gpus=gpus)


def node_body(node: FakeNode) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node.name, "labels": dict(node.labels)},
            "spec": {"taints": list(node.taints) or None, "providerID": f"testbed://{node.name}"}}


def node_status(node: FakeNode) -> dict[str, Any]:
    resources = {"cpu": "192", "memory": "2048Gi", "nvidia.com/gpu": str(node.gpus), "pods": "250"}
    now = now_rfc3339()
    conditions = [{"type": t, "status": "False", "reason": reason, "message": "",
                   "lastHeartbeatTime": now, "lastTransitionTime": now}
                  for t, reason in (("MemoryPressure", "KubeletHasSufficientMemory"),
                                    ("DiskPressure", "KubeletHasNoDiskPressure"),
                                    ("PIDPressure", "KubeletHasSufficientPID"))]
    conditions.append({"type": "Ready", "status": "True", "reason": "KubeletReady",
                       "message": "kubelet is posting ready status", "lastHeartbeatTime": now,
                       "lastTransitionTime": now})
    return {"status": {
        "capacity": resources, "allocatable": resources, "conditions": conditions,
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": node.name}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {"kubeletVersion": KUBE_VERSION, "containerRuntimeVersion": "testbed://1",
                     "operatingSystem": "linux", "architecture": "amd64", "machineID": "", "systemUUID": "",
                     "bootID": "", "kernelVersion": "", "osImage": "testbed", "kubeProxyVersion": ""},
    }}


def lease_body(node: FakeNode, resource_version: str | None = None) -> dict[str, Any]:
    """The node's heartbeat; the node-lifecycle controller marks a node whose Lease stops NotReady."""
    metadata: dict[str, Any] = {"name": node.name, "namespace": "kube-node-lease"}
    if resource_version:
        metadata["resourceVersion"] = resource_version
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata,
            "spec": {"holderIdentity": node.name, "leaseDurationSeconds": 40,
                     "renewTime": now_rfc3339(micro=True)}}


def register_node(core: Any, node: FakeNode) -> None:
    """Create the Node, or put back its labels and taints (a restarted kubelet's), then post its status."""
    from kubernetes.client.rest import ApiException
    try:
        call_api(core.create_node, node_body(node))
    except ApiException as e:
        if e.status != 409:
            raise
        version = call_api(core.read_node, node.name)["metadata"]["resourceVersion"]
        body = node_body(node)
        call_api(core.replace_node, node.name, {**body, "metadata": {**body["metadata"], "resourceVersion": version}})
    call_api(core.patch_node_status, node.name, node_status(node))


def renew_lease(coordination: Any, node: FakeNode) -> None:
    from kubernetes.client.rest import ApiException
    try:
        current = call_api(coordination.read_namespaced_lease, node.name, "kube-node-lease")
        call_api(coordination.replace_namespaced_lease, node.name, "kube-node-lease",
                 lease_body(node, current["metadata"]["resourceVersion"]))
    except ApiException as e:
        if e.status != 404:
            raise
        call_api(coordination.create_namespaced_lease, "kube-node-lease", lease_body(node))


def keep_alive(core: Any, coordination: Any, node: FakeNode) -> bool:
    """Renew the Lease and, as a kubelet does, post the node's status again where the node-lifecycle
    controller has marked it NotReady (a Lease missed while the API server restarted, a partition);
    True when it did: the controller marked the node's pods not ready too."""
    renew_lease(coordination, node)
    conditions = (call_api(core.read_node, node.name).get("status") or {}).get("conditions") or []
    if all(c.get("status") == "True" for c in conditions if c.get("type") == "Ready"):
        return False
    call_api(core.patch_node_status, node.name, node_status(node))
    return True
