"""Reactive autoscaling: from one tick's signals to the number of replicas a service should run.

    decide(spec, signals, fleet, memory, now) -> Decision

is the whole policy, and it is pure: time and history come in as arguments, a value comes out.
The operator calls it every tick for every service; the trace simulator calls it 40 000 times
a week per policy, so it reads the spec's attributes and does arithmetic, nothing more.

One tick, in order:
1. Blind? Missing, stale or failed metrics hold the current size (bounds still apply).
2. Each signal recommends a size; the largest demand wins.
   - KV-cache usage and running concurrency measure utilization, so they argue both ways:
     the replicas needed to carry the observed load at the target.
   - Token throughput, once the service has shown what a replica serves at its limit, argues
     both ways too, and is the one that stays right far from saturation (THROUGHPUT_TARGET).
   - Queue backlog and TTFT/TPOT breaches only push up: an empty queue or a fast response
     says nothing about how many replicas could go.
3. Clamp to [replicas.min, replicas.max].
4. Stabilize (lowest recommendation of the scale-up window, highest of the scale-down window),
   never scale down on history younger than the scale-down window, then rate-limit (and,
   until a replica's limit has been seen, remove one replica per metrics window).

Every recommendation is an absolute size compared with `fleet.current`, the size already asked
for, which counts replicas that are still starting: load they will absorb is not added again.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from ebbtide.api.spec import InferenceServiceSpec, LatencySlo, ScalingBehavior, ScalingTargets
from ebbtide.policy.behavior import (
    Stabilized,
    prune,
    push_highest,
    push_lowest,
    record_change,
    scale_down_limit,
    scale_up_limit,
    stabilize,
)
from ebbtide.policy.decision import ConditionReport, Decision, Memory
from ebbtide.policy.observation import FleetState, Signals

# Reasons, as they appear in status, Events and the operator's metrics.
QUEUE_BACKLOG = "QueueBacklog"
KV_CACHE = "KVCache"
CONCURRENCY = "Concurrency"
THROUGHPUT = "Throughput"
TTFT = "TTFT"
TPOT = "TPOT"
MIN_REPLICAS = "MinReplicas"
MAX_REPLICAS = "MaxReplicas"
STABILIZING = "Stabilizing"
RATE_LIMITED = "RateLimited"
METRICS_UNAVAILABLE = "MetricsUnavailable"
SCALED_TO_ZERO = "ScaledToZero"
STEADY = "Steady"

METRICS_AVAILABLE = "MetricsAvailable"
SCALING_LIMITED = "ScalingLimited"

# A latency quantile says the SLO is broken, not by how much capacity is short: TTFT counts
# queueing, so a 10x breach can be cured by far fewer than 10x replicas. Step proportionally,
# but at most doubling per step (Knative's panic threshold and AIBrix's scale-up rate are also
# 2); the rate limit bounds it again, and the next step waits until the quantile's window has
# seen the replicas this one added (see _latency).
LATENCY_MAX_STEP = 2.0

# KV usage and concurrency grow much faster than the load near saturation (a batch's step time
# grows with the batch, so requests stay longer): a fleet at a few % KV usage may be a third of
# the way to a queue, and "usage x replicas / target" then shrinks it straight into one, again
# and again (in a fluid replay of a compute-bound 8B model it cycled every ~7 minutes between a
# queue and 3x the replicas needed). Token throughput is proportional to the load, so once the
# service has shown what a replica serves at its limit (see _learn_capacity), it is sized to
# run each replica at this fraction of that: 0.7 bought little SLO for 10 % more GPU-hours in
# that replay, 0.9 let queues through on every ripple. That replay counted tokens when requests
# finished, which jumps after every backlog, and the limit it learned read ~7 % high (so 0.8 ran
# replicas at ~0.86 of their true limit). Measured again on the corrected replays of bench/
# (conv-week; conv-1h x 14 request by request, warm): 0.8 / 0.85 / 0.9 met the SLO for
# 99.98 / 99.95 / 99.61 % of the week's requests and 99.95 / 99.94 / 99.63 % of the hour's,
# with 1429 / 1347 / 1270 GPU-hours for the week and 8.2 / 8.0 / 8.2 for the hour. 0.8 stays:
# 0.85 is 6 % cheaper on the week, but it lets more of the day's ripples reach the queue, and
# a cheaper week that misses the SLO more often is not what this default is for.
# It is the default of scaling.targets.throughput (read from there: one number); off-peak
# windows raise it (schedules.py).
THROUGHPUT_TARGET: float = ScalingTargets.model_fields["throughput"].default
# Until that limit has been seen, the fleet is only ever shrunk by utilization signals, which
# read far too low (above), so it is shrunk by probing: one replica at a time, a metrics window
# apart, and only while the service reports its token rate (otherwise nothing can be learned).
# The first time it finds the limit it is then one replica short, not half the fleet: in a
# one-hour request-by-request replay of a chat log, halving 10 replicas at 56 % load held a
# queue for a cold start (TTFT p99 35 s, 94 % of requests within the SLO); see decide().
# Each reading taken during a breach moves the learned limit this far down toward it: fast
# enough to settle within one cold start, slow enough that one odd window does not decide.
CAPACITY_LEARNING_RATE = 0.25

# 0.75 * 4 / 0.75 is 4.000000000000001 in floating point; that must not become 5 replicas.
_EPSILON = 1e-9
# More replicas than any spec allows (replicas.max <= 1000): absurd loads saturate here
# instead of overflowing.
_MOST = 1_000_000


def _ceil(x: float) -> int:
    return math.ceil(x - _EPSILON) if x < _MOST else _MOST


class _Recommendation(NamedTuple):
    replicas: int
    reason: str
    text: str
    pressure: bool  # the signal is beyond its target (said as the reason even when holding)


class _Load(NamedTuple):
    """What the awake replicas with a fresh sample report, summed."""

    pods: int
    waiting: float
    running: float
    kv_sum: float  # sum of per-replica usage: KV load in replica units
    queued: int  # replicas with at least one request waiting


def decide(spec: InferenceServiceSpec, signals: Signals, fleet: FleetState, memory: Memory,
           now: float) -> Decision:
    """The replicas `spec`'s service should run now, why, and the memory for the next tick."""
    behavior = spec.scaling.behavior
    lo, hi = spec.replicas.min, spec.replicas.max
    current = fleet.current
    memory = _trusted(memory, now)
    ready_rose_at, ready_fell_at = _ready_changes(memory, fleet, now, behavior.metrics_window_seconds)

    problem = _metrics_problem(signals, fleet, now, behavior.stale_after_seconds)
    if problem is not None:
        return _hold_blind(spec, signals, fleet, memory, now, problem, ready_rose_at, ready_fell_at)

    load = _aggregate(signals, now - behavior.stale_after_seconds)
    # Ready replicas without a fresh sample carry load we cannot see: when the result would
    # shrink the fleet, count each of them at target (the HPA does the same), never at zero.
    unseen = max(0, fleet.ready - load.pods)
    recommendations = _recommend(spec, signals, fleet, load, unseen, current, now, ready_rose_at,
                                 memory.capacity)
    capacity, breached_at = _learn_capacity(spec, signals, fleet, load, memory, now,
                                            ready_rose_at is None and ready_fell_at is None)

    if recommendations:
        winner = max(recommendations, key=_strength)
    else:
        winner = _Recommendation(current, STEADY, "no signal is configured and observed", False)
    if winner.replicas < 1 and (load.waiting > 0 or load.running > 0 or load.kv_sum > 0):
        # With min 0, a service with requests in flight keeps a replica to serve them; whether
        # an idle one sleeps or goes is the lifecycle policy's call, not this one's.
        winner = _Recommendation(1, CONCURRENCY, f"{_count(load.running)} running and {_count(load.waiting)} "
                                 "waiting requests need at least one replica", True)
    raw = winner.replicas
    clamped = min(max(raw, lo), hi)

    up, down = behavior.scale_up, behavior.scale_down
    st = stabilize(current, clamped, memory.up_recommendations, memory.down_recommendations,
                   up.stabilization_seconds, down.stabilization_seconds, now)
    stabilized = st.replicas
    history = now - memory.since
    # Knative's rule: lost history must never shrink the fleet. After a restart (or with
    # unreadable status) the scale-down window is empty, so its "highest recommendation" is
    # just this tick's; wait until the window has been filled before trusting it.
    guarded = stabilized < current and history < down.stabilization_seconds
    if guarded:
        stabilized = current

    limited, limit_note = stabilized, ""
    if stabilized > current:
        ceiling, base = scale_up_limit(current, memory.scale_ups, up, now)
        if stabilized > ceiling:
            limited = ceiling
            limit_note = (f"; {stabilized} wanted, but at most max({up.max_increase_percent} %, "
                          f"{up.max_increase_replicas}) are added per {up.period_seconds} s from {base}")
    elif stabilized < current:
        floor, base = scale_down_limit(current, memory.scale_downs, down, now)
        note = (f"; {stabilized} wanted, but at most max({down.max_decrease_percent} %, "
                f"{down.max_decrease_replicas}) are removed per {down.period_seconds} s from {base}")
        if memory.capacity is None and signals.tokens_per_second is not None:
            probe_floor = current if ready_fell_at is not None else current - 1
            if probe_floor > floor:
                floor = probe_floor
                note = (f"; {stabilized} wanted, but until a replica's limit has been seen (queue on every "
                        f"replica or latency beyond target) replicas go one at a time, "
                        f"{behavior.metrics_window_seconds} s apart")
        if stabilized < floor:
            limited = floor
            limit_note = note
    # Bounds hold whatever the history says (a user who lowers max gets max at once, as with HPA).
    desired = min(max(limited, lo), hi)

    if guarded:
        limit_note = (f"; history begins {history:.0f} s ago (operator restart or lost status), "
                      f"no scale-down before {down.stabilization_seconds} s of it")
    reason, message = _explain(winner, _Stages(current, raw, clamped, stabilized, limited, desired), lo, hi,
                               guarded, limit_note, st, behavior)

    ups, downs = record_change(memory.scale_ups, memory.scale_downs, current, desired, now,
                               up.period_seconds, down.period_seconds)
    new_memory = Memory(since=memory.since, up_recommendations=st.up_recommendations,
                        down_recommendations=st.down_recommendations, scale_ups=ups, scale_downs=downs,
                        last_ready=fleet.ready, ready_rose_at=ready_rose_at, ready_fell_at=ready_fell_at,
                        capacity=capacity,
                        breached_at=breached_at)

    used = _signals_used(signals, fleet, load, now, raw, capacity)
    conditions = (
        ConditionReport(METRICS_AVAILABLE, "True", "Fresh",
                        f"{load.pods} replicas report via {signals.source}, newest sample "
                        f"{used['sampleAgeSeconds']:.0f} s old"),
        _scaling_limited(raw, desired, lo, hi, limited != stabilized or reason == RATE_LIMITED),
    )
    return Decision(desired=desired, current=current, reason=reason, message=message, signals=used,
                    source=signals.source, conditions=conditions, memory=new_memory)


