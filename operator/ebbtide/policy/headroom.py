"""How close to its limit each replica may run: a margin sized from how well the load is foreseen.

    observe_rate(variability, now, tokens_per_second, horizon) -> Variability
    throughput_share(targets, variability, tokens_per_second) -> Share

A replica added now serves only one startup time later, so the fleet sized now must carry the
demand of then. A fixed share of the limit (scaling.targets.throughput, 0.8 by default) prices
every tick as if a ramp were coming, and sized on each minute's noisy rate, the scale-down
window's highest recommendation then holds the noise's peaks too; most of a week is flat or
falling, and there that margin is GPU-hours for nothing.

Here the demand is forecast one horizon (startup time + one tick + half the rate's window)
ahead, and the margin is what the forecasts have missed by:
- the level is the token rate smoothed over LEVEL_SECONDS (minute-to-minute noise is not a
  trend: a replica started for a one-minute spike arrives after it);
- the forecast is the level, raised by the rise over the last horizon of the rate smoothed
  over TREND_SECONDS, if it rose (a ramp under way keeps rising; a fall is left to the
  scale-down window);
- every tick the rate read now is compared with the forecast made one horizon ago; the
  shortfalls (forecasts below what came) feed a slowly forgotten mean of their squares;
- each replica is sized for forecast x (1 + RISE_DEVIATIONS x their root-mean-square), which
  as a share of the level is kept between scaling.targets.throughput (the most cautious) and
  scaling.targets.throughputMax (the most packed).
Until half an hour of forecasts has been checked, the share is the cautious one on the rate as
read (the fixed-share behaviour).

Pure; the state is a few numbers and the readings of one horizon, kept in Memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from ebbtide.api.spec import ScalingTargets

# How many root-mean-square forecast shortfalls the margin covers. Tuned on the training traces
# only (code-week fluid, code-1h x 12 request by request; bench/notes.md).
RISE_DEVIATIONS = 2.0
# The level's smoothing time (on top of the rate's own metrics window).
LEVEL_SECONDS = 60.0
# The trend is read on a slower level: over one horizon a minute's noise is as large as a ramp's
# rise (conv-week: +-10 % minute to minute), and read on the fast level it doubled the margin.
TREND_SECONDS = 300.0
# How fast old shortfalls are forgotten: the evening's calm must not inherit the morning's ramp
# in full, and an hour still holds 240 checks at the default 15 s tick.
HALF_LIFE_SECONDS = 3600.0
# The margin is trusted once this little weight is left unseen: half an hour of checks.
UNSEEN_WHEN_TRUSTED = 0.5 ** (1800.0 / HALF_LIFE_SECONDS)


@dataclass(frozen=True, slots=True)
class Variability:
    """What the forecast and its margin are measured from."""

    # (time, forecast made then) over the last horizon, oldest first: the checks to come.
    forecasts: tuple[tuple[float, float], ...] = ()
    level: float | None = None  # the smoothed rate, tokens/s
    slow: float | None = None  # the rate smoothed over TREND_SECONDS, for the rise
    slows: tuple[tuple[float, float], ...] = ()  # (time, slow) over the last horizon
    shortfall_square: float = 0.0  # weighted mean of max(0, rate / forecast - 1)^2
    unseen: float = 1.0  # weight not yet given to any check (1: none yet; falls toward 0)
    forecast: float | None = None  # tokens/s expected one horizon after the last reading
    updated_at: float | None = None

    def carried(self) -> Variability:
        """What stays true on another clock (a restart whose history is lost, a service started
        knowing an earlier run): how far forecasts fell short, not when."""
        return Variability(shortfall_square=self.shortfall_square, unseen=self.unseen)

    def to_json(self) -> dict:
        return {"forecasts": [list(r) for r in self.forecasts], "level": self.level,
                "slow": self.slow, "slows": [list(r) for r in self.slows], "shortfallSquare": self.shortfall_square,
                "unseen": self.unseen, "forecast": self.forecast, "updatedAt": self.updated_at}

    @classmethod
    def from_json(cls, data: object) -> Variability:
        """The inverse of to_json; anything unreadable is no history (the cautious share)."""
        if not isinstance(data, dict):
            return cls()
        try:
            forecasts = _pairs(data.get("forecasts", []))
            slows = _pairs(data.get("slows", []))
            square, unseen = float(data.get("shortfallSquare", 0.0)), float(data.get("unseen", 1.0))
            level, slow, forecast, updated_at = (_optional(data.get(k)) for k in (
                "level", "slow", "forecast", "updatedAt"))
        except (TypeError, ValueError):
            return cls()
        if not (math.isfinite(square) and square >= 0 and 0.0 <= unseen <= 1.0):
            return cls()
        return cls(forecasts, level, slow, slows, square, unseen, forecast, updated_at)


def _pairs(raw: list) -> tuple[tuple[float, float], ...]:
    pairs = tuple((float(t), float(x)) for t, x in raw)
    if not all(math.isfinite(t) and math.isfinite(x) for t, x in pairs):
        raise ValueError("not finite")
    return pairs


def _optional(x: object) -> float | None:
    if x is None:
        return None
    value = float(x)  # type: ignore[arg-type]
    if not math.isfinite(value):
        raise ValueError("not finite")
    return value


class Share(NamedTuple):
    share: float  # of the learned limit, each replica's target
    margin: float | None  # the measured margin over the level (None: not trusted yet, or a fixed share)
    adaptive: bool  # the spec leaves room between throughput and throughputMax
    demand: float | None  # tokens/s to size for at that share: the level once trusted, else the rate read

    def why(self) -> str:
        """Where the share came from, when it was measured (nothing to say for a fixed one)."""
        if self.margin is None:
            return ""
        return f" (smoothed; the share leaves {self.margin:.0%} for what forecasts one startup time ahead missed by)"


def horizon_seconds(lead_seconds: float, interval_seconds: float, window_seconds: float) -> float:
    """How far ahead a size decided now must hold: until a replica started now serves (one tick
    to decide, the startup time), measured from the middle of the rate's window (its lag)."""
    return lead_seconds + interval_seconds + window_seconds / 2.0


