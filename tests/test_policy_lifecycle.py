"""plan(): the reactive core inside schedule windows, with scheduled floors started early, and
ramps the learned demand profile predicts pre-warmed."""

import dataclasses
import datetime
from functools import cache
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ebbtide.api.manifest import parse_spec
from ebbtide.policy.autoscaling import decide
from ebbtide.policy.decision import Memory
from ebbtide.policy.lifecycle import PRE_WARMING, plan, ramp_ahead
from ebbtide.policy.observation import FleetState, PodSignals, Signals
from ebbtide.policy.profile import WEEK_SECONDS, Profile, observe, predict

EIGHT = datetime.datetime(2026, 3, 2, 8, 0, tzinfo=datetime.UTC).timestamp()  # a Monday


def spec(**extra):
    return parse_spec({"model": {"name": "m"}, "replicas": {"min": 1, "max": 10}, **extra})


def quiet(now, ready=2):
    pods = tuple(PodSignals(pod=f"p{i}", sampled_at=now, running=1, kv_cache_usage=0.1) for i in range(ready))
    return Signals(source="test", sampled_at=now, pods=pods, ttft_seconds=0.1, tpot_seconds=0.02)


PEAK = {"schedules": [{"name": "weekday-peak", "cron": "0 8 * * 1-5", "durationMinutes": 600, "minReplicas": 5}]}


def test_without_schedules_plan_is_the_reactive_core():
    s, now = spec(), EIGHT
    fleet = FleetState(current=2, ready=2)
    assert plan(s, quiet(now), fleet, Memory.empty(now - 600), now) == decide(s, quiet(now), fleet,
                                                                              Memory.empty(now - 600), now)


def test_a_scheduled_floor_is_started_one_startup_time_early():
    s = spec(**PEAK)
    fleet = FleetState(current=2, ready=2)
    early = plan(s, quiet(EIGHT - 120), fleet, Memory.empty(EIGHT - 900), EIGHT - 120, startup_seconds=180)
    assert early.desired == 5
    assert "started early for 'weekday-peak' at 08:00 UTC" in early.message
    too_early = plan(s, quiet(EIGHT - 600), fleet, Memory.empty(EIGHT - 900), EIGHT - 600, startup_seconds=180)
    assert too_early == decide(s, quiet(EIGHT - 600), fleet, Memory.empty(EIGHT - 900), EIGHT - 600)
    assert too_early.desired < 5


def test_inside_the_window_its_floor_holds_and_is_named():
    s = spec(**PEAK)
    decision = plan(s, quiet(EIGHT + 3600), FleetState(current=2, ready=2), Memory.empty(EIGHT), EIGHT + 3600)
    assert decision.desired == 5 and "schedule weekday-peak" in decision.message
    after = EIGHT + 601 * 60
    relaxed = plan(s, quiet(after), FleetState(current=2, ready=2), Memory.empty(EIGHT), after)
    assert relaxed.desired < 5


# -- predictive pre-warming --------------------------------------------------------------------

# Two weeks of a daily ramp at 08:00 are learned; week three is predicted.
LEARN_FROM = EIGHT - 8 * 3600 - 2 * WEEK_SECONDS  # Monday 00:00, two weeks before EIGHT's Monday
CAPACITY = 500.0  # tokens/s a replica serves at its limit; the core sizes at 80 % of it: 400
NIGHT, DAY = 200.0, 2480.0  # tokens/s: 0.5 and 6.2 replicas of demand


def daily_ramp(t: float, zone: str = "UTC") -> float:
    hour = datetime.datetime.fromtimestamp(t, ZoneInfo(zone)).hour
    return DAY if 8 <= hour < 18 else NIGHT


@cache
def taught(zone: str = "UTC") -> Profile:
    profile = Profile.empty(lookback_weeks=2, timezone=zone)
    t = LEARN_FROM
    while t < LEARN_FROM + 2 * WEEK_SECONDS:
        profile = observe(profile, t, daily_ramp(t, zone))
        t += 300
    return profile


