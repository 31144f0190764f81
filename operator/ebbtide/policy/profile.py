"""A service's demand by time of week, learned from its own history, to start replicas ahead
of a ramp it has seen before.

    observe(profile, now, demand) -> Profile
    predict(profile, at, high=False) -> float | None
    prewarm_target(profile, now, lead_seconds, headroom, capacity_per_replica) -> (replicas, at) | None

The week is cut into 672 bins of 15 minutes of local time (so a ramp at 08:00 stays at 08:00
across daylight-saving changes). Each bin keeps an exponentially weighted mean and variance
of the demand seen in it, the weight behind them, and the (local) week it was last seen. The
profile is unit-free: tokens/s (divided by a replica's capacity in tokens/s) or replicas (with
capacity 1). Its size does not depend on how long it has learned: about 15 KB of JSON at most,
small enough for the service's status or an annotation, so a restarted operator keeps it.

Each bin also keeps `prior`, its mean as it stood before this week's first visit: what last
week taught about that time. A bin already visited this week blends today's demand in, while
the next bin still holds last week's; comparing the two would see a rise at every boundary of
a day that runs below its profile. predict(..., before_this_week=True) compares like with like.

Forgetting is per week: each time a bin is visited in a new week, the weight of what it held
is multiplied by (N - 1) / (N + 1) per week passed, N = warmup.predictive.lookbackWeeks. That
is an exponential moving average over weeks with a span of N: with N = 1 only the last week
counts, with N = 2 the week before weighs a third of it, and so on.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from functools import lru_cache
from zoneinfo import ZoneInfo

PROFILE_VERSION = 2  # 2 adds `prior`; version 1 is read with prior = mean
NO_PRIOR = -1.0
BIN_SECONDS = 900
WEEK_SECONDS = 7 * 24 * 3600
BINS = WEEK_SECONDS // BIN_SECONDS  # 672
# Weeks start on Monday 00:00 local time; the unix epoch was a Thursday.
_MONDAY = 4 * 24 * 3600
# One sample stands for the time since the previous one, but never more than a bin: after an
# outage the first sample must not count as hours of demand.
_MAX_SAMPLE_SECONDS = BIN_SECONDS
_FIRST_SAMPLE_SECONDS = 15.0
# A bin is trusted when at least this much observation (in seconds, after forgetting) stands
# behind it: a couple of ticks are not a profile.
_MIN_BIN_WEIGHT = 120.0
# The high estimate is mean + z * standard deviation: the 90th percentile of a normal spread.
_HIGH_Z = 1.2816


@lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _local_seconds(t: float, zone: ZoneInfo) -> float:
    offset = datetime.fromtimestamp(t, zone).utcoffset()
    return t + (offset.total_seconds() if offset is not None else 0.0) - _MONDAY


def bin_of(t: float, timezone: str = "UTC") -> tuple[int, int]:
    """(bin index within the local week, local week number) of instant t."""
    local = _local_seconds(t, _zone(timezone))
    week, within = divmod(local, WEEK_SECONDS)
    return int(within // BIN_SECONDS), int(week)


def _decay(lookback_weeks: int) -> float:
    return (lookback_weeks - 1) / (lookback_weeks + 1)


@dataclass(frozen=True, slots=True)
class Profile:
    """Demand by time of week. Build with Profile.empty(); change only with observe()."""

    timezone: str
    lookback_weeks: int
    since: float | None  # first observation: the profile predicts nothing for a week after
    updated: float | None  # newest observation
    # Per bin, as flat arrays, never changed in place (observe copies the one it changes): a
    # tuple of floats would hold an object per learned value, 107 KB a service instead of 27.
    mean: array
    var: array
    weight: array  # seconds of observation behind the bin, after forgetting
    week: array  # local week the bin was last seen in
    # Mean before this week's first visit (see the module docstring); NO_PRIOR when the bin
    # had no history before this week (then its mean is all there is).
    prior: array | None = None

    def __post_init__(self) -> None:
        if self.prior is None:
            object.__setattr__(self, "prior", self.mean)

    @classmethod
    def empty(cls, lookback_weeks: int = 2, timezone: str = "UTC") -> Profile:
        _zone(timezone)  # fail early on an unknown zone
        if lookback_weeks < 1:
            raise ValueError(f"lookback_weeks must be at least 1, got {lookback_weeks}")
        zeros = _floats([0.0] * BINS)
        return cls(timezone, lookback_weeks, None, None, zeros, zeros, zeros, _weeks([0] * BINS))

    def to_json(self) -> dict:
        return {
            "version": PROFILE_VERSION,
            "timezone": self.timezone,
            "lookbackWeeks": self.lookback_weeks,
            "since": self.since,
            "updated": self.updated,
            "binSeconds": BIN_SECONDS,
            "mean": [_short(x) for x in self.mean],
            "var": [_short(x) for x in self.var],
            "weight": [round(x, 1) if x else 0 for x in self.weight],
            "week": list(self.week),
            "prior": [_short(x) for x in self.prior],
        }

    @classmethod
    def from_json(cls, data: dict) -> Profile:
        """The inverse of to_json (values rounded as stored); ValueError on anything else."""
        if not isinstance(data, dict) or data.get("version") not in (1, PROFILE_VERSION):
            raise ValueError(f"not a demand profile of version 1 or {PROFILE_VERSION}")
        try:
            if data["binSeconds"] != BIN_SECONDS:
                raise ValueError(f"bins of {data['binSeconds']} s, expected {BIN_SECONDS}")
            columns = [data["mean"], data["var"], data["weight"], data["week"], data.get("prior", data["mean"])]
            if any(len(c) != BINS for c in columns):
                raise ValueError(f"expected {BINS} bins")
            mean, var, weight, prior = (_floats(_finite(x) for x in c) for c in (*columns[:3], columns[4]))
            if any(v < 0 for v in var) or any(w < 0 for w in weight):
                raise ValueError("negative variance or weight")
            profile = cls.empty(int(data["lookbackWeeks"]), str(data["timezone"]))
            return replace(profile, since=_optional(data["since"]), updated=_optional(data["updated"]),
                           mean=mean, var=var, weight=weight, week=_weeks(int(w) for w in columns[3]),
                           prior=prior)
        except (KeyError, TypeError, ValueError, LookupError) as e:
            raise ValueError(f"demand profile is malformed: {e!r}") from None

    @classmethod
    def load(cls, data: dict | None, lookback_weeks: int = 2, timezone: str = "UTC") -> Profile:
        """What the shell calls on start: the stored profile (re-tuned to the spec's lookback),
        or an empty one if there is none or it cannot be read."""
        if data is not None:
            try:
                profile = cls.from_json(data)
                if profile.timezone == timezone:
                    return replace(profile, lookback_weeks=lookback_weeks)
            except ValueError:
                pass
        return cls.empty(lookback_weeks, timezone)


def _floats(values: Iterable[float]) -> array:
    return array("d", values)


def _weeks(values: Iterable[int]) -> array:
    return array("q", values)


def _short(x: float) -> float:
    return float(f"{x:.5g}") if x else 0


def _finite(x: object) -> float:
    value = float(x)  # type: ignore[arg-type]
    if not math.isfinite(value):
        raise ValueError(f"{x!r} is not finite")
    return value


def _optional(x: object) -> float | None:
    return None if x is None else _finite(x)


def observe(profile: Profile, now: float, demand: float, seconds: float | None = None) -> Profile:
    """The profile with one more sample of demand at `now`.

    The sample stands for `seconds` of demand: by default the time since the previous sample,
    capped at one bin. Samples that go back in time, or are not finite and non-negative, are
    ignored: an unknown demand is not zero demand.
    """
    if not (math.isfinite(demand) and demand >= 0 and math.isfinite(now)):
        return profile
    if profile.updated is not None and now < profile.updated:
        return profile
    if seconds is None:
        seconds = _FIRST_SAMPLE_SECONDS if profile.updated is None else now - profile.updated
    seconds = min(max(seconds, 0.0), _MAX_SAMPLE_SECONDS)
    since = profile.since if profile.since is not None else now
    if seconds <= 0:
        return replace(profile, since=since, updated=now)
    i, week = bin_of(now, profile.timezone)
    w, mean, var = profile.weight[i], profile.mean[i], profile.var[i]
    prior = profile.prior[i]
    if week > profile.week[i]:
        prior = mean if w > 0 else NO_PRIOR  # the first visit this week: keep what the weeks before taught
        if w > 0:
            w *= _decay(profile.lookback_weeks) ** (week - profile.week[i])
    total = w + seconds
    share = seconds / total
    delta = demand - mean
    mean += share * delta
    var = (1.0 - share) * (var + share * delta * delta)
    return replace(
        profile, since=since, updated=now,
        mean=_put(profile.mean, i, mean), var=_put(profile.var, i, var),
        weight=_put(profile.weight, i, total), week=_put(profile.week, i, max(week, profile.week[i])),
        prior=_put(profile.prior, i, prior),
    )


def _put(values: array, i: int, value: float) -> array:
    changed = array(values.typecode, values)
    changed[i] = value
    return changed


def predict(profile: Profile, at: float, high: bool = False, before_this_week: bool = False) -> float | None:
    """The expected demand at `at` (with high=True: its 90th percentile), or None when the
    profile has not seen that time of week in the past `lookback_weeks` weeks, or has learned
    for less than a week. With before_this_week, a bin already visited in at's week answers
    with what it held before (its `prior`)."""
    if profile.since is None or at - profile.since < WEEK_SECONDS:
        return None
    i, week = bin_of(at, profile.timezone)
    w = profile.weight[i]
    weeks_unseen = week - profile.week[i] - 1
    if weeks_unseen > 0:
        w *= _decay(profile.lookback_weeks) ** weeks_unseen
    if w < _MIN_BIN_WEIGHT:
        return None
    prior = profile.prior[i]
    mean = prior if before_this_week and profile.week[i] == week and prior != NO_PRIOR else profile.mean[i]
    return mean + _HIGH_Z * math.sqrt(profile.var[i]) if high else mean


def in_valley(profile: Profile, now: float, lead_seconds: float, share: float) -> bool:
    """True when every quarter-hour from now through now + lead is predicted (as last week left
    it) below `share` of the week's busiest quarter-hour: a low-traffic stretch the profile
    knows, long enough that consolidating cannot be caught out by a ramp it predicts."""
    peak = max(profile.mean)  # max() over 672 floats runs in C: cheap enough for every tick
    if peak <= 0:
        return False
    start = math.floor(now / BIN_SECONDS) * BIN_SECONDS
    while start <= now + lead_seconds:
        demand = predict(profile, max(start, now), before_this_week=True)
        if demand is None or demand >= share * peak:
            return False
        start += BIN_SECONDS
    return True


def prewarm_target(profile: Profile, now: float, lead_seconds: float, headroom: float,
                   capacity_per_replica: float, high: bool = False,
                   before_this_week: bool = False) -> tuple[int, float] | None:
    """(replicas, when) for the highest demand predicted in (now, now + lead].

    replicas = ceil(demand x headroom / capacity per replica); `when` is the first moment
    that demand is expected (the start of its bin, or now if that bin has begun), for the
    caller's reason ("pre-warming 4 -> 7 for the ramp expected at 08:00"). None when nothing
    in the interval can be predicted yet. The caller bounds it by the maximum replicas and
    takes the larger of it and the reactive decision.
    """
    if not (capacity_per_replica > 0 and math.isfinite(capacity_per_replica)) or lead_seconds < 0:
        return None
    best: tuple[float, float] | None = None
    start = math.floor(now / BIN_SECONDS) * BIN_SECONDS  # every zone's offset is whole bins
    end = now + lead_seconds
    while start <= end:
        moment = max(start, now)
        demand = predict(profile, moment, high=high, before_this_week=before_this_week)
        if demand is not None and (best is None or demand > best[0]):
            best = (demand, moment)
        start += BIN_SECONDS
    if best is None:
        return None
    demand, moment = best
    return replicas_for(demand, headroom, capacity_per_replica), moment


def replicas_for(demand: float, headroom: float, capacity_per_replica: float) -> int:
    """ceil(demand x headroom / capacity per replica), without float noise adding a replica."""
    return math.ceil(demand * headroom / capacity_per_replica - 1e-9)
