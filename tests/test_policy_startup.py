"""The measured startup time: each pod counted once, a high quantile of the recent ones, JSON."""

from __future__ import annotations

import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from ebbtide.policy.startup import (
    MAX_STARTUP_SECONDS,
    RECENT,
    StartupEstimate,
    counted_from,
    high_quantile,
    observe_startups,
)

T0 = 1_772_438_400.0  # 2026-03-02 08:00 UTC


def pods(*durations: float, start: float = T0, gap: float = 10.0) -> list[tuple[float, float]]:
    """(created_at, ready_at) of pods created `gap` apart, each ready after its duration."""
    return [(start + i * gap, start + i * gap + d) for i, d in enumerate(durations)]


def test_nothing_measured_is_none():
    empty = StartupEstimate()
    assert empty.seconds is None and empty.samples == 0
    assert observe_startups(empty, []) is empty


def test_one_startup_is_the_estimate():
    estimate = observe_startups(StartupEstimate(), pods(183.4))
    assert estimate.seconds == 183.4 and estimate.samples == 1
    assert estimate.last_ready_at == T0 + 183.4


def test_each_pod_counts_once_however_often_it_is_listed():
    ready = pods(180, 190, 200)
    once = observe_startups(StartupEstimate(), ready)
    again = observe_startups(once, ready)  # the shell lists every ready pod every tick
    assert again == once and once.samples == 3
    later = observe_startups(again, ready + pods(240, start=T0 + 600))
    assert later.samples == 4 and later.recent == (180, 190, 200, 240)


def test_the_estimate_is_a_high_quantile_not_the_mean():
    durations = [180.0] * 17 + [200.0, 210.0, 400.0]
    estimate = observe_startups(StartupEstimate(), pods(*durations))
    assert estimate.seconds == 200.0  # the 18th of 20: covers nine startups in ten
    mean = sum(durations) / len(durations)
    assert mean < estimate.seconds < 400


def test_with_few_samples_the_slowest_is_the_estimate():
    estimate = observe_startups(StartupEstimate(), pods(120, 300, 150))
    assert estimate.seconds == 300


def test_slower_startups_are_adopted_within_three_pods_faster_ones_slowly():
    steady = observe_startups(StartupEstimate(), pods(*[180.0] * RECENT))
    slow = steady
    for k in range(3):
        assert slow.seconds == 180.0
        slow = observe_startups(slow, pods(360.0, start=T0 + 3600 * (k + 1)))
    assert slow.seconds == 360.0
    fast = observe_startups(StartupEstimate(), pods(*[360.0] * RECENT))
    for k in range(RECENT - 3):
        fast = observe_startups(fast, pods(90.0, start=T0 + 3600 * (k + 1)))
        assert fast.seconds == 360.0
    fast = observe_startups(fast, pods(90.0, start=T0 + 3600 * RECENT))
    assert fast.seconds == 90.0


def test_one_odd_pod_does_not_move_a_full_window():
    steady = observe_startups(StartupEstimate(), pods(*[180.0] * RECENT))
    odd = observe_startups(steady, pods(3000.0, start=T0 + 3600))
    assert odd.seconds == 180.0 and odd.samples == RECENT + 1


def test_absurd_startups_are_seen_but_not_counted():
    estimate = observe_startups(StartupEstimate(), pods(180.0))
    skewed = observe_startups(estimate, [(T0 + 500, T0 + 400)])  # ready before created: clocks disagree
    assert skewed.seconds == 180.0 and skewed.samples == 1 and skewed.last_ready_at == T0 + 400
    stuck = observe_startups(skewed, [(T0, T0 + MAX_STARTUP_SECONDS + 600)])  # pending for hours
    assert stuck.seconds == 180.0 and stuck.samples == 1
    nan = observe_startups(stuck, [(math.nan, T0 + 9000), (T0, math.nan), (T0, math.inf)])
    assert nan.samples == 1 and nan.last_ready_at == T0 + 9000


