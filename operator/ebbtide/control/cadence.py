"""When a service's periodic work falls due: once per period, each service at its own phase.

A fleet created at once (or an operator restarted over it) would otherwise evaluate every
service, and write every status refresh and demand profile, in the same tick once per period:
at 1,000 services, 1,000 evaluations in one tick and none in the two after it
(bench/operator_scale.py). A phase taken from the service's name spreads them evenly over the
period, and stays the same across restarts.

Periodic writes (a status refresh, a demand profile's save) also have a fleet-wide budget: past
it their period doubles, so that a fleet at rest costs the API server the same writes a second at
1,000 services as at 100. What a longer period costs: a failover resumes from an older status
(the cost totals, the last decision's words) and profile (at most one period of learning).
"""

from __future__ import annotations

import math
import zlib


def _phase(key: tuple[str, str]) -> float:
    """The service's phase, a fraction of a period, from its name: the same after a restart."""
    return zlib.crc32("/".join(key).encode()) / 2**32


def slot(now: float, period: float, key: tuple[str, str]) -> int:
    """The number of the period `now` falls in, for this service: a write is due when it moved."""
    return math.floor((now + _phase(key) * period) / period)


def due(now: float, period: float, key: tuple[str, str], last: float, last_slot: int | None) -> bool:
    """Whether work last done at `last`, in period `last_slot`, is due again at `now`: once per
    period, at the service's phase. Never within half a period of the last time: a first
    evaluation that fell just before the service's phase moves it later, not twice in a row."""
    return slot(now, period, key) != last_slot and now - last >= period / 2


# Fleet-wide budgets, in writes a second: together half a write a second (2.5 a 5 s tick) for a
# fleet at rest of any size. At 1 a second each, 1,000 services at rest cost 18.2 API requests a
# tick and 100 cost 2.6 (bench/operator_scale.py). Reached at ~90 (refreshes), ~180 (saves) services.
STATUS_REFRESHES_PER_SECOND = 0.3
PROFILE_SAVES_PER_SECOND = 0.2


def stretched(period: float, services: int, budget: float) -> float:
    """`period`, doubled until `services` writes, one each per period, fit in the `budget`."""
    while services > period * budget:
        period *= 2
    return period


def crossed(now: float, base: float, services: int, key: tuple[str, str], last: float, budget: float) -> bool:
    """Whether a periodic write last done at `last` is due again: its period (`base`, stretched
    for a fleet of `services` within the `budget`) has a boundary, at the service's phase, between then and now. A
    first write spreads the next ones over the period (a fleet written at once is not written
    again all at once). The phase is a fraction of `base` times a power of two far past any
    stretch: the boundaries of a stretched period are some of the base's (a fleet that doubles
    makes no service due early), and spread over it (not bunched in its first `base` seconds)."""
    if last == -math.inf:
        return True
    period, phase = stretched(base, services, budget), _phase(key) * base * 2**20
    return math.floor((now + phase) / period) > math.floor((last + phase) / period)
