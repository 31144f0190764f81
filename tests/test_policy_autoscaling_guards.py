"""The reactive autoscaling core's guards, one rule at a time: latency SLOs, bounds, rate limits,
missing and stale data, restarts and its memory (tests/autoscaling_scenarios.py builds the scenarios)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from ebbtide.policy.autoscaling import decide
from ebbtide.policy.decision import Memory
from ebbtide.policy.observation import FleetState, PodSignals, Signals
from tests.autoscaling_scenarios import (
    DEFAULT,
    KV_ONLY,
    NOW,
    SETTLED,
    condition,
    fleet,
    load,
    make_spec,
    run,
    tick,
)

# -- latency SLOs ----------------------------------------------------------------------------------


def test_ttft_breach_steps_up_in_proportion_at_most_doubling():
    d = tick(DEFAULT, load(pods=4, kv=0.5, ttft=1.5), current=4)
    assert (d.desired, d.reason) == (6, "TTFT")
    assert d.message == "TTFT p90 1.5 s > target 1 s: 4 ready replicas x 1.5 = 6: 4 -> 6"
    d = tick(DEFAULT, load(pods=4, kv=0.5, ttft=30.0), current=4)
    assert (d.desired, d.reason) == (8, "TTFT")
    assert "x 2 (ratio 30, capped)" in d.message


def test_tpot_breach_steps_up_and_within_tolerance_does_not():
    d = tick(DEFAULT, load(pods=2, kv=0.5, tpot=0.15), current=2)
    assert (d.desired, d.reason) == (3, "TPOT")
    d = tick(DEFAULT, load(pods=2, kv=0.7, tpot=0.105, ttft=1.05), current=2)
    assert (d.desired, d.reason) == (2, "Steady")


def test_latency_waits_for_its_window_to_see_replicas_that_just_became_ready():
    breach = load(pods=4, kv=0.5, ttft=3.0)
    before = tick(DEFAULT, breach, current=4, ready=2, starting=2)
    assert before.desired == 4
    # The two starting replicas become ready; the 60 s TTFT quantile still describes 2.
    just_ready = tick(DEFAULT, breach, current=4, ready=4, memory=before.memory, now=NOW + 15)
    assert (just_ready.desired, just_ready.reason) == (4, "TTFT")
    assert "replicas became ready 0 s ago, inside the 60 s window" in just_ready.message
    later = tick(DEFAULT, breach, current=4, ready=4, memory=just_ready.memory, now=NOW + 75)
    assert later.desired == 8


def test_a_latency_breach_never_lets_the_fleet_shrink():
    # 2 ready replicas breach TTFT 2x, 4 are starting: 4 would do, KV says 1, but 6 stay.
    d = tick(DEFAULT, load(pods=2, kv=0.1, ttft=2.0), current=6, starting=4)
    assert (d.desired, d.reason) == (6, "TTFT")


def test_latency_that_is_not_a_number_is_ignored():
    d = tick(DEFAULT, load(pods=2, kv=0.7, ttft=float("nan"), tpot=float("inf")), current=2)
    assert (d.desired, d.reason) == (4, "TPOT")  # +Inf: beyond the last bucket, a breach; NaN: no data


# -- bounds --------------------------------------------------------------------------------------------


def test_max_replicas_caps_demand_and_says_so():
    spec = make_spec(max=5)
    d = tick(spec, load(pods=4, kv=1.0, waiting=400, running=400), current=4)
    assert (d.desired, d.reason) == (5, "MaxReplicas")
    assert d.message.endswith("; replicas.max is 5: 4 -> 5")
    assert condition(d, "ScalingLimited") == ("True", "MaxReplicas")
    at_max = tick(spec, load(pods=5, kv=1.0, waiting=400, running=400), current=5)
    assert (at_max.desired, at_max.reason) == (5, "MaxReplicas")
    assert condition(at_max, "ScalingLimited") == ("True", "MaxReplicas")


def test_min_replicas_holds_an_idle_service():
    d = tick(make_spec(min=2), load(pods=2), current=2)
    assert (d.desired, d.reason) == (2, "MinReplicas")
    assert condition(d, "ScalingLimited") == ("True", "MinReplicas")


def test_bounds_apply_at_once_when_the_spec_changes():
    d = tick(make_spec(max=4), load(pods=10, kv=0.75), current=10)  # max lowered from 12 to 4
    assert (d.desired, d.reason) == (4, "MaxReplicas")  # not rate-limited: the user asked
    assert d.message.startswith("10 replicas is above replicas.max 4")
    d = tick(make_spec(min=3), load(pods=1, kv=0.1), current=1)
    assert (d.desired, d.reason) == (3, "MinReplicas")


def test_min_zero_keeps_a_replica_while_requests_are_in_flight():
    spec = make_spec(min=0, targets={"kvCacheUsage": None, "waitingPerReplica": 2, "ttft": None, "tpot": None})
    d = tick(spec, load(pods=1, running=1), current=1)
    assert (d.desired, d.reason) == (1, "Concurrency")
    assert d.message.startswith("1 running and 0 waiting requests need at least one replica")


def test_min_zero_without_load_goes_to_zero_after_the_window_and_stays():
    spec = make_spec(min=0)

    def last_request_ends_at_60_s(t: float, current: int) -> Signals:
        busy = t < NOW + 60
        return load(t, pods=current, running=1 if busy else 0, kv=0.2 if busy else 0)

    decisions = run(spec, last_request_ends_at_60_s, start=1, seconds=900)
    sizes = [d.desired for d in decisions]
    assert sizes[0] == 1 and sizes[-1] == 0
    first_zero = sizes.index(0)
    assert decisions[first_zero].reason == "KVCache"
    assert 45 + 300 <= first_zero * 15 < 45 + 315  # a window after the last busy tick (45 s), then at once
    assert decisions[-1].reason == "ScaledToZero"
    assert condition(decisions[-1], "MetricsAvailable") == ("False", "NoReplicas")


def test_rate_limits_up_use_the_larger_of_percent_and_count_per_period():
    burst = load(pods=3, waiting=300, running=0)  # needs 150
    d1 = tick(DEFAULT, burst, current=3)
    assert (d1.desired, d1.reason) == (7, "RateLimited")  # max(100 % of 3, 4) = +4
    assert condition(d1, "ScalingLimited") == ("True", "RateLimited")
    d2 = tick(DEFAULT, load(pods=7, waiting=300), current=7, memory=d1.memory, now=NOW + 10)
    assert (d2.desired, d2.reason) == (7, "RateLimited")  # still inside the 15 s period that began at 3
    d3 = tick(DEFAULT, load(pods=7, waiting=300), current=7, memory=d2.memory, now=NOW + 15)
    assert d3.desired == 12  # +100 % of 7 = 14, capped at max 12
    assert d3.reason == "MaxReplicas"


def test_advisory_mode_does_not_eat_the_rate_limit_twice():
    # The decision is computed and reported but not carried out: the fleet stays at 3.
    d, memory = None, SETTLED
    for i in range(4):
        d = tick(DEFAULT, load(pods=3, waiting=300), current=3, memory=memory, now=NOW + 5 * i)
        memory = d.memory
        assert d.desired == 7


def test_scale_up_stabilization_takes_the_lowest_recommendation_of_its_window():
    spec = make_spec(targets={"waitingPerReplica": None, "ttft": None, "tpot": None},
                     behavior={"scaleUp": {"stabilizationSeconds": 60}})
    spike = tick(spec, load(pods=3, kv=1.5), current=3)  # 6 wanted; only this tick in the window
    assert spike.desired == 6
    calm = tick(spec, load(pods=3, kv=0.75), current=3, memory=spike.memory, now=NOW + 15)
    spike2 = tick(spec, load(pods=3, kv=1.5), current=3, memory=calm.memory, now=NOW + 30)
    assert (spike2.desired, spike2.reason) == (3, "Stabilizing")
    assert "lowest recommendation over the last 60 s is 3" in spike2.message


# -- missing and stale data ----------------------------------------------------------------------------


def test_stale_metrics_hold_the_current_size():
    d = tick(DEFAULT, load(pods=3, kv=0.01, age=95), current=3)
    assert (d.desired, d.reason, d.changed) == (3, "MetricsUnavailable", False)
    assert d.message == "metrics stale for 95 s (limit 60 s): holding 3 replicas"
    assert condition(d, "MetricsAvailable") == ("False", "Stale")
    assert condition(d, "ScalingLimited") == ("Unknown", "MetricsUnavailable")


def test_failed_query_holds_and_says_why():
    d = tick(DEFAULT, Signals.missing("Prometheus unreachable: connection refused"), current=5)
    assert (d.desired, d.reason) == (5, "MetricsUnavailable")
    assert d.message == ("metrics unavailable (Prometheus unreachable: connection refused): holding 5 replicas")
    assert condition(d, "MetricsAvailable") == ("False", "QueryFailed")
    assert d.source == "none"


def test_bounds_hold_even_without_metrics():
    d = tick(make_spec(min=2), Signals.missing("no data"), current=0, ready=0)
    assert (d.desired, d.reason) == (2, "MinReplicas")
    assert d.message == "metrics unavailable (no data); 0 replicas is below replicas.min 2: 0 -> 2"
    d = tick(make_spec(max=3), Signals.missing("no data"), current=5)
    assert d.desired == 3


def test_after_an_outage_the_window_refills_before_a_scale_down():
    blind = tick(KV_ONLY, Signals.missing("down"), current=6, now=NOW)
    back = tick(KV_ONLY, load(pods=6, kv=0.1), current=6, memory=blind.memory, now=NOW + 60)
    assert (back.desired, back.reason) == (6, "Stabilizing")
    done = tick(KV_ONLY, load(pods=6, kv=0.1), current=6, memory=back.memory, now=NOW + 301)
    assert done.desired < 6


def test_a_pod_with_a_stale_sample_counts_as_unseen_and_loaded():
    sampled = NOW - 5
    pods = (PodSignals("a", sampled, kv_cache_usage=0.1), PodSignals("b", sampled, kv_cache_usage=0.1),
            PodSignals("c", NOW - 500, kv_cache_usage=0.0))
    spec = make_spec(targets={"waitingPerReplica": None, "ttft": None, "tpot": None},
                     behavior={"scaleDown": {"maxDecreasePercent": 100}})
    d = tick(spec, Signals("prometheus", sampled, pods), current=3)
    assert d.signals["podsReporting"] == 2
    assert d.desired == 2  # 0.27 replicas' worth seen, + 1 unseen ready replica at target
    assert "+1 ready replicas without a fresh sample, counted at target" in d.message


def test_sleeping_replicas_do_not_dilute_kv_usage():
    sampled = NOW - 5
    pods = (PodSignals("a", sampled, kv_cache_usage=0.9), PodSignals("b", sampled, kv_cache_usage=0.9),
            PodSignals("c", sampled, kv_cache_usage=0.0, asleep=True))
    d = decide(KV_ONLY, Signals("prometheus", sampled, pods), FleetState(current=2, ready=2, asleep=1),
               SETTLED, NOW)
    assert d.signals["kvCacheUsage"] == pytest.approx(0.9)
    assert d.desired == 3


# -- restarts and memory -----------------------------------------------------------------------------


def test_a_restart_never_scales_down_until_the_window_has_passed():
    idle = load(pods=6, kv=0.05)
    fresh = Memory.empty(NOW)
    d = tick(KV_ONLY, idle, current=6, memory=fresh)
    assert (d.desired, d.reason) == (6, "Stabilizing")
    assert "history begins 0 s ago" in d.message
    decisions = run(KV_ONLY, lambda t, current: load(t, pods=current, kv=0.05 * 6 / current), start=6,
                    seconds=400, memory=fresh)
    first_down = next(i for i, x in enumerate(decisions) if x.desired < 6)
    assert first_down * 15 >= 300


def test_a_restart_scales_up_at_once():
    d = tick(KV_ONLY, load(pods=3, kv=1.0), current=3, memory=Memory.empty(NOW))
    assert d.desired == 4


def test_a_clock_that_went_back_counts_as_lost_history():
    future = Memory(since=NOW + 3600, capacity=7_000.0)
    d = tick(KV_ONLY, load(pods=6, kv=0.05), current=6, memory=future)
    assert (d.desired, d.reason) == (6, "Stabilizing")
    assert d.memory.since == NOW
    assert d.memory.capacity == 7_000  # what a replica serves does not depend on the clock


def test_memory_round_trips_through_json():
    decisions = run(DEFAULT, lambda t, current: load(t, pods=current, kv=0.3 + (t % 120) / 200, ttft=0.5),
                    start=3, seconds=900)
    memory = replace(decisions[-1].memory, capacity=12_345.678, breached_at=NOW + 800, ready_fell_at=NOW + 850)
    assert memory.size > 0
    text = json.dumps(memory.to_json())
    assert Memory.from_json(json.loads(text)) == memory


def test_unreadable_memory_loads_as_a_fresh_history():
    assert Memory.load(None, NOW) == Memory.empty(NOW)
    assert Memory.load({"version": 99}, NOW) == Memory.empty(NOW)
    assert Memory.load({"version": 1, "since": "yesterday"}, NOW) == Memory.empty(NOW)
    assert Memory.load({"version": 1, "since": 5, "downRecommendations": [[1, 2, 3]]}, NOW) == Memory.empty(NOW)
    assert Memory.load({"version": 1, "since": 5, "capacityTokensPerSecond": -1}, NOW) == Memory.empty(NOW)
    with pytest.raises(ValueError, match="malformed"):
        Memory.from_json({"version": 1})


def test_memory_keeps_only_what_its_windows_need():
    # A week of ticks every second with noisy load: the history stays a handful of entries.
    spec = make_spec(behavior={"intervalSeconds": 1})
    memory, current = SETTLED, 4
    for i in range(5000):
        t = NOW + i
        d = decide(spec, load(t, pods=current, kv=0.4 + 0.3 * ((i * 7919) % 13) / 13), fleet(current), memory, t)
        memory, current = d.memory, d.desired
    assert memory.size <= 2 * (12 + 1)
    assert all(t > NOW + 5000 - 301 for t, _ in memory.down_recommendations)


def test_decision_carries_source_and_signal_values():
    d = tick(DEFAULT, load(pods=2, waiting=1, running=10, kv=0.7, ttft=0.4, tpot=0.03, tokens=900,
                           source="scrape"), current=2)
    assert d.source == "scrape"
    assert d.signals == {"waiting": 1, "running": 10, "podsReporting": 2, "ready": 2, "starting": 0,
                         "sampleAgeSeconds": 5.0, "recommended": 2, "kvCacheUsage": pytest.approx(0.7),
                         "ttftSeconds": 0.4, "tpotSeconds": 0.03, "tokensPerSecond": 900}
