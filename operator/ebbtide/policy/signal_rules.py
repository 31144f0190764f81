"""What each signal asks for, one recommendation each (autoscaling.decide picks the winner),
and what a replica serves at its limit, learned from the breaches."""

from __future__ import annotations

import math
from typing import NamedTuple

from ebbtide.api.spec import InferenceServiceSpec, LatencySlo, ScalingTargets
from ebbtide.policy.decision import Memory
from ebbtide.policy.headroom import Share
from ebbtide.policy.observation import FleetState, Signals
from ebbtide.policy.reasons import CONCURRENCY, KV_CACHE, QUEUE_BACKLOG, THROUGHPUT, TPOT, TTFT

# A latency quantile says the SLO is broken, not by how much capacity is short: TTFT counts
# queueing, so a 10x breach can be cured by far fewer than 10x replicas. Step proportionally,
# but at most doubling per step (Knative's panic threshold and AIBrix's scale-up rate are also
# 2); the rate limit bounds it again, and the next step waits until the quantile's window has
# seen the replicas this one added (see latency).
LATENCY_MAX_STEP = 2.0

# KV usage and concurrency grow much faster than the load near saturation, so sized on them a
# fleet shrinks into a queue and oscillates; token throughput is proportional to the load, and
# once a replica's limit is known (see learn_capacity) each replica runs at this fraction of it.
# 0.8 keeps the SLO first; 0.7, 0.85 and 0.9 were measured against it (bench/notes.md, conv-week).
# It is the default of scaling.targets.throughput (one number); off-peak windows raise it.
THROUGHPUT_TARGET: float = ScalingTargets.model_fields["throughput"].default
# Until that limit has been seen, utilization reads far too low to shrink on, so the fleet is
# shrunk one replica per metrics window (see decide(); halving instead held a queue for a cold
# start in a chat replay). Each reading taken during a breach moves the learned limit this far
# toward it: settled within a cold start, yet no single odd window decides.
CAPACITY_LEARNING_RATE = 0.25

# 0.75 * 4 / 0.75 is 4.000000000000001 in floating point; that must not become 5 replicas.
_EPSILON = 1e-9
# More replicas than any spec allows (replicas.max <= 1000): absurd loads saturate here
# instead of overflowing.
_MOST = 1_000_000


def ceil(x: float) -> int:
    return math.ceil(x - _EPSILON) if x < _MOST else _MOST


class Recommendation(NamedTuple):
    replicas: int
    reason: str
    text: str
    pressure: bool  # the signal is beyond its target (said as the reason even when holding)


class Load(NamedTuple):
    """What the awake replicas with a fresh sample report, summed."""

    pods: int
    waiting: float
    running: float
    kv_sum: float  # sum of per-replica usage: KV load in replica units
    queued: int  # replicas with at least one request waiting


def strength(r: Recommendation) -> tuple[int, bool, bool]:
    """The largest demand wins. On a tie, a signal beyond its target names the reason before one
    that is not, and a utilization signal before the queue's veto (an empty queue is no reason
    for a scale-down); otherwise the first in signal order."""
    return r.replicas, r.pressure, r.pressure or r.reason != QUEUE_BACKLOG


def aggregate(signals: Signals, fresh_after: float) -> Load:
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
    return Load(pods, waiting, running, kv_sum, queued)


def recommend(spec: InferenceServiceSpec, signals: Signals, fleet: FleetState, load: Load, unseen: int,
               current: int, now: float, ready_rose_at: float | None,
               capacity: float | None, share: Share | None = None) -> list[Recommendation]:
    """One recommendation per configured and observed signal, in tie-break order."""
    targets = spec.scaling.targets
    behavior = spec.scaling.behavior
    tolerance = behavior.tolerance
    out: list[Recommendation] = []
    if load.pods:
        if targets.waiting_per_replica is not None:
            out.append(queue(load, targets.waiting_per_replica, tolerance, current))
        if targets.kv_cache_usage is not None:
            need = load.kv_sum / targets.kv_cache_usage
            text = (f"KV-cache usage {load.kv_sum / load.pods:.2f} x {load.pods} replicas / target "
                    f"{targets.kv_cache_usage:g} = {need:.1f} replicas")
            out.append(utilization(KV_CACHE, text, need, current, unseen, tolerance))
        if targets.running_per_replica is not None:
            need = load.running / targets.running_per_replica
            text = (f"running requests {count(load.running)} / target {targets.running_per_replica:g} per "
                    f"replica = {need:.1f} replicas")
            out.append(utilization(CONCURRENCY, text, need, current, unseen, tolerance))
    if share is None:
        share = Share(targets.throughput, None, False, signals.tokens_per_second)
    tokens = share.demand
    if capacity is not None and capacity * share.share > 0 and tokens is not None and math.isfinite(
            tokens) and tokens >= 0:
        need = tokens / (capacity * share.share)
        text = (f"throughput {tokens:.0f} tokens/s / ({share.share:.0%} of the {capacity:.0f} tokens/s "
                f"a replica serves at its limit) = {need:.1f} replicas{share.why()}")
        # The rate counts every replica's tokens, so no replica is unseen. A measured margin
        # already covers the ripples a tolerance band would absorb on the way up; stacking the
        # two would let replicas run past their limit before a scale-up (0.95 x 1.1).
        rising = 0.0 if share.margin is not None else tolerance
        out.append(utilization(THROUGHPUT, text, need, current, 0, tolerance, rising))
    window = behavior.metrics_window_seconds
    for reason, slo, value in ((TTFT, targets.ttft, signals.ttft_seconds),
                               (TPOT, targets.tpot, signals.tpot_seconds)):
        if slo is not None and value is not None:
            rec = latency(reason, slo, value, fleet.ready, current, tolerance, now, ready_rose_at, window)
            if rec is not None:
                out.append(rec)
    return out