def load(now, tokens, ready=2):
    """A fleet carrying `tokens` tokens/s, lightly: the reactive core asks for tokens / 400."""
    pods = tuple(PodSignals(pod=f"p{i}", sampled_at=now, running=1, kv_cache_usage=0.05) for i in range(ready))
    return Signals(source="test", sampled_at=now, pods=pods, ttft_seconds=0.1, tpot_seconds=0.02,
                   tokens_per_second=tokens)


def memory(now):
    return Memory(since=now - 3600, capacity=CAPACITY)


def both(s, now, signals, fleet, profile, lead=180):
    """(with the profile, without it): the same tick."""
    return (plan(s, signals, fleet, memory(now), now, startup_seconds=lead, profile=profile),
            plan(s, signals, fleet, memory(now), now, startup_seconds=lead))


def test_a_learned_ramp_is_pre_warmed_one_startup_time_ahead():
    s, now = spec(), EIGHT - 150
    decision, reactive = both(s, now, load(now, NIGHT), FleetState(current=2, ready=2), taught())
    assert reactive.desired <= 2
    assert decision.desired == 7  # ceil(6.2 x 1.1)
    assert decision.reason == PRE_WARMING
    assert decision.message.startswith("pre-warming 2 -> 7 for the ramp expected at 08:00 UTC "
                                       "(predicted 6.2 replicas of demand, x1.1 headroom)")
    assert decision.signals["prewarmReplicas"] == 7 and decision.signals["predictedTokensPerSecond"] == DAY
    assert decision.condition("ScalingLimited").reason == PRE_WARMING


def test_before_the_lead_time_nothing_is_pre_warmed():
    s, now = spec(), EIGHT - 240  # the ramp is 4 minutes away, a startup takes 3
    decision, reactive = both(s, now, load(now, NIGHT), FleetState(current=2, ready=2), taught())
    assert decision.desired == reactive.desired and decision.reason == reactive.reason != PRE_WARMING
    assert decision.off_peak, "still the night's valley: consolidated until the ramp is within reach"
    longer, _ = both(s, now, load(now, NIGHT), FleetState(current=2, ready=2), taught(), lead=300)
    assert longer.desired == 7  # a measured 5-minute startup starts it earlier


def test_the_floor_holds_through_the_first_quarter_hour_then_the_core_decides():
    s = spec()
    at = EIGHT + 300
    held, _ = both(s, at, load(at, NIGHT), FleetState(current=7, ready=7), taught())
    assert held.desired == 7 and held.reason == PRE_WARMING
    assert held.message.startswith("pre-warming: holding 7 for the ramp under way since 08:00 UTC")
    noon = EIGHT + 4 * 3600
    for tokens in (DAY, NIGHT):  # a normal day, and a holiday far below its profile
        decision, reactive = both(s, noon, load(noon, tokens), FleetState(current=7, ready=7), taught())
        assert dataclasses.replace(decision, profile=None, signals=reactive.signals) == reactive


def test_switched_off_the_profile_is_untouched_and_nothing_is_pre_warmed():
    s, now = spec(warmup={"predictive": {"enabled": False}}), EIGHT - 150
    profile = taught()
    decision = plan(s, load(now, NIGHT), FleetState(current=2, ready=2), memory(now), now, 180, profile)
    assert decision.profile is profile
    assert dataclasses.replace(decision, profile=None) == plan(s, load(now, NIGHT), FleetState(current=2, ready=2),
                                                               memory(now), now, 180)


def test_pre_warming_is_bounded_by_max_replicas():
    s, now = spec(replicas={"min": 1, "max": 5}), EIGHT - 150
    decision, _ = both(s, now, load(now, NIGHT), FleetState(current=2, ready=2), taught())
    assert decision.desired == 5 and decision.reason == PRE_WARMING
    assert "7 wanted, the ceiling is 5" in decision.message


