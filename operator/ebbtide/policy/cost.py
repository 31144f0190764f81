"""What a service's GPUs cost: GPU-hours by capacity type, dollars per hour, dollars per token.

    accrue(ledger, now, held, gpus_per_replica, pricing, sleep) -> Ledger   (a single fleet)
    accrue_rate(ledger, now, rate) -> Ledger                               (accelerator variants)
    usd_per_hour(held, gpus_per_replica, pricing, sleep) -> float
    usd_per_million_tokens(usd_per_hour, tokens_per_second) -> float | None

Pure, like the rest of policy/: the shell counts the replicas that hold a GPU and passes the
time in. The ledger is kept in the InferenceService's status, so totals survive a restart.

A replica is charged from the moment it holds a GPU (scheduled on a node: a Pending pod on no
node costs nothing) until it is gone, whether it serves, starts, or sleeps: a cloud bills the
node, not the tokens. A sleeping replica still holds its GPU; `sleep.reclaimedFraction` is the
share of that time other work uses (a cluster that packs batch jobs onto sleeping replicas'
GPUs), which is not charged to this service.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass

from ebbtide.api.spec import Pricing, SleepPolicy

LEDGER_VERSION = 1
# The operator may be down for a while (upgrade, crash loop): the replicas it counted last kept
# running, and are charged for the gap, but not beyond an hour: after that, what ran is unknown
# and a guess would be worse than a gap in the record.
MAX_GAP_SECONDS = 3600.0
SHORTEST_MONTH_SECONDS = 28 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class Held:
    """Replicas holding a GPU at one tick, by what they cost."""

    on_demand: int = 0
    spot: int = 0
    asleep_on_demand: int = 0
    asleep_spot: int = 0

    @property
    def total(self) -> int:
        return self.on_demand + self.spot + self.asleep_on_demand + self.asleep_spot


@dataclass(frozen=True, slots=True)
class Rate:
    """What the replicas held at one tick come to per hour: GPUs by how they are charged
    (asleep: the charged share) and dollars."""

    on_demand: float = 0.0
    spot: float = 0.0
    asleep: float = 0.0
    reserved: float = 0.0  # reserved variants: all their replicas, paid for whether they run or not
    usd: float = 0.0

    def to_json(self) -> list[float]:
        return [self.on_demand, self.spot, self.asleep, self.reserved, self.usd]


@dataclass(frozen=True, slots=True)
class Ledger:
    """GPU-hours and dollars since `since`; `held` (a single fleet) or `rate` (variants) is what
    the last tick counted, which the next one charges the time between them at."""

    since: float
    last_at: float
    held: Held = Held()
    gpu_hours_on_demand: float = 0.0
    gpu_hours_spot: float = 0.0
    gpu_hours_asleep: float = 0.0  # the charged share only
    usd: float = 0.0
    gpu_hours_reserved: float = 0.0
    month_start: float = 0.0  # the UTC calendar month `usd_month` counts (unix seconds of its first instant)
    usd_month: float = 0.0
    rate: Rate | None = None  # with variants: what the replicas held at the last tick cost per hour

    @classmethod
    def start(cls, now: float) -> Ledger:
        return cls(since=now, last_at=now, month_start=month_start(now))

    def to_json(self) -> dict:
        h = self.held
        # Fields added since version 1 have keys of their own, so an older operator still reads the rest.
        return {"version": LEDGER_VERSION, "since": self.since, "lastAt": self.last_at,
                "held": [h.on_demand, h.spot, h.asleep_on_demand, h.asleep_spot],
                "gpuHours": [self.gpu_hours_on_demand, self.gpu_hours_spot, self.gpu_hours_asleep],
                "usd": self.usd, "gpuHoursReserved": self.gpu_hours_reserved,
                "month": [self.month_start, self.usd_month],
                "rate": None if self.rate is None else self.rate.to_json()}

    @classmethod
    def load(cls, data: object, now: float) -> Ledger:
        """The stored ledger, or a new one starting now when there is none or it is unreadable."""
        try:
            if not isinstance(data, dict) or data.get("version") != LEDGER_VERSION:
                raise ValueError("not a cost ledger of this version")
            on_demand, spot, asleep = (_finite(x) for x in data["gpuHours"])
            since, usd = _finite(data["since"]), _finite(data["usd"])
            rate = data.get("rate")
            if "month" in data:
                started, usd_month = (_finite(x) for x in data["month"])
            else:  # written before the month was kept: all of it is this month's if it began in it, else unknown
                started = month_start(now)
                usd_month = usd if since >= started else 0.0
            return cls(since=since, last_at=_finite(data["lastAt"]),
                       held=Held(*(int(x) for x in data["held"])), gpu_hours_on_demand=on_demand,
                       gpu_hours_spot=spot, gpu_hours_asleep=asleep, usd=usd,
                       gpu_hours_reserved=_finite(data.get("gpuHoursReserved", 0.0)), month_start=started,
                       usd_month=usd_month, rate=None if rate is None else Rate(*(_finite(x) for x in rate)))
        except (KeyError, TypeError, ValueError):
            return cls.start(now)


def _finite(x: object) -> float:
    value = float(x)  # type: ignore[arg-type]
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{x!r} is not a finite non-negative number")
    return value


def usd_per_hour(held: Held, gpus_per_replica: int, pricing: Pricing, sleep: SleepPolicy) -> float:
    charged_asleep = 1.0 - sleep.reclaimed_fraction
    on_demand = held.on_demand + held.asleep_on_demand * charged_asleep
    spot = held.spot + held.asleep_spot * charged_asleep
    return gpus_per_replica * (on_demand * pricing.on_demand_per_gpu_hour + spot * pricing.spot_per_gpu_hour)


def held_rate(held: Held, gpus_per_replica: int, pricing: Pricing, sleep: SleepPolicy) -> Rate:
    charged_asleep = 1.0 - sleep.reclaimed_fraction
    return Rate(on_demand=gpus_per_replica * held.on_demand, spot=gpus_per_replica * held.spot,
                asleep=gpus_per_replica * (held.asleep_on_demand + held.asleep_spot) * charged_asleep,
                usd=usd_per_hour(held, gpus_per_replica, pricing, sleep))


def accrue(ledger: Ledger, now: float, held: Held, gpus_per_replica: int, pricing: Pricing,
           sleep: SleepPolicy) -> Ledger:
    """Charge the time since the last tick at what that tick counted, then remember `held`.

    The previous count is the one that held over the interval: a replica added this tick
    starts costing from now on, one removed this tick cost until now.
    """
    return _charge(ledger, now, held_rate(ledger.held, gpus_per_replica, pricing, sleep), held, None)


def accrue_rate(ledger: Ledger, now: float, rate: Rate) -> Ledger:
    """As accrue, for replicas whose prices differ (accelerator variants): the time since the
    last tick at the rate that tick handed in (none, after a single fleet's), then remember `rate`."""
    return _charge(ledger, now, ledger.rate or Rate(), Held(), rate)


def _charge(ledger: Ledger, now: float, was: Rate, held: Held, rate: Rate | None) -> Ledger:
    seconds = min(max(0.0, now - ledger.last_at), MAX_GAP_SECONDS)
    hours = seconds / 3600.0
    usd = hours * was.usd
    end = max(now, ledger.last_at)
    started, usd_month = ledger.month_start, ledger.usd_month + usd
    # Every month is at least 28 days long: inside that, the month cannot have changed.
    if not started <= end < started + SHORTEST_MONTH_SECONDS and month_start(end) != started:
        started = month_start(end)  # a new month: only the part of the interval inside it counts
        usd_month = was.usd * min(seconds, end - started) / 3600.0
    return Ledger(  # built whole, not with replace(): the simulator charges 40 000 ticks a week
        since=ledger.since,
        last_at=end,
        held=held,
        gpu_hours_on_demand=ledger.gpu_hours_on_demand + hours * was.on_demand,
        gpu_hours_spot=ledger.gpu_hours_spot + hours * was.spot,
        gpu_hours_asleep=ledger.gpu_hours_asleep + hours * was.asleep,
        usd=ledger.usd + usd,
        gpu_hours_reserved=ledger.gpu_hours_reserved + hours * was.reserved,
        month_start=started,
        usd_month=usd_month,
        rate=rate,
    )


def month_start(now: float) -> float:
    """Unix seconds of the first instant of `now`'s calendar month, UTC."""
    at = datetime.datetime.fromtimestamp(now, datetime.UTC)
    return datetime.datetime(at.year, at.month, 1, tzinfo=datetime.UTC).timestamp()


def hours_left_in_month(now: float) -> float:
    """Hours from `now` (unix seconds) to the start of the next calendar month, UTC."""
    at = datetime.datetime.fromtimestamp(now, datetime.UTC)
    following = datetime.datetime(at.year + (at.month == 12), at.month % 12 + 1, 1, tzinfo=datetime.UTC)
    return (following - at).total_seconds() / 3600.0


def usd_per_million_tokens(dollars_per_hour: float, tokens_per_second: float | None) -> float | None:
    """Dollars per million tokens (prompt + generated) at the current spend and token rate.

    None when nothing is served: an idle fleet's cost per token is not a number, and
    reporting it as infinite or zero would mislead a dashboard's average.
    """
    if tokens_per_second is None or not tokens_per_second > 0 or not math.isfinite(tokens_per_second):
        return None
    return dollars_per_hour / (tokens_per_second * 3600.0) * 1e6
