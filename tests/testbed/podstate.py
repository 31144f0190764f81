"""The test bed kubelet's pods: what it runs for each, and the status it writes for them."""
from __future__ import annotations

import contextlib
import dataclasses
import subprocess
from collections.abc import Mapping
from typing import Any

from tests.testbed.engines import now_rfc3339

Body = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class PodInfo:
    """A snapshot of one pod as the kubelet runs it."""
    namespace: str
    name: str
    deployment: str
    ip: str
    port: int
    pid: int | None
    ready: bool
    node: str
    terminating: bool
    restart_count: int

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}"


@dataclasses.dataclass
class RunningPod:
    namespace: str
    name: str
    uid: str
    node: str
    ip: str
    port: int
    grace: float
    container: dict[str, Any]
    labels: dict[str, str]
    proc: subprocess.Popen | None = None
    start_time: str = dataclasses.field(default_factory=now_rfc3339)
    started_at: str | None = None
    healthy: bool = False
    failures: int = 0
    gates_passed: bool = True
    restart_count: int = 0
    last_state: dict[str, Any] = dataclasses.field(default_factory=dict)
    restart_after: float | None = None
    transitions: dict[str, tuple[bool, str]] = dataclasses.field(default_factory=dict)
    terminating: bool = False
    last_status: dict[str, Any] | None = None

    @classmethod
    def admitted(cls, body: Body, ip: str, max_grace_seconds: float | None) -> RunningPod:
        """A pod bound to one of the kubelet's Nodes, at `ip`: its engine container's port and grace."""
        meta, spec = body["metadata"], body.get("spec") or {}
        containers = spec.get("containers") or [{}]
        container = next((c for c in containers if c.get("name") == "vllm"), containers[0])
        port = next((int(p["containerPort"]) for p in container.get("ports") or [] if p.get("containerPort")), 8000)
        grace = float(spec.get("terminationGracePeriodSeconds", 30))
        if max_grace_seconds is not None:
            grace = min(grace, max_grace_seconds)
        return cls(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"], node=spec["nodeName"],
                   ip=ip, port=port, grace=grace, container=container, labels=meta.get("labels") or {})

    def info(self) -> PodInfo:
        return PodInfo(namespace=self.namespace, name=self.name, deployment=self.deployment, ip=self.ip,
                       port=self.port, pid=self.proc.pid if self.alive else None,
                       ready=self.healthy and self.alive and self.gates_passed, node=self.node,
                       terminating=self.terminating, restart_count=self.restart_count)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def deployment(self) -> str:
        """The owning Deployment's name: the ReplicaSet's name less its template hash."""
        return self.name.rsplit("-", 2)[0] if "pod-template-hash" in self.labels else self.name

    def transition(self, condition: str, status: bool) -> str:
        """The lastTransitionTime of a condition, moved when its status changes."""
        if condition not in self.transitions or self.transitions[condition][0] != status:
            self.transitions[condition] = (status, now_rfc3339())
        return self.transitions[condition][1]


def pod_status(pod: RunningPod) -> Body:
    """What the kubelet writes to pods/status: Ready only with the engine healthy and every gate True."""
    ready = pod.healthy and pod.alive
    conditions = [{"type": c, "status": "True", "lastTransitionTime": pod.transition(c, True)}
                  for c in ("PodReadyToStartContainers", "Initialized")]
    for condition, true in (("ContainersReady", ready), ("Ready", ready and pod.gates_passed)):
        item = {"type": condition, "status": str(true), "lastTransitionTime": pod.transition(condition, true)}
        if not ready:
            item.update(reason="ContainersNotReady", message="containers with unready status: [vllm]")
        elif not true:
            item.update(reason="ReadinessGatesNotReady", message='the status of pod readiness gate is not "True"')
        conditions.append(item)
    if pod.alive:
        state: Body = {"running": {"startedAt": pod.started_at}}
    elif pod.restart_after is not None:
        state = {"waiting": {"reason": "CrashLoopBackOff",
                             "message": f"back-off restarting failed container vllm in pod {pod.name}"}}
    else:
        state = {"waiting": {"reason": "ContainerCreating"}}
    container = {"name": pod.container.get("name", "vllm"), "image": pod.container.get("image", ""),
                 "imageID": "", "ready": ready, "started": pod.alive and pod.healthy,
                 "restartCount": pod.restart_count, "state": state, "lastState": pod.last_state}
    if pod.proc is not None:
        container["containerID"] = f"testbed://{pod.proc.pid}"
    return {"phase": "Running", "conditions": conditions, "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": pod.ip, "podIPs": [{"ip": pod.ip}], "startTime": pod.start_time,
            "containerStatuses": [container]}


def prestop_seconds(container: Mapping[str, Any]) -> float:
    """The N of a ``sleep N`` preStop exec hook (the only kind the test bed runs), else 0."""
    command = ((((container.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command")) or []
    with contextlib.suppress(ValueError, IndexError):
        if command[0] == "sleep":
            return float(command[1])
    return 0.0
