"""The decision the operator and the simulator act on: the reactive core inside the time frame.

    plan(spec, signals, fleet, memory, now, startup_seconds, profile) -> Decision

Schedule windows change floors, ceilings and targets (policy/schedules.py); a floor that a
window will raise is asked for one startup time early, so the replicas are ready when the
window opens. With a learned demand profile (policy/profile.py) a ramp the profile predicts
within one startup time raises the floor the same way (pre-warming). The higher floor wins,
then the reactive core decides within those bounds. Pure, like its parts.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import NamedTuple
from zoneinfo import ZoneInfo

from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.policy.autoscaling import decide
from ebbtide.policy.decision import ConditionReport, Decision, Memory
from ebbtide.policy.observation import FleetState, Signals
from ebbtide.policy.profile import (
    BIN_SECONDS,
    Profile,
    in_valley,
    observe,
    predict,
    prewarm_target,
    replicas_for,
)
from ebbtide.policy.reasons import MAX_REPLICAS, METRICS_AVAILABLE, MIN_REPLICAS
from ebbtide.policy.schedules import consolidated, effective_bounds, effective_spec, floor_ahead, next_change

PRE_WARMING = "PreWarming"
# A valley the profile knows: every quarter-hour through one startup time ahead below this
# share of the week's busiest. The coding week swings about 10x between night and day, so its
# nights sit near 10 %; 30 % leaves the shoulders of the day to the normal targets.
VALLEY_SHARE = 0.3


class Ramp(NamedTuple):
    """A rise in demand the profile expects within one startup time, and the floor it needs."""

    floor: int  # replicas to hold now: `wanted`, within the ceiling in force at `at`
    wanted: int  # ceil(demand x headroom / what one replica serves at the throughput target)
    demand: float  # predicted tokens/s at `at`
    replicas: float  # the same in replicas at the reactive core's throughput target (no headroom)
    at: float  # when that demand is expected (now, if its 15 minutes have begun)
    headroom: float  # warmup.predictive.headroom, for the message


def plan(spec: InferenceServiceSpec, signals: Signals, fleet: FleetState, memory: Memory, now: float,
         startup_seconds: float | None = None, profile: Profile | None = None) -> Decision:
    """The replicas to run now. With a profile and `warmup.predictive.enabled`, this tick's demand
    teaches the profile and a predicted ramp raises the floor; the updated profile is returned on
    the Decision for the shell to persist. Without one, the schedules and the reactive core alone."""
    lead = startup_seconds if startup_seconds is not None else spec.warmup.default_startup_seconds
    predictive = spec.warmup.predictive
    if profile is None or not predictive.enabled:
        decision = _scheduled(spec, signals, fleet, memory, now, lead)
        decision = dataclasses.replace(decision, off_peak=window_off_peak(spec, now))
        return decision if profile is None else dataclasses.replace(decision, profile=profile)

    if profile.lookback_weeks != predictive.lookback_weeks:  # the spec changed: forget at its pace
        profile = dataclasses.replace(profile, lookback_weeks=predictive.lookback_weeks)
    scheduled_floor = floor_ahead(spec, now, lead) if spec.schedules else spec.replicas.min
    ramp = ramp_ahead(spec, profile, memory.capacity, now, lead, _observed(signals, fleet))
    valley = ramp is None and in_valley(profile, now, lead, VALLEY_SHARE)
    if ramp is None or ramp.floor <= scheduled_floor:
        decision = _scheduled(spec, signals, fleet, memory, now, lead, scheduled_floor, valley)
        if valley and decision.changed:
            decision = dataclasses.replace(decision, message=f"{decision.message} (off-peak: the demand profile "
                                                             f"expects under {VALLEY_SHARE:.0%} of the week's peak)")
    else:
        decision = decide(effective_spec(spec, now, floor=ramp.floor), signals, fleet, memory, now, lead,
                          window_off_peak(spec, now))
        if decision.reason == MAX_REPLICAS and spec.schedules:
            decision = dataclasses.replace(
                decision, message=f"{decision.message} ({_why(spec, now, scheduled_floor)})")
        decision = _explain_ramp(decision, ramp, profile.timezone, now)
    if ramp is not None:
        signals_used = {**decision.signals, "predictedTokensPerSecond": ramp.demand, "prewarmReplicas": ramp.floor}
        decision = dataclasses.replace(decision, signals=signals_used)
    return dataclasses.replace(decision, profile=_learn(profile, decision, signals, fleet, now),
                               off_peak=valley or window_off_peak(spec, now))


def window_off_peak(spec: InferenceServiceSpec, now: float) -> bool:
    return bool(spec.schedules) and effective_bounds(spec, now).off_peak


def ramp_ahead(spec: InferenceServiceSpec, profile: Profile, capacity: float | None, now: float,
               lead_seconds: float, observed: float | None = None) -> Ramp | None:
    """The ramp to pre-warm for now, or None.

    The profile holds tokens/s (see _learn), which become replicas as the reactive core counts
    them: at scaling.targets.throughput of what one replica serves at its limit (memory.capacity). Until
    that limit has been seen, tokens/s cannot be turned into replicas and nothing is pre-warmed.

    Only a rise counts: the demand predicted ahead (the highest in (now, now + lead]) must exceed
    the level already reached, the lower of the predictions for the previous 15 minutes and the
    current ones, by more than the reactive core's tolerance. Those levels are read as they
    stood before this week's visits (profile.predict(before_this_week=True)): the bins ahead
    have not been visited yet, and on a day below its profile the visited ones already hold
    today's lower demand, which made every quarter-hour boundary look like a rise. Without the
    rise test the floor would sit at the prediction x headroom all day on a plateau (about 10 %
    more GPU-hours for replicas the reactive core already provides), and a day that runs far
    below its profile (a holiday) would be held at a normal day's size. Comparing with the
    previous 15 minutes keeps the floor up through the first quarter-hour of the new level,
    until the reactive core's metrics windows have seen the load and its scale-down window
    holds the replicas on its own.

    A day running below its profile (a holiday, a quiet Saturday) rises less too: with the
    demand `observed` now (tokens/s) below the level the ramp rises from by more than the
    tolerance, the ramp is scaled by the same ratio. Above it, the reactive core sees the extra
    load itself.

    The floor is bounded by the ceiling in force when the demand is expected (replicas.max, or a
    window's): a night cap must not stop the morning's replicas from starting before morning.
    """
    if capacity is None:
        return None
    per_replica = capacity * spec.scaling.targets.throughput
    headroom = spec.warmup.predictive.headroom
    # Everything is read as last week left it (before_this_week): the bins ahead and the ones
    # this week has already visited then compare like with like; today's own level enters
    # through `observed` below.
    target = prewarm_target(profile, now, lead_seconds, headroom, per_replica, before_this_week=True)
    if target is None:
        return None
    replicas, at = target
    demand = predict(profile, at, before_this_week=True)
    if demand is None:  # prewarm_target found it, so this does not happen; never pre-warm on nothing
        return None
    tolerance = spec.scaling.behavior.tolerance
    levels = [p for p in (predict(profile, now - BIN_SECONDS, before_this_week=True),
                          predict(profile, now, before_this_week=True)) if p is not None]
    if levels and demand <= min(levels) * (1.0 + tolerance):
        return None
    # The level the ramp starts from (the lower of the two bins) is what today's demand is
    # compared with: inside the ramp's first quarter-hour the metrics window still reads that
    # level, and must not be taken for a quiet day.
    start = min(levels) if levels else None
    if observed is not None and start and observed < start * (1.0 - tolerance):
        demand *= observed / start
        replicas = replicas_for(demand, headroom, per_replica)
        if replicas <= 0:
            return None
    ceiling = effective_bounds(spec, at).max_replicas
    return Ramp(min(replicas, ceiling), replicas, demand, demand / per_replica, at, headroom)


def _observed(signals: Signals, fleet: FleetState) -> float | None:
    """This tick's demand in tokens/s, when it can be read as demand (see _learn)."""
    fair = signals.error is None and signals.sampled_at is not None and fleet.ready > 0
    return signals.tokens_per_second if fair else None


def _learn(profile: Profile, decision: Decision, signals: Signals, fleet: FleetState, now: float) -> Profile:
    """The profile with this tick's demand, in tokens/s.

    Tokens/s is demand: proportional to the load whatever the fleet does. The replica count
    is not: it echoes the decisions (rate limits, bounds, the tolerance band, and pre-warming
    itself, which would teach the profile its own floor and ratchet it up week after week), and
    it bakes in today's estimate of a replica's capacity, while tokens/s are turned into
    replicas at prediction time with the newest one. (A saturated fleet serves less than is
    asked of it, so a ramp the reactive core ran behind reads low once; the next week, served
    on time, teaches the full height.) A tick the core could not see (metrics missing, stale or
    failed), one without a token rate, or one without a ready replica (nothing could serve, so
    nothing served says how much was asked) is no observation: unknown demand is not zero demand.
    """
    available = decision.condition(METRICS_AVAILABLE)
    if (available is None or available.status != "True" or signals.tokens_per_second is None
            or fleet.ready <= 0):
        return profile
    return observe(profile, now, signals.tokens_per_second)


def _explain_ramp(decision: Decision, ramp: Ramp, timezone: str, now: float) -> Decision:
    """Name pre-warming when its floor is what set the size; otherwise the core's words stand."""
    if decision.reason != MIN_REPLICAS or decision.desired != ramp.floor:
        return decision
    moment = datetime.datetime.fromtimestamp(ramp.at, ZoneInfo(timezone))
    # Bins start on whole quarter-hours in every zone: the ramp under way began at its bin's start.
    began = datetime.datetime.fromtimestamp(ramp.at - ramp.at % BIN_SECONDS, ZoneInfo(timezone))
    when = (f"expected at {moment:%H:%M} {moment.tzname()}" if ramp.at > now
            else f"under way since {began:%H:%M} {began.tzname()}")
    why = f"for the ramp {when} (predicted {ramp.replicas:.1f} replicas of demand, x{ramp.headroom:g} headroom"
    why += f"; {ramp.wanted} wanted, the ceiling is {ramp.floor})" if ramp.wanted > ramp.floor else ")"
    current, desired = decision.current, decision.desired
    if desired > current:
        message = f"pre-warming {current} -> {desired} {why}"
    elif desired == current:
        message = f"pre-warming: holding {current} {why}"
    else:
        message = f"{current} -> {desired}, no lower: pre-warming {why}"
    recommended = decision.signals.get("recommended")
    if recommended is not None:
        message += f"; the load now asks for {recommended:.0f}"
    metrics = decision.condition(METRICS_AVAILABLE)
    if metrics is not None and metrics.status != "True":
        message += f"; {metrics.message}"
    conditions = tuple(
        ConditionReport(c.type, c.status, PRE_WARMING, f"pre-warming keeps {desired} replicas {why}")
        if c.reason == MIN_REPLICAS else c
        for c in decision.conditions
    )
    return dataclasses.replace(decision, reason=PRE_WARMING, message=message, conditions=conditions)


def _scheduled(spec: InferenceServiceSpec, signals: Signals, fleet: FleetState, memory: Memory, now: float,
               lead: float, floor: int | None = None, valley: bool = False) -> Decision:
    """The schedules and the reactive core (plan() as it was before pre-warming); in a valley
    the profile knows, consolidated as in an off-peak window."""
    if not spec.schedules:
        return decide(consolidated(spec) if valley else spec, signals, fleet, memory, now, lead, valley)
    if floor is None:
        floor = floor_ahead(spec, now, lead)
    decision = decide(effective_spec(spec, now, floor=floor, off_peak=valley), signals, fleet, memory, now, lead,
                      valley or window_off_peak(spec, now))
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
