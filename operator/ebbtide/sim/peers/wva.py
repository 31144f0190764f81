"""llm-d's workload-variant-autoscaler (WVA), saturation mode (V1 analyzer), one variant.

From its documentation (facts in ../shared/reference/anchors.md): every 30 s it reads, per
replica, max_over_time(KV usage[1m]) and max_over_time(waiting requests[1m]). A replica is
saturated at KV >= kvCacheThreshold (0.80) or queue >= queueLengthThreshold (5). Over the
replicas that are not, it averages the spare capacity (threshold - value): below
kvSpareTrigger (0.10) or queueSpareTrigger (3), or with no unsaturated replica at all, it adds
one replica. Otherwise it removes one, but only if the load of the unsaturated replicas, spread
over one fewer, still leaves the spare capacity above both triggers (the absorb check). It
skips a variant with pending (starting) pods. It publishes the desired count and an HPA acts on
it, with the HPA's default behaviour (scale-down stabilization 300 s).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ebbtide.policy.observation import FleetState, Signals
from ebbtide.sim.peers.base import Peer
from ebbtide.sim.peers.hpa import HpaRule


@dataclass
class Wva(Peer):
    kv_threshold: float = 0.80
    queue_threshold: float = 5.0
    kv_spare_trigger: float = 0.10
    queue_spare_trigger: float = 3.0
    cycle_s: float = 30.0  # its engine loop
    window_s: float = 60.0  # max_over_time(...[1m])
    name: str = "wva"
    interval_s: float = 15.0  # it reads every scrape (the max over the window), decides every cycle
    observes: frozenset[str] = frozenset({"pods"})
    hpa: HpaRule = field(init=False)
    _samples: dict = field(default_factory=dict, init=False)  # pod -> deque of (t, kv, waiting)
    _next_cycle: float | None = field(default=None, init=False)
    _desired: int | None = field(default=None, init=False)

    knob = "kv_threshold"

    def __post_init__(self) -> None:
        self.hpa = HpaRule(target=1.0)  # only its stabilization and rate limits are used

    def size(self, signals: Signals, fleet: FleetState, now: float) -> int:
        if not signals.error:
            self._observe(signals, now)
        if self._next_cycle is None:
            self._next_cycle = now
        if now >= self._next_cycle:
            self._next_cycle += self.cycle_s
            self._desired = self.cycle(fleet)
        desired = fleet.current if self._desired is None else self._desired
        return self.hpa.stabilize(desired, fleet.current, now)

    def _observe(self, signals: Signals, now: float) -> None:
        live = {p.pod for p in signals.pods}
        for pod in list(self._samples):
            if pod not in live:
                del self._samples[pod]
        for p in signals.pods:
            samples = self._samples.setdefault(p.pod, deque())
            samples.append((now, p.kv_cache_usage, p.waiting))
            while samples[0][0] <= now - self.window_s:
                samples.popleft()

    def cycle(self, fleet: FleetState) -> int:
        """One engine loop: +1, -1, or hold."""
        if fleet.starting > 0 or not self._samples:
            return fleet.current  # pending pods: skip the variant
        peaks = [(max(s[1] for s in samples), max(s[2] for s in samples)) for samples in self._samples.values()]
        free = [(kv, q) for kv, q in peaks if kv < self.kv_threshold and q < self.queue_threshold]
        if not free:
            return fleet.current + 1
        if not self._spare(free, len(free)):
            return fleet.current + 1
        if len(free) >= 2 and self._spare(free, len(free) - 1):
            return fleet.current - 1
        return fleet.current

    def _spare(self, free: list[tuple[float, float]], replicas: int) -> bool:
        """Whether the unsaturated replicas' load, spread over `replicas`, leaves the average
        spare capacity at or above both triggers."""
        kv = sum(k for k, _ in free) / replicas
        queue = sum(q for _, q in free) / replicas
        return (self.kv_threshold - kv >= self.kv_spare_trigger
                and self.queue_threshold - queue >= self.queue_spare_trigger)
