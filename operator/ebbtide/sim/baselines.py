"""The fixed fleets and the lower bound, and (re-exported) the autoscalers users would otherwise
pick, which live in sim/peers/ (one module per project, written from its documentation).

Static and Oracle know their own sizes; they see no signals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ebbtide.policy.observation import FleetState, Signals
from ebbtide.sim.peers.aibrix import AibrixApa
from ebbtide.sim.peers.dynamo import DynamoPlanner
from ebbtide.sim.peers.hpa import KV_TARGET, Hpa, HpaInflight, HpaRule, HpaTokens, Keda
from ebbtide.sim.peers.wva import Wva
from ebbtide.sim.policy import SizingPolicy

__all__ = ["KV_TARGET", "AibrixApa", "DynamoPlanner", "Hpa", "HpaInflight", "HpaRule", "HpaTokens", "Keda", "Oracle",
           "Static", "Wva"]


@dataclass
class Static(SizingPolicy):
    """Provisioned for the peak, all the time: what many teams run."""

    replicas: int
    name: str = "static-peak"
    interval_s: float = 60.0
    observes: frozenset[str] = frozenset()

    def initial(self, guess: int) -> int:
        return self.replicas

    def decide(self, signals: Signals, fleet: FleetState, now: float) -> int:
        return self.replicas


@dataclass
class Oracle(SizingPolicy):
    """The lower bound: perfect foresight and instant start.

    Each interval it runs exactly the replicas the coming interval's arrivals need at a fixed
    request rate per replica: at most the highest rate that still meets the ITL target with no
    queue (the capacity model's `max_request_rate`), lower where that misses the SLO (see
    simulate.calibrate_oracle). It is simulated like every other policy, so its own SLO
    attainment is measured, not assumed.
    """

    needed: list[int]  # replicas per interval, precomputed from the trace
    epoch: float
    name: str = "oracle"
    interval_s: float = 15.0
    instant_start: bool = True
    observes: frozenset[str] = frozenset()

    @classmethod
    def for_trace(cls, counts, rate_per_replica: float, epoch: float, interval_s: float = 15.0,
                  min_replicas: int = 1, max_replicas: int | None = None) -> Oracle:
        """Bounded by the spec's replicas like every other policy: a bound that needs more GPUs
        than the service may have is no bound for the policies that may not."""
        width = int(interval_s)
        padded = len(counts) + (-len(counts)) % width
        per_interval = np.pad(np.asarray(counts, dtype=float), (0, padded - len(counts))).reshape(-1, width)
        rates = per_interval.mean(axis=1)
        needed = np.maximum(min_replicas, np.ceil(rates / rate_per_replica - 1e-9))
        if max_replicas is not None:
            needed = np.minimum(needed, max(max_replicas, min_replicas))
        return cls(needed=needed.astype(int).tolist(), epoch=epoch, interval_s=interval_s)

    @property
    def peak(self) -> int:
        return max(self.needed)

    def initial(self, guess: int) -> int:
        return self.needed[0]

    def decide(self, signals: Signals, fleet: FleetState, now: float) -> int:
        index = int(round((now - self.epoch) / self.interval_s))
        return self.needed[min(index, len(self.needed) - 1)]
