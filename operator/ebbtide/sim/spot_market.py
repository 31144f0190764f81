"""The spot market a replay meets: reclaim events, outages, and what they did."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

from ebbtide.policy.capacity_types import SPOT
from ebbtide.sim.replicas import Fleet, Replica


@dataclass(frozen=True)
class SpotMarket:
    """How spot capacity behaves during a replay (sim/inputs.py sets the CLI's defaults).

    Reclaim events arrive as a Poisson process, `preemptions_per_hour` of them per hour
    whatever the fleet holds (a provider reclaims capacity pools, not one customer's pods);
    each takes 1 + Poisson(burst - 1) of the spot replicas that have a node (at least one, the
    mean is `burst`), chosen at random. A reclaimed replica keeps serving for `notice_s` (the
    provider's warning; the operator sees the reclaim taint at once), then it is gone and its
    requests in flight are retried on other replicas. During an outage (start, end) in trace
    seconds, new spot replicas find no capacity: they stay Pending, not ready and not charged,
    until it ends. `reclaims` adds reclaim events at given times, (trace seconds, replicas
    taken), to set up a scenario. Everything is seeded by SimSettings.seed.
    """

    preemptions_per_hour: float = 0.0
    burst: float = 1.0
    notice_s: float = 0.0
    outages: tuple[tuple[float, float], ...] = ()
    reclaims: tuple[tuple[float, int], ...] = ()


@dataclass(frozen=True)
class SpotStats:
    """What spot capacity did during a run."""

    reclaim_events: int = 0  # events that took at least one of this fleet's replicas
    replicas_reclaimed: int = 0
    requests_retried: float = 0.0  # in flight on a reclaimed replica (fluid: a fractional count)


_ALL = 1 << 30  # a reclaim event that takes every spot replica


class SpotClock:
    """The spot market's events over one replay: reclaim notices, the reclaims that follow
    them, and outage boundaries. The reclaim times and burst sizes depend only on the seed and
    the market, so every policy of a run faces the same market."""

    def __init__(self, market: SpotMarket, end: float, seed: int):
        self.market = market
        rng = np.random.default_rng([seed, 0x5B07])
        times: list[float] = []
        if market.preemptions_per_hour > 0:
            mean_gap = 3600.0 / market.preemptions_per_hour
            t = float(rng.exponential(mean_gap))
            while t < end:
                times.append(t)
                t += float(rng.exponential(mean_gap))
        sizes = 1 + rng.poisson(max(0.0, market.burst - 1.0), len(times))
        self.outages = sorted((float(a), float(b)) for a, b in market.outages if b > a)
        # An outage is a pool out of capacity: the provider takes back every spot replica it
        # runs (with the usual notice), and new ones stay Pending until it ends.
        everything = [(a, _ALL) for a, _ in self.outages]
        # Pending events (time, replicas to take), in time order.
        self.notices = sorted([*zip(times, sizes.tolist(), strict=True), *market.reclaims, *everything])
        self.reclaims: list[tuple[float, Replica]] = []  # (when, replica), noticed, in time order
        self._victims = random.Random(seed * 7919 + 0x5B07)
        self.stats = SpotStats()

    def obtainable(self, t: float) -> bool:
        return not any(a <= t < b for a, b in self.outages)

    def next_at(self, t: float) -> float:
        """The next time something changes, after `t`."""
        upcoming = [self.notices[0][0] if self.notices else math.inf,
                    self.reclaims[0][0] if self.reclaims else math.inf]
        upcoming += [b for a, b in self.outages if b > t] + [a for a, b in self.outages if a > t]
        return min(upcoming)

    def notice(self, t: float, fleet: Fleet, spot_kinds: frozenset[str] = frozenset({SPOT})) -> None:
        """Reclaim events due by `t` mark their victims: spot replicas with a node (of the
        Deployments in `spot_kinds`: with variants, each spot variant's)."""
        while self.notices and self.notices[0][0] <= t:
            _, size = self.notices.pop(0)
            held = [r for r in fleet.replicas
                    if r.capacity_type in spot_kinds and r.scheduled_at is not None and r.reclaimed_at is None]
            if not held:
                continue
            taken = self._victims.sample(held, min(size, len(held)))
            for r in taken:
                r.reclaimed_at = t
                self.reclaims.append((t + self.market.notice_s, r))
            self.reclaims.sort(key=lambda e: (e[0], e[1].rid))
            self.stats = SpotStats(self.stats.reclaim_events + 1, self.stats.replicas_reclaimed + len(taken),
                                   self.stats.requests_retried)

    def due(self, t: float) -> list[Replica]:
        """The reclaimed replicas whose notice is over by `t`."""
        out = []
        while self.reclaims and self.reclaims[0][0] <= t:
            out.append(self.reclaims.pop(0)[1])
        return out

    def retried(self, requests: float) -> None:
        self.stats = SpotStats(self.stats.reclaim_events, self.stats.replicas_reclaimed,
                               self.stats.requests_retried + requests)