def utilization(reason: str, text: str, need: float, current: int, unseen: int,
                 tolerance: float, rising: float | None = None) -> Recommendation:
    """HPA's rule on a load measured in replicas (`need` = load / target per replica).

    The tolerance band is around the current size: within it nothing moves, so measurement
    noise does not flap the fleet. Outside it the size follows the load, both ways, and a
    scale-down counts every unseen ready replica as fully loaded. `rising` is the band's upper
    side when it differs from the lower.
    """
    up = tolerance if rising is None else rising
    if current > 0 and -tolerance <= need / current - 1.0 <= up:
        return Recommendation(current, reason, f"{text}, within {tolerance:.0%} of {current}", False)
    if need > current:
        return Recommendation(ceil(need), reason, text, True)
    if unseen:
        text += f" (+{unseen} ready replicas without a fresh sample, counted at target)"
    return Recommendation(min(current, ceil(need + unseen)), reason, text, False)


def queue(load: Load, target: float, tolerance: float, current: int) -> Recommendation:
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
    if saturated(load, target, tolerance):
        # A replica carries at least one request, whatever it runs now (nothing, with a zero
        # target): this also keeps the need below the number of requests in flight.
        per_replica = max(running / n + target, 1.0)
        need = ceil((running + waiting) / per_replica)
        text = (f"waiting requests {count(waiting)} > target {target:g} x {n} replicas; "
                f"{count(running + waiting)} in flight at {per_replica:.1f} per replica need {need}")
        return Recommendation(max(need, current), QUEUE_BACKLOG, text, True)
    floor = min(ceil(waiting / target), n, current) if target > 0 else 0
    if floor > 0:
        text = f"waiting requests {count(waiting)} need {floor} replicas at target {target:g} per replica"
    else:
        text = "no requests waiting"
    return Recommendation(floor, QUEUE_BACKLOG, text, False)


def saturated(load: Load, target: float | None, tolerance: float) -> bool:
    return target is not None and load.pods > 0 and load.waiting > load.pods * target * (1.0 + tolerance)


class Learned(NamedTuple):
    capacity: float | None  # tokens/s one replica serves at the service's limit
    breached_at: float | None  # when a target was last breached (kept for one metrics window)
    at_limit: float | None  # this tick's tokens/s per replica, when read at the limit (policy/performance.py)


def learn_capacity(spec: InferenceServiceSpec, signals: Signals, fleet: FleetState, load: Load,
                    memory: Memory, now: float, ready_steady: bool) -> Learned:
    """What one replica serves at the service's limit, and when a target was last breached.

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
                        and saturated(load, targets.waiting_per_replica, behavior.tolerance))
    ttft_breached = slo_breached(targets.ttft, signals.ttft_seconds, behavior.tolerance)
    tpot_breached = slo_breached(targets.tpot, signals.tpot_seconds, behavior.tolerance)
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
        return Learned(memory.capacity, breached_at, None)
    observed = tokens / fleet.ready
    if not observed * THROUGHPUT_TARGET > 0:  # a rate so small it underflows teaches nothing
        return Learned(memory.capacity, breached_at, None)
    capacity = memory.capacity
    if at_limit:
        if capacity is None:
            return Learned(observed, breached_at, observed)
        if observed < capacity:
            return Learned(capacity + CAPACITY_LEARNING_RATE * (observed - capacity), breached_at, observed)
        return Learned(capacity, breached_at, observed)
    elif not breached and breached_at is None and capacity is not None and observed > capacity and load.waiting == 0:
        # Only a reading with nobody waiting: with a queue the replicas are at their limit,
        # and while their batches fill, prompt tokens (counted at prefill) run ahead of what
        # they sustain (a week's replay crept 7 % above the true limit on such readings).
        return Learned(observed, breached_at, None)
    return Learned(capacity, breached_at, None)


def slo_breached(slo: LatencySlo | None, value: float | None, tolerance: float) -> bool:
    return slo is not None and value is not None and value > slo.target_seconds * (1.0 + tolerance)


def latency(reason: str, slo: LatencySlo, value: float, ready: int, current: int, tolerance: float,
             now: float, ready_rose_at: float | None, window: int) -> Recommendation | None:
    """A latency SLO breach: step the ready replicas up in proportion, at most doubling.

    The latency comes from the replicas that are ready, so they are the base; replicas still
    starting are in `current` already and absorb their share. A quantile over a window still
    describes the smaller fleet for a window after new replicas became ready: acting on it
    again then would double twice for one breach.
    """
    if not slo_breached(slo, value, tolerance):  # also False for NaN
        return None
    label = f"{reason} p{slo.quantile * 100:g} {value:.3g} s > target {slo.target_seconds:g} s"
    if ready_rose_at is not None and now - ready_rose_at < window:
        text = (f"{label}, but replicas became ready {now - ready_rose_at:.0f} s ago, inside the "
                f"{window} s window the quantile covers")
        return Recommendation(current, reason, text, True)
    ratio = value / slo.target_seconds
    step = min(ratio, LATENCY_MAX_STEP)
    need = ceil(ready * step)
    capped = f" (ratio {ratio:.2g}, capped)" if ratio > LATENCY_MAX_STEP else ""
    text = f"{label}: {ready} ready replicas x {step:.2g}{capped} = {need}"
    return Recommendation(max(need, current), reason, text, True)


def count(x: float) -> str:
    """Request counts are whole numbers from vLLM, averages in simulations: 42, 5.8, 2856."""
    return f"{x:.0f}" if x >= 100 or abs(x - round(x)) < 0.05 else f"{x:.1f}"
