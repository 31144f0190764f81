"""Ticks the core cannot see through, and history it cannot trust: never act on missing data."""

from __future__ import annotations

from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.policy.behavior import prune, push_highest, push_lowest, record_change
from ebbtide.policy.decision import ConditionReport, Decision, Memory
from ebbtide.policy.decision_words import bound_reason, outside_bounds
from ebbtide.policy.observation import FleetState, Signals
from ebbtide.policy.reasons import (
    METRICS_AVAILABLE,
    METRICS_UNAVAILABLE,
    SCALED_TO_ZERO,
    SCALING_LIMITED,
)


def fresh(sampled_at: float, now: float, stale_after: float) -> bool:
    """The staleness rule: a sample older than `stale_after` (spec.scaling.behavior.staleAfterSeconds)
    counts as missing. NaN counts as stale."""
    return now - sampled_at <= stale_after


def metrics_problem(signals: Signals, fleet: FleetState, now: float,
                     stale_after: int) -> tuple[str, str] | None:
    """(condition reason, what is wrong) when the signals cannot be trusted; None when they can."""
    if signals.error:
        return "QueryFailed", f"metrics unavailable ({signals.error})"
    if signals.sampled_at is None:
        if fleet.current == 0 and fleet.ready == 0 and fleet.starting == 0:
            return "NoReplicas", "no replica runs, so none reports load"
        return "NoSamples", (f"no replica reports metrics yet ({fleet.ready} ready, "
                             f"{fleet.starting} starting)")
    if not fresh(signals.sampled_at, now, stale_after):
        return "Stale", f"metrics stale for {now - signals.sampled_at:.0f} s (limit {stale_after} s)"
    return None


def hold_blind(spec: InferenceServiceSpec, signals: Signals, fleet: FleetState, memory: Memory, now: float,
                problem: tuple[str, str], ready_rose_at: float | None, ready_fell_at: float | None) -> Decision:
    """Never act on missing data: hold the size (into bounds, which need no metrics).

    The hold is recorded as this tick's recommendation, so when metrics come back the
    scale-down window must fill with fresh ones before anything shrinks.
    """
    lo, hi = spec.replicas.min, spec.replicas.max
    current = fleet.current
    desired = min(max(current, lo), hi)
    condition_reason, text = problem
    if desired != current:
        reason, bounds = bound_reason(desired, lo), outside_bounds(current, lo, hi)
        message = f"{text}; {bounds}: {current} -> {desired}"
        limited = ConditionReport(SCALING_LIMITED, "True", reason, bounds)
    else:
        if condition_reason == "NoReplicas" and lo == 0:
            reason = SCALED_TO_ZERO
            text += " (scaling.activation wakes it)"
        else:
            reason = METRICS_UNAVAILABLE
        message = f"{text}: holding {current} replicas"
        limited = ConditionReport(SCALING_LIMITED, "Unknown", METRICS_UNAVAILABLE,
                                  "no scaling decision is made without metrics")

    behavior = spec.scaling.behavior
    up, down = behavior.scale_up, behavior.scale_down
    ups_window = prune(memory.up_recommendations, now - up.stabilization_seconds)
    downs_window = prune(memory.down_recommendations, now - down.stabilization_seconds)
    if up.stabilization_seconds > 0:
        ups_window = push_lowest(ups_window, now, desired)
    if down.stabilization_seconds > 0:
        downs_window = push_highest(downs_window, now, desired)
    ups, downs = record_change(memory.scale_ups, memory.scale_downs, current, desired, now,
                               up.period_seconds, down.period_seconds)
    new_memory = Memory(since=memory.since, up_recommendations=ups_window, down_recommendations=downs_window,
                        scale_ups=ups, scale_downs=downs, last_ready=fleet.ready, ready_rose_at=ready_rose_at,
                        ready_fell_at=ready_fell_at,
                        capacity=memory.capacity, breached_at=memory.breached_at, variability=memory.variability,
                        performance=memory.performance)
    used: dict[str, float] = {"ready": fleet.ready, "starting": fleet.starting}
    if signals.sampled_at is not None:
        used["sampleAgeSeconds"] = max(0.0, now - signals.sampled_at)
    conditions = (ConditionReport(METRICS_AVAILABLE, "False", condition_reason, text), limited)
    return Decision(desired=desired, current=current, reason=reason, message=message, signals=used,
                    source=signals.source, conditions=conditions, memory=new_memory)


def trusted(memory: Memory, now: float) -> Memory:
    """The memory, or an empty one if it claims to come from the future.

    History stamped after `now` means the clock went back (or another operator's clock was
    ahead); its windows cannot be read against this clock, so it counts as lost history,
    which blocks scale-downs for a window rather than pinning the fleet for however long the
    skew lasts.
    """
    newest = memory.since
    for entries in (memory.up_recommendations, memory.down_recommendations, memory.scale_ups,
                    memory.scale_downs):
        if entries and entries[-1][0] > newest:
            newest = entries[-1][0]
    for moment in (memory.ready_rose_at, memory.ready_fell_at, memory.breached_at):
        if moment is not None and moment > newest:
            newest = moment
    if newest <= now:
        return memory
    # What a replica can serve, and how far forecasts fell short, do not depend on the clock.
    return Memory(since=now, capacity=memory.capacity, variability=memory.variability.carried(),
                  performance=memory.performance)


def ready_changes(memory: Memory, fleet: FleetState, now: float,
                   window: int) -> tuple[float | None, float | None]:
    """When the ready count last rose and last fell, while it matters: windowed metrics
    (latency quantiles, token rates) still describe the old fleet for one window after."""
    rose, fell = memory.ready_rose_at, memory.ready_fell_at
    if memory.last_ready is not None:
        if fleet.ready > memory.last_ready:
            rose = now
        elif fleet.ready < memory.last_ready:
            fell = now
    if rose is not None and now - rose >= window:
        rose = None
    if fell is not None and now - fell >= window:
        fell = None
    return rose, fell
