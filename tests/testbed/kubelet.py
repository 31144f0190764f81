"""
The test bed's kubelet: fake Nodes whose pods really run, one engine-simulator process each.

The real control plane (``controlplane.py``) does everything else: the Deployment and ReplicaSet
controllers create the pods, the scheduler binds them to our Nodes, the garbage collector and
the taint-eviction controller delete them, the EndpointSlice controller lists the ready ones.
`Kubelet` does what a kubelet does and nothing more:

- registers its Nodes (an on-demand and a spot pool, labelled as Karpenter, EKS, GKE and AKS
  label theirs), posts their status and renews their Leases in ``kube-node-lease``;
- for every pod bound to one of its Nodes, starts the engine on the pod's own address in the
  test bed's pod network (``podnetwork.py``: 10.244.x.y in a network namespace of our own) and
  the container's port, so ``podIP:containerPort`` reaches it as in a cluster; a crashed engine
  is restarted (``restartCount`` + 1, after a back-off);
- writes ``pods/status``: phase, podIP, containerStatuses, ``ContainersReady`` from the engine's
  ``/health``, and ``Ready`` only when that and every ``readinessGates`` condition is True. The
  gate conditions are someone else's (the operator's): it never sets them, and a strategic merge
  patch leaves them alone;
- honours deletion: preStop ``sleep N`` (with ``honor_prestop``), SIGTERM, the grace period,
  SIGKILL, then deletes the pod with grace 0, as the kubelet's status manager does.

    with Kubelet(api_client, log_dir=tmp) as kubelet:
        kubelet.pods('default')               # what runs now
        kubelet.set_capacity('spot', False)   # the spot pool has no nodes (Karpenter got none)
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
import signal
import time
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

from tests.testbed.engines import (
    LoopThread,
    call_api,
    engine_command,
    is_pod_ready,
    now_rfc3339,
    pid_alive,
    readiness_gates_passed,
    reaped,
    spawn,
)
from tests.testbed.nodes import FakeNode, default_nodes, keep_alive, register_node
from tests.testbed.podnetwork import shared_pod_network
from tests.testbed.podstate import PodInfo, RunningPod, pod_status, prestop_seconds
from tests.testbed.waiting import wait_for

logger = logging.getLogger(__name__)

Body = dict[str, Any]
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
READY_FAILURE_THRESHOLD = 2
RESTART_BACKOFF_SECONDS = 1.0
LEASE_RENEW_SECONDS = 5.0


class Kubelet:
    """
    The kubelet of ``nodes`` (default: `default_nodes`). ``preset``, ``capacity_overrides`` and
    ``startup_delay`` shape every engine; ``max_grace_seconds`` caps a pod's termination grace;
    ``honor_prestop`` waits out a ``sleep N`` preStop hook before SIGTERM; ``log_dir`` gets one
    log per pod.
    """

    def __init__(self, api_client: Any, *, nodes: Sequence[FakeNode] | None = None, preset: str = "tiny",
                 startup_delay: float = 1.0, capacity_overrides: Mapping[str, Any] | None = None,
                 max_grace_seconds: float | None = None, honor_prestop: bool = False, interval: float = 0.2,
                 log_dir: str | pathlib.Path | None = None, engine_log_level: str = "WARNING") -> None:
        import kubernetes.client
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.coordination = kubernetes.client.CoordinationV1Api(api_client)
        self.nodes = {n.name: n for n in (default_nodes() if nodes is None else nodes)}
        self.unavailable_pools: set[str] = set()
        self.preset, self.startup_delay = preset, startup_delay
        self.capacity_overrides = dict(capacity_overrides or {})
        self.max_grace_seconds, self.honor_prestop = max_grace_seconds, honor_prestop
        self.interval = interval
        self.log_dir = pathlib.Path(log_dir) if log_dir is not None else None
        self.engine_log_level = engine_log_level
        self.network = shared_pod_network()
        self._pods: dict[str, RunningPod] = {}  # by uid
        self._all_pids: set[int] = set()
        self._snapshot: list[PodInfo] = []
        self._loop = LoopThread("kubelet")
        self._stop: asyncio.Event | None = None
        self._main: Any = None
        self._ticks = 0
        self._tasks: set[asyncio.Task] = set()
        self._session: aiohttp.ClientSession | None = None
        self._lease_renewed = 0.0

    # ------------------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 60.0) -> Kubelet:
        """Register the Nodes, wait until the scheduler may use them, then run in a thread."""
        for node in self.nodes.values():
            self._register(node)
        self._wait_schedulable(timeout)
        self._loop.start()
        self._main = self._loop.submit(self._run())
        wait_for(lambda: self._ticks > 0 or self._main.done(), timeout=timeout, interval=0.05,
                 what="the kubelet's first sync")
        if self._main.done():
            self._main.result()
        return self

    def stop(self) -> None:
        """Stop every engine (SIGTERM, SIGKILL after 5 s). Pods stay in the API, as with a dead kubelet."""
        if self._stop is not None and self._loop.running:
            self._loop.loop.call_soon_threadsafe(self._stop.set)
            with contextlib.suppress(Exception):
                self._main.result(60)
        self._loop.stop()

    def __enter__(self) -> Kubelet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def sync(self, ticks: int = 2, timeout: float = 30.0) -> None:
        """Block until ``ticks`` full syncs have run after this call."""
        target = self._ticks + ticks
        wait_for(lambda: self._ticks >= target, timeout=timeout, interval=0.05, what="the kubelet to sync")

    # ------------------------------------------------------------------------------ test API

    def pods(self, namespace: str | None = None, deployment: str | None = None) -> list[PodInfo]:
        """What runs now, oldest first (refreshed every sync)."""
        return [p for p in self._snapshot if (namespace is None or p.namespace == namespace)
                and (deployment is None or p.deployment == deployment)]

    def pod(self, namespace: str, name: str) -> PodInfo | None:
        return next((p for p in self._snapshot if (p.namespace, p.name) == (namespace, name)), None)

    @property
    def started_pids(self) -> set[int]:
        return set(self._all_pids)

    def live_pids(self) -> set[int]:
        return {pid for pid in self._all_pids if pid_alive(pid)}

    def set_capacity(self, capacity_type: str, available: bool) -> None:
        """A pool without capacity has no Nodes (Karpenter got none): its pods stay Pending."""
        (self.unavailable_pools.discard if available else self.unavailable_pools.add)(capacity_type)
        for node in self.nodes.values():
            if node.capacity_type != capacity_type:
                continue
            if available:
                self._register(node)
            else:
                with contextlib.suppress(Exception):
                    self.core.delete_node(node.name)
        if available:
            self._wait_schedulable(60)

    def taint_node(self, name: str, taint: Mapping[str, Any]) -> None:
        """Add (or replace, by key and effect) a taint: NoExecute ones the taint-eviction controller acts on."""
        node = self.nodes[name]
        node.taints = [t for t in node.taints
                       if (t.get("key"), t.get("effect")) != (taint.get("key"), taint.get("effect"))] + [dict(taint)]
        self._patch_taints(node)

    def untaint_node(self, name: str, key: str) -> None:
        node = self.nodes[name]
        node.taints = [t for t in node.taints if t.get("key") != key]
        self._patch_taints(node)

    def kill_engine(self, namespace: str, name: str, sig: int = signal.SIGKILL) -> int:
        """Signal a pod's engine (SIGKILL: a crash the kubelet restarts); returns the pid."""
        pod = next(p for p in self._pods.values() if (p.namespace, p.name) == (namespace, name))
        assert pod.proc is not None, f"{namespace}/{name} runs no engine"
        pod.proc.send_signal(sig)
        return pod.proc.pid

    # ------------------------------------------------------------------------------ nodes

    def _register(self, node: FakeNode) -> None:
        register_node(self.core, node)
        self._renew_lease(node)

    def _patch_taints(self, node: FakeNode) -> None:
        call_api(self.core.patch_node, node.name, {"spec": {"taints": node.taints or None}})

    def _wait_schedulable(self, timeout: float) -> None:
        """New Nodes carry ``not-ready`` taints until the node-lifecycle controller sees them Ready."""
        ours = {t.get("key") for n in self.nodes.values() for t in n.taints}

        def clean() -> bool:
            for node in self.nodes.values():
                if node.capacity_type in self.unavailable_pools:
                    continue
                body = call_api(self.core.read_node, node.name)
                if any(t["key"] not in ours for t in (body.get("spec") or {}).get("taints") or []):
                    return False
            return True
        wait_for(clean, timeout=timeout, interval=0.2, what="the node-lifecycle controller to lift its taints")

    def _renew_lease(self, node: FakeNode) -> None:
        if keep_alive(self.core, self.coordination, node):  # back from NotReady: write the pods' statuses again
            for pod in list(self._pods.values()):
                pod.last_status = None

    # ------------------------------------------------------------------------------ the sync loop

    async def _run(self) -> None:
        self._stop = asyncio.Event()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0))
        try:
            while not self._stop.is_set():
                try:
                    await self._sync()
                except Exception:  # the API server may be restarting: a kubelet keeps going
                    logger.exception("kubelet sync failed")
                self._ticks += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.interval)
        finally:
            await self._shutdown()

    async def _sync(self) -> None:
        if time.monotonic() - self._lease_renewed > LEASE_RENEW_SECONDS:
            for node in self.nodes.values():
                if node.capacity_type not in self.unavailable_pools:
                    await asyncio.to_thread(self._renew_lease, node)
            self._lease_renewed = time.monotonic()
        listed = await asyncio.to_thread(call_api, self.core.list_pod_for_all_namespaces)
        bound = {b["metadata"]["uid"]: b for b in listed.get("items") or []
                 if (b.get("spec") or {}).get("nodeName") in self.nodes}
        for uid, pod in list(self._pods.items()):
            if uid not in bound and not pod.terminating:  # force-deleted, or its Node is gone
                self._begin_termination(pod, delete=False)
        for uid, body in bound.items():
            pod = self._pods.get(uid)
            if pod is None:
                if body["metadata"].get("deletionTimestamp"):
                    # Deleted before it was started (scaled away at once): nothing to stop, so the
                    # deletion is finished at once, as the kubelet's status manager does.
                    meta = body["metadata"]
                    await asyncio.to_thread(self._delete_now, meta["namespace"], meta["name"], meta["uid"])
                    continue
                if (body.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                    continue
                pod = self._pods[uid] = RunningPod.admitted(body, self.network.allocate(), self.max_grace_seconds)
            pod.gates_passed = readiness_gates_passed(body)
            if self._cut_off(pod):
                pass  # its node cannot reach the API server: the node controller's word stands
            elif pod.last_status is not None and is_pod_ready(body) != is_pod_ready({"status": pod.last_status}):
                # Someone else set Ready (the node-lifecycle controller marks the pods of a node
                # it thinks lost NotReady): say again what is true, as the kubelet's status manager does.
                pod.last_status = None
            if body["metadata"].get("deletionTimestamp") and not pod.terminating:
                self._begin_termination(pod)
            if not pod.terminating:
                await self._check(pod)
        self._refresh_snapshot()
        for pod in list(self._pods.values()):
            if not pod.terminating and not self._cut_off(pod):
                await self._write_status(pod)

    def _delete_now(self, namespace: str, name: str, uid: str) -> None:
        """Finish a pod's deletion (grace 0), once nothing of it runs here."""
        from kubernetes.client.rest import ApiException
        with contextlib.suppress(ApiException):
            call_api(self.core.delete_namespaced_pod, name, namespace,
                     body={"gracePeriodSeconds": 0, "preconditions": {"uid": uid}})

    def _cut_off(self, pod: RunningPod) -> bool:
        """On a node of a pool cut off from the API server (it renews no Lease either)."""
        node = self.nodes.get(pod.node)
        return node is not None and node.capacity_type in self.unavailable_pools

    async def _check(self, pod: RunningPod) -> None:
        """Start, probe, or restart the engine."""
        if pod.proc is None:
            if pod.restart_after is None or time.monotonic() >= pod.restart_after:
                self._run_engine(pod)
            return
        code = pod.proc.poll()
        if code is not None:  # crashed: back off, then start it again
            pod.last_state = {"terminated": {"exitCode": code if code >= 0 else 137, "reason": "Error",
                                             "startedAt": pod.started_at, "finishedAt": now_rfc3339()}}
            pod.restart_count += 1
            reaped(pod.proc)
            pod.healthy, pod.proc = False, None
            pod.restart_after = time.monotonic() + RESTART_BACKOFF_SECONDS
            logger.warning("engine of %s/%s exited with %s; restarting", pod.namespace, pod.name, code)
            return
        try:
            async with self._session.get(f"http://{pod.ip}:{pod.port}/health") as response:
                ok = response.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            ok = False
        pod.failures = 0 if ok else pod.failures + 1
        if ok:
            pod.healthy = True
        elif pod.failures >= READY_FAILURE_THRESHOLD:
            pod.healthy = False

    def _run_engine(self, pod: RunningPod) -> None:
        command = engine_command(pod.container, host=pod.ip, port=pod.port, preset=self.preset,
                                 startup_delay=self.startup_delay, shutdown_timeout=max(0.0, pod.grace - 0.5),
                                 capacity_overrides=self.capacity_overrides, log_level=self.engine_log_level)
        log_path = self.log_dir / f"{pod.namespace}_{pod.name}.log" if self.log_dir is not None else None
        pod.proc = spawn(command.argv, command.env, log_path, wrap=self.network.command)
        self._all_pids.add(pod.proc.pid)
        pod.started_at, pod.restart_after, pod.failures, pod.healthy = now_rfc3339(), None, 0, False
        logger.info("started %s/%s: pid %d at %s:%d", pod.namespace, pod.name, pod.proc.pid, pod.ip, pod.port)

    # ------------------------------------------------------------------------------ pod status

    async def _write_status(self, pod: RunningPod, status: Body | None = None) -> None:
        status = status or pod_status(pod)
        if status == pod.last_status:
            return
        from kubernetes.client.rest import ApiException
        try:  # strategic merge: conditions merge by type, so the readiness-gate conditions stay
            await asyncio.to_thread(call_api, self.core.patch_namespaced_pod_status, pod.name, pod.namespace,
                                    {"status": status}, _content_type=STRATEGIC_MERGE_PATCH)
            pod.last_status = status
        except ApiException as e:
            if e.status != 404:  # the pod is gone: nothing to report
                raise

    # ------------------------------------------------------------------------------ termination

    def _begin_termination(self, pod: RunningPod, *, delete: bool = True) -> None:
        pod.terminating = True
        task = asyncio.get_running_loop().create_task(self._terminate(pod, delete=delete))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _terminate(self, pod: RunningPod, *, delete: bool) -> None:
        try:
            if pod.alive and self.honor_prestop and delete:
                await asyncio.sleep(min(prestop_seconds(pod.container), pod.grace))
            await self._stop_engine(pod, pod.grace)
            if delete:  # what the kubelet's status manager does once the containers are gone
                await asyncio.to_thread(self._delete_now, pod.namespace, pod.name, pod.uid)
        except Exception:
            logger.exception("terminating %s/%s failed", pod.namespace, pod.name)
        finally:
            self._pods.pop(pod.uid, None)
            self.network.release(pod.ip)
            self._refresh_snapshot()

    async def _stop_engine(self, pod: RunningPod, grace: float) -> None:
        proc = pod.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if proc.poll() is None:
                logger.warning("%s/%s did not stop in %.1f s: SIGKILL", pod.namespace, pod.name, grace)
                with contextlib.suppress(OSError):
                    proc.kill()
                await asyncio.to_thread(proc.wait)
        reaped(proc)

    async def _shutdown(self) -> None:
        pods = list(self._pods.values())
        for pod in pods:
            pod.terminating = True
        await asyncio.gather(*(self._stop_engine(p, min(p.grace, 5.0)) for p in pods), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for pod in pods:
            self.network.release(pod.ip)
        self._pods.clear()
        self._refresh_snapshot()
        await self._session.close()

    def _refresh_snapshot(self) -> None:
        self._snapshot = [p.info() for p in self._pods.values()]


if __name__ == "__main__":  # python -m tests.testbed.kubelet: the command line lives in kubelet_cli
    from tests.testbed.kubelet_cli import main
    raise SystemExit(main())
