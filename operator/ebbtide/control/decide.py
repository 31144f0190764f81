"""Decide: for one service, the tick's inputs from what was observed, the pure tick, and the
actions its Turn asks for. Nothing is read or written here."""

from __future__ import annotations

from dataclasses import dataclass

from ebbtide.api.ref import ServiceRef
from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.cluster.pods import ServicePods
from ebbtide.cluster.render import deployment_name
from ebbtide.cluster.variants import single_variant_spec, variant_deployment_name
from ebbtide.control.actions import Actions, actions
from ebbtide.control.observe import Snapshot
from ebbtide.policy.capacity_types import SPOT
from ebbtide.policy.idle import seen_drained, seen_idle
from ebbtide.policy.observation import Deployments, Observation, Signals
from ebbtide.policy.tick import TickState, Turn, tick


@dataclass(frozen=True)
class Step:
    """One service's tick: what was seen, what was decided, what is to be done."""

    now: float
    seen: Observation
    turn: Turn
    actions: Actions
    pods: ServicePods
    spec: InferenceServiceSpec  # the spec it was decided on


def variant_replicas(snapshot: Snapshot, ref: ServiceRef, spec: InferenceServiceSpec) -> dict[str, int]:
    """spec.replicas of each variant's Deployment, for those there (the reconciler creates the others)."""
    counts = {v.name: snapshot.deployments.get((ref.namespace, variant_deployment_name(ref, v.name)))
              for v in spec.variants}
    return {name: n for name, n in counts.items() if n is not None}


def _deployments(snapshot: Snapshot, ref: ServiceRef, spec: InferenceServiceSpec) -> Deployments | None:
    if spec.has_variants:
        variants = variant_replicas(snapshot, ref, spec)
        # The variants' counts add up to the awake size, as one Deployment's would.
        return Deployments(sum(variants.values())) if variants else None
    on_demand = snapshot.deployments.get((ref.namespace, deployment_name(ref)))
    if on_demand is None:
        return None
    return Deployments(on_demand, snapshot.deployments.get((ref.namespace, deployment_name(ref, SPOT))))


def observation(snapshot: Snapshot, ref: ServiceRef, spec: InferenceServiceSpec) -> Observation | None:
    """The tick's inputs for one service; None while its workload is not there (the reconciler
    is creating it)."""
    key = (ref.namespace, ref.name)
    deployments = _deployments(snapshot, ref, spec)
    if deployments is None:
        return None
    mine = snapshot.pods_of(key)
    signals = snapshot.signals.get(key) or Signals.missing("no observation")
    return Observation(signals=signals, pods=mine.views(), deployments=deployments,
                       held=mine.held, startups=tuple(mine.startups), idle=seen_idle(signals, snapshot.now),
                       drained=seen_drained(signals, mine.left_service),
                       reclaimed_nodes=snapshot.reclaimed_nodes, activation=snapshot.activation.get(key),
                       stored_profile=snapshot.profiles.get(key),
                       variant_signals=snapshot.variant_signals.get(key, {}))


def decide(snapshot: Snapshot, ref: ServiceRef, spec: InferenceServiceSpec, state: TickState) -> Step | None:
    seen = observation(snapshot, ref, spec)
    if seen is None:
        return None
    turn = tick(single_variant_spec(spec), seen, state, snapshot.now)
    mine = snapshot.pods_of((ref.namespace, ref.name))
    variants = variant_replicas(snapshot, ref, spec) if spec.has_variants else {}
    return Step(snapshot.now, seen, turn, actions(ref, turn, seen.deployments, mine.members, variants), mine,
                spec)
