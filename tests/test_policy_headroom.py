"""The throughput share measured from the load's own rises (policy/headroom.py)."""

import dataclasses
import math

from ebbtide.api.manifest import parse_spec
from ebbtide.policy.autoscaling import decide
from ebbtide.policy.decision import Memory
from ebbtide.policy.headroom import (
    UNSEEN_WHEN_TRUSTED,
    Variability,
    horizon_seconds,
    observe_rate,
    throughput_share,
)
from ebbtide.policy.observation import FleetState, PodSignals, Signals

NOW = 1_800_000_000.0
TICK = 15.0
HORIZON = horizon_seconds(180.0, TICK, 60.0)  # 225 s


def spec(**targets):
    return parse_spec({"model": {"name": "m"}, "replicas": {"min": 1, "max": 20},
                       "scaling": {"targets": targets}})


def feed(rates, v=None, start=NOW):
    """The variability after one reading per tick of `rates` (tokens/s)."""
    v = v or Variability()
    for i, rate in enumerate(rates):
        v = observe_rate(v, start + i * TICK, rate, HORIZON)
    return v


def steady(ticks, level=10_000.0, ripple=0.02):
    """A flat load with a small alternating ripple (deterministic noise)."""
    return [level * (1 + ripple * (1 if i % 2 else -1)) for i in range(ticks)]


def test_the_horizon_is_a_startup_time_a_tick_and_half_the_rate_s_window():
    assert HORIZON == 180 + 15 + 30


def test_a_share_fixed_by_the_spec_is_the_throughput_target_on_the_rate_as_read():
    targets = spec(throughput=0.8, throughputMax=0.8).scaling.targets
    share = throughput_share(targets, feed(steady(600)), 12_345.0)
    assert (share.share, share.margin, share.adaptive, share.demand) == (0.8, None, False, 12_345.0)


def test_until_half_an_hour_of_forecasts_is_checked_the_share_is_the_cautious_one():
    targets = spec().scaling.targets
    early = feed(steady(100))  # 25 minutes
    assert early.unseen > UNSEEN_WHEN_TRUSTED
    share = throughput_share(targets, early, 9_000.0)
    assert (share.share, share.margin, share.demand) == (0.8, None, 9_000.0)


def test_a_steady_load_runs_close_to_throughput_max_sized_on_its_smoothed_level():
    targets = spec().scaling.targets  # 0.8 .. 0.95
    v = feed(steady(8 * 240))  # 8 hours
    share = throughput_share(targets, v, 10_200.0)
    assert 0.9 <= share.share <= 0.95, share
    # The demand sized for is the level, not the reading: a minute's ripple is not a trend.
    assert abs(share.demand - 10_000.0) < 300 and share.demand != 10_200.0


def test_a_ramp_under_way_leaves_more_room_than_a_plateau_at_the_same_level():
    targets = spec().scaling.targets
    flat = feed(steady(4 * 240))
    # The same history, then 20 minutes rising 1 % a minute.
    ramp = feed([10_000.0 * 1.01 ** (i / 4) for i in range(80)], flat, start=NOW + 4 * 240 * TICK)
    plateau = feed([10_000.0] * 80, flat, start=NOW + 4 * 240 * TICK)
    assert ramp.forecast > ramp.level * 1.02  # the rise over the last horizon goes on
    assert throughput_share(targets, ramp, 1.0).share < throughput_share(targets, plateau, 1.0).share


def test_forecasts_that_fell_short_widen_the_margin():
    targets = spec().scaling.targets
    calm = feed(steady(4 * 240, ripple=0.01))
    jumpy = feed(steady(4 * 240, ripple=0.08))
    assert jumpy.shortfall_square > calm.shortfall_square
    assert throughput_share(targets, jumpy, 1.0).share < throughput_share(targets, calm, 1.0).share


def test_the_state_holds_one_horizon_of_readings_and_survives_json():
    v = feed(steady(1000))
    assert len(v.forecasts) <= HORIZON / TICK + 2 and len(v.slows) <= HORIZON / TICK + 2
    assert Variability.from_json(v.to_json()) == v
    for garbage in (None, [], {"unseen": 7}, {"forecasts": [["x", 1]]}, {"level": "nan"}):
        assert Variability.from_json(garbage) == Variability()


