"""Idle tracking for the warm pool: since when each replica has had nothing to do.

    seen_idle(signals, now) -> {pod: now}         what one observation says
    seen_drained(signals, left_at) -> {pod}        out of the Service and done with its requests
    track_idle(previous, seen) -> {pod: since}    what the ticks have seen together

A replica is put to sleep only after `sleep.idleSeconds` of nothing running or waiting, so the
idle time must be carried from tick to tick.
"""

from __future__ import annotations

from collections.abc import Mapping

from ebbtide.policy.observation import Signals


def seen_idle(signals: Signals, now: float) -> dict[str, float]:
    """Pods whose newest sample shows nothing running or waiting: idle as of `now` (a sample
    says nothing of before). A pod without a sample is not idle: unknown load is not zero
    load, and a replica must never be put to sleep on a guess."""
    return {p.pod: now for p in signals.pods if not p.asleep and p.running + p.waiting <= 0}


def track_idle(previous: Mapping[str, float], seen: Mapping[str, float]) -> dict[str, float]:
    """Pod -> since when it has been idle: the earlier of what the last ticks and this one saw,
    for the pods idle now (a pod that did anything since starts over)."""
    return {pod: min(previous.get(pod, since), since) for pod, since in seen.items()}


# How long after a pod leaves the Service a request may still reach it: the endpoints reach
# every proxy and gateway within a few seconds. A sample taken later that shows nothing in
# flight proves the drain is over.
PROPAGATION_SECONDS = 5.0


def seen_drained(signals: Signals, left_at: Mapping[str, float]) -> frozenset[str]:
    """Pods out of the Service (pod -> unix seconds it left) whose newest sample, taken once
    the endpoints had caught up, shows nothing running or waiting."""
    return frozenset(p.pod for p in signals.pods
                     if p.pod in left_at and p.sampled_at >= left_at[p.pod] + PROPAGATION_SECONDS
                     and p.running + p.waiting <= 0)
