"""A fleet created at once is evaluated spread over its interval, each service once per interval
(control/cadence.py `due`, as the scaling loop uses it): at 1,000 services every third tick
held all 1,000 evaluations (bench/operator_scale.py)."""

from __future__ import annotations

import collections
import math

from ebbtide.control.cadence import STATUS_REFRESHES_PER_SECOND, crossed, due, slot, stretched

INTERVAL = 15.0  # the default intervalSeconds


def fleet_of(size: int) -> list[tuple[str, str]]:
    return [(f"scale-{i % 20:02d}", f"svc-{i:04d}") for i in range(size)]


FLEET = fleet_of(1000)


def evaluate(ticks: list[float]) -> dict[tuple[str, str], list[float]]:
    """When each service of FLEET is evaluated at these ticks, all of them new at the first."""
    last: dict[tuple[str, str], tuple[float, int | None]] = dict.fromkeys(FLEET, (-math.inf, None))
    times = collections.defaultdict(list)
    for now in ticks:
        for key in FLEET:
            if due(now, INTERVAL, key, *last[key]):
                last[key] = (now, slot(now, INTERVAL, key))
                times[key].append(now)
    return times


def test_a_fleet_created_at_once_is_evaluated_at_once_then_spread_over_its_interval():
    # Ticks 5 s apart plus the tick's own duration, which varies.
    ticks = [1000.0]
    for i in range(400):
        ticks.append(ticks[-1] + 5.0 + (0.3, 1.9, 0.8, 2.6)[i % 4])
    times = evaluate(ticks)
    per_tick = collections.Counter(t for evaluated in times.values() for t in evaluated)
    assert per_tick[ticks[0]] == len(FLEET)  # a new service is evaluated at once
    # Afterwards about a tick's share of the interval each tick, never the whole fleet.
    later = [per_tick[t] for t in ticks[6:]]
    assert max(later) <= len(FLEET) * (5.0 + 2.6) / INTERVAL * 1.25, max(later)
    span = ticks[-1] - ticks[0]
    for key, evaluated in times.items():
        gaps = [b - a for a, b in zip(evaluated, evaluated[1:], strict=False)]
        assert min(gaps) >= INTERVAL / 2, (key, gaps)  # never twice in a row
        # Once per interval, not more: one evaluation in each period of its phase.
        periods = [slot(t, INTERVAL, key) for t in evaluated]
        assert len(set(periods)) == len(periods), key
        assert span / INTERVAL - 2 <= len(evaluated) <= span / INTERVAL + 2, (key, len(evaluated))


def test_ticks_shorter_than_the_interval_still_evaluate_each_service_once_per_interval():
    ticks = [t * 0.5 for t in range(2000, 2600)]  # the tests' 0.5 s tick against a 15 s interval
    for evaluated in evaluate(ticks).values():
        assert len(evaluated) in (20, 21)  # 300 s


def periodic_writes(fleet: list[tuple[str, str]], ticks: list[float], base: float,
                    last: dict | None = None) -> tuple[collections.Counter, dict]:
    """Writes per tick of a periodic write (a status refresh), each service looked at every tick,
    the period stretched for the fleet's size; and when each was last written."""
    last = dict(last or {})
    counted = collections.Counter()
    for now in ticks:
        for key in fleet:
            if crossed(now, base, len(fleet), key, last.get(key, -math.inf), STATUS_REFRESHES_PER_SECOND):
                last[key] = now
                counted[now] += 1
    return counted, last


def test_periodic_writes_stay_within_the_fleet_wide_budget_whatever_the_fleet_size():
    base = 20 * INTERVAL  # the status refresh at the default interval
    assert stretched(base, 50, STATUS_REFRESHES_PER_SECOND) == stretched(base, 90, STATUS_REFRESHES_PER_SECOND) \
        == base  # a small fleet keeps its 300 s
    ticks = [5.0 * i for i in range(1, 3000)]  # 15,000 s: a period even at 3,000 services
    budget = 5.0 * STATUS_REFRESHES_PER_SECOND  # a tick's share
    for size in (50, 100, 300, 1000, 3000):
        counted, _ = periodic_writes(fleet_of(size), ticks, base)
        assert counted[ticks[0]] == size  # the first writes at once (a new operator writes every status)
        later = [counted[t] for t in ticks[1:]]
        assert sum(later) / len(later) <= budget * 1.01, (size, sum(later) / len(later))
        assert max(later) <= 3 * budget, (size, max(later))  # phases from names: spread, not even


def test_a_fleet_that_doubles_does_not_make_every_service_due_at_once():
    base = 20 * INTERVAL
    ticks = [5.0 * i for i in range(1, 500)]
    _, last = periodic_writes(fleet_of(500), ticks, base)
    grown, _ = periodic_writes(fleet_of(1000), [ticks[-1] + 5.0 * i for i in range(1, 400)], base, last)
    (_, first), *later = sorted(grown.items())
    assert 500 <= first <= 500 + 3 * 5.0, first  # the new half at once; the old half as due anyway
    assert max(n for _, n in later) <= 3 * 5.0 * STATUS_REFRESHES_PER_SECOND, max(n for _, n in later)
