"""When a service's slow-moving writes fall due: once per period, each service at its own phase.

A fleet created at once (or an operator restarted over it) would otherwise write every
service's status refresh and demand profile in the same tick, once per period: at 1,000
services, 1,000 writes in one tick (bench/operator_scale.py). A phase taken from the service's
name spreads them evenly over the period, and stays the same across restarts.
"""

from __future__ import annotations

import math
import zlib


def slot(now: float, period: float, key: tuple[str, str]) -> int:
    """The number of the period `now` falls in, for this service: a write is due when it moved."""
    phase = zlib.crc32("/".join(key).encode()) / 2**32 * period
    return math.floor((now + phase) / period)
