"""AIBrix's PodAutoscaler, APA strategy (vllm-project/aibrix; facts in
../shared/reference/anchors.md), on the KV-cache usage of its published sample (0.5)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ebbtide.policy.observation import FleetState, Signals
from ebbtide.sim.peers.base import Peer
from ebbtide.sim.peers.hpa import KV_TARGET


@dataclass
class AibrixApa(Peer):
    """APA: KV-cache target, tolerance 0.1, x2 / ÷2 per step, reconcile every 10 s, scale-down
    cooldown 300 s, scale-up cooldown 0."""

    target: float = KV_TARGET
    name: str = "aibrix-apa"
    interval_s: float = 10.0
    observes: frozenset[str] = frozenset({"pods"})
    tolerance: float = 0.1
    up_rate: float = 2.0
    down_rate: float = 2.0
    down_cooldown_s: float = 300.0
    _last_scale: float = field(default=-math.inf, init=False)

    def size(self, signals: Signals, fleet: FleetState, now: float) -> int:
        usage = signals.kv_cache_usage
        if usage is None or signals.error:
            return fleet.current
        ratio = usage / self.target
        current = fleet.current
        if 1 - self.tolerance <= ratio <= 1 + self.tolerance:
            return current
        desired = math.ceil(current * ratio)
        if desired > current:
            desired = min(desired, math.ceil(current * self.up_rate) if current else 1)
        elif desired < current:
            if now - self._last_scale < self.down_cooldown_s:
                return current
            desired = max(desired, math.floor(current / self.down_rate))
        desired = max(self.floor(now), min(self.max_replicas, desired))
        if desired != current:
            self._last_scale = now
        return desired
