"""The learned demand profile: learning, forgetting, prediction and persistence."""

from __future__ import annotations

import json
import math
import random
from datetime import datetime
from functools import cache
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ebbtide.policy.profile import (
    BIN_SECONDS,
    BINS,
    WEEK_SECONDS,
    Profile,
    bin_of,
    observe,
    predict,
    prewarm_target,
)

BERLIN = ZoneInfo("Europe/Berlin")
MONDAY = datetime(2024, 4, 1, tzinfo=BERLIN).timestamp()  # a Monday, 00:00 local
TICK = 60.0
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def diurnal(t: float) -> float:
    """Tokens/s: 200 at night, a ramp from 07:00 to a 2000 plateau at 09:00, down after 18:00."""
    local = datetime.fromtimestamp(t, BERLIN)
    hour = local.hour + local.minute / 60
    weekend = local.weekday() >= 5
    peak = 800 if weekend else 2000
    if hour < 7 or hour >= 20:
        return 200.0
    if hour < 9:
        return 200 + (peak - 200) * (hour - 7) / 2
    if hour < 18:
        return float(peak)
    return peak - (peak - 200) * (hour - 18) / 2


@cache
def learned(weeks: int = 2, noise: float = 0.05, lookback: int = 2) -> Profile:
    rng = random.Random(7)
    profile = Profile.empty(lookback_weeks=lookback, timezone="Europe/Berlin")
    t = MONDAY
    while t < MONDAY + weeks * WEEK_SECONDS:
        profile = observe(profile, t, diurnal(t) * (1 + rng.uniform(-noise, noise)))
        t += TICK
    return profile


def test_two_weeks_of_diurnal_demand_predict_week_three_within_ten_percent():
    profile = learned()
    week3 = MONDAY + 2 * WEEK_SECONDS
    errors = []
    # A bin predicts the mean demand over its 15 minutes (a ramp rises 225 tokens/s in one),
    # so that is what each prediction is compared with, at several points inside each bin.
    for start in range(0, WEEK_SECONDS, BIN_SECONDS):
        actual = sum(diurnal(week3 + start + m * 60) for m in range(15)) / 15
        for inside in (0, 450, 899):
            p = predict(profile, week3 + start + inside)
            assert p is not None
            errors.append(abs(p - actual) / actual)
    assert max(errors) < 0.10
    high = predict(profile, week3 + 10 * 3600, high=True)
    assert high is not None and high >= predict(profile, week3 + 10 * 3600)


def test_nothing_predicted_before_a_week_of_history():
    profile = Profile.empty()
    t = MONDAY
    while t < MONDAY + 3 * 24 * 3600:
        profile = observe(profile, t, 100.0)
        t += TICK
    assert predict(profile, t) is None
    assert predict(profile, MONDAY + WEEK_SECONDS - 1) is None
    assert prewarm_target(profile, t, 3600, 1.1, 100.0) is None
    assert predict(profile, MONDAY + WEEK_SECONDS + 60) == 100.0  # Monday 00:01 was seen


def test_unseen_bins_predict_nothing():
    profile = Profile.empty()
    t = MONDAY
    while t < MONDAY + 8 * 24 * 3600:
        if datetime.fromtimestamp(t, ZoneInfo("UTC")).hour != 12:  # the operator was down at noon
            profile = observe(profile, t, 50.0)
        t += TICK
    noon_next_week = MONDAY + WEEK_SECONDS + 2 * 86400 + 14 * 3600 + 600  # 12:10 UTC
    assert predict(profile, noon_next_week) is None
    assert predict(profile, noon_next_week + 3600) == 50.0


def test_lookback_governs_forgetting():
    def two_regimes(lookback: int) -> float:
        profile = Profile.empty(lookback_weeks=lookback)
        for week, level in ((0, 100.0), (1, 100.0), (2, 300.0)):
            t = MONDAY + week * WEEK_SECONDS
            for k in range(15):
                profile = observe(profile, t + k * TICK, level)
        return predict(profile, MONDAY + 3 * WEEK_SECONDS + 60)

    assert math.isclose(two_regimes(1), 300.0)
    assert 100.0 < two_regimes(8) < two_regimes(2) < 300.0


