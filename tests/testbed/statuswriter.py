"""
A kwok-style kubelet for scale runs: fake Nodes whose pods run nothing.

`Kubelet` (kubelet.py) starts an engine process per pod; a thousand-service fleet has thousands
of pods, which no machine here can run. `StatusWriter` keeps the rest of a kubelet's contract
with the control plane and drops the processes:

- registers its Nodes and renews their Leases (nodes.py, as the kubelet does);
- watches pods (one list, then one watch; no polling of 3,000 pods) and marks every pod bound
  to its Nodes Running and Ready, with a pod IP, in the status the kubelet writes
  (podstate.pod_status, for a pod whose engine is up and healthy);
- honours deletion at once (the pod is deleted with grace 0, as the kubelet's status manager
  does once the containers are gone);
- tells `on_running(pod)` / `on_gone(pod)` so that an exporter serves metrics for exactly the
  pods that run (fleetexporter.py).

Readiness gates are honoured (Ready only when every gate is True), never set.

    with StatusWriter(api_client, nodes=status_nodes(4000)) as writer:
        writer.running()   # {(namespace, name): PodInfo-like RunningPod}
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import ipaddress
import json
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from tests.testbed.engines import call_api, now_rfc3339, readiness_gates_passed
from tests.testbed.nodes import FakeNode, keep_alive, pool_labels, register_node, renew_lease
from tests.testbed.podstate import RunningPod, pod_status
from tests.testbed.waiting import wait_for

logger = logging.getLogger(__name__)

STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
PODS_PER_NODE = 250  # what nodes.node_status() declares as the node's pod capacity
LEASE_RENEW_SECONDS = 5.0
WATCH_SECONDS = 240  # the API server ends a watch after this; we list again only on 410 Gone


@dataclasses.dataclass
class StatusOnlyPod(RunningPod):
    """A pod whose engine is up and healthy although no process runs."""

    @property
    def alive(self) -> bool:
        return True


def status_nodes(pods: int, prefix: str = "status-only") -> list[FakeNode]:
    """On-demand Nodes enough for `pods` pods (with a quarter to spare), as many GPUs as pods each."""
    count = max(1, -(-pods * 5 // (4 * PODS_PER_NODE)))
    return [FakeNode(f"{prefix}-{i}", "on-demand", pool_labels(f"{prefix}-{i}", "on-demand"), gpus=PODS_PER_NODE)
            for i in range(count)]


class StatusWriter:
    def __init__(self, api_client: Any, nodes: Sequence[FakeNode], *, workers: int = 8,
                 on_running: Callable[[RunningPod], None] | None = None,
                 on_gone: Callable[[RunningPod], None] | None = None) -> None:
        import kubernetes.client
        self.client = api_client
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.coordination = kubernetes.client.CoordinationV1Api(api_client)
        self.nodes = {n.name: n for n in nodes}
        self.on_running = on_running or (lambda pod: None)
        self.on_gone = on_gone or (lambda pod: None)
        self._pods: dict[str, StatusOnlyPod] = {}  # by uid
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="status-writer")
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._addresses = ipaddress.ip_network("10.128.0.0/10").hosts()  # never dialled: no process listens
        self.status_writes = 0
        self._response: Any = None  # the open watch, closed by stop() so that it need not time out

    # ------------------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 60.0) -> StatusWriter:
        for node in self.nodes.values():
            register_node(self.core, node)
            renew_lease(self.coordination, node)
        wait_for(self._schedulable, timeout=timeout, interval=0.5,
                 what="the node-lifecycle controller to lift its taints from the status-only nodes")
        for target, name in ((self._renew_leases, "leases"), (self._watch_pods, "pods")):
            thread = threading.Thread(target=target, name=f"status-writer-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            self._response.close()
        for thread in self._threads:
            thread.join(10)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> StatusWriter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def running(self) -> dict[tuple[str, str], RunningPod]:
        with self._lock:
            return {(p.namespace, p.name): p for p in self._pods.values() if p.last_status is not None}

    def _schedulable(self) -> bool:
        for node in self.nodes.values():
            taints = (call_api(self.core.read_node, node.name).get("spec") or {}).get("taints") or []
            if taints:
                return False
        return True

    def _renew_leases(self) -> None:
        """Every node's Lease, a few side by side: one after the other, 16 nodes behind a loaded
        API server took longer than the node-monitor grace period (20 s), and the node-lifecycle
        controller took the nodes NotReady and evicted their pods (bench/operator_scale.py)."""
        with concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="status-writer-leases") as leases:
            while not self._stop.wait(LEASE_RENEW_SECONDS):
                list(leases.map(self._keep_alive, list(self.nodes.values())))

    def _keep_alive(self, node: FakeNode) -> None:
        try:
            if keep_alive(self.core, self.coordination, node):  # back from NotReady: its pods were marked not ready
                with self._lock:
                    pods = [p for p in self._pods.values() if p.node == node.name and not p.terminating]
                for pod in pods:
                    self._pool.submit(self._write_status, pod, pod_status(pod))
        except Exception:  # the API server may be busy: the next round retries
            logger.exception("renewing the Lease of %s failed", node.name)

    # ------------------------------------------------------------------------------ pods

    def _watch_pods(self) -> None:
        """List once, then follow one watch; list again only when the watch's version is gone."""
        import kubernetes.watch
        version = None
        while not self._stop.is_set():
            try:
                if version is None:
                    listed = call_api(self.core.list_pod_for_all_namespaces)
                    for body in listed.get("items") or []:
                        self._handle("ADDED", body)
                    version = listed["metadata"]["resourceVersion"]
                response = self.core.list_pod_for_all_namespaces(
                    watch=True, resource_version=version, allow_watch_bookmarks=True,
                    timeout_seconds=WATCH_SECONDS, _preload_content=False)
                self._response = response
                for line in kubernetes.watch.watch.iter_resp_lines(response):
                    event = json.loads(line)
                    if event["type"] == "ERROR":
                        version = None if event["object"].get("code") == 410 else version
                        break
                    version = event["object"]["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK":
                        self._handle(event["type"], event["object"])
                    if self._stop.is_set():
                        break
            except Exception:  # a restarting API server: list again
                if self._stop.is_set():
                    return
                logger.exception("watching pods failed; listing again")
                version = None
                self._stop.wait(1.0)

    def _handle(self, kind: str, body: dict) -> None:
        meta, spec = body["metadata"], body.get("spec") or {}
        if spec.get("nodeName") not in self.nodes:
            return
        uid = meta["uid"]
        with self._lock:
            pod = self._pods.get(uid)
            if kind == "DELETED":
                gone = self._pods.pop(uid, None)
            elif pod is None and not meta.get("deletionTimestamp"):
                pod = self._pods[uid] = self._admit(body)
        if kind == "DELETED":
            if gone is not None:
                self.on_gone(gone)
            return
        if pod is None:
            return
        pod.gates_passed = readiness_gates_passed(body)
        if meta.get("deletionTimestamp"):
            if not pod.terminating:
                pod.terminating = True
                self.on_gone(pod)
                self._pool.submit(self._delete, pod)
            return
        status = pod_status(pod)
        if status != pod.last_status:
            self._pool.submit(self._write_status, pod, status)

    def _admit(self, body: dict) -> StatusOnlyPod:
        meta, spec = body["metadata"], body["spec"]
        container = next((c for c in spec.get("containers") or [] if c.get("name") == "vllm"), spec["containers"][0])
        port = next((int(p["containerPort"]) for p in container.get("ports") or [] if p.get("containerPort")), 8000)
        return StatusOnlyPod(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"], node=spec["nodeName"],
                             ip=str(next(self._addresses)), port=port, grace=0.0, container=container,
                             labels=meta.get("labels") or {}, started_at=now_rfc3339(), healthy=True)

    def _write_status(self, pod: StatusOnlyPod, status: dict) -> None:
        from kubernetes.client.rest import ApiException
        try:  # strategic merge: conditions merge by type, so the readiness-gate conditions stay
            call_api(self.core.patch_namespaced_pod_status, pod.name, pod.namespace, {"status": status},
                     _content_type=STRATEGIC_MERGE_PATCH)
        except ApiException as e:
            if e.status != 404:
                logger.warning("status of %s/%s not written: %s", pod.namespace, pod.name, e.reason)
            return
        first = pod.last_status is None
        pod.last_status = status
        self.status_writes += 1
        if first:
            self.on_running(pod)

    def _delete(self, pod: StatusOnlyPod) -> None:
        from kubernetes.client.rest import ApiException
        with contextlib.suppress(ApiException):
            call_api(self.core.delete_namespaced_pod, pod.name, pod.namespace,
                     body={"gracePeriodSeconds": 0, "preconditions": {"uid": pod.uid}})


def wait_running(writer: StatusWriter, count: int, timeout: float) -> None:
    """Until `count` pods have had their Running status written."""
    wait_for(lambda: len(writer.running()) >= count, timeout=timeout, interval=1.0, what=f"{count} pods Running")
