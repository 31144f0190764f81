"""When a service's periodic work falls due: once per period, each service at its own phase.

A fleet created at once (or an operator restarted over it) would otherwise evaluate every
service, and write every status refresh and demand profile, in the same tick once per period:
at 1,000 services, 1,000 evaluations in one tick and none in the two after it
(bench/operator_scale.py). A phase taken from the service's name spreads them evenly over the
period, and stays the same across restarts.
"""

from __future__ import annotations

import math
import zlib


def slot(now: float, period: float, key: tuple[str, str]) -> int:
    """The number of the period `now` falls in, for this service: a write is due when it moved."""
    phase = zlib.crc32("/".join(key).encode()) / 2**32 * period
    return math.floor((now + phase) / period)


def due(now: float, period: float, key: tuple[str, str], last: float, last_slot: int | None) -> bool:
    """Whether work last done at `last`, in period `last_slot`, is due again at `now`: once per
    period, at the service's phase. Never within half a period of the last time: a first
    evaluation that fell just before the service's phase moves it later, not twice in a row."""
    return slot(now, period, key) != last_slot and now - last >= period / 2