def test_stale_bins_are_forgotten_at_prediction_too():
    profile = Profile.empty(lookback_weeks=1)
    for k in range(15):
        profile = observe(profile, MONDAY + k * TICK, 10.0)
    profile = observe(profile, MONDAY + 5 * WEEK_SECONDS + 86400, 10.0)  # keep the profile alive elsewhere
    assert predict(profile, MONDAY + WEEK_SECONDS + 60) == 10.0
    assert predict(profile, MONDAY + 3 * WEEK_SECONDS + 60) is None


def test_prewarm_target_covers_the_ramp_ahead():
    profile = learned()
    capacity = 500.0  # tokens/s per replica
    at_0630 = MONDAY + 2 * WEEK_SECONDS + 6.5 * 3600
    replicas, when = prewarm_target(profile, at_0630, lead_seconds=3 * 3600, headroom=1.1,
                                    capacity_per_replica=capacity)
    assert replicas == math.ceil(2000 * 1.1 / capacity) or replicas == math.ceil(2000 * 1.05 * 1.1 / capacity)
    assert at_0630 + 2 * 3600 <= when <= at_0630 + 3 * 3600  # the plateau, from 08:30 on
    replicas, when = prewarm_target(profile, at_0630, lead_seconds=0, headroom=1.0,
                                    capacity_per_replica=capacity)
    assert replicas == 1 and when == at_0630
    assert prewarm_target(profile, at_0630, 600, 1.1, 0.0) is None


def test_restart_round_trip_is_small_and_lossless_enough():
    profile = learned()
    text = json.dumps(profile.to_json(), separators=(",", ":"))
    assert len(text) < 32_000
    back = Profile.from_json(json.loads(text))
    assert back.to_json() == profile.to_json()
    for k in range(0, WEEK_SECONDS, 3 * 3600 + 7):
        t = MONDAY + 2 * WEEK_SECONDS + k
        assert math.isclose(predict(back, t), predict(profile, t), rel_tol=1e-4)
    assert Profile.load(json.loads(text), lookback_weeks=3, timezone="Europe/Berlin").lookback_weeks == 3
    assert Profile.load({"version": 99}, timezone="UTC") == Profile.empty(timezone="UTC")
    assert Profile.load(json.loads(text), timezone="UTC") == Profile.empty(timezone="UTC")  # other zone's weeks
    # A version-1 document (before `prior`) still loads: what it learned is all last week's.
    v1 = {k: v for k, v in json.loads(text).items() if k != "prior"} | {"version": 1}
    old = Profile.from_json(v1)
    assert old.mean == back.mean and old.prior == old.mean


def test_bins_follow_local_time_across_dst():
    # 08:00 local before and after the spring change: the same bin, one UTC hour apart.
    before = datetime(2024, 3, 25, 8, 0, tzinfo=BERLIN).timestamp()
    after = datetime(2024, 4, 1, 8, 0, tzinfo=BERLIN).timestamp()
    assert bin_of(before, "Europe/Berlin")[0] == bin_of(after, "Europe/Berlin")[0] == 32
    assert after - before == WEEK_SECONDS - 3600


@FAST
@given(samples=st.lists(st.tuples(st.floats(0, 6 * WEEK_SECONDS), st.one_of(st.floats(-10, 1e6), st.just(math.nan))),
                        max_size=60),
       lookback=st.integers(1, 8))
def test_size_is_bounded_and_json_survives_any_history(samples, lookback):
    profile = Profile.empty(lookback_weeks=lookback)
    for t, demand in sorted(samples, key=lambda s: s[0]):
        profile = observe(profile, MONDAY + t, demand)
    data = profile.to_json()
    assert len(data["mean"]) == len(data["weight"]) == BINS
    assert all(v >= 0 for v in profile.var) and all(w >= 0 for w in profile.weight)
    again = Profile.from_json(json.loads(json.dumps(data)))
    assert again.to_json() == data
    for t, _ in samples:
        p = predict(profile, MONDAY + t + BIN_SECONDS, high=True)
        assert p is None or (math.isfinite(p) and p >= 0)
