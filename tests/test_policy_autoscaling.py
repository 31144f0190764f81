"""The reactive autoscaling core, one rule at a time, in scenarios a person can read.

Every scenario is a few ticks of `decide` with made-up signals. Times are seconds from an
arbitrary origin; `SETTLED` history is old enough that the restart guard plays no part.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from ebbtide.policy.decision import Memory
from ebbtide.policy.observation import PodSignals, Signals
from tests.autoscaling_scenarios import (
    DEFAULT,
    KV_ONLY,
    NOW,
    SETTLED,
    condition,
    load,
    make_spec,
    tick,
)

# -- utilization: KV cache and concurrency --------------------------------------------------------


def test_kv_cache_above_target_scales_up_to_carry_the_load_at_target():
    d = tick(KV_ONLY, load(pods=3, kv=0.9), current=3)
    # 3 x 0.9 = 2.7 replicas' worth of KV cache; at 0.75 per replica that needs 3.6 -> 4
    assert (d.desired, d.reason, d.changed) == (4, "KVCache", True)
    assert d.message == "KV-cache usage 0.90 x 3 replicas / target 0.75 = 3.6 replicas: 3 -> 4"
    assert d.signals["kvCacheUsage"] == pytest.approx(0.9)
    assert condition(d, "MetricsAvailable") == ("True", "Fresh")
    assert condition(d, "ScalingLimited") == ("False", "WithinLimits")


def test_kv_cache_within_tolerance_changes_nothing():
    d = tick(KV_ONLY, load(pods=4, kv=0.8), current=4)  # 0.8 / 0.75 = 1.07, inside 1 +- 0.1
    assert (d.desired, d.reason, d.changed) == (4, "Steady", False)
    assert "within 10% of 4" in d.message and d.message.endswith("holding 4")


def test_exact_multiples_do_not_round_up_by_floating_point_noise():
    d = tick(KV_ONLY, load(pods=4, kv=0.75 * 1.2), current=3, ready=4)  # 4 x 0.9 / 0.75 = 4.8
    assert d.desired == 5
    d = tick(make_spec(targets={"kvCacheUsage": 0.3, "waitingPerReplica": None, "ttft": None, "tpot": None}),
             load(pods=3, kv=0.6), current=5)  # 3 x 0.6 / 0.3 = 6.000000000000001 -> 6, not 7
    assert d.desired == 6


def test_kv_cache_below_target_scales_down_after_the_window_at_the_rate_limit():
    busy, idle = load(pods=6, kv=0.7), load(pods=6, kv=0.1)
    first = tick(KV_ONLY, busy, current=6)
    assert (first.desired, first.reason) == (6, "Steady")
    # The load drops: the highest recommendation of the last 300 s (6) holds the fleet.
    held = tick(KV_ONLY, idle, current=6, memory=first.memory, now=NOW + 290)
    assert (held.desired, held.reason) == (6, "Stabilizing")
    assert "highest recommendation over the last 300 s is 6" in held.message
    # Once the busy tick has left the window, the fleet shrinks, at most 50 % per 60 s.
    down = tick(KV_ONLY, idle, current=6, memory=held.memory, now=NOW + 301)
    assert (down.desired, down.reason) == (3, "RateLimited")
    assert "at most max(50 %, 1) are removed per 60 s from 6" in down.message
    again = tick(KV_ONLY, idle, current=3, memory=down.memory, now=NOW + 330)
    assert (again.desired, again.reason) == (3, "RateLimited")  # same period: 6 -> 3 was the allowance
    later = tick(KV_ONLY, idle, current=3, memory=again.memory, now=NOW + 362)
    assert later.desired == 2  # 0.6 KV replicas' worth -> 1, but only 1 of 3 may go (50 % of 3 is 1)


def test_concurrency_target_is_a_utilization_signal():
    spec = make_spec(targets={"runningPerReplica": 8, "kvCacheUsage": None, "waitingPerReplica": None,
                              "ttft": None, "tpot": None})
    up = tick(spec, load(pods=2, running=40), current=2)
    assert (up.desired, up.reason) == (5, "Concurrency")
    assert up.message.startswith("running requests 40 / target 8 per replica = 5.0 replicas")
    down = tick(spec, load(pods=5, running=8), current=5)
    assert (down.desired, down.reason) == (3, "RateLimited")  # wants 1, may remove 50 % of 5 = 2


def test_largest_demand_wins():
    spec = make_spec(targets={"runningPerReplica": 10})
    d = tick(spec, load(pods=2, running=60, kv=0.5), current=2)  # KV says 2 (1.33), concurrency 6
    assert (d.desired, d.reason) == (6, "Concurrency")


# -- throughput and learned capacity ----------------------------------------------------------------

# What a replica of this service was seen to serve at its limit.
KNOWS_CAPACITY = replace(SETTLED, capacity=10_000.0)


def test_without_a_learned_capacity_throughput_says_nothing():
    d = tick(KV_ONLY, load(pods=4, kv=0.05, tokens=30_000), current=4)
    assert "Throughput" not in d.message and "capacityTokensPerSecond" not in d.signals
    assert d.signals["tokensPerSecond"] == 30_000


def test_throughput_sizes_the_fleet_where_kv_usage_would_shrink_it_into_a_queue():
    # KV usage is low far from saturation (a replica's batch stays small until it nearly
    # saturates), so KV alone would keep 1 replica; the load is 30k tokens/s, and a replica
    # serves 10k when saturated: at 80 % of that, 3.75 -> 4 replicas.
    spec = make_spec(behavior={"scaleDown": {"maxDecreasePercent": 100}})
    d = tick(spec, load(pods=8, kv=0.05, tokens=30_000), current=8, memory=KNOWS_CAPACITY)
    assert (d.desired, d.reason) == (4, "Throughput")
    assert d.message.startswith("throughput 30000 tokens/s / (80% of the 10000 tokens/s a replica serves at its "
                                "limit) = 3.8 replicas")
    assert d.signals["capacityTokensPerSecond"] == 10_000
    up = tick(spec, load(pods=2, kv=0.3, tokens=30_000), current=2, memory=KNOWS_CAPACITY)
    assert (up.desired, up.reason) == (4, "Throughput")  # ahead of any queue


# Ready replicas unchanged for more than a metrics window: the token rate can be read.
STEADY_TWO = replace(SETTLED, last_ready=2)


def test_a_queue_on_every_replica_teaches_the_limit():
    saturated = load(pods=2, waiting=40, running=512, kv=0.6, tokens=24_000)  # 12k tokens/s per replica
    d = tick(DEFAULT, saturated, current=2, memory=STEADY_TWO)
    assert d.memory.capacity == 12_000 and d.memory.breached_at == NOW
    # Later breaches move it a quarter of the way down to what they read, never up.
    lower = load(pods=2, waiting=40, running=512, kv=0.6, tokens=16_000)
    d2 = tick(DEFAULT, lower, current=2, memory=d.memory, now=NOW + 15)
    assert d2.memory.capacity == pytest.approx(12_000 + 0.25 * (8_000 - 12_000))
    higher = load(pods=2, waiting=40, running=512, kv=0.6, tokens=30_000)
    assert tick(DEFAULT, higher, current=2, memory=d2.memory, now=NOW + 30).memory.capacity == d2.memory.capacity


def test_a_latency_breach_teaches_the_limit_too():
    # Long prompts: TPOT breaks its SLO with the batch far from full and no queue at all.
    d = tick(DEFAULT, load(pods=2, running=40, kv=0.3, tpot=0.15, tokens=20_000), current=2, memory=STEADY_TWO)
    assert d.memory.capacity == 10_000
    assert (d.desired, d.reason) == (3, "TPOT")


def test_a_ttft_breach_after_the_queue_drained_teaches_nothing():
    # The TTFT window still holds a drained backlog; the replicas, caught up, serve 7k each:
    # that is no limit. With requests still waiting it is one.
    knows = replace(STEADY_TWO, capacity=10_000.0)
    drained = load(pods=2, running=60, kv=0.1, ttft=5.0, tpot=0.03, tokens=14_000)
    d = tick(DEFAULT, drained, current=2, memory=knows)
    assert d.memory.capacity == 10_000 and d.memory.breached_at == NOW
    waiting = load(pods=2, waiting=3, running=512, kv=0.6, ttft=5.0, tpot=0.09, tokens=14_000)
    assert tick(DEFAULT, waiting, current=2, memory=knows).memory.capacity == pytest.approx(9_250)


def test_carrying_more_for_a_whole_window_without_a_breach_raises_the_limit():
    knows = replace(STEADY_TWO, capacity=8_000.0)
    calm = load(pods=2, running=100, kv=0.3, ttft=0.3, tpot=0.03, tokens=20_000)
    assert tick(DEFAULT, calm, current=2, memory=knows).memory.capacity == 10_000
    just_breached = replace(knows, breached_at=NOW - 30)  # the token rate's window saw the breach
    assert tick(DEFAULT, calm, current=2, memory=just_breached).memory.capacity == 8_000


def test_a_changed_ready_count_makes_the_token_rate_unreadable_for_a_window():
    saturated = load(pods=2, waiting=40, running=512, kv=0.6, tokens=30_000)  # 3 served most of the window
    d = tick(DEFAULT, saturated, current=3, ready=2, starting=1, memory=replace(SETTLED, last_ready=3))
    assert d.memory.capacity is None and d.memory.ready_fell_at == NOW
    d = tick(DEFAULT, saturated, current=3, ready=2, starting=1, memory=d.memory, now=NOW + 45)
    assert d.memory.capacity is None
    d = tick(DEFAULT, saturated, current=3, ready=2, starting=1, memory=d.memory, now=NOW + 60)
    assert d.memory.capacity == 15_000


def test_a_restarted_operator_reads_no_token_rate_for_a_window():
    saturated = load(pods=2, waiting=40, running=512, kv=0.6, tokens=24_000)
    assert tick(DEFAULT, saturated, current=2, memory=Memory.empty(NOW)).memory.capacity is None


def test_no_breach_no_learning():
    d = tick(DEFAULT, load(pods=2, waiting=1, running=100, kv=0.5, tokens=20_000), current=2, memory=STEADY_TWO)
    assert d.memory.capacity is None and d.memory.breached_at is None


def test_one_hot_replica_teaches_nothing():
    sampled = NOW - 5
    pods = (PodSignals("hot", sampled, waiting=50, running=256, kv_cache_usage=0.6),
            PodSignals("idle", sampled, waiting=0, running=3, kv_cache_usage=0.01))
    d = tick(DEFAULT, Signals("prometheus", sampled, pods, tokens_per_second=9_000), current=2,
             memory=STEADY_TWO)
    assert d.reason == "QueueBacklog"  # the queue still argues
    assert d.memory.capacity is None  # but 4.5k tokens/s per replica is not what a replica can serve


def test_until_the_limit_is_known_replicas_go_one_at_a_time_a_window_apart():
    # 10 replicas at KV 0.06 with a token rate: KV alone would halve the fleet straight into a
    # queue (nothing says where the limit is); the probe removes one, then waits a metrics window.
    quiet = load(pods=10, kv=0.06, tokens=110_000)
    d = tick(DEFAULT, quiet, current=10, memory=replace(SETTLED, last_ready=10))
    assert (d.desired, d.reason) == (9, "RateLimited")
    assert "until a replica's limit has been seen" in d.message and d.message.endswith("10 -> 9")
    held = tick(DEFAULT, load(pods=9, kv=0.07, tokens=110_000), current=9, memory=d.memory, now=NOW + 15)
    assert (held.desired, held.memory.ready_fell_at) == (9, NOW + 15)
    again = tick(DEFAULT, load(pods=9, kv=0.07, tokens=110_000), current=9, memory=held.memory, now=NOW + 75)
    assert again.desired == 8
    # Once the limit is known, the throughput signal sizes the fleet and the usual rates apply.
    known = tick(DEFAULT, quiet, current=10, memory=replace(SETTLED, last_ready=10, capacity=20_000.0))
    assert (known.desired, known.reason) == (7, "Throughput")  # 110k / (0.8 x 20k) = 6.9
    # Without a token rate nothing could be learned: utilization signals act as HPA's do.
    blind = tick(DEFAULT, load(pods=10, kv=0.06), current=10, memory=replace(SETTLED, last_ready=10))
    assert blind.desired == 5


# -- queue backlog ---------------------------------------------------------------------------------


def test_queue_backlog_sizes_the_fleet_to_the_demand_in_flight():
    # 3 replicas each running 256 requests, 42 waiting in all, target 2 waiting per replica:
    # 810 requests at 258 per replica need 4 replicas (not 21 = 42 / 2, as KEDA would ask).
    d = tick(DEFAULT, load(pods=3, waiting=42, running=768, kv=0.5), current=3)
    assert (d.desired, d.reason) == (4, "QueueBacklog")
    assert d.message == ("waiting requests 42 > target 2 x 3 replicas; 810 in flight at 258.0 per replica "
                         "need 4: 3 -> 4")
    assert d.signals["waiting"] == 42 and d.signals["running"] == 768


def test_queue_with_little_running_scales_like_waiting_over_target():
    d = tick(DEFAULT, load(pods=1, waiting=10, running=0), current=1)
    assert (d.desired, d.reason) == (5, "QueueBacklog")  # 10 waiting / 2 per replica


def test_queue_target_zero_means_any_queue_is_too_much():
    spec = make_spec(targets={"waitingPerReplica": 0})
    d = tick(spec, load(pods=2, waiting=1, running=0), current=2)
    assert (d.desired, d.reason) == (2, "QueueBacklog")  # 1 request needs at most 1 replica: hold
    d = tick(spec, load(pods=2, waiting=3, running=0), current=2)
    assert d.desired == 3
    d = tick(spec, load(pods=2, waiting=4, running=20), current=2)  # 24 in flight at 10 per replica
    assert d.desired == 3


def test_queue_within_target_does_not_argue_up():
    d = tick(DEFAULT, load(pods=3, waiting=6, running=300, kv=0.72), current=3)  # 2 per replica
    assert (d.desired, d.reason) == (3, "Steady")


def test_queue_vetoes_a_scale_down_into_a_queue():
    spec = make_spec(behavior={"scaleDown": {"maxDecreasePercent": 100}})
    d = tick(spec, load(pods=6, waiting=8, running=60, kv=0.1), current=6)
    # KV alone would keep 1 replica; 8 waiting at 2 per replica keep 4.
    assert (d.desired, d.reason) == (4, "QueueBacklog")
    assert "waiting requests 8 need 4 replicas at target 2 per replica" in d.message


def test_a_queue_above_target_never_lets_the_fleet_shrink():
    # 2 ready + 2 starting: 210 in flight at 102 per replica need 3 (and KV only 1), but a queue
    # above target holds the fleet.
    d = tick(DEFAULT, load(pods=2, waiting=10, running=200, kv=0.2), current=4, starting=2)
    assert (d.desired, d.reason) == (4, "QueueBacklog")
    assert d.message.endswith("need 3: holding 4")


def test_a_queue_within_target_only_vetoes_it_never_adds():
    d = tick(DEFAULT, load(pods=10, waiting=21, running=100, kv=0.7), current=10)  # 2.1 per replica
    assert (d.desired, d.reason) == (10, "Steady")


# -- starting replicas ---------------------------------------------------------------------------


def test_starting_replicas_absorb_load_instead_of_more_being_added():
    # 3 ready replicas breach TTFT 2x; 3 more are starting: that is the doubling already.
    d = tick(DEFAULT, load(pods=3, ttft=2.0), current=6, ready=3, starting=3)
    assert (d.desired, d.reason) == (6, "TTFT")
    assert d.message.endswith("holding 6")
    # Without the starting ones, the same breach doubles the fleet.
    d = tick(DEFAULT, load(pods=3, ttft=2.0), current=3)
    assert (d.desired, d.reason) == (6, "TTFT")


def test_kv_load_is_compared_with_ready_plus_starting():
    d = tick(KV_ONLY, load(pods=2, kv=1.0), current=3, ready=2, starting=1)  # 2.67 replicas' worth
    assert (d.desired, d.reason) == (3, "Steady")


def test_all_replicas_starting_and_none_reporting_holds():
    d = tick(DEFAULT, load(pods=0), current=3, ready=0, starting=3)
    assert (d.desired, d.reason) == (3, "MetricsUnavailable")
    assert d.message == "no replica reports metrics yet (0 ready, 3 starting): holding 3 replicas"
    assert condition(d, "MetricsAvailable") == ("False", "NoSamples")


def test_replicas_reporting_before_ready_count_with_their_load():
    d = tick(KV_ONLY, load(pods=2, kv=0.9), current=2, ready=0, starting=2)  # warming, not yet Ready
    assert d.desired == 3  # 2 x 0.9 / 0.75 = 2.4
    d = tick(DEFAULT, load(pods=2, kv=0.5, ttft=5.0), current=2, ready=0, starting=2)
    assert d.desired == 2  # a latency breach with no ready replica: the starting ones are the answer
