"""What a service's GPUs cost: GPU-hours by capacity type, dollars per hour, dollars per token.

    accrue(ledger, now, held, gpus_per_replica) -> Ledger
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

import math
from dataclasses import dataclass

from ebbtide.api.spec import Pricing, SleepPolicy

LEDGER_VERSION = 1
# The operator may be down for a while (upgrade, crash loop): the replicas it counted last kept
# running, and are charged for the gap, but not beyond an hour: after that, what ran is unknown
# and a guess would be worse than a gap in the record.
MAX_GAP_SECONDS = 3600.0


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
class Ledger:
    """GPU-hours and dollars since `since`; `held` is what the last tick counted."""

    since: float
    last_at: float
    held: Held = Held()
    gpu_hours_on_demand: float = 0.0
    gpu_hours_spot: float = 0.0
    gpu_hours_asleep: float = 0.0  # the charged share only
    usd: float = 0.0

    @classmethod
    def start(cls, now: float) -> Ledger:
        return cls(since=now, last_at=now)

    def to_json(self) -> dict:
        h = self.held
        return {"version": LEDGER_VERSION, "since": self.since, "lastAt": self.last_at,
                "held": [h.on_demand, h.spot, h.asleep_on_demand, h.asleep_spot],
                "gpuHours": [self.gpu_hours_on_demand, self.gpu_hours_spot, self.gpu_hours_asleep],
                "usd": self.usd}

    @classmethod
    def load(cls, data: object, now: float) -> Ledger:
        """The stored ledger, or a new one starting now when there is none or it is unreadable."""
        try:
            if not isinstance(data, dict) or data.get("version") != LEDGER_VERSION:
                raise ValueError("not a cost ledger of this version")
            on_demand, spot, asleep = (_finite(x) for x in data["gpuHours"])
            return cls(since=_finite(data["since"]), last_at=_finite(data["lastAt"]),
                       held=Held(*(int(x) for x in data["held"])), gpu_hours_on_demand=on_demand,
                       gpu_hours_spot=spot, gpu_hours_asleep=asleep, usd=_finite(data["usd"]))
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


def accrue(ledger: Ledger, now: float, held: Held, gpus_per_replica: int, pricing: Pricing,
           sleep: SleepPolicy) -> Ledger:
    """Charge the time since the last tick at what that tick counted, then remember `held`.

    The previous count is the one that held over the interval: a replica added this tick
    starts costing from now on, one removed this tick cost until now.
    """
    seconds = min(max(0.0, now - ledger.last_at), MAX_GAP_SECONDS)
    hours = seconds / 3600.0
    was = ledger.held
    charged_asleep = 1.0 - sleep.reclaimed_fraction
    return Ledger(  # built whole, not with replace(): the simulator charges 40 000 ticks a week
        since=ledger.since,
        last_at=max(now, ledger.last_at),
        held=held,
        gpu_hours_on_demand=ledger.gpu_hours_on_demand + hours * gpus_per_replica * was.on_demand,
        gpu_hours_spot=ledger.gpu_hours_spot + hours * gpus_per_replica * was.spot,
        gpu_hours_asleep=ledger.gpu_hours_asleep
        + hours * gpus_per_replica * (was.asleep_on_demand + was.asleep_spot) * charged_asleep,
        usd=ledger.usd + hours * usd_per_hour(was, gpus_per_replica, pricing, sleep),
    )


def usd_per_million_tokens(dollars_per_hour: float, tokens_per_second: float | None) -> float | None:
    """Dollars per million tokens (prompt + generated) at the current spend and token rate.

    None when nothing is served: an idle fleet's cost per token is not a number, and
    reporting it as infinite or zero would mislead a dashboard's average.
    """
    if tokens_per_second is None or not tokens_per_second > 0 or not math.isfinite(tokens_per_second):
        return None
    return dollars_per_hour / (tokens_per_second * 3600.0) * 1e6
