"""NVIDIA Dynamo's planner, throughput mode, for an aggregated (prefill and decode on one
engine) deployment. From its documentation (facts in ../shared/reference/anchors.md):

- every adjustment interval (180 s) it reads from the frontend the requests of the interval
  and their mean input and output lengths (ISL, OSL);
- a load predictor forecasts the next interval's request count, ISL and OSL; the documented
  default is ARIMA (`load_predictor = "arima"`, window of 50 samples), which falls back to the
  constant predictor (next = current) while it has too few samples;
- the replicas are the predicted request rate over what one engine serves within the ITL
  target (default 50 ms), read from a pre-deployment profile: here the simulator's capacity
  model, exact for the simulated engine (the most favourable profile there is);
- a decision is not acted on while an earlier one is still starting (it observes the
  transition and holds).

The ARIMA here is ARIMA(1,1,0) fitted by least squares over the window (an AR(1) on the
interval-to-interval changes), not an order search: on a smooth daily load that is the model an
order search lands near, and it costs microseconds. The frontend's request counter is the
trace's arrivals up to now (the planner never reads ahead). The TTFT target does not bind for
these mixes (a 1k-token prompt prefills in milliseconds), so the ITL target sizes the fleet.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ebbtide.policy.observation import FleetState, Signals
from ebbtide.sim.capacity import CapacityModel
from ebbtide.sim.peers.base import Peer

WINDOW = 50  # load_prediction_window_size
MIN_POINTS = 5  # fewer samples: the constant predictor


def arima_110(history: list[float] | deque) -> float:
    """The next value of a series: ARIMA(1,1,0) by least squares, constant with few points."""
    if len(history) < MIN_POINTS:
        return float(history[-1])
    diffs = np.diff(np.asarray(history, dtype=float))
    x, y = diffs[:-1], diffs[1:]
    denominator = float(x @ x)
    phi = 0.0 if denominator == 0 else max(-0.99, min(0.99, float(x @ y) / denominator))
    return max(0.0, float(history[-1]) + phi * float(diffs[-1]))


@dataclass
class DynamoPlanner(Peer):
    capacity: CapacityModel | None = None  # the profile
    counts: np.ndarray | None = None  # the frontend's view: requests arriving each second
    prompt_sum: np.ndarray | None = None  # and their input / output tokens
    output_sum: np.ndarray | None = None
    epoch: float = 0.0  # unix seconds of the trace's first second
    itl_slo_s: float = 0.05
    adjustment_interval_s: float = 180.0
    name: str = "dynamo-planner"
    interval_s: float = 15.0  # checks every scrape whether an adjustment is due
    observes: frozenset[str] = frozenset()
    _next: float | None = field(default=None, init=False)
    _history: dict = field(default_factory=lambda: {k: deque(maxlen=WINDOW) for k in ("req", "isl", "osl")},
                           init=False)
    _desired: int | None = field(default=None, init=False)

    knob = "itl_slo_s"

    def size(self, signals: Signals, fleet: FleetState, now: float) -> int:
        if self._next is None:
            self._next = now + self.adjustment_interval_s  # the first interval is observed first
        if now >= self._next:
            self._next += self.adjustment_interval_s
            self._observe(now)
            if fleet.starting == 0:
                self._desired = self.plan()
        return fleet.current if self._desired is None else self._desired

    def _observe(self, now: float) -> None:
        end = int(now - self.epoch)
        start = max(0, end - int(self.adjustment_interval_s))
        requests = float(self.counts[start:end].sum())
        self._history["req"].append(requests)
        if requests > 0:  # an empty interval has no mean length: the last one stands
            self._history["isl"].append(float(self.prompt_sum[start:end].sum()) / requests)
            self._history["osl"].append(max(1.0, float(self.output_sum[start:end].sum()) / requests))

    def plan(self) -> int | None:
        if not self._history["isl"]:
            return None
        requests, isl, osl = (arima_110(self._history[k]) for k in ("req", "isl", "osl"))
        per_replica = self.capacity.max_request_rate(max(isl, 1.0), max(osl, 1.0), self.itl_slo_s)
        if per_replica <= 0:
            return self.max_replicas
        return math.ceil(requests / self.adjustment_interval_s / per_replica - 1e-9)
