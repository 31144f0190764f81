"""Scale up fast, down slowly: stabilization windows and rate limits over remembered history.

The semantics are the Kubernetes HPA's (autoscaling/v2 `behavior`), so that a user who knows
HPA reads our spec the same way:
- stabilization: over its window, the lowest recommendation wins a scale-up and the highest
  wins a scale-down (a short dip does not shrink the fleet; a short spike, with an up window,
  does not grow it);
- rate limits: per period, at most max(percent of the size at the period's start, count)
  replicas are added or removed.

History is kept as sliding-window extremes (see Memory): each function takes the entries,
drops what fell out of its window, and returns the new entries. Pure functions over tuples.
"""

from __future__ import annotations

from typing import NamedTuple

from ebbtide.api.spec import ScaleDownBehavior, ScaleUpBehavior
from ebbtide.policy.decision import Entries


def prune(entries: Entries, horizon: float) -> Entries:
    """The entries newer than `horizon` (entries are oldest first)."""
    i = 0
    n = len(entries)
    while i < n and entries[i][0] <= horizon:
        i += 1
    return entries[i:] if i else entries


def push_highest(entries: Entries, now: float, value: int) -> Entries:
    """Append (now, value) to a window whose first entry is its highest value.

    Older entries not above `value` are dropped: the new one stays in the window longer and
    is at least as high, so they could never be the highest again.
    """
    kept = list(entries)
    while kept and kept[-1][1] <= value:
        kept.pop()
    kept.append((now, value))
    return tuple(kept)


def push_lowest(entries: Entries, now: float, value: int) -> Entries:
    """Append (now, value) to a window whose first entry is its lowest value."""
    kept = list(entries)
    while kept and kept[-1][1] >= value:
        kept.pop()
    kept.append((now, value))
    return tuple(kept)


class Stabilized(NamedTuple):
    replicas: int
    lowest: int  # lowest recommendation over the scale-up window, this one included
    highest: int  # highest recommendation over the scale-down window, this one included
    up_recommendations: Entries
    down_recommendations: Entries


def stabilize(current: int, recommendation: int, up_recommendations: Entries, down_recommendations: Entries,
              up_window: float, down_window: float, now: float) -> Stabilized:
    """HPA's stabilization: grow to the lowest recommendation of the up window, shrink to the
    highest of the down window, otherwise stay. Records `recommendation` in both windows."""
    ups = prune(up_recommendations, now - up_window)
    downs = prune(down_recommendations, now - down_window)
    lowest = min(recommendation, ups[0][1]) if ups else recommendation
    highest = max(recommendation, downs[0][1]) if downs else recommendation
    if current < lowest:
        replicas = lowest
    elif current > highest:
        replicas = highest
    else:
        replicas = current
    # A zero-length window needs no history; not storing it keeps the status small.
    if up_window > 0:
        ups = push_lowest(ups, now, recommendation)
    if down_window > 0:
        downs = push_highest(downs, now, recommendation)
    return Stabilized(replicas, lowest, highest, ups, downs)


def scale_up_limit(current: int, scale_ups: Entries, behavior: ScaleUpBehavior, now: float) -> tuple[int, int]:
    """(most replicas allowed now, replicas the period started from).

    The base is the smallest size a scale-up started from within the period, so that several
    steps inside one period add up to one period's allowance (HPA counts the same way). It is
    read from the recorded sizes, not summed from deltas, so a decision that was computed but
    not carried out (advisory mode, a failed patch) does not eat the allowance twice.
    Percent rounds up: adding fast is the point of a scale-up.
    """
    recent = prune(scale_ups, now - behavior.period_seconds)
    base = min(current, recent[0][1]) if recent else current
    allowed = max(-(-base * behavior.max_increase_percent // 100), behavior.max_increase_replicas)
    return max(current, base + allowed), base


def scale_down_limit(current: int, scale_downs: Entries, behavior: ScaleDownBehavior,
                     now: float) -> tuple[int, int]:
    """(fewest replicas allowed now, replicas the period started from).

    The base is the largest size a scale-down started from within the period. Percent rounds
    down (never more than the stated share goes at once), but the count limit is at least 1,
    so a scale-down always makes progress.
    """
    recent = prune(scale_downs, now - behavior.period_seconds)
    base = max(current, recent[0][1]) if recent else current
    allowed = max(base * behavior.max_decrease_percent // 100, behavior.max_decrease_replicas)
    return min(current, max(0, base - allowed)), base


def record_change(scale_ups: Entries, scale_downs: Entries, current: int, desired: int, now: float,
                  up_period: float, down_period: float) -> tuple[Entries, Entries]:
    """The change histories after this tick: pruned to their periods, with this change added."""
    ups = prune(scale_ups, now - up_period)
    downs = prune(scale_downs, now - down_period)
    if desired > current:
        ups = push_lowest(ups, now, current)
    elif desired < current:
        downs = push_highest(downs, now, current)
    return ups, downs
