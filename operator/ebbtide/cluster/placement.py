"""Where a service's replicas may run: the pod-spec fields of each of its Deployments.

The provider presets (SPOT_PRESETS) tell spot nodes from on-demand ones the way each cloud
labels and taints them; a variant (cluster/variants.py) uses the same presets for its capacity type.
"""

from __future__ import annotations

from dataclasses import dataclass

from ebbtide.api.engine import EngineSpec
from ebbtide.api.spec import InferenceServiceSpec, Toleration
from ebbtide.policy.capacity_types import SPOT

LABEL_SERVICE = "ebbtide.dev/service"
LABEL_CAPACITY = "ebbtide.dev/capacity-type"
ZONE = "topology.kubernetes.io/zone"


@dataclass(frozen=True)
class Shape:
    """What sets one of a service's Deployments apart from its others: a capacity type's, or a
    variant's (cluster/variants.py)."""

    name: str
    selector: dict[str, str]  # besides the service label: what tells its pods from the others'
    labels: dict[str, str]  # on the Deployment and its pods (the selector's included)
    placement: dict  # nodeSelector, affinity, tolerations, spread
    grace_seconds: int
    engine: EngineSpec
    tensor_parallel: int


@dataclass(frozen=True)
class SpotPreset:
    """How one provider marks spot nodes (anchors.md, "Spot facts by cloud")."""

    spot_selector: dict[str, str]  # node labels of spot nodes
    spot_tolerations: tuple[dict, ...]  # taints spot nodes carry that spot pods must tolerate
    # What keeps on-demand pods off spot nodes: a label only on-demand nodes carry, or else
    # requirements (ANDed) that spot nodes fail.
    on_demand_selector: dict[str, str]
    on_demand_requirements: tuple[dict, ...]
    reclaim_notice_seconds: int | None  # the shortest warning a pod gets before its node goes


def not_in(key: str, value: str) -> dict:
    # NotIn also matches nodes without the label, which is what plain on-demand nodes look like.
    return {"key": key, "operator": "NotIn", "values": [value]}


def _no_schedule(key: str, value: str) -> dict:
    return {"key": key, "operator": "Equal", "value": value, "effect": "NoSchedule"}


GKE_SPOT = "cloud.google.com/gke-spot"
GKE_PREEMPTIBLE = "cloud.google.com/gke-preemptible"  # the older kind of GKE spot VM
AKS_PRIORITY = "kubernetes.azure.com/scalesetpriority"

SPOT_PRESETS: dict[str, SpotPreset] = {
    # Karpenter and EKS managed node groups label on-demand nodes too: select them directly.
    "karpenter": SpotPreset({"karpenter.sh/capacity-type": "spot"}, (),
                            {"karpenter.sh/capacity-type": "on-demand"}, (), 120),
    "eks": SpotPreset({"eks.amazonaws.com/capacityType": "SPOT"}, (),
                      {"eks.amazonaws.com/capacityType": "ON_DEMAND"}, (), 120),
    # GKE and AKS label only spot nodes: keep on-demand pods away from that label. GKE gives
    # ordinary pods 15 s of the 30 s notice; Autopilot (and many node pools) taint spot nodes.
    "gke": SpotPreset({GKE_SPOT: "true"}, (_no_schedule(GKE_SPOT, "true"),), {},
                      (not_in(GKE_SPOT, "true"), not_in(GKE_PREEMPTIBLE, "true")), 15),
    "aks": SpotPreset({AKS_PRIORITY: "spot"}, (_no_schedule(AKS_PRIORITY, "spot"),), {},
                      (not_in(AKS_PRIORITY, "spot"),), 30),
    # Only what the user wrote: placement.spot.nodeSelector says which nodes are spot (see _custom).
    "custom": SpotPreset({}, (), {}, (), None),
}


def tolerations_wire(tolerations: list[Toleration]) -> list[dict]:
    return [t.to_wire() for t in tolerations]


def unique(items: list[dict]) -> list[dict]:
    out: list[dict] = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


def _on_demand_terms(spec: InferenceServiceSpec, preset: SpotPreset) -> list[dict]:
    """Required node-affinity terms (ORed) that spot nodes fail; [] when the preset selects by label.

    Custom: spot nodes are the ones matching all of placement.spot.nodeSelector, so an
    on-demand node is one that misses any of those labels: one NotIn term per label. With no
    spot selector there is nothing to tell spot nodes by, and nothing is added.
    """
    if preset.on_demand_requirements:
        return [{"matchExpressions": list(preset.on_demand_requirements)}]
    if spec.placement.spot.provider == "custom":
        return [{"matchExpressions": [not_in(k, v)]} for k, v in sorted(spec.placement.spot.node_selector.items())]
    return []


def spread(selector: dict[str, str]) -> list[dict]:
    """Spot replicas spread over zones.

    Reclaims take capacity pools, often one zone at a time: spread so one reclaim takes as few
    replicas as it can (SkyServe spreads over zones the same way). ScheduleAnyway: a replica in
    a crowded zone beats a replica Pending.
    """
    return [{"maxSkew": 1, "topologyKey": ZONE, "whenUnsatisfiable": "ScheduleAnyway",
             "labelSelector": {"matchLabels": dict(selector)}}]


def required(terms: list[dict]) -> dict:
    """A pod affinity that allows only nodes matching one of `terms` (ORed)."""
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}


def pod_placement(spec: InferenceServiceSpec, capacity: str, selector: dict[str, str]) -> dict:
    """The pod-spec fields that decide where a replica of this capacity type may run."""
    placement = spec.placement
    node_selector = dict(placement.node_selector)
    tolerations = tolerations_wire(placement.tolerations)
    out: dict = {}
    if placement.spot.enabled:
        preset = SPOT_PRESETS[placement.spot.provider]
        if capacity == SPOT:
            # The preset wins over the service-wide selector (a capacity label there would make
            # the spot pods unschedulable); the user's spot selector wins over the preset.
            node_selector |= preset.spot_selector | placement.spot.node_selector
            tolerations += [*preset.spot_tolerations, *tolerations_wire(placement.spot.tolerations)]
            out["topologySpreadConstraints"] = spread(selector)
        else:
            node_selector |= preset.on_demand_selector
            terms = _on_demand_terms(spec, preset)
            if terms:
                out["affinity"] = required(terms)
    return with_nodes(out, node_selector, tolerations)


def with_nodes(out: dict, node_selector: dict[str, str], tolerations: list[dict]) -> dict:
    """The pod-spec fields `out` plus the node selector and tolerations, each only if it has any."""
    if node_selector:
        out["nodeSelector"] = node_selector
    if tolerations:
        out["tolerations"] = unique(tolerations)
    return out


def grace_period(spec: InferenceServiceSpec, capacity: str) -> int:
    """Seconds a stopping replica gets to finish its requests.

    On spot, no more than the provider's shortest reclaim notice: the node goes when the
    notice ends whatever the pod asked for, so a longer grace period only hides that the
    replica's requests will be cut. Fitting it in the notice makes the drain (preStop, vLLM's
    shutdown) plan for the time it really has. Custom: the notice is unknown, the spec's
    value stands.
    """
    grace = spec.engine.termination_grace_period_seconds
    return grace if capacity != SPOT else within_notice(grace, spec.placement.spot.provider)


def within_notice(grace: int, provider: str) -> int:
    """A spot replica's grace period, fitted in its provider's reclaim notice (if known)."""
    notice = SPOT_PRESETS[provider].reclaim_notice_seconds
    return grace if notice is None else min(grace, notice)
