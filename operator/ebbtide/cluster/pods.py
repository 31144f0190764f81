"""What one list of pods says about each service: the replicas the tick sees, GPUs held for the
cost ledger, startup times for the lead time, and what acting on each pod needs.

Pure functions of the pod objects the API returns (plain dicts), read once per tick.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

from ebbtide.api.conditions import get_condition
from ebbtide.cluster.engine import engine_started_at, engine_url
from ebbtide.cluster.render import LABEL_CAPACITY, LABEL_SERVICE, LABEL_SERVING
from ebbtide.cluster.variants import LABEL_VARIANT
from ebbtide.policy.capacity_types import ON_DEMAND, SPOT
from ebbtide.policy.cost import Held
from ebbtide.policy.observation import Pod, PodState
from ebbtide.policy.startup import Startup

# Set by the operator on a pod it put to sleep (unix seconds), removed when it wakes it: the
# pod's own record, so a restarted operator knows its sleepers and how long they have slept.
ANNOTATION_ASLEEP_SINCE = "ebbtide.dev/asleep-since"
# Set by the operator when it takes a pod out of the Service (unix seconds), removed when the
# pod rejoins: a drain's start, which its deadline and the proof it is over count from.
ANNOTATION_LEFT_SERVICE_AT = "ebbtide.dev/left-service-at"
# Read by the ReplicaSet controller: on a scale-down, pods with the lowest cost go first.
ANNOTATION_DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"


def parse_time(stamp: str | None) -> float | None:
    """Unix seconds of an RFC 3339 timestamp as the API server writes it; None if absent or unreadable."""
    if not stamp:
        return None
    try:
        return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class PodRecord:
    """One live pod: what the tick sees of it, and what acting on it needs."""

    name: str
    capacity: str  # on-demand or spot: which Deployment it belongs to
    state: PodState  # starting (not Ready), awake, or asleep
    serving: bool  # in the Service's endpoints (the serving label)
    asleep_since: float | None
    deletion_cost: str | None
    url: str | None  # the engine's address, for /sleep and /wake_up
    created: float = 0.0
    node: str | None = None
    phase: str = "Running"
    left_at: float | None = None  # out of the Service since (unix seconds); None while in it
    variant: str | None = None  # the accelerator variant whose Deployment it belongs to (spec.variants)

    def view(self) -> Pod:
        # The tick knows a variant's pods by their Deployment: the variant's name (policy/variant_tick.py).
        return Pod(self.name, self.variant or self.capacity, self.state, self.serving, self.asleep_since, self.created,
                   self.node, self.phase, ready=self.state != "starting", left_service_at=self.left_at)


@dataclass
class ServicePods:
    held: Held = Held()  # replicas holding a GPU, by what they cost (pods on their way out included)
    # Pods Ready and serving now: the startup times the lead time is measured from.
    startups: list[Startup] = field(default_factory=list)
    members: list[PodRecord] = field(default_factory=list)  # every live pod

    @property
    def ready(self) -> int:
        """Ready and serving (not asleep, not draining)."""
        return sum(1 for m in self.members if m.state == "awake" and m.serving)

    @property
    def starting(self) -> int:
        """Created, not Ready yet: capacity on its way."""
        return sum(1 for m in self.members if m.state == "starting")

    @property
    def asleep(self) -> int:
        """In vLLM sleep (warm pool), out of the Service."""
        return sum(1 for m in self.members if m.state == "asleep")

    @property
    def draining(self) -> int:
        """Awake but out of the Service: surplus on its way to sleep or deletion."""
        return len(self.left_service)

    @property
    def left_service(self) -> dict[str, float]:
        """Awake pods out of the Service -> since when: the drains under way."""
        return {m.name: m.left_at for m in self.members if m.state == "awake" and m.left_at is not None}

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def views(self) -> tuple[Pod, ...]:
        return tuple(m.view() for m in self.members)

    def of(self, capacity: str) -> list[PodRecord]:
        """The live pods of one Deployment (on-demand or spot)."""
        return [m for m in self.members if m.capacity == capacity]


def parse_float(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _true_since(pod: dict, type_: str) -> float | None:
    """When the pod's condition `type_` became True (0.0 if it does not say), or None if it is not True."""
    condition = get_condition(pod.get("status", {}).get("conditions"), type_)
    if condition is None or condition.get("status") != "True":
        return None
    return parse_time(condition.get("lastTransitionTime")) or 0.0