def test_longer_than_the_startup_budget_still_counts():
    # Ten minutes Pending for a GPU node, then six loading: a real scale-up waits all of it.
    estimate = observe_startups(StartupEstimate(), pods(960.0))
    assert estimate.seconds == 960.0
    assert observe_startups(StartupEstimate(), pods(960.0), limit_seconds=900).seconds is None


def test_a_pod_ready_in_the_future_waits_instead_of_hiding_the_others():
    future = [(T0, T0 + 86400 * 365)]  # a node clock a year ahead
    now = T0 + 1000
    estimate = observe_startups(StartupEstimate(), future + pods(180.0), now=now)
    assert estimate.last_ready_at == T0 + 180 and estimate.samples == 1
    estimate = observe_startups(estimate, future + pods(180.0, 200.0, start=T0 + 500), now=now)
    assert estimate.samples == 3


def test_a_spot_pods_wait_beyond_the_fallback_timeout_is_not_lead_time():
    """A spot outage: pods wait an hour for capacity while on-demand covers them after the
    pending timeout (300 s). Counted from creation, twenty such startups would make the lead
    time an hour; counted from when the cover started, it stays the cold start."""
    timeout, cold = 300.0, 180.0
    waited = [(T0 + i, T0 + 3600 + i, T0 + 3600 + i + cold) for i in range(RECENT)]  # created, scheduled, ready
    as_created = observe_startups(StartupEstimate(), [(c, r) for c, _, r in waited])
    covered = observe_startups(StartupEstimate(), [(counted_from(c, s, timeout), r) for c, s, r in waited])
    assert as_created.seconds == 3600 + cold
    assert covered.seconds == timeout + cold
    # Within the timeout, or on demand (no cover to wait for), the whole wait counts.
    assert counted_from(T0, T0 + 200, timeout) == T0
    assert counted_from(T0, T0 + 3600, None) == T0
    assert counted_from(T0, None, timeout) == T0  # the API did not say when it got a node


def test_round_trip_and_lenient_load():
    estimate = observe_startups(StartupEstimate(), pods(*[170.0 + k for k in range(30)]))
    data = json.loads(json.dumps(estimate.to_json()))
    assert set(data) == {"measuredSeconds", "samples", "count", "lastReadyAt"}
    assert len(data["samples"]) == RECENT and data["count"] == 30
    assert StartupEstimate.from_json(data) == estimate == StartupEstimate.load(data)
    assert StartupEstimate.load(None) == StartupEstimate()
    for bad in ({"samples": [-1]}, {"samples": "x"}, {"lastReadyAt": "nan"}, {"count": 1, "samples": [1, 2]},
                {"measuredSeconds": math.inf}, [], "text"):
        assert StartupEstimate.load(bad) == StartupEstimate()  # type: ignore[arg-type]


TIME = st.one_of(st.floats(-1e4, 1e4), st.just(math.nan), st.just(math.inf))


@settings(max_examples=200, deadline=None)
@given(batches=st.lists(st.lists(st.tuples(TIME, TIME), max_size=8, unique=True), max_size=8))
def test_any_history_gives_a_sane_estimate(batches):
    estimate = StartupEstimate()
    seen: set[tuple[float, float]] = set()
    for batch in batches:
        listed = list(dict.fromkeys((T0 + c, T0 + r) for c, r in batch))  # distinct pods, after rounding
        before = estimate
        estimate = observe_startups(estimate, listed)
        assert estimate.samples >= before.samples
        assert len(estimate.recent) <= RECENT
        seen.update(listed)
    if estimate.seconds is not None:
        assert 0 <= estimate.seconds <= MAX_STARTUP_SECONDS
        assert estimate.seconds == high_quantile(estimate.recent)
        assert min(estimate.recent) <= estimate.seconds <= max(estimate.recent)
    counted = {(c, r) for c, r in seen if math.isfinite(r - c) and 0 <= r - c <= MAX_STARTUP_SECONDS}
    assert estimate.samples <= len(counted)  # a pod listed on many ticks counts once
    assert StartupEstimate.from_json(json.loads(json.dumps(estimate.to_json()))) == estimate
