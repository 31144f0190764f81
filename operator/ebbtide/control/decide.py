"""Decide: for one service, the tick's inputs from what was observed, the pure tick, and the
actions its Turn asks for. Nothing is read or written here."""

from __future__ import annotations

from dataclasses import dataclass

from ebbtide.api.ref import ServiceRef
from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.cluster.pods import ServicePods
from ebbtide.cluster.render import deployment_name
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


def observation(snapshot: Snapshot, ref: ServiceRef) -> Observation | None:
    """The tick's inputs for one service; None while its workload is not there (the reconciler
    is creating it)."""
    key = (ref.namespace, ref.name)
    on_demand = snapshot.deployments.get((ref.namespace, deployment_name(ref)))
    if on_demand is None:
        return None
    mine = snapshot.pods_of(key)
    signals = snapshot.signals.get(key) or Signals.missing("no observation")
    return Observation(signals=signals, pods=mine.views(),
                       deployments=Deployments(on_demand, snapshot.deployments.get(
                           (ref.namespace, deployment_name(ref, SPOT)))),
                       held=mine.held, startups=tuple(mine.startups), idle=seen_idle(signals, snapshot.now),
                       drained=seen_drained(signals, mine.left_service),
                       reclaimed_nodes=snapshot.reclaimed_nodes, activation=snapshot.activation.get(key),
                       stored_profile=snapshot.profiles.get(key))


def decide(snapshot: Snapshot, ref: ServiceRef, spec: InferenceServiceSpec, state: TickState) -> Step | None:
    seen = observation(snapshot, ref)
    if seen is None:
        return None
    turn = tick(spec, seen, state, snapshot.now)
    mine = snapshot.pods_of((ref.namespace, ref.name))
    return Step(snapshot.now, seen, turn, actions(ref, turn, seen.deployments, mine.members), mine)