def _holds_gpu(pod: dict) -> bool:
    """Scheduled and not finished: a cloud bills the node from then until the pod is gone."""
    return bool(pod.get("spec", {}).get("nodeName")) and pod.get("status", {}).get("phase") not in (
        "Succeeded", "Failed")


def essentials(pod: dict) -> dict:
    """A listed pod cut down to what the tick reads of it (summarize here, cluster/warmup.py,
    cluster/engine.py): ~2 KiB of Python objects where the whole pod was ~18 KiB. The tick lists
    3,000 pods at 1,000 services, and the allocator keeps a tick's high-water mark as RSS."""
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    return {"metadata": _picked(meta, ("name", "namespace", "labels", "annotations", "creationTimestamp",
                                       "deletionTimestamp")),
            "spec": {**_picked(spec, ("nodeName", "readinessGates")),
                     "containers": [_picked(c, ("name", "args", "ports")) for c in spec.get("containers") or []]},
            "status": {**_picked(status, ("phase", "podIP", "conditions")),
                       "containerStatuses": [_picked(c, ("name", "ready", "state"))
                                             for c in status.get("containerStatuses") or []]}}


def _picked(obj: dict, keys: tuple[str, ...]) -> dict:
    return {k: obj[k] for k in keys if k in obj}


def summarize(pods: list[dict]) -> dict[tuple[str, str], ServicePods]:
    """Pods by (namespace, service name)."""
    out: dict[tuple[str, str], ServicePods] = {}
    for pod in pods:
        meta = pod.get("metadata", {})
        labels = meta.get("labels") or {}
        service = labels.get(LABEL_SERVICE)
        if not service:
            continue
        s = out.setdefault((meta.get("namespace", "default"), service), ServicePods())
        on_spot = labels.get(LABEL_CAPACITY) == SPOT
        ready_at = _true_since(pod, "Ready")
        serving = labels.get(LABEL_SERVING, "true") == "true"
        annotations = meta.get("annotations") or {}
        asleep_since = parse_float(annotations.get(ANNOTATION_ASLEEP_SINCE))
        # A sleeper whose engine restarted since (a crash) runs a fresh engine: awake, and still
        # out of the Service, so the pool treats it as awake surplus (rejoin, or sleep again).
        started = parse_time(engine_started_at(pod))
        if asleep_since is not None and started is not None and started > asleep_since:
            asleep_since = None
        asleep = ready_at is not None and asleep_since is not None
        if _holds_gpu(pod):
            s.held = Held(on_demand=s.held.on_demand + (not on_spot and not asleep),
                          spot=s.held.spot + (on_spot and not asleep),
                          asleep_on_demand=s.held.asleep_on_demand + (not on_spot and asleep),
                          asleep_spot=s.held.asleep_spot + (on_spot and asleep))
        finished = pod.get("status", {}).get("phase") in ("Succeeded", "Failed")
        if meta.get("deletionTimestamp") or finished:
            continue  # on its way out: holds a GPU until gone, but is no capacity
        created = parse_time(meta.get("creationTimestamp")) or 0.0
        state: PodState = "starting" if ready_at is None else "asleep" if asleep else "awake"
        if state == "awake" and serving:
            s.startups.append(Startup(created, _true_since(pod, "PodScheduled"), ready_at, on_spot))
        # Out of the Service with no mark (marked by an older operator): since it was created, at the latest.
        left_at = None if serving else parse_float(annotations.get(ANNOTATION_LEFT_SERVICE_AT)) or created
        s.members.append(PodRecord(meta["name"], SPOT if on_spot else ON_DEMAND, state, serving,
                                   asleep_since if asleep else None,
                                   annotations.get(ANNOTATION_DELETION_COST), engine_url(pod), created,
                                   pod.get("spec", {}).get("nodeName"), pod.get("status", {}).get("phase", "Pending"),
                                   left_at, labels.get(LABEL_VARIANT)))
    return out


def node_essentials(node: dict) -> dict:
    """A node cut down to what reclaimed_nodes reads: its name, taints and cordon."""
    spec = node.get("spec") or {}
    return {"metadata": {"name": (node.get("metadata") or {}).get("name")},
            "spec": _picked(spec, ("taints", "unschedulable"))}


def reclaimed_nodes(nodes: list[dict], reclaim_taints: tuple[str, ...]) -> set[str]:
    """Nodes that announce their own end: a reclaim taint, or cordoned."""
    out = set()
    for node in nodes:
        taints = {t.get("key") for t in node.get("spec", {}).get("taints") or []}
        if node.get("spec", {}).get("unschedulable") or taints & set(reclaim_taints):
            out.add(node["metadata"]["name"])
    return out
