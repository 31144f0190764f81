"""How long a replica of this service takes to become useful, measured on its own pods.

    observe_startups(estimate, pods, limit_seconds=MAX_STARTUP_SECONDS, now=None) -> StartupEstimate

A startup is a pod's creation to its readiness (ready and warmed: the warm-up requests run
before the pod is counted ready). That is everything a scale-up waits for: scheduling, a node
the cluster autoscaler may have to add, the image pull, loading the weights, compiling, and
warming. lifecycle.plan() uses the estimate as its lead time: scheduled floors and predicted
ramps are started that long ahead.

The estimate is the 90th percentile of the last RECENT startups, not their mean. Being late
and being early do not cost the same: a replica that lands after the ramp has begun costs the
SLO for every request of the ramp that queued meanwhile, one that lands a minute early costs a
GPU-minute. So the lead time should cover nearly every startup, not the typical one. A
quantile of a short window also behaves the way a lead time should: a slower startup (a new
model, a node pool without the image cached) moves it up within two or three pods, a faster
one brings it down only once most of the window agrees, and once ten startups have been seen
a single odd pod (a crash loop, a node that took an hour) moves it not at all (before that,
the slowest one seen is the estimate, which errs early). A mean would do the opposite on each
count, and an exponentially weighted mean-plus-deviation (TCP's RTO estimator) is blown up
for several samples by one outlier. A window of 20 is as small as the JSON it lives in: the service's
status keeps it (see to_json).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from ebbtide.api.spec import InferenceServiceSpec

# Startups the estimate is taken over, newest last.
RECENT = 20
QUANTILE = 0.9
# A pod that became ready more than two hours after it was created waited for something a lead
# time cannot buy (no node for hours, a long crash loop): pre-warming two hours ahead is not
# what anyone wants from the profile, and the spec's own bounds for a startup stop here too
# (engine.startupBudgetSeconds and warmup.defaultStartupSeconds are at most 7200).
MAX_STARTUP_SECONDS = 7200.0


@dataclass(frozen=True, slots=True)
class StartupEstimate:
    """The measured startup time of one service, and what is needed to keep measuring it."""

    seconds: float | None = None  # the estimate: None until a startup has been measured
    samples: int = 0  # startups counted since measuring began
    last_ready_at: float | None = None  # newest ready time already examined: each pod counts once
    recent: tuple[float, ...] = ()  # the last RECENT startups in seconds, newest last

    def to_json(self) -> dict:
        """Status-shaped: `measuredSeconds` and `samples` (the recent startups, newest last) are
        the fields status.startup has; `count` and `lastReadyAt` are what the next tick needs."""
        return {
            "measuredSeconds": self.seconds,
            "samples": list(self.recent),
            "count": self.samples,
            "lastReadyAt": self.last_ready_at,
        }

    @classmethod
    def from_json(cls, data: dict) -> StartupEstimate:
        """The inverse of to_json; ValueError on anything else (see `load` for the lenient form)."""
        if not isinstance(data, dict):
            raise ValueError(f"startup estimate must be an object, got {type(data).__name__}")
        try:
            recent = tuple(_duration(x) for x in data.get("samples", []))[-RECENT:]
            seconds = data.get("measuredSeconds")
            count = int(data.get("count", len(recent)))
            if count < len(recent):
                raise ValueError(f"count {count} is below the {len(recent)} samples kept")
            last = data.get("lastReadyAt")
            return cls(seconds=None if seconds is None else _duration(seconds), samples=count,
                       last_ready_at=None if last is None else _finite(last), recent=recent)
        except (TypeError, ValueError) as e:
            raise ValueError(f"startup estimate is malformed: {e!r}") from None

    @classmethod
    def load(cls, data: dict | None) -> StartupEstimate:
        """What the shell calls on start: the stored estimate, or none measured yet.

        An unreadable estimate is measured again: until then the spec's default startup time is
        the lead time, which is what it is for.
        """
        if data is None:
            return cls()
        try:
            return cls.from_json(data)
        except ValueError:
            return cls()


def observe_startups(estimate: StartupEstimate, pods: Iterable[tuple[float, float]],
                     limit_seconds: float = MAX_STARTUP_SECONDS, now: float | None = None) -> StartupEstimate:
    """The estimate with the startups of pods that became ready since the last call.

    `pods` are (created_at, ready_at) in unix seconds, for pods that are ready now; the shell may
    pass all of them every tick, since only those ready after `last_ready_at` count (pods ready in
    the same second as the newest one counted, but listed only on a later tick, are missed; that
    costs a sample, not correctness). Not counted, but marked as seen: a startup that is negative
    (clocks disagree) or longer than `limit_seconds` (see MAX_STARTUP_SECONDS).

    Why not the spec's startup budget as the limit: the startupProbe's budget starts when the
    container does, but a scale-up also waits while the pod is Pending for a node and while the
    image is pulled. A pod that waited ten minutes for a GPU node the cluster autoscaler added
    took that long, and the next ramp will wait as long: that is the lead time to measure.

    With `now`, a pod ready later than `now` (a node clock ahead of the operator's) is left for
    a later tick instead of pushing `last_ready_at` into the future, where it would hide every
    pod ready before it.
    """
    last = estimate.last_ready_at
    fresh = sorted(
        (ready, created) for created, ready in pods
        if math.isfinite(ready) and (last is None or ready > last) and (now is None or ready <= now)
    )
    if not fresh:
        return estimate
    recent = list(estimate.recent)
    counted = estimate.samples
    for ready, created in fresh:
        took = ready - created
        if 0.0 <= took <= limit_seconds:  # False for NaN
            recent.append(round(took, 1))
            counted += 1
    recent = recent[-RECENT:]
    seconds = high_quantile(recent) if recent else estimate.seconds
    return StartupEstimate(seconds=seconds, samples=counted, last_ready_at=fresh[-1][0], recent=tuple(recent))


@dataclass(frozen=True, slots=True)
class Startup:
    """One replica's way to Ready (unix seconds), as the shell saw it."""

    created: float
    scheduled: float | None  # got a node (PodScheduled); None if not known
    ready: float
    spot: bool = False


def lead_time_samples(startups: Iterable[Startup], spec: InferenceServiceSpec) -> list[tuple[float, float]]:
    """(counted from, ready) per startup, for observe_startups (see counted_from)."""
    spot = spec.placement.spot
    covered_after = float(spot.pending_timeout_seconds) if spot.enabled else None
    return [(counted_from(s.created, s.scheduled, covered_after if s.spot else None), s.ready) for s in startups]


def counted_from(created: float, scheduled: float | None, covered_after: float | None) -> float:
    """When a pod's startup starts counting, for the lead time: its creation, except for a spot
    pod that waited for capacity longer than the on-demand fallback's pending timeout
    (`covered_after`, placement.spot.pendingTimeoutSeconds). From then on the fallback starts
    an on-demand replica in its place, so a scale-up never waits longer than that for a node,
    and the rest of the wait is not lead time: counted, one spot outage would start every floor
    and predicted ramp hours early for the next twenty startups. An on-demand pod's wait for a
    node (a cluster autoscaler adding one) is the scale-up's own, and counts in full.
    """
    if scheduled is None or covered_after is None:
        return created
    return max(created, scheduled - covered_after)


def high_quantile(values: Iterable[float], q: float = QUANTILE) -> float:
    """The nearest-rank q-quantile: a value that was measured, never an interpolation. With fewer
    than 1 / (1 - q) values it is the largest: a few samples say little about the tail, so the
    slowest seen is the safe lead time."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _finite(x: object) -> float:
    value = float(x)  # type: ignore[arg-type]
    if not math.isfinite(value):
        raise ValueError(f"{x!r} is not finite")
    return value


def _duration(x: object) -> float:
    value = _finite(x)
    if value < 0:
        raise ValueError(f"duration {x!r} is negative")
    return value
