"""One Deployment per accelerator variant (spec.variants with more than one entry).

Each variant's Deployment is `<service>-<variant>` and selects its pods by the variant label
alone: a variant's capacity type may be edited, a Deployment's selector may not. Its pods also
carry the capacity-type label (for `kubectl get pods -l`, and the cost ledger), and the
service label, so the Service and the PodDisruptionBudget select every variant's pods.

Where a variant runs: the provider preset of its capacity type (cluster/placement.py: a spot
variant on the provider's spot nodes, with their tolerations, spread over zones, its grace
period fitted in the reclaim notice; an on-demand one kept off spot nodes), then the
service-wide placement, then the variant's own selector, affinity and tolerations, which win.

A spec with one variant renders as a service without variants (one Deployment, `<service>`),
with that variant's GPUs, arguments and placement.
"""

from __future__ import annotations

import copy

from ebbtide.api.engine import EngineSpec
from ebbtide.api.ref import ServiceRef
from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.api.variants import Variant
from ebbtide.cluster.placement import (
    LABEL_CAPACITY,
    LABEL_SERVICE,
    SPOT_PRESETS,
    Shape,
    required,
    spread,
    tolerations_wire,
    with_nodes,
    within_notice,
)
from ebbtide.policy.capacity_types import ON_DEMAND, SPOT

LABEL_VARIANT = "ebbtide.dev/variant"
RESERVED = "reserved"
# Karpenter (v1.3 on, the ReservedCapacity feature gate) labels nodes of On-Demand Capacity
# Reservations with this capacity type; the other presets have no label for reserved capacity,
# so a reserved variant there is placed as on-demand, and its own selector names the pool.
KARPENTER_CAPACITY = "karpenter.sh/capacity-type"


def variant_deployment_name(ref: ServiceRef, variant: str) -> str:
    return f"{ref.name}-{variant}"


def variant_of(deployment: dict) -> str | None:
    """The variant a Deployment (or pod) runs, from its label; None for a service without variants."""
    return deployment.get("metadata", {}).get("labels", {}).get(LABEL_VARIANT)


def merged_args(base: list[str], override: list[str]) -> list[str]:
    """engine.args, then the variant's: a flag the variant names replaces the base's (with its values)."""
    def flag(arg: str) -> str | None:
        return arg.split("=", 1)[0] if arg.startswith("-") else None

    replaced = {f for f in map(flag, override) if f}
    out: list[str] = []
    dropping = False
    for arg in base:
        name = flag(arg)
        if name is not None:
            dropping = name in replaced
        if not dropping:
            out.append(arg)
    return out + list(override)


def variant_engine(spec: InferenceServiceSpec, variant: Variant) -> EngineSpec:
    return spec.engine.model_copy(update={"gpus": variant.gpus_per_replica,
                                          "args": merged_args(spec.engine.args, variant.engine_args)})


def _with_requirements(affinity: dict, expressions: list[dict]) -> dict:
    """The user's affinity with `expressions` ANDed into each of its required node terms (or as the only one)."""
    if not expressions:
        return affinity
    out = copy.deepcopy(affinity)
    node = out.setdefault("nodeAffinity", {})
    terms = node.get("requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms") or [{}]
    anded = [{**term, "matchExpressions": [*term.get("matchExpressions", []), *expressions]} for term in terms]
    node.update(required(anded)["nodeAffinity"])
    return out


def variant_placement(spec: InferenceServiceSpec, variant: Variant, selector: dict[str, str]) -> dict:
    """The pod-spec fields that decide where this variant's replicas may run."""
    preset = SPOT_PRESETS[variant.placement.provider]
    node_selector = dict(spec.placement.node_selector)
    tolerations = tolerations_wire(spec.placement.tolerations)
    out: dict = {}
    expressions: list[dict] = []
    if variant.capacity_type == SPOT:
        node_selector |= preset.spot_selector
        tolerations += list(preset.spot_tolerations)
        out["topologySpreadConstraints"] = spread(selector)
    elif variant.capacity_type == RESERVED and variant.placement.provider == "karpenter":
        node_selector[KARPENTER_CAPACITY] = RESERVED
    else:
        node_selector |= preset.on_demand_selector
        expressions = list(preset.on_demand_requirements)
    node_selector |= variant.placement.node_selector  # the variant's own word wins over the preset's
    tolerations += tolerations_wire(variant.placement.tolerations)
    affinity = _with_requirements(dict(variant.placement.affinity), expressions)
    if affinity:
        out["affinity"] = affinity
    return with_nodes(out, node_selector, tolerations)


def _grace(spec: InferenceServiceSpec, variant: Variant) -> int:
    grace = spec.engine.termination_grace_period_seconds
    return within_notice(grace, variant.placement.provider) if variant.capacity_type == SPOT else grace


def variant_shape(ref: ServiceRef, spec: InferenceServiceSpec, variant: Variant) -> Shape:
    selector = {LABEL_VARIANT: variant.name}
    labels = {LABEL_VARIANT: variant.name, LABEL_CAPACITY: variant.capacity_type}
    return Shape(variant_deployment_name(ref, variant.name), selector, labels,
                 variant_placement(spec, variant, {LABEL_SERVICE: ref.name, **selector}),
                 _grace(spec, variant), variant_engine(spec, variant), variant.tensor_parallel_size)


def single_variant_shape(ref: ServiceRef, spec: InferenceServiceSpec, variant: Variant) -> Shape:
    """The one Deployment of a spec with one variant: named (the service's own name) and labelled
    as without variants."""
    shape = variant_shape(ref, spec, variant)
    capacity = {LABEL_CAPACITY: ON_DEMAND}
    return Shape(ref.name, capacity, capacity, shape.placement, shape.grace_seconds, shape.engine,
                 shape.tensor_parallel)


def single_variant_spec(spec: InferenceServiceSpec) -> InferenceServiceSpec:
    """The spec the tick runs a one-variant service on: its one Deployment's pods are labelled
    on-demand (single_variant_shape), so they are charged at pricing.onDemandPerGpuHour, which is
    the variant's price here, for its GPUs per replica. Any other spec is returned as it is."""
    if len(spec.variants) != 1:
        return spec
    variant = spec.variants[0]
    return spec.model_copy(update={
        "pricing": spec.pricing.model_copy(update={"on_demand_per_gpu_hour": variant.price_per_gpu_hour}),
        "engine": variant_engine(spec, variant)})


def first_counts(spec: InferenceServiceSpec) -> dict[str, int]:
    """Replicas per variant when its Deployments are created: each variant's floor. What
    replicas.min asks beyond the floors is the tick's to place (from zero, on the cheapest
    suitable variant, within the budget) once the Deployments are there."""
    return {v.name: v.replicas.min for v in spec.variants}
