"""A fleet created at once is evaluated spread over its interval, each service once per interval
(control/cadence.py `due`, as the scaling loop uses it): at 1,000 services every third tick
held all 1,000 evaluations (bench/operator_scale.py)."""

from __future__ import annotations

import collections
import math

from ebbtide.control.cadence import due, slot

INTERVAL = 15.0  # the default intervalSeconds
FLEET = [(f"scale-{i % 20:02d}", f"svc-{i:04d}") for i in range(1000)]


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