def test_a_night_cap_does_not_stop_the_morning_from_starting():
    night = {"schedules": [{"name": "night", "cron": "0 0 * * *", "durationMinutes": 480, "maxReplicas": 2}]}
    s, now = spec(**night), EIGHT - 150
    decision, reactive = both(s, now, load(now, NIGHT), FleetState(current=2, ready=2), taught())
    assert reactive.desired <= 2 and decision.desired == 7


def test_a_higher_scheduled_floor_wins_and_keeps_its_words():
    peak = {"schedules": [{"name": "peak", "cron": "0 8 * * *", "durationMinutes": 600, "minReplicas": 9}]}
    s, now = spec(**peak), EIGHT - 150
    decision, reactive = both(s, now, load(now, NIGHT), FleetState(current=2, ready=2), taught())
    assert decision.desired == reactive.desired == 9
    assert decision.message == reactive.message and "started early for 'peak'" in decision.message


def test_the_ramp_is_said_in_the_profile_timezone():
    s = spec()
    eight_berlin = datetime.datetime(2026, 3, 2, 8, 0, tzinfo=ZoneInfo("Europe/Berlin")).timestamp()
    now = eight_berlin - 150
    decision, _ = both(s, now, load(now, NIGHT), FleetState(current=2, ready=2), taught("Europe/Berlin"))
    assert "expected at 08:00 CET" in decision.message


def test_a_fresh_tick_teaches_its_token_rate_and_a_blind_one_teaches_nothing():
    s, now = spec(), EIGHT + 2 * 3600 + 7
    profile = taught()
    fresh = plan(s, load(now, 0.0), FleetState(current=7, ready=7), memory(now), now, profile=profile)
    assert fresh.profile == observe(profile, now, 0.0)
    assert predict(fresh.profile, now + WEEK_SECONDS) < DAY
    stale = load(now - 600, 0.0)
    no_tokens = dataclasses.replace(load(now, 0.0), tokens_per_second=None)
    for blind in (Signals.missing("Prometheus unreachable"), stale, no_tokens):
        decision = plan(s, blind, FleetState(current=7, ready=7), memory(now), now, profile=profile)
        assert decision.profile is profile
    asleep = plan(s, load(now, 0.0, ready=0), FleetState(current=0, ready=0, asleep=2), memory(now), now,
                  profile=profile)
    assert asleep.profile is profile  # nothing could serve: no demand was measured


def test_blind_ticks_still_pre_warm():
    s, now = spec(), EIGHT - 150
    decision = plan(s, Signals.missing("Prometheus unreachable"), FleetState(current=2, ready=2), memory(now), now,
                    180, taught())
    assert decision.desired == 7 and decision.reason == PRE_WARMING
    assert "metrics unavailable (Prometheus unreachable)" in decision.message
    assert decision.profile is taught()


def test_no_pre_warming_until_a_replica_limit_is_known_or_a_week_is_learned():
    s, now = spec(), EIGHT - 150
    unknown = Memory(since=now - 3600)
    decision = plan(s, load(now, NIGHT), FleetState(current=2, ready=2), unknown, now, 180, taught())
    assert decision.reason != PRE_WARMING and decision.desired <= 2
    young = Profile.empty()
    for k in range(2000):
        young = observe(young, now - 3 * 86400 + 60 * k, DAY)
    assert ramp_ahead(s, young, CAPACITY, now, 180) is None
    assert ramp_ahead(s, taught(), CAPACITY, now, 180) is not None


def test_the_spec_lookback_retunes_the_profile():
    s, now = spec(warmup={"predictive": {"lookbackWeeks": 4}}), EIGHT + 3600
    decision = plan(s, load(now, DAY), FleetState(current=7, ready=7), memory(now), now, profile=taught())
    assert decision.profile.lookback_weeks == 4


FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(offset=st.floats(-3 * 3600, 3 * 3600), current=st.integers(0, 12), ready=st.integers(0, 12),
       tokens=st.one_of(st.none(), st.floats(0, 6000)), kv=st.floats(0, 1), waiting=st.floats(0, 50),
       history=st.floats(0, 3600), capacity=st.one_of(st.none(), st.floats(50, 3000)),
       lead=st.floats(0, 3600), blind=st.booleans(), low=st.integers(0, 3), high=st.integers(3, 12))
def test_pre_warming_never_lowers_the_reactive_decision(offset, current, ready, tokens, kv, waiting, history,
                                                        capacity, lead, blind, low, high):
    s = spec(replicas={"min": low, "max": high})
    now = EIGHT + offset
    pods = tuple(PodSignals(pod=f"p{i}", sampled_at=now, running=2, waiting=waiting / max(ready, 1),
                            kv_cache_usage=kv) for i in range(ready))
    signals = (Signals.missing("down") if blind else
               Signals(source="test", sampled_at=now, pods=pods, tokens_per_second=tokens))
    fleet = FleetState(current=current, ready=min(ready, current))
    mem = Memory(since=now - history, capacity=capacity)
    with_profile = plan(s, signals, fleet, mem, now, lead, taught())
    without = plan(s, signals, fleet, mem, now, lead)
    assert with_profile.desired >= without.desired
    assert with_profile.desired <= max(high, without.desired)  # never above max, unless already there


def test_without_a_profile_the_decision_carries_none():
    now = EIGHT
    assert plan(spec(), quiet(now), FleetState(current=2, ready=2), Memory.empty(now - 600), now).profile is None


@pytest.mark.parametrize("lead", [60, 180, 900, 3600])
def test_the_floor_covers_the_ramp_from_one_lead_time_ahead(lead):
    assert ramp_ahead(spec(), taught(), CAPACITY, EIGHT - lead - 1, lead) is None
    ramp = ramp_ahead(spec(), taught(), CAPACITY, EIGHT - lead + 1, lead)
    assert ramp is not None and ramp.floor == 7 and ramp.at == EIGHT


def test_a_day_below_its_profile_sees_no_ramp_at_every_quarter_hour_and_a_smaller_real_one():
    """Mid-morning of a quiet day (a third of the learned demand): the quarter-hour this week
    has visited blends today's demand in, the next one still holds last week's. Read as last
    week left them, the plateau is no ramp. And the 08:00 ramp of a day running at a third of
    its profile's night level is pre-warmed to a third of its height."""
    s = spec()
    profile, t = taught(), EIGHT + 2 * 3600 + 600  # 10:10, ten minutes into the 10:00 quarter-hour
    for moment in (EIGHT + 2 * 3600, EIGHT + 2 * 3600 + 300, t):
        profile = observe(profile, moment, DAY / 3)
    assert predict(profile, t) < predict(profile, t + 900) / 1.1, "the blended bin looks like a rise"
    assert ramp_ahead(s, profile, CAPACITY, t, 600, observed=DAY / 3) is None

    now = EIGHT - 150
    full = ramp_ahead(s, taught(), CAPACITY, now, 180, observed=NIGHT)
    quiet = ramp_ahead(s, taught(), CAPACITY, now, 180, observed=NIGHT / 3)
    assert full.floor == 7 and quiet.floor == 3, (full, quiet)  # ceil(2480 x 1.1 / 400) and a third of it


# --- off-peak consolidation ---------------------------------------------------------------------

OFF_PEAK = {"schedules": [{"name": "night", "cron": "0 22 * * *", "durationMinutes": 480, "offPeak": True,
                        "minReplicas": 1}],
         "sleep": {"enabled": True, "idleSeconds": 300},
         "placement": {"spot": {"enabled": True, "onDemandBase": 2}}}
MIDNIGHT = datetime.datetime(2026, 3, 3, 0, 0, tzinfo=datetime.UTC).timestamp()
FIXED_SHARE = {"targets": {"throughputMax": 0.8}}  # throughput 0.8, fixed: no measured margin