class _Stages(NamedTuple):
    current: int
    raw: int  # what the winning signal asks for
    clamped: int  # within replicas.min and max
    stabilized: int  # after the stabilization windows and the restart guard
    limited: int  # after the rate limits
    desired: int  # within bounds again (bounds beat rate limits)


def _explain(winner: _Recommendation, s: _Stages, lo: int, hi: int, guarded: bool, limit_note: str,
             st: Stabilized, behavior: ScalingBehavior) -> tuple[str, str]:
    """(reason, message): the stage that decided the outcome names it."""
    text = winner.text
    if s.desired != s.current:
        if s.desired != s.limited:
            reason, text = _bound_reason(s.desired, lo), _outside_bounds(s.current, lo, hi)
        elif s.limited != s.stabilized:
            reason, text = RATE_LIMITED, text + limit_note
        elif s.clamped != s.raw and s.desired == s.clamped:
            reason, text = _bound_reason(s.clamped, lo), text + _clamp_note(s.clamped, lo)
        else:
            reason = winner.reason
            if s.stabilized != s.clamped:
                text += _window_note(s.desired < s.current, st.lowest, st.highest, behavior)
        return reason, f"{text}: {s.current} -> {s.desired}"
    if s.clamped != s.current:  # the signals want a change that does not happen (yet)
        if guarded:
            reason, text = STABILIZING, text + limit_note
        elif s.stabilized == s.current:
            reason = STABILIZING
            text += _window_note(s.clamped < s.current, st.lowest, st.highest, behavior)
        else:
            reason, text = RATE_LIMITED, text + limit_note
    elif s.raw != s.clamped:
        reason, text = _bound_reason(s.clamped, lo), text + _clamp_note(s.clamped, lo)
    else:
        reason = winner.reason if winner.pressure else STEADY
    return reason, f"{text}: holding {s.current}"


