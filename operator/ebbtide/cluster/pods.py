"""What one list of pods says about each service: replicas for the core, GPUs held for the
cost ledger, spot pods for the fallback, startup times for the lead time.

Pure functions of the pod objects the API returns (plain dicts), read once per tick.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

from ebbtide.cluster.render import LABEL_CAPACITY, LABEL_SERVICE, LABEL_SERVING, SPOT
from ebbtide.policy.cost import Held
from ebbtide.policy.spot import PodView


def parse_time(stamp: str | None) -> float | None:
    """Unix seconds of an RFC 3339 timestamp as the API server writes it; None if absent or unreadable."""
    if not stamp:
        return None
    try:
        return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass
class ServicePods:
    ready: int = 0  # Ready and serving (not asleep, not warming)
    starting: int = 0  # created, not Ready yet: capacity on its way
    asleep: int = 0  # Ready but taken out of the Service (vLLM sleep)
    names: list[str] = field(default_factory=list)
    held: Held = Held()  # replicas holding a GPU, by what they cost
    spot: list[PodView] = field(default_factory=list)  # the spot Deployment's pods, for the fallback
    # (created, ready) of pods Ready now: the startup times the lead time is measured from.
    startups: list[tuple[float, float]] = field(default_factory=list)


def _ready_since(pod: dict) -> float | None:
    """When the pod became Ready, or None if it is not Ready."""
    for c in pod.get("status", {}).get("conditions") or []:
        if c.get("type") == "Ready":
            if c.get("status") != "True":
                return None
            return parse_time(c.get("lastTransitionTime")) or 0.0
    return None


def _holds_gpu(pod: dict) -> bool:
    """Scheduled and not finished: a cloud bills the node from then until the pod is gone."""
    return bool(pod.get("spec", {}).get("nodeName")) and pod.get("status", {}).get("phase") not in (
        "Succeeded", "Failed")


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
        ready_at = _ready_since(pod)
        serving = labels.get(LABEL_SERVING, "true") == "true"
        asleep = ready_at is not None and not serving
        if _holds_gpu(pod):
            s.held = Held(on_demand=s.held.on_demand + (not on_spot and not asleep),
                          spot=s.held.spot + (on_spot and not asleep),
                          asleep_on_demand=s.held.asleep_on_demand + (not on_spot and asleep),
                          asleep_spot=s.held.asleep_spot + (on_spot and asleep))
        finished = pod.get("status", {}).get("phase") in ("Succeeded", "Failed")
        if meta.get("deletionTimestamp") or finished:
            continue  # on its way out: holds a GPU until gone, but is no capacity
        s.names.append(meta["name"])
        created = parse_time(meta.get("creationTimestamp")) or 0.0
        if ready_at is None:
            s.starting += 1
        elif asleep:
            s.asleep += 1
        else:
            s.ready += 1
            s.startups.append((created, ready_at))
        if on_spot:
            s.spot.append(PodView(name=meta["name"], ready=ready_at is not None,
                                  phase=pod.get("status", {}).get("phase", "Pending"), created_at=created,
                                  node=pod.get("spec", {}).get("nodeName")))
    return out


def reclaimed_nodes(nodes: list[dict], reclaim_taints: tuple[str, ...]) -> set[str]:
    """Nodes that announce their own end: a reclaim taint, or cordoned."""
    out = set()
    for node in nodes:
        taints = {t.get("key") for t in node.get("spec", {}).get("taints") or []}
        if node.get("spec", {}).get("unschedulable") or taints & set(reclaim_taints):
            out.add(node["metadata"]["name"])
    return out
