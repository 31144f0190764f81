"""plan(): the reactive core inside schedule windows, with scheduled floors started early."""

import datetime

from ebbtide.api.manifest import parse_spec
from ebbtide.policy.autoscaling import decide
from ebbtide.policy.decision import Memory
from ebbtide.policy.lifecycle import plan
from ebbtide.policy.observation import FleetState, PodSignals, Signals

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
