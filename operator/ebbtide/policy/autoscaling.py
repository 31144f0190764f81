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
     both ways too, and is the one that stays right far from saturation (signal_rules.THROUGHPUT_TARGET).
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

from dataclasses import replace

from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.policy.behavior import record_change, scale_down_limit, scale_up_limit, stabilize
from ebbtide.policy.blind import hold_blind, metrics_problem, ready_changes, trusted
from ebbtide.policy.decision import ConditionReport, Decision, Memory
from ebbtide.policy.decision_words import Stages, explain, scaling_limited, signals_used
from ebbtide.policy.headroom import horizon_seconds, observe_rate, throughput_share
from ebbtide.policy.observation import FleetState, Signals
from ebbtide.policy.performance import observe_limit, observe_mix, read_mix, rescale
from ebbtide.policy.reasons import CONCURRENCY, METRICS_AVAILABLE, RATE_LIMITED, STEADY
from ebbtide.policy.schedules import OFF_PEAK_THROUGHPUT
from ebbtide.policy.signal_rules import Recommendation, aggregate, count, learn_capacity, recommend, strength


def decide(spec: InferenceServiceSpec, signals: Signals, fleet: FleetState, memory: Memory,
           now: float, lead_seconds: float | None = None, off_peak: bool = False) -> Decision:
    """The replicas `spec`'s service should run now, why, and the memory for the next tick.
    `lead_seconds` is how long a new replica takes to serve (the spec's default startup time
    if not measured): how far ahead the throughput margin must look (policy/headroom.py).
    `off_peak`: consolidation is in force; until the margin is measured, replicas run at
    OFF_PEAK_THROUGHPUT (policy/schedules.py) then."""
    behavior = spec.scaling.behavior
    lo, hi = spec.replicas.min, spec.replicas.max
    current = fleet.current
    memory = trusted(memory, now)
    ready_rose_at, ready_fell_at = ready_changes(memory, fleet, now, behavior.metrics_window_seconds)

    problem = metrics_problem(signals, fleet, now, behavior.stale_after_seconds)
    if problem is not None:
        return hold_blind(spec, signals, fleet, memory, now, problem, ready_rose_at, ready_fell_at)

    load = aggregate(signals, now - behavior.stale_after_seconds)
    # Ready replicas without a fresh sample carry load we cannot see: when the result would
    # shrink the fleet, count each of them at target (the HPA does the same), never at zero.
    unseen = max(0, fleet.ready - load.pods)
    # The limit was learned in tokens/s at the mix of its time: carried to the mix now.
    mix = read_mix(signals.prompt_tokens_per_second, signals.tokens_per_second, signals.requests_per_second)
    performance = observe_mix(memory.performance, now, mix)
    if memory.capacity is not None and performance.mix != memory.performance.mix:
        memory = replace(memory, capacity=rescale(performance, memory.capacity, memory.performance.mix,
                                                  performance.mix))
    lead = spec.warmup.default_startup_seconds if lead_seconds is None else lead_seconds
    horizon = horizon_seconds(lead, behavior.interval_seconds, behavior.metrics_window_seconds)
    variability = observe_rate(memory.variability, now, signals.tokens_per_second, horizon)
    share = throughput_share(spec.scaling.targets, variability, signals.tokens_per_second,
                             OFF_PEAK_THROUGHPUT if off_peak else None)
    recommendations = recommend(spec, signals, fleet, load, unseen, current, now, ready_rose_at,
                                 memory.capacity, share)
    capacity, breached_at, at_limit = learn_capacity(spec, signals, fleet, load, memory, now,
                                                      ready_rose_at is None and ready_fell_at is None)
    if at_limit is not None:
        performance = observe_limit(performance, mix, at_limit)

    if recommendations:
        winner = max(recommendations, key=strength)
    else:
        winner = Recommendation(current, STEADY, "no signal is configured and observed", False)
    if winner.replicas < 1 and (load.waiting > 0 or load.running > 0 or load.kv_sum > 0):
        # With min 0, a service with requests in flight keeps a replica to serve them; whether
        # an idle one sleeps or goes is the lifecycle policy's call, not this one's.
        winner = Recommendation(1, CONCURRENCY, f"{count(load.running)} running and {count(load.waiting)} "
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
    reason, message = explain(winner, Stages(current, raw, clamped, stabilized, limited, desired), lo, hi,
                               guarded, limit_note, st, behavior)

    ups, downs = record_change(memory.scale_ups, memory.scale_downs, current, desired, now,
                               up.period_seconds, down.period_seconds)
    new_memory = Memory(since=memory.since, up_recommendations=st.up_recommendations,
                        down_recommendations=st.down_recommendations, scale_ups=ups, scale_downs=downs,
                        last_ready=fleet.ready, ready_rose_at=ready_rose_at, ready_fell_at=ready_fell_at,
                        capacity=capacity, breached_at=breached_at, variability=variability,
                        performance=performance)

    used = signals_used(signals, fleet, load, now, raw, capacity)
    if capacity is not None:
        used["throughputShare"] = share.share
    conditions = (
        ConditionReport(METRICS_AVAILABLE, "True", "Fresh",
                        f"{load.pods} replicas report via {signals.source}, newest sample "
                        f"{used['sampleAgeSeconds']:.0f} s old"),
        scaling_limited(raw, desired, lo, hi, limited != stabilized or reason == RATE_LIMITED),
    )
    return Decision(desired=desired, current=current, reason=reason, message=message, signals=used,
                    source=signals.source, conditions=conditions, memory=new_memory)
