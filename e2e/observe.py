"""What the end-to-end scenarios read on the cluster: the objects they name, and `Observer`, which
follows one InferenceService (its Deployments, pods, status and Events) and logs every change."""

from __future__ import annotations

from tests.testbed.waiting import wait_for

from e2e.backend import Backend, StoryLog

NAMESPACE = "default"
ISVC = ("ebbtide.dev/v1alpha1", "InferenceService")
DEPLOYMENT = ("apps/v1", "Deployment")
SERVICE = ("v1", "Service")
POD = ("v1", "Pod")
EVENT = ("v1", "Event")
# The operator's contract with the cluster, as a user sees it on pods.
LABEL_SERVING = "ebbtide.dev/serving"
ANNOTATION_ASLEEP_SINCE = "ebbtide.dev/asleep-since"
CONDITION_WARMED_UP = "ebbtide.dev/warmed-up"


def condition(conditions: list[dict] | None, type_: str) -> dict:
    return next((c for c in conditions or [] if c.get("type") == type_), {})


def pod_summary(pod: dict) -> str:
    """name(phase, ready, out of the Service, asleep, node): what the scenarios follow on a pod."""
    meta, status = pod["metadata"], pod.get("status") or {}
    flags = [status.get("phase") or "?"]
    if condition(status.get("conditions"), "Ready").get("status") == "True":
        flags.append("ready")
    if meta.get("deletionTimestamp"):
        flags.append("Terminating")
    if (meta.get("labels") or {}).get(LABEL_SERVING) == "false":
        flags.append("out of the Service")
    if ANNOTATION_ASLEEP_SINCE in (meta.get("annotations") or {}):
        flags.append("asleep")
    if node := (pod.get("spec") or {}).get("nodeName"):
        flags.append(f"on {node}")
    return f"{meta['name']}({', '.join(flags)})"


class Observer:
    """Reads the cluster for a scenario and logs every change of the replica counts and the pods."""

    def __init__(self, backend: Backend, story: StoryLog, name: str, spot: bool = False,
                 namespace: str = NAMESPACE) -> None:
        self.backend, self.story, self.name, self.namespace = backend, story, name, namespace
        self.deployments = (name, f"{name}-spot") if spot else (name,)
        self.last: str | None = None
        self.last_pods: str | None = None

    def isvc(self) -> dict | None:
        return self.backend.get(*ISVC, self.name, self.namespace)

    def status(self) -> dict:
        return (self.isvc() or {}).get("status") or {}

    def replicas(self, deployment: str | None = None) -> int:
        """The spec.replicas of a Deployment (the on-demand one by default), logging the counts."""
        return self.counts().get(deployment or self.name) or 0

    def counts(self) -> dict:
        """spec.replicas and readyReplicas of each Deployment, status.replicas, phase, last decision."""
        counts: dict = {}
        for name in self.deployments:
            if deployment := self.backend.get(*DEPLOYMENT, name, self.namespace):
                counts[name] = deployment["spec"].get("replicas")
                counts[f"{name}.ready"] = (deployment.get("status") or {}).get("readyReplicas", 0)
        status = self.status()
        counts |= {f"status.{k}": v for k, v in (status.get("replicas") or {}).items() if v}
        counts |= {"phase": status.get("phase"), "last": status.get("lastDecisionSummary")}
        line = " ".join(f"{k}={v}" for k, v in counts.items())
        if line != self.last:
            self.last = line
            self.story.step(f"  replicas {line}")
        self.pods()
        return counts

    def pods(self) -> list[dict]:
        """The service's pods (both Deployments), logged when they change."""
        pods = self.backend.list(*POD, self.namespace, label_selector=f"ebbtide.dev/service={self.name}")
        line = " ".join(sorted(pod_summary(p) for p in pods)) or "(none)"
        if line != self.last_pods:
            self.last_pods = line
            self.story.step(f"  pods {line}")
        return pods

    def live_pods(self) -> list[dict]:
        return [p for p in self.pods() if not p["metadata"].get("deletionTimestamp")]

    def events(self, reason: str) -> list[dict]:
        """The service's Events with this reason (filtered here: both backends list the namespace)."""
        about = {"kind": ISVC[1], "name": self.name}
        return [e for e in self.backend.list(*EVENT, self.namespace) if e.get("reason") == reason
                and {k: (e.get("involvedObject") or {}).get(k) for k in about} == about]

    def engines_asleep(self) -> dict[str, bool | None]:
        """Pod -> what its engine's /is_sleeping says (None where the backend cannot ask)."""
        return {p["metadata"]["name"]: (self.backend.engine_get(p, "/is_sleeping") or {}).get("is_sleeping")
                for p in self.live_pods()}

    def wait(self, probe, what: str, timeout: float = 60, interval: float = 1.0):
        self.story.step(f"waiting for {what}")
        found = wait_for(probe, timeout=timeout, interval=interval, what=what)
        self.story.step(f"seen: {what}")
        return found