def test_no_rate_is_no_reading():
    v = feed(steady(10))
    for nothing in (None, -5.0, math.nan, math.inf):
        assert observe_rate(v, NOW + 10_000, nothing, HORIZON) is v
    assert observe_rate(v, v.updated_at, 9_000.0, HORIZON) is v  # not after the last reading
    targets = spec().scaling.targets
    assert throughput_share(targets, feed(steady(600)), None).demand is None  # never a stale level


def test_traffic_that_stops_takes_the_level_down_with_it():
    v = feed(steady(600))
    stopped = feed([0.0] * 40, v, start=NOW + 600 * TICK)  # ten minutes without a token
    share = throughput_share(spec().scaling.targets, stopped, 0.0)
    assert share.demand is not None and share.demand < 10.0


def signals(now, tokens, ready):
    pods = tuple(PodSignals(pod=f"p{i}", sampled_at=now, running=50, kv_cache_usage=0.3) for i in range(ready))
    return Signals(source="test", sampled_at=now, pods=pods, ttft_seconds=0.2, tpot_seconds=0.03,
                   tokens_per_second=tokens)


def run(s, rates, ready):
    memory = dataclasses.replace(Memory.empty(NOW - 3600), capacity=1_000.0)
    decision = None
    for i, rate in enumerate(rates):
        now = NOW + i * TICK
        decision = decide(s, signals(now, rate, ready), FleetState(current=ready, ready=ready), memory, now, 180.0)
        memory = decision.memory
    return decision


def test_decide_packs_a_steady_load_onto_fewer_replicas_than_the_fixed_share():
    """9,000 tokens/s over 1,000 a replica serves: 11.25 replicas at 80 %, 10 at 90 % or more."""
    rates = steady(4 * 240, level=9_000.0, ripple=0.01)
    measured = run(spec(), rates, ready=12)
    fixed = run(spec(throughputMax=0.8), rates, ready=12)
    assert fixed.signals["recommended"] == 12 and fixed.signals["throughputShare"] == 0.8
    assert measured.signals["recommended"] == 10 and measured.signals["throughputShare"] >= 0.9
    assert "what forecasts one startup time ahead missed by" in measured.message


def test_with_a_measured_share_a_load_above_the_fleet_scales_up_without_waiting_for_the_tolerance():
    """The margin covers the ripples the tolerance band would; at 10 replicas a need of 10.5
    (5 % over, inside the 10 % band) adds one."""
    rates = steady(4 * 240, level=9_000.0, ripple=0.01)
    settled = run(spec(), rates, ready=10)
    share = settled.signals["throughputShare"]
    need = 10.5 * 1_000.0 * share
    up = run(spec(), rates + [need] * 40, ready=10)
    assert up.desired == 11, up.message


def test_what_an_earlier_run_measured_is_kept_without_its_clock():
    """A restarted operator with its clock gone back, or a service started knowing an earlier
    run (ebbtide-warm), keeps how far forecasts fell short: not when, nor the rates of then."""
    from ebbtide.policy.blind import trusted
    from ebbtide.policy.tick import TickState

    v = feed(steady(1000))
    kept = v.carried()
    assert (kept.shortfall_square, kept.unseen) == (v.shortfall_square, v.unseen)
    assert kept.forecasts == kept.slows == () and kept.level is kept.updated_at is None
    earlier = Memory(since=NOW, capacity=1_000.0, variability=v)
    assert TickState.start(NOW + 99_999, 1_000.0, known=earlier).memory.variability == kept
    assert trusted(earlier, NOW - 10).variability == kept  # history from the future: the clock went back


def test_off_peak_runs_packed_until_the_margin_is_measured_then_the_measured_share_rules():
    targets = spec().scaling.targets
    early, measured = feed(steady(100)), feed(steady(8 * 240))
    assert throughput_share(targets, early, 9_000.0, 0.9).share == 0.9
    assert throughput_share(targets, measured, 9_000.0, 0.9) == throughput_share(targets, measured, 9_000.0)
