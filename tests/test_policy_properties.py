"""Properties of the autoscaling core that must hold for every spec, signal and history.

Histories are built with the same window operations decide() uses, so they have the shape a
real run leaves behind, but their contents are arbitrary.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from functools import cache

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.policy.autoscaling import decide
from ebbtide.policy.behavior import push_highest, push_lowest
from ebbtide.policy.decision import Memory
from ebbtide.policy.observation import FleetState, PodSignals, Signals

NOW = 1_000_000.0
FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@cache
def build_spec(lo: int, hi: int, waiting: float | None, kv: float | None, running: float | None,
               ttft: float | None, tpot: float | None, tolerance: float, up_window: int, down_window: int,
               up_pct: int, up_count: int, down_pct: int, down_count: int, down_period: int,
               ) -> InferenceServiceSpec:
    return InferenceServiceSpec.model_validate({
        "model": {"name": "m"},
        "replicas": {"min": lo, "max": hi},
        "scaling": {
            "targets": {
                "waitingPerReplica": waiting, "kvCacheUsage": kv, "runningPerReplica": running,
                "ttft": None if ttft is None else {"targetSeconds": ttft},
                "tpot": None if tpot is None else {"targetSeconds": tpot},
            },
            "behavior": {
                "tolerance": tolerance,
                "scaleUp": {"stabilizationSeconds": up_window, "maxIncreasePercent": up_pct,
                            "maxIncreaseReplicas": up_count},
                "scaleDown": {"stabilizationSeconds": down_window, "maxDecreasePercent": down_pct,
                              "maxDecreaseReplicas": down_count, "periodSeconds": down_period},
            },
        },
    })


@st.composite
def specs(draw) -> InferenceServiceSpec:
    lo = draw(st.integers(0, 3))
    hi = draw(st.integers(max(lo, 1), 16))
    return build_spec(
        lo, hi,
        draw(st.sampled_from([None, 0.0, 0.5, 2.0, 5.0])),
        draw(st.sampled_from([None, 0.5, 0.75, 0.9])),
        draw(st.sampled_from([None, 4.0, 32.0])),
        draw(st.sampled_from([None, 0.5, 1.0])),
        draw(st.sampled_from([None, 0.05, 0.1])),
        draw(st.sampled_from([0.0, 0.1, 0.3])),
        draw(st.sampled_from([0, 30])),
        draw(st.sampled_from([0, 60, 300])),
        draw(st.sampled_from([50, 100])),
        draw(st.sampled_from([1, 4])),
        draw(st.sampled_from([50, 100])),
        draw(st.sampled_from([1, 2])),
        draw(st.sampled_from([15, 60])),
    )


amounts = st.floats(0, 500, allow_nan=False)
usages = st.floats(0, 1, allow_nan=False)
latencies = st.one_of(st.none(), st.floats(0, 60, allow_nan=False), st.just(math.inf))
token_rates = st.one_of(st.none(), st.floats(0, 1e6, allow_nan=False))


@st.composite
def pod_lists(draw, max_pods: int = 8) -> tuple[PodSignals, ...]:
    n = draw(st.integers(0, max_pods))
    return tuple(
        PodSignals(pod=f"p{i}", sampled_at=NOW - draw(st.sampled_from([0.0, 5.0, 30.0, 3600.0])),
                   waiting=draw(amounts), running=draw(amounts), kv_cache_usage=draw(usages),
                   asleep=draw(st.booleans()) if i == 0 else False)
        for i in range(n)
    )


@st.composite
def signal_sets(draw) -> Signals:
    pods = draw(pod_lists())
    sampled_at = max((p.sampled_at for p in pods), default=None)
    signals = Signals(source="prometheus", sampled_at=sampled_at, pods=pods, ttft_seconds=draw(latencies),
                      tpot_seconds=draw(latencies), tokens_per_second=draw(token_rates))
    kind = draw(st.sampled_from(["fresh", "fresh", "fresh", "error", "stale"]))
    if kind == "error":
        return replace(signals, error="Prometheus unreachable")
    if kind == "stale" and sampled_at is not None:
        return replace(signals, sampled_at=NOW - 600)
    return signals


@st.composite
def fleets(draw) -> FleetState:
    current = draw(st.integers(0, 20))
    ready = draw(st.integers(0, current))
    starting = draw(st.integers(0, current - ready))
    return FleetState(current=current, ready=ready, starting=starting)


@st.composite
def memories(draw) -> Memory:
    """A history whose entries are arbitrary but shaped as decide() leaves them."""
    since = NOW - draw(st.sampled_from([0.0, 100.0, 299.0, 301.0, 86_400.0]))
    ups, downs, scale_ups, scale_downs = (), (), (), ()
    times = sorted(draw(st.lists(st.floats(since, NOW), max_size=12)))
    for t in times:
        value = draw(st.integers(0, 20))
        what = draw(st.sampled_from(["rec", "up", "down"]))
        if what == "rec":
            ups, downs = push_lowest(ups, t, value), push_highest(downs, t, value)
        elif what == "up":
            scale_ups = push_lowest(scale_ups, t, value)
        else:
            scale_downs = push_highest(scale_downs, t, value)
    moments = st.one_of(st.none(), st.floats(since, NOW))
    return Memory(since=since, up_recommendations=ups, down_recommendations=downs, scale_ups=scale_ups,
                  scale_downs=scale_downs, last_ready=draw(st.one_of(st.none(), st.integers(0, 20))),
                  ready_rose_at=draw(moments), ready_fell_at=draw(moments),
                  capacity=draw(st.one_of(st.none(), st.floats(1, 1e5))), breached_at=draw(moments))


def with_more(signals: Signals, index: int, waiting: float = 0.0, kv: float = 0.0) -> Signals:
    if not signals.pods:
        return signals
    i = index % len(signals.pods)
    pod = signals.pods[i]
    more = replace(pod, waiting=pod.waiting + waiting, kv_cache_usage=min(1.0, pod.kv_cache_usage + kv))
    return replace(signals, pods=signals.pods[:i] + (more,) + signals.pods[i + 1:])


# -- more load never means fewer replicas -------------------------------------------------------


@FAST
@given(specs(), signal_sets(), fleets(), memories(), st.integers(0, 7), st.floats(0, 1000, allow_nan=False))
def test_more_waiting_never_means_fewer_replicas(spec, signals, fleet, memory, index, extra):
    base = decide(spec, signals, fleet, memory, NOW)
    more = decide(spec, with_more(signals, index, waiting=extra), fleet, memory, NOW)
    assert more.desired >= base.desired, (base.message, more.message)


@FAST
@given(specs(), signal_sets(), fleets(), memories(), st.integers(0, 7), st.floats(0, 1, allow_nan=False))
def test_more_kv_cache_usage_never_means_fewer_replicas(spec, signals, fleet, memory, index, extra):
    base = decide(spec, signals, fleet, memory, NOW)
    more = decide(spec, with_more(signals, index, kv=extra), fleet, memory, NOW)
    assert more.desired >= base.desired, (base.message, more.message)


@FAST
@given(specs(), signal_sets(), fleets(), memories(), st.floats(0, 60, allow_nan=False),
       st.floats(0, 60, allow_nan=False), st.booleans())
def test_higher_latency_never_means_fewer_replicas(spec, signals, fleet, memory, a, b, which):
    low, high = sorted((a, b))
    field = "ttft_seconds" if which else "tpot_seconds"
    base = decide(spec, replace(signals, **{field: low}), fleet, memory, NOW)
    more = decide(spec, replace(signals, **{field: high}), fleet, memory, NOW)
    assert more.desired >= base.desired, (base.message, more.message)


@FAST
@given(specs(), signal_sets(), fleets(), memories(), st.floats(0, 1e6, allow_nan=False),
       st.floats(0, 1e6, allow_nan=False))
def test_more_throughput_never_means_fewer_replicas(spec, signals, fleet, memory, a, b):
    low, high = sorted((a, b))
    base = decide(spec, replace(signals, tokens_per_second=low), fleet, memory, NOW)
    more = decide(spec, replace(signals, tokens_per_second=high), fleet, memory, NOW)
    assert more.desired >= base.desired, (base.message, more.message)


# -- bounds, blindness, restarts --------------------------------------------------------------------


@FAST
@given(specs(), signal_sets(), fleets(), memories())
def test_bounds_always_hold_and_the_decision_explains_itself(spec, signals, fleet, memory):
    d = decide(spec, signals, fleet, memory, NOW)
    assert spec.replicas.min <= d.desired <= spec.replicas.max
    assert d.current == fleet.current and d.changed == (d.desired != fleet.current)
    assert d.reason[:1].isupper() and " " not in d.reason
    assert d.message.endswith(f"{fleet.current} -> {d.desired}" if d.changed else f"holding {fleet.current}") \
        or d.message.endswith(f"holding {fleet.current} replicas")
    assert {c.type for c in d.conditions} == {"MetricsAvailable", "ScalingLimited"}
    assert all(isinstance(v, (int, float)) for v in d.signals.values())


@FAST
@given(specs(), signal_sets(), fleets(), memories(), st.sampled_from(["missing", "error", "stale"]))
def test_missing_or_stale_data_holds_the_size_within_bounds(spec, signals, fleet, memory, how):
    if how == "missing":
        signals = Signals.missing("no series")
    elif how == "error":
        signals = replace(signals, error="timeout")
    else:
        signals = replace(signals, sampled_at=NOW - spec.scaling.behavior.stale_after_seconds - 1)
    d = decide(spec, signals, fleet, memory, NOW)
    assert d.desired == min(max(fleet.current, spec.replicas.min), spec.replicas.max)
    status = d.condition("MetricsAvailable")
    assert status is not None and status.status == "False"


@FAST
@given(specs(), signal_sets(), fleets())
def test_a_restart_with_empty_history_does_not_scale_down(spec, signals, fleet):
    assume(spec.scaling.behavior.scale_down.stabilization_seconds > 0)  # a zero window keeps no history
    d = decide(spec, signals, fleet, Memory.empty(NOW), NOW)
    assert d.desired >= min(fleet.current, spec.replicas.max)


@SLOW
@given(specs(), st.lists(signal_sets(), min_size=1, max_size=30), st.integers(0, 20))
def test_no_scale_down_for_a_whole_window_after_a_restart(spec, signal_list, start):
    window = spec.scaling.behavior.scale_down.stabilization_seconds
    memory, current, t = Memory.empty(NOW), start, NOW
    for signals in signal_list:
        if t - NOW >= window:
            break
        d = decide(spec, shifted(signals, t - NOW), FleetState(current=current, ready=current), memory, t)
        assert d.desired >= min(current, spec.replicas.max), d.message
        memory, current, t = d.memory, d.desired, t + 15


# -- stability and memory ---------------------------------------------------------------------------


@SLOW
@given(specs(), amounts, amounts, st.floats(0, 12, allow_nan=False), latencies, latencies, token_rates,
       st.one_of(st.none(), st.floats(100, 1e5)), st.integers(0, 16))
def test_constant_load_converges_and_stays(spec, waiting, running, kv_load, ttft, tpot, tokens, capacity, start):
    """The fleet becomes what is decided, ready at once; the same total load spreads over it."""
    memory, current, t, sizes = Memory(since=NOW - 86_400, capacity=capacity), start, NOW, []
    for _ in range(250):
        n = current
        pods = tuple(PodSignals(f"p{i}", t - 5, waiting=waiting / n, running=running / n,
                                kv_cache_usage=min(1.0, kv_load / n)) for i in range(n))
        signals = Signals("prometheus", t - 5 if n else None, pods, ttft_seconds=ttft, tpot_seconds=tpot,
                          tokens_per_second=tokens)
        d = decide(spec, signals, FleetState(current=current, ready=current), memory, t)
        sizes.append(d.desired)
        memory, current, t = d.memory, d.desired, t + spec.scaling.behavior.interval_seconds
    assert len(set(sizes[-50:])) == 1, sizes


@SLOW
@given(specs(), st.lists(signal_sets(), min_size=1, max_size=60), st.integers(0, 16),
       st.lists(st.sampled_from([1.0, 15.0, 15.0, 60.0]), min_size=60, max_size=60))
def test_memory_stays_bounded_and_round_trips_through_json(spec, signal_list, start, gaps):
    lo, hi = spec.replicas.min, spec.replicas.max
    behavior = spec.scaling.behavior
    memory, current, t = Memory.empty(NOW), min(max(start, lo), hi), NOW
    for signals, gap in zip(signal_list, gaps, strict=False):
        d = decide(spec, shifted(signals, t - NOW), FleetState(current=current, ready=current), memory, t)
        memory, current = d.memory, d.desired
        assert Memory.from_json(json.loads(json.dumps(memory.to_json()))) == memory
        t += gap
    horizon = max(behavior.scale_up.stabilization_seconds, behavior.scale_down.stabilization_seconds,
                  behavior.scale_up.period_seconds, behavior.scale_down.period_seconds)
    last = t - gap
    for entries, rising in ((memory.up_recommendations, True), (memory.down_recommendations, False),
                            (memory.scale_ups, True), (memory.scale_downs, False)):
        assert len(entries) <= hi + 1
        assert all(last - horizon < when <= last for when, _ in entries)
        values = [v for _, v in entries]
        assert values == sorted(set(values), reverse=not rising)


@FAST
@given(memories())
def test_any_memory_round_trips_through_json(memory):
    assert Memory.from_json(json.loads(json.dumps(memory.to_json()))) == memory


def shifted(signals: Signals, by: float) -> Signals:
    if not by or signals.sampled_at is None:
        return signals
    pods = tuple(replace(p, sampled_at=p.sampled_at + by) for p in signals.pods)
    return replace(signals, sampled_at=signals.sampled_at + by, pods=pods)