def _signals_used(signals: Signals, fleet: FleetState, load: _Load, now: float, raw: int,
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


# -- the signals -------------------------------------------------------------------------------


def _strength(r: _Recommendation) -> tuple[int, bool, bool]:
    """The largest demand wins. On a tie, a signal beyond its target names the reason before one
    that is not, and a utilization signal before the queue's veto (an empty queue is no reason
    for a scale-down); otherwise the first in signal order."""
    return r.replicas, r.pressure, r.pressure or r.reason != QUEUE_BACKLOG


def _aggregate(signals: Signals, fresh_after: float) -> _Load:
    pods = queued = 0
    waiting = running = kv_sum = 0.0
    for p in signals.pods:
        # A sleeping replica takes no requests and holds no KV cache; a pod whose own sample is
        # stale, or not a number, did not really report this tick (it counts as unseen).
        if p.asleep or not p.sampled_at >= fresh_after:  # `not >=`: NaN times are stale too
            continue
        if not math.isfinite(p.waiting + p.running + p.kv_cache_usage):
            continue
        pods += 1
        if p.waiting > 0:
            queued += 1
        waiting += max(0.0, p.waiting)
        running += max(0.0, p.running)
        kv_sum += max(0.0, p.kv_cache_usage)
    return _Load(pods, waiting, running, kv_sum, queued)


def _recommend(spec: InferenceServiceSpec, signals: Signals, fleet: FleetState, load: _Load, unseen: int,
               current: int, now: float, ready_rose_at: float | None,
               capacity: float | None) -> list[_Recommendation]:
    """One recommendation per configured and observed signal, in tie-break order."""
    targets = spec.scaling.targets
    behavior = spec.scaling.behavior
    tolerance = behavior.tolerance
    out: list[_Recommendation] = []
    if load.pods:
        if targets.waiting_per_replica is not None:
            out.append(_queue(load, targets.waiting_per_replica, tolerance, current))
        if targets.kv_cache_usage is not None:
            need = load.kv_sum / targets.kv_cache_usage
            text = (f"KV-cache usage {load.kv_sum / load.pods:.2f} x {load.pods} replicas / target "
                    f"{targets.kv_cache_usage:g} = {need:.1f} replicas")
            out.append(_utilization(KV_CACHE, text, need, current, unseen, tolerance))
        if targets.running_per_replica is not None:
            need = load.running / targets.running_per_replica
            text = (f"running requests {_count(load.running)} / target {targets.running_per_replica:g} per "
                    f"replica = {need:.1f} replicas")
            out.append(_utilization(CONCURRENCY, text, need, current, unseen, tolerance))
    tokens = signals.tokens_per_second
    share = targets.throughput
    if capacity is not None and capacity * share > 0 and tokens is not None and math.isfinite(
            tokens) and tokens >= 0:
        need = tokens / (capacity * share)
        text = (f"throughput {tokens:.0f} tokens/s / ({share:.0%} of the {capacity:.0f} tokens/s "
                f"a replica serves at its limit) = {need:.1f} replicas")
        # The rate counts every replica's tokens, so no replica is unseen.
        out.append(_utilization(THROUGHPUT, text, need, current, 0, tolerance))
    window = behavior.metrics_window_seconds
    for reason, slo, value in ((TTFT, targets.ttft, signals.ttft_seconds),
                               (TPOT, targets.tpot, signals.tpot_seconds)):
        if slo is not None and value is not None:
            rec = _latency(reason, slo, value, fleet.ready, current, tolerance, now, ready_rose_at, window)
            if rec is not None:
                out.append(rec)
    return out


def _utilization(reason: str, text: str, need: float, current: int, unseen: int,
                 tolerance: float) -> _Recommendation:
    """HPA's rule on a load measured in replicas (`need` = load / target per replica).

    The tolerance band is around the current size: within it nothing moves, so measurement
    noise does not flap the fleet. Outside it the size follows the load, both ways, and a
    scale-down counts every unseen ready replica as fully loaded.
    """
    if current > 0 and abs(need / current - 1.0) <= tolerance:
        return _Recommendation(current, reason, f"{text}, within {tolerance:.0%} of {current}", False)
    if need > current:
        return _Recommendation(_ceil(need), reason, text, True)
    if unseen:
        text += f" (+{unseen} ready replicas without a fresh sample, counted at target)"
    return _Recommendation(min(current, _ceil(need + unseen)), reason, text, False)


def _queue(load: _Load, target: float, tolerance: float, current: int) -> _Recommendation:
    """Queue backlog: upward pressure, plus a veto against shrinking into a queue.

    vLLM queues a request only when its batch or KV cache is full, so a replica's capacity is
    what it is running now; the backlog is demand beyond it. Above target, the need is the
    demand in flight (running + waiting) over what one replica carries at target (running per
    replica + waiting target). This is a tenth of KEDA's waiting/threshold when a replica runs
    256 requests and 42 wait, yet it reaches the target at the same point: it sizes to the
    demand rather than to the length of a queue each new replica absorbs at once. When the
    backlog outgrows that estimate, the next tick (and the TTFT SLO) adds more.

    At or below target the queue cannot argue for fewer replicas, but it still vetoes a
    scale-down that would put more than the target in each remaining replica's queue.
    """
    n, waiting, running = load.pods, load.waiting, load.running
    if _saturated(load, target, tolerance):
        # A replica carries at least one request, whatever it runs now (nothing, with a zero
        # target): this also keeps the need below the number of requests in flight.
        per_replica = max(running / n + target, 1.0)
        need = _ceil((running + waiting) / per_replica)
        text = (f"waiting requests {_count(waiting)} > target {target:g} x {n} replicas; "
                f"{_count(running + waiting)} in flight at {per_replica:.1f} per replica need {need}")
        return _Recommendation(max(need, current), QUEUE_BACKLOG, text, True)
    floor = min(_ceil(waiting / target), n, current) if target > 0 else 0
    if floor > 0:
        text = f"waiting requests {_count(waiting)} need {floor} replicas at target {target:g} per replica"
    else:
        text = "no requests waiting"
    return _Recommendation(floor, QUEUE_BACKLOG, text, False)


def _saturated(load: _Load, target: float | None, tolerance: float) -> bool:
    return target is not None and load.pods > 0 and load.waiting > load.pods * target * (1.0 + tolerance)


def _learn_capacity(spec: InferenceServiceSpec, signals: Signals, fleet: FleetState, load: _Load,
                    memory: Memory, now: float, ready_steady: bool) -> tuple[float | None, float | None]:
    """(tokens/s one replica serves at the service's limit, when a target was last breached).

    The limit is where the service leaves its targets: a queue on every replica (saturation),
    a TPOT quantile beyond its SLO (long prompts can break it well before the batch is full),
    or a TTFT quantile beyond its SLO while requests wait. The token rate per ready replica is
    read only when the ready count has not changed for a whole metrics window, since the rate
    is an average over that window:
    - read during a breach, it is a load the replicas could not carry within their targets:
      the estimate moves a quarter of the way down to it (one odd window does not decide);
    - read after a whole window without a breach, and with nobody waiting, it is a load they
      did carry: the estimate rises to it if it was lower (a lighter request mix, or a
      too-cautious first reading).
    A queue on only some replicas (sticky sessions, prefix-aware routing) is no breach here:
    tokens per replica would read far too low, and replicas added on that would not relieve
    the hot one, read lower still, and run away.
    """
    targets = spec.scaling.targets
    behavior = spec.scaling.behavior
    window = behavior.metrics_window_seconds
    queue_everywhere = (load.pods > 0 and load.queued == load.pods
                        and _saturated(load, targets.waiting_per_replica, behavior.tolerance))
    ttft_breached = _slo_breached(targets.ttft, signals.ttft_seconds, behavior.tolerance)
    tpot_breached = _slo_breached(targets.tpot, signals.tpot_seconds, behavior.tolerance)
    breached = queue_everywhere or ttft_breached or tpot_breached
    # TTFT counts queueing, and its quantile covers a window: it still reports a backlog for a
    # window after the backlog is gone, while the replicas, caught up, serve less than their
    # limit. Such a reading is no limit: TTFT teaches it only while requests are waiting (in
    # a week's replay, three readings after one drained backlog took the limit 7 % down).
    at_limit = queue_everywhere or tpot_breached or (ttft_breached and load.waiting > 0)
    breached_at = now if breached else memory.breached_at
    if breached_at is not None and now - breached_at >= window:
        breached_at = None
    tokens = signals.tokens_per_second
    if (fleet.ready <= 0 or not ready_steady or now - memory.since < window
            or tokens is None or not 0 < tokens < math.inf):
        return memory.capacity, breached_at
    observed = tokens / fleet.ready
    if not observed * THROUGHPUT_TARGET > 0:  # a rate so small it underflows teaches nothing
        return memory.capacity, breached_at
    capacity = memory.capacity
    if at_limit:
        if capacity is None:
            return observed, breached_at
        if observed < capacity:
            return capacity + CAPACITY_LEARNING_RATE * (observed - capacity), breached_at
    elif not breached and breached_at is None and capacity is not None and observed > capacity and load.waiting == 0:
        # Only a reading with nobody waiting: with a queue the replicas are at their limit,
        # and while their batches fill, prompt tokens (counted at prefill) run ahead of what
        # they sustain (a week's replay crept 7 % above the true limit on such readings).
        return observed, breached_at
    return capacity, breached_at


def _slo_breached(slo: LatencySlo | None, value: float | None, tolerance: float) -> bool:
    return slo is not None and value is not None and value > slo.target_seconds * (1.0 + tolerance)


def _latency(reason: str, slo: LatencySlo, value: float, ready: int, current: int, tolerance: float,
             now: float, ready_rose_at: float | None, window: int) -> _Recommendation | None:
    """A latency SLO breach: step the ready replicas up in proportion, at most doubling.

    The latency comes from the replicas that are ready, so they are the base; replicas still
    starting are in `current` already and absorb their share. A quantile over a window still
    describes the smaller fleet for a window after new replicas became ready: acting on it
    again then would double twice for one breach.
    """
    if not _slo_breached(slo, value, tolerance):  # also False for NaN
        return None
    label = f"{reason} p{slo.quantile * 100:g} {value:.3g} s > target {slo.target_seconds:g} s"
    if ready_rose_at is not None and now - ready_rose_at < window:
        text = (f"{label}, but replicas became ready {now - ready_rose_at:.0f} s ago, inside the "
                f"{window} s window the quantile covers")
        return _Recommendation(current, reason, text, True)
    ratio = value / slo.target_seconds
    step = min(ratio, LATENCY_MAX_STEP)
    need = _ceil(ready * step)
    capped = f" (ratio {ratio:.2g}, capped)" if ratio > LATENCY_MAX_STEP else ""
    text = f"{label}: {ready} ready replicas x {step:.2g}{capped} = {need}"
    return _Recommendation(max(need, current), reason, text, True)


# -- blind ticks -------------------------------------------------------------------------------


def _metrics_problem(signals: Signals, fleet: FleetState, now: float,
                     stale_after: int) -> tuple[str, str] | None:
    """(condition reason, what is wrong) when the signals cannot be trusted; None when they can."""
    if signals.error:
        return "QueryFailed", f"metrics unavailable ({signals.error})"
    if signals.sampled_at is None:
        if fleet.current == 0 and fleet.ready == 0 and fleet.starting == 0:
            return "NoReplicas", "no replica runs, so none reports load"
        return "NoSamples", (f"no replica reports metrics yet ({fleet.ready} ready, "
                             f"{fleet.starting} starting)")
    age = now - signals.sampled_at
    if not age <= stale_after:  # NaN included
        return "Stale", f"metrics stale for {age:.0f} s (limit {stale_after} s)"
    return None


def _hold_blind(spec: InferenceServiceSpec, signals: Signals, fleet: FleetState, memory: Memory, now: float,
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
        reason, bounds = _bound_reason(desired, lo), _outside_bounds(current, lo, hi)
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
                        capacity=memory.capacity, breached_at=memory.breached_at)
    used: dict[str, float] = {"ready": fleet.ready, "starting": fleet.starting}
    if signals.sampled_at is not None:
        used["sampleAgeSeconds"] = max(0.0, now - signals.sampled_at)
    conditions = (ConditionReport(METRICS_AVAILABLE, "False", condition_reason, text), limited)
    return Decision(desired=desired, current=current, reason=reason, message=message, signals=used,
                    source=signals.source, conditions=conditions, memory=new_memory)


# -- memory ------------------------------------------------------------------------------------


def _trusted(memory: Memory, now: float) -> Memory:
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
    # What a replica can serve does not depend on the clock: keep it.
    return Memory(since=now, capacity=memory.capacity)


def _ready_changes(memory: Memory, fleet: FleetState, now: float,
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


# -- words -------------------------------------------------------------------------------------


def _count(x: float) -> str:
    """Request counts are whole numbers from vLLM, averages in simulations: 42, 5.8, 2856."""
    return f"{x:.0f}" if x >= 100 or abs(x - round(x)) < 0.05 else f"{x:.1f}"


def _bound_reason(bound: int, lo: int) -> str:
    return MIN_REPLICAS if bound == lo else MAX_REPLICAS


def _clamp_note(clamped: int, lo: int) -> str:
    return f"; replicas.min is {clamped}" if clamped == lo else f"; replicas.max is {clamped}"


def _outside_bounds(current: int, lo: int, hi: int) -> str:
    if current < lo:
        return f"{current} replicas is below replicas.min {lo}"
    return f"{current} replicas is above replicas.max {hi}"


def _window_note(down: bool, lowest: int, highest: int, behavior: ScalingBehavior) -> str:
    if down:
        return (f"; the highest recommendation over the last {behavior.scale_down.stabilization_seconds} s "
                f"is {highest}")
    return f"; the lowest recommendation over the last {behavior.scale_up.stabilization_seconds} s is {lowest}"


def _scaling_limited(raw: int, desired: int, lo: int, hi: int, rate_limited: bool) -> ConditionReport:
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