def busy(now, tokens, ready=9):
    pods = tuple(PodSignals(pod=f"p{i}", sampled_at=now, running=4, kv_cache_usage=0.2) for i in range(ready))
    return Signals(source="test", sampled_at=now, pods=pods, ttft_seconds=0.1, tpot_seconds=0.02,
                   tokens_per_second=tokens)


def test_a_valley_the_profile_knows_is_consolidated_like_an_off_peak_window():
    """At 03:00 the profile expects a twelfth of the day's demand until long after one startup
    time: off-peak, with the consolidated targets, and said so. At noon it is not. (A fixed
    share: a measured one keeps its own floor off-peak, see the next test.)"""
    s = spec(scaling=FIXED_SHARE)
    night, noon = EIGHT - 5 * 3600, EIGHT + 4 * 3600
    heavy = dataclasses.replace(memory(night), capacity=120.0)  # 200 tokens/s: 2.08 replicas at 80 %, 1.85 at 90 %
    decision = plan(s, load(night, NIGHT), FleetState(current=4, ready=2), heavy, night, 180, taught())
    assert decision.off_peak and decision.signals["recommended"] == 2
    assert "off-peak: the demand profile expects under 30%" in decision.message
    day = plan(s, load(noon, DAY), FleetState(current=7, ready=7), memory(noon), noon, 180, taught())
    assert not day.off_peak
    switched_off = plan(spec(warmup={"predictive": {"enabled": False}}, scaling=FIXED_SHARE), load(night, NIGHT),
                        FleetState(current=4, ready=2), heavy, night, 180, taught())
    assert not switched_off.off_peak and switched_off.signals["recommended"] == 3


def test_an_off_peak_window_packs_replicas_tighter_sleeps_sooner_and_prefers_spot():
    from ebbtide.policy.schedules import OFF_PEAK_THROUGHPUT, consolidated, effective_spec

    s = spec(**OFF_PEAK, scaling=FIXED_SHARE)
    night, day = effective_spec(s, MIDNIGHT), effective_spec(s, MIDNIGHT + 12 * 3600)
    assert night.scaling.targets.throughput == OFF_PEAK_THROUGHPUT > s.scaling.targets.throughput
    assert night.sleep.idle_seconds == 0 and night.placement.spot.on_demand_base == 0
    assert day.scaling.targets.throughput == s.scaling.targets.throughput and day.sleep.idle_seconds == 300
    assert consolidated(s).scaling.targets.throughput == OFF_PEAK_THROUGHPUT
    # A share measured from the load's rises (the default) is already packed when the load is
    # steady; off-peak does not raise its cautious floor (policy/schedules.py).
    measured = spec(**OFF_PEAK)
    assert consolidated(measured).scaling.targets.throughput == measured.scaling.targets.throughput == 0.8

    # The same load at the same learned capacity: 7,200 tokens/s over 1,000 a replica serves at
    # its limit is 9 replicas at 80 % and 8 at 90 %. Off-peak consolidates onto 8.
    memory = dataclasses.replace(Memory.empty(MIDNIGHT - 3600), capacity=1000.0)
    fleet = FleetState(current=9, ready=9)
    at_night = plan(s, busy(MIDNIGHT, 7200.0), fleet, memory, MIDNIGHT)
    by_day = plan(s, busy(MIDNIGHT + 12 * 3600, 7200.0), fleet,
                  dataclasses.replace(Memory.empty(MIDNIGHT + 11 * 3600), capacity=1000.0), MIDNIGHT + 12 * 3600)
    assert at_night.signals["recommended"] == 8 and by_day.signals["recommended"] == 9, (at_night, by_day)


def test_a_window_s_own_throughput_target_beats_consolidation():
    from ebbtide.policy.schedules import effective_spec

    s = spec(schedules=[{**OFF_PEAK["schedules"][0], "targets": {"throughput": 0.85}}])
    assert effective_spec(s, MIDNIGHT).scaling.targets.throughput == 0.85