def observe_rate(v: Variability, now: float, tokens: float | None, horizon: float) -> Variability:
    """`v` with this tick's token rate. A missing, non-finite or negative rate is no reading;
    zero is one (the level falls toward it: a service whose traffic stopped must shrink)."""
    if tokens is None or not 0.0 <= tokens < math.inf or (v.updated_at is not None and now <= v.updated_at):
        return v
    dt = now - v.updated_at if v.updated_at is not None else 0.0
    level = _smoothed(v.level, tokens, dt, LEVEL_SECONDS)
    slow = _smoothed(v.slow, tokens, dt, TREND_SECONDS)
    # Check the forecast made one horizon ago (the newest at least that old) against now.
    forecasts, due = _due(v.forecasts, now - horizon)
    square, unseen = v.shortfall_square, v.unseen
    if due is not None and due > 0:
        keep = 0.5 ** (dt / HALF_LIFE_SECONDS)
        short = max(tokens / due - 1.0, 0.0)
        # A weighted mean over the checks so far: the weight not yet seen does not dilute it.
        before, after = 1.0 - unseen, 1.0 - unseen * keep
        square = (square * before * keep + short * short * (after - before * keep)) / after
        unseen *= keep
    slows, base = _due(v.slows, now - horizon)
    rise = slow / base - 1.0 if base else 0.0
    forecast = level * (1.0 + max(rise, 0.0))
    return Variability(forecasts + ((now, forecast),), level, slow, slows + ((now, slow),), square, unseen, forecast,
                       now)


def _smoothed(previous: float | None, value: float, dt: float, seconds: float) -> float:
    return value if previous is None else previous + (value - previous) * (1.0 - math.exp(-dt / seconds))


def _due(entries: tuple[tuple[float, float], ...], horizon: float) -> tuple[tuple[tuple[float, float], ...], float | None]:
    """(the entries from the newest one at or before `horizon` on, that one's value or None)."""
    index = -1
    for i, (t, _) in enumerate(entries):
        if t > horizon:
            break
        index = i
    if index < 0:
        return entries, None
    return entries[index:], entries[index][1]


def throughput_share(targets: ScalingTargets, v: Variability, tokens: float | None,
                     unmeasured: float | None = None) -> Share:
    """The demand to size for and each replica's share of its limit: the rate as read at the
    cautious share (or `unmeasured`, if higher: off-peak) until the forecasts are checked, then
    the level at level / (forecast x (1 + RISE_DEVIATIONS x RMS shortfall)), within
    [throughput, throughputMax]."""
    lo = targets.throughput
    hi = max(lo, targets.throughput_max)
    if hi <= lo:
        return Share(lo, None, False, tokens)
    cautious = max(lo, min(hi, unmeasured)) if unmeasured is not None else lo
    # No rate this tick: nothing to size on (the level would be a stale one).
    if tokens is None or not 0.0 <= tokens < math.inf or v.unseen > UNSEEN_WHEN_TRUSTED:
        return Share(cautious, None, True, tokens)
    if v.level is None or v.forecast is None or not v.level > 0:
        return Share(cautious, None, True, tokens)
    margin = v.forecast / v.level * (1.0 + RISE_DEVIATIONS * math.sqrt(v.shortfall_square)) - 1.0
    return Share(min(hi, max(lo, 1.0 / (1.0 + margin))), margin, True, v.level)
