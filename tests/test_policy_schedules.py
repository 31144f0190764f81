"""Schedule windows: cron in a timezone, across midnight and daylight-saving changes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ebbtide.api.spec import InferenceServiceSpec, ScheduleWindow
from ebbtide.policy.schedules import (
    active_windows,
    effective_bounds,
    effective_spec,
    floor_ahead,
    is_open,
    next_change,
)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def at(zone: ZoneInfo, *args: int, fold: int = 0) -> float:
    return datetime(*args, tzinfo=zone, fold=fold).timestamp()


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


def window(cron: str, minutes: int, tz: str = "UTC", name: str = "w", **kw) -> ScheduleWindow:
    return ScheduleWindow(name=name, cron=cron, duration_minutes=minutes, timezone=tz, **kw)


def spec(*windows: ScheduleWindow, lo: int = 1, hi: int = 10) -> InferenceServiceSpec:
    return InferenceServiceSpec.model_validate({
        "model": {"name": "m"}, "replicas": {"min": lo, "max": hi},
        "schedules": [w.model_dump(by_alias=True, exclude_none=True) for w in windows],
    })


# -- opening and closing -----------------------------------------------------------------------


def test_open_from_fire_time_inclusive_to_end_exclusive():
    w = window("0 8 * * 1-5", 60, "Europe/Berlin")
    assert not is_open(w, at(BERLIN, 2024, 5, 6, 7, 59, 59))  # a Monday
    assert is_open(w, at(BERLIN, 2024, 5, 6, 8, 0))
    assert is_open(w, at(BERLIN, 2024, 5, 6, 8, 59, 59))
    assert not is_open(w, at(BERLIN, 2024, 5, 6, 9, 0))
    assert not is_open(w, at(BERLIN, 2024, 5, 4, 8, 30))  # Saturday


def test_window_across_midnight():
    night = window("0 22 * * *", 8 * 60, "America/New_York", off_peak=True)
    assert is_open(night, at(NEW_YORK, 2024, 6, 1, 23, 0))
    assert is_open(night, at(NEW_YORK, 2024, 6, 2, 5, 59))
    assert not is_open(night, at(NEW_YORK, 2024, 6, 2, 6, 0))
    assert not is_open(night, at(NEW_YORK, 2024, 6, 2, 21, 59))


def test_timezone_is_respected():
    w = window("0 9 * * *", 30, "America/New_York")
    assert is_open(w, utc(2024, 7, 1, 13, 10))  # 09:10 EDT
    assert not is_open(w, utc(2024, 7, 1, 9, 10))


# -- daylight saving ---------------------------------------------------------------------------
# Berlin: 2024-03-31 02:00 -> 03:00 and 2024-10-27 03:00 -> 02:00.
# New York: 2024-03-10 02:00 -> 03:00 and 2024-11-03 02:00 -> 01:00.


def test_spring_forward_duration_is_real_time():
    # Opens 01:30 CET, 60 real minutes later it is 03:30 CEST.
    w = window("30 1 * * *", 60, "Europe/Berlin")
    assert is_open(w, at(BERLIN, 2024, 3, 31, 3, 29))
    assert not is_open(w, at(BERLIN, 2024, 3, 31, 3, 30))


@pytest.mark.parametrize("tz, zone, day", [("Europe/Berlin", BERLIN, 31), ("America/New_York", NEW_YORK, 10)])
def test_spring_forward_skipped_time_fires_at_the_jump(tz, zone, day):
    w = window("30 2 * * *", 30, tz)
    assert not is_open(w, at(zone, 2024, 3, day, 1, 59))
    assert is_open(w, at(zone, 2024, 3, day, 3, 0))  # the instant 02:00 became 03:00
    assert is_open(w, at(zone, 2024, 3, day, 3, 29))
    assert not is_open(w, at(zone, 2024, 3, day, 3, 30))
    # and the next day as usual
    next_day = at(zone, 2024, 3, day, 12, 0) + 86400
    assert is_open(w, next_day - 9.5 * 3600)  # 02:30
    assert not is_open(w, next_day - 9.5 * 3600 - 60)


def test_fall_back_fixed_time_fires_once():
    w = window("30 2 * * *", 20, "Europe/Berlin")
    assert is_open(w, at(BERLIN, 2024, 10, 27, 2, 40, fold=0))  # first 02:30 (CEST)
    assert not is_open(w, at(BERLIN, 2024, 10, 27, 2, 40, fold=1))  # not again an hour later
    w = window("30 1 * * *", 60, "America/New_York")
    assert is_open(w, at(NEW_YORK, 2024, 11, 3, 1, 30, fold=0))
    # 60 real minutes after the first 01:30 EDT is 01:30 EST: closed, not re-opened
    assert not is_open(w, at(NEW_YORK, 2024, 11, 3, 1, 45, fold=1))


def test_fall_back_wildcard_fires_in_both_passes():
    w = window("0 * * * *", 15, "America/New_York")
    assert is_open(w, at(NEW_YORK, 2024, 11, 3, 1, 10, fold=0))
    assert is_open(w, at(NEW_YORK, 2024, 11, 3, 1, 10, fold=1))


def test_eight_hour_window_over_fall_back_is_eight_real_hours():
    w = window("0 22 * * *", 8 * 60, "Europe/Berlin")
    start = at(BERLIN, 2024, 10, 26, 22, 0)
    assert is_open(w, start + 8 * 3600 - 1)
    assert not is_open(w, start + 8 * 3600)  # 05:00 CET, one wall-clock hour "early"


# Reference: scan every minute for a fire, the way cron does.
def _reference_fires(cron: str, zone: ZoneInfo, minute: float) -> bool:
    local = datetime.fromtimestamp(minute, zone)
    naive = local.replace(tzinfo=None)
    fixed = not (cron.split()[0].startswith("*") or cron.split()[1].startswith("*"))
    second_pass = local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()
    if croniter.match(cron, naive) and not (fixed and second_pass):
        return True
    before = datetime.fromtimestamp(minute - 60, zone)
    jump = local.utcoffset() - before.utcoffset()
    # Clocks went forward: skipped times fire now, unless every hour fires anyway (croniter).
    if cron.split()[1] != "*" and jump > timedelta(0):
        skipped = naive - jump
        while skipped < naive:
            if croniter.match(cron, skipped):
                return True
            skipped += timedelta(minutes=1)
    return False


def _reference_open(w: ScheduleWindow, now: float) -> bool:
    zone = ZoneInfo(w.timezone)
    minute = now - now % 60
    while minute > now - w.duration_minutes * 60:
        if _reference_fires(w.cron, zone, minute):
            return True
        minute -= 60
    return False


TRANSITIONS = [
    ("Europe/Berlin", utc(2024, 3, 31, 1, 0)), ("Europe/Berlin", utc(2024, 10, 27, 1, 0)),
    ("America/New_York", utc(2024, 3, 10, 7, 0)), ("America/New_York", utc(2024, 11, 3, 6, 0)),
]
CRONS = st.builds(
    lambda m, h, dow: f"{m} {h} * * {dow}",
    st.sampled_from(["0", "30", "15,45", "*/20", "*", "59"]),
    st.sampled_from(["2", "1", "3", "1-3", "*/2", "*", "23", "0"]),
    st.sampled_from(["*", "0", "6", "0,6", "1-5"]),
)


@FAST
@given(transition=st.sampled_from(TRANSITIONS), cron=CRONS, minutes=st.integers(1, 240),
       offset=st.integers(-5 * 3600, 5 * 3600))
def test_matches_a_minute_by_minute_cron_around_dst(transition, cron, minutes, offset):
    tz, moment = transition
    w = window(cron, minutes, tz)
    now = moment + offset
    assert is_open(w, now) == _reference_open(w, now)


# -- effective bounds --------------------------------------------------------------------------


def test_overlapping_windows_highest_floor_lowest_ceiling_last_targets():
    a = window("0 8 * * *", 120, name="a", min_replicas=3, max_replicas=8,
               targets={"waitingPerReplica": 1.0, "kvCacheUsage": 0.6})
    b = window("0 9 * * *", 120, name="b", min_replicas=2, max_replicas=6, off_peak=True,
               targets={"waitingPerReplica": 4.0})
    s = spec(a, b, lo=1, hi=10)
    eff = effective_bounds(s, utc(2024, 1, 1, 9, 30))
    assert (eff.min_replicas, eff.max_replicas) == (3, 6)
    assert eff.waiting_per_replica == 4.0 and eff.kv_cache_usage == 0.6
    assert eff.off_peak and eff.windows == ("a", "b")
    eff = effective_bounds(s, utc(2024, 1, 1, 10, 30))
    assert (eff.min_replicas, eff.max_replicas, eff.windows) == (2, 6, ("b",))
    eff = effective_bounds(s, utc(2024, 1, 1, 12, 0))
    assert (eff.min_replicas, eff.max_replicas, eff.off_peak, eff.windows) == (1, 10, False, ())
    assert eff.waiting_per_replica == s.scaling.targets.waiting_per_replica


def test_off_peak_window_may_lower_the_floor_but_not_lift_the_ceiling():
    s = spec(window("0 0 * * *", 360, min_replicas=0, max_replicas=50), lo=2, hi=10)
    eff = effective_bounds(s, utc(2024, 1, 1, 1, 0))
    assert (eff.min_replicas, eff.max_replicas) == (0, 10)


def test_conflicts_resolved_and_explained():
    s = spec(window("0 0 * * *", 60, name="cap", max_replicas=1), lo=2, hi=10)
    eff = effective_bounds(s, utc(2024, 1, 1, 0, 30))
    assert (eff.min_replicas, eff.max_replicas) == (1, 1) and "ceiling" in eff.note
    s = spec(window("0 0 * * *", 60, name="cap", max_replicas=2),
             window("0 0 * * *", 60, name="peak", min_replicas=4), hi=10)
    eff = effective_bounds(s, utc(2024, 1, 1, 0, 30))
    assert (eff.min_replicas, eff.max_replicas) == (4, 4) and "floor" in eff.note


def test_effective_spec_feeds_decide_and_is_identity_when_nothing_is_open():
    s = spec(window("0 8 * * *", 60, min_replicas=5, targets={"kvCacheUsage": 0.5}), lo=1, hi=10)
    assert effective_spec(s, utc(2024, 1, 1, 12, 0)) is s
    e = effective_spec(s, utc(2024, 1, 1, 8, 10))
    assert e.replicas.min == 5 and e.scaling.targets.kv_cache_usage == 0.5
    assert s.replicas.min == 1  # unchanged
    assert effective_spec(s, utc(2024, 1, 1, 7, 50), floor=5).replicas.min == 5


# -- what comes next ---------------------------------------------------------------------------


def test_next_change_openings_and_closings():
    a = window("0 8 * * *", 60, "Europe/Berlin", name="a")
    b = window("30 8 * * *", 120, "Europe/Berlin", name="b")
    now = at(BERLIN, 2024, 5, 6, 7, 0)
    t, w, opening = next_change([a, b], now)
    assert (t, w.name, opening) == (at(BERLIN, 2024, 5, 6, 8, 0), "a", True)
    t, w, opening = next_change([a, b], at(BERLIN, 2024, 5, 6, 8, 40))
    assert (t, w.name, opening) == (at(BERLIN, 2024, 5, 6, 9, 0), "a", False)
    t, w, opening = next_change([a, b], at(BERLIN, 2024, 5, 6, 9, 0))
    assert (t, w.name, opening) == (at(BERLIN, 2024, 5, 6, 10, 30), "b", False)
    assert next_change([], now) is None


def test_next_change_follows_self_overlapping_windows():
    hourly = window("0 * * * 1-5", 90)  # open all weekday long, closes Saturday 00:30
    t, _, opening = next_change([hourly], utc(2024, 5, 8, 12, 0))  # a Wednesday
    assert (t, opening) == (utc(2024, 5, 11, 0, 30), False)


def test_floor_ahead_starts_a_scheduled_raise_early():
    peak = window("0 8 * * *", 120, name="peak", min_replicas=6)
    night = window("0 0 * * *", 7 * 60 + 59, name="night", max_replicas=2, min_replicas=0)
    s = spec(peak, night, lo=1, hi=10)
    lead = 600
    assert floor_ahead(s, utc(2024, 1, 1, 7, 45), lead) == 0  # 07:55: not yet
    assert floor_ahead(s, utc(2024, 1, 1, 7, 51), lead) == 6  # 08:01 is in the peak
    assert effective_spec(s, utc(2024, 1, 1, 7, 51), floor=6).replicas.max >= 6  # night cap lifted
    assert floor_ahead(s, utc(2024, 1, 1, 9, 55), lead) == 6  # still in force now
    assert floor_ahead(s, utc(2024, 1, 1, 12, 0), lead) == 1


@FAST
@given(offset=st.integers(0, 14 * 24 * 3600), lead=st.integers(0, 7200))
def test_floor_ahead_never_below_now_and_active_in_listing_order(offset, lead):
    s = spec(window("0 8 * * 1-5", 90, "Europe/Berlin", name="a", min_replicas=4),
             window("*/45 * * * *", 30, "America/New_York", name="b", min_replicas=2, max_replicas=5),
             lo=1, hi=8)
    now = utc(2024, 3, 1) + offset
    eff = effective_bounds(s, now)
    assert eff.min_replicas <= floor_ahead(s, now, lead) <= s.replicas.max
    names = [w.name for w in active_windows(s.schedules, now)]
    assert tuple(names) == eff.windows and names == sorted(names)
