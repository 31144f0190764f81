"""The words of a decision: which stage of decide() set the size, and the numbers behind it."""

from __future__ import annotations

from typing import NamedTuple

from ebbtide.api.spec import ScalingBehavior
from ebbtide.policy.behavior import Stabilized
from ebbtide.policy.decision import ConditionReport
from ebbtide.policy.observation import FleetState, Signals
from ebbtide.policy.reasons import (
    MAX_REPLICAS,
    MIN_REPLICAS,
    RATE_LIMITED,
    SCALING_LIMITED,
    STABILIZING,
    STEADY,
)
from ebbtide.policy.signal_rules import Load, Recommendation


class Stages(NamedTuple):
    current: int
    raw: int  # what the winning signal asks for
    clamped: int  # within replicas.min and max
    stabilized: int  # after the stabilization windows and the restart guard
    limited: int  # after the rate limits
    desired: int  # within bounds again (bounds beat rate limits)


def explain(winner: Recommendation, s: Stages, lo: int, hi: int, guarded: bool, limit_note: str,
             st: Stabilized, behavior: ScalingBehavior) -> tuple[str, str]:
    """(reason, message): the stage that decided the outcome names it."""
    text = winner.text
    if s.desired != s.current:
        if s.desired != s.limited:
            reason, text = bound_reason(s.desired, lo), outside_bounds(s.current, lo, hi)
        elif s.limited != s.stabilized:
            reason, text = RATE_LIMITED, text + limit_note
        elif s.clamped != s.raw and s.desired == s.clamped:
            reason, text = bound_reason(s.clamped, lo), text + clamp_note(s.clamped, lo)
        else:
            reason = winner.reason
            if s.stabilized != s.clamped:
                text += window_note(s.desired < s.current, st.lowest, st.highest, behavior)
        return reason, f"{text}: {s.current} -> {s.desired}"
    if s.clamped != s.current:  # the signals want a change that does not happen (yet)
        if guarded:
            reason, text = STABILIZING, text + limit_note
        elif s.stabilized == s.current:
            reason = STABILIZING
            text += window_note(s.clamped < s.current, st.lowest, st.highest, behavior)
        else:
            reason, text = RATE_LIMITED, text + limit_note
    elif s.raw != s.clamped:
        reason, text = bound_reason(s.clamped, lo), text + clamp_note(s.clamped, lo)
    else:
        reason = winner.reason if winner.pressure else STEADY
    return reason, f"{text}: holding {s.current}"


def signals_used(signals: Signals, fleet: FleetState, load: Load, now: float, raw: int,
                  capacity: float | None) -> dict[str, float]:
    used: dict[str, float] = {
        "waiting": load.waiting,
        "running": load.running,
        "podsReporting": load.pods,
        "ready": fleet.ready,
        "starting": fleet.starting,
        "sampleAgeSeconds": max(0.0, now - signals.sampled_at),  # type: ignore[operator]
        "recommended": raw,
    }
    if load.pods:
        used["kvCacheUsage"] = load.kv_sum / load.pods
    if signals.ttft_seconds is not None:
        used["ttftSeconds"] = signals.ttft_seconds
    if signals.tpot_seconds is not None:
        used["tpotSeconds"] = signals.tpot_seconds
    if signals.tokens_per_second is not None:
        used["tokensPerSecond"] = signals.tokens_per_second
    if capacity is not None:
        used["capacityTokensPerSecond"] = capacity
    return used


def bound_reason(bound: int, lo: int) -> str:
    return MIN_REPLICAS if bound == lo else MAX_REPLICAS


def clamp_note(clamped: int, lo: int) -> str:
    return f"; replicas.min is {clamped}" if clamped == lo else f"; replicas.max is {clamped}"


def outside_bounds(current: int, lo: int, hi: int) -> str:
    if current < lo:
        return f"{current} replicas is below replicas.min {lo}"
    return f"{current} replicas is above replicas.max {hi}"


def window_note(down: bool, lowest: int, highest: int, behavior: ScalingBehavior) -> str:
    if down:
        return (f"; the highest recommendation over the last {behavior.scale_down.stabilization_seconds} s "
                f"is {highest}")
    return f"; the lowest recommendation over the last {behavior.scale_up.stabilization_seconds} s is {lowest}"


def scaling_limited(raw: int, desired: int, lo: int, hi: int, rate_limited: bool) -> ConditionReport:
    if raw > hi and desired == hi:
        return ConditionReport(SCALING_LIMITED, "True", MAX_REPLICAS,
                               f"the load needs {raw} replicas; replicas.max is {hi}")
    if raw < lo and desired == lo:
        return ConditionReport(SCALING_LIMITED, "True", MIN_REPLICAS,
                               f"the load needs {raw} replicas; replicas.min keeps {lo}")
    if rate_limited:
        return ConditionReport(SCALING_LIMITED, "True", RATE_LIMITED,
                               "the change is limited by scaling.behavior rate limits")
    return ConditionReport(SCALING_LIMITED, "False", "WithinLimits",
                           f"{desired} replicas is within replicas [{lo}, {hi}]")
