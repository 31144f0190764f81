"""
Asking the real kube-scheduler where a pod template may run.

`Scheduling` registers fake Nodes through our kubelet (so their Leases stay fresh and they stay
Ready), then answers "does this pod template fit that node?" the only way a scheduler answers:
a pod made from the template, pinned to the node's ``kubernetes.io/hostname``, is bound to it or
left Pending with the scheduler's reason (``PodScheduled=False``). The pod is deleted after.

    with Scheduling(api_client, [FakeNode(...), ...]) as scheduling:
        verdict = scheduling.fits(deployment['spec']['template'], 'gke-spot')
        bool(verdict), verdict.message   # True/False, and the scheduler's words when False
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from kubernetes.client.rest import ApiException

from tests.testbed.kubeapi import KubeApi
from tests.testbed.kubelet import Kubelet
from tests.testbed.nodes import FakeNode
from tests.testbed.waiting import wait_for

HOSTNAME = "kubernetes.io/hostname"
PODS = "v1/pods"


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The scheduler's answer for one pod on one node: bound there, or not with its reason."""
    scheduled: bool
    message: str = ""

    def __bool__(self) -> bool:
        return self.scheduled


def pinned_pod(template: Mapping[str, Any], node: str, name: str) -> dict[str, Any]:
    """A pod from the template that may only go to ``node`` (a nodeSelector ANDs with the rest)."""
    spec = copy.deepcopy(dict(template["spec"]))
    spec["nodeSelector"] = {**(spec.get("nodeSelector") or {}), HOSTNAME: node}
    labels = (template.get("metadata") or {}).get("labels") or {}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": dict(labels)}, "spec": spec}


def _scheduled(pod: Mapping[str, Any] | None) -> dict | None:
    conditions = ((pod or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == "PodScheduled"), None)


class Scheduling:
    """The scheduler's verdicts on ``nodes`` (registered on enter, deleted on exit) in ``namespace``."""

    def __init__(self, api_client: Any, nodes: Sequence[FakeNode], namespace: str = "default") -> None:
        self.api = KubeApi(api_client)
        self.nodes = {n.name: n for n in nodes}
        self.namespace = namespace
        # A slow sync: the kubelet only renews the Leases here; a bound probe pod is deleted
        # before it would start an engine for it (and stopped at once if it did).
        self.kubelet = Kubelet(api_client, nodes=nodes, interval=2.0)
        self._names = (f"fits-{i}" for i in itertools.count())

    def __enter__(self) -> Scheduling:
        self.kubelet.start()
        try:
            for node in self.nodes.values():
                self._wait_until_seen(node)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.kubelet.stop()
        for name in self.nodes:
            with contextlib.suppress(ApiException):
                self.api.delete_object("v1/nodes", None, name)

    def fits(self, template: Mapping[str, Any], node: str, timeout: float = 30.0, *,
             until_bound: bool = False) -> Verdict:
        """
        Whether the scheduler binds a pod of ``template`` (a pod template: metadata, spec) to
        ``node``: its first decision, or with ``until_bound`` the binding (waited for).
        """
        assert node in self.nodes, f"{node} is not one of this helper's nodes: {sorted(self.nodes)}"
        name = next(self._names)
        self.api.create_object(pinned_pod(template, node, name), namespace=self.namespace)

        def decided() -> dict | None:
            condition = _scheduled(self.api.get_object(PODS, self.namespace, name))
            return condition if condition and (condition["status"] == "True" or not until_bound) else None
        try:
            condition = wait_for(decided, timeout=timeout, what=f"the scheduler to decide on {name} for {node}")
            pod = self.api.get_object(PODS, self.namespace, name)
        finally:
            self.api.delete_object(PODS, self.namespace, name, grace_period_seconds=0)
        if condition["status"] == "True":
            assert pod["spec"].get("nodeName") == node, pod["spec"].get("nodeName")
            return Verdict(True)
        return Verdict(False, f"{condition.get('reason')}: {condition.get('message')}")

    def _wait_until_seen(self, node: FakeNode) -> None:
        """
        A canary that tolerates only the node's own taints is bound to it: the scheduler's cache
        has the node, Ready and without the node controller's not-ready taint. (Before that, a
        probe could be refused for a node the scheduler has not seen yet.)
        """
        tolerations = [{"key": t["key"], "operator": "Exists", "effect": t["effect"]} for t in node.taints]
        container = {"name": "vllm", "image": "canary", "command": ["vllm", "serve"], "args": ["canary"]}
        self.fits({"spec": {"containers": [container], "tolerations": tolerations}}, node.name, timeout=60,
                  until_bound=True)
