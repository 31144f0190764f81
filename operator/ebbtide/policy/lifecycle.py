"""The decision the operator and the simulator act on: the reactive core inside the time frame.

    plan(spec, signals, fleet, memory, now, startup_seconds) -> Decision

Schedule windows change floors, ceilings and targets (policy/schedules.py); a floor that a
window will raise is asked for one startup time early, so the replicas are ready when the
window opens. Then the reactive core decides within those bounds. Pure, like its parts.
"""

from __future__ import annotations

import dataclasses
import datetime

from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.policy.autoscaling import MAX_REPLICAS, MIN_REPLICAS, decide
from ebbtide.policy.decision import Decision, Memory
from ebbtide.policy.observation import FleetState, Signals
from ebbtide.policy.schedules import effective_bounds, effective_spec, floor_ahead, next_change


def plan(spec: InferenceServiceSpec, signals: Signals, fleet: FleetState, memory: Memory, now: float,
         startup_seconds: float | None = None) -> Decision:
    if not spec.schedules:
        return decide(spec, signals, fleet, memory, now)
    lead = startup_seconds if startup_seconds is not None else spec.warmup.default_startup_seconds
    floor = floor_ahead(spec, now, lead)
    decision = decide(effective_spec(spec, now, floor=floor), signals, fleet, memory, now)
    if decision.reason not in (MIN_REPLICAS, MAX_REPLICAS):
        return decision
    return dataclasses.replace(decision, message=f"{decision.message} ({_why(spec, now, floor)})")


def _why(spec: InferenceServiceSpec, now: float, floor: int) -> str:
    """Which schedule set the bound, in words."""
    here = effective_bounds(spec, now)
    if floor > here.min_replicas:
        change = next_change(spec.schedules, now)
        when = ""
        if change is not None:
            moment = datetime.datetime.fromtimestamp(change[0], datetime.UTC)
            when = f" for {change[1].name!r} at {moment:%H:%M} UTC"
        return f"floor {floor} started early{when}, one startup time ahead"
    if here.windows:
        return f"schedule {', '.join(here.windows)}"
    return "spec bounds"
