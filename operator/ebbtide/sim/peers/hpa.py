"""The Kubernetes HPA (autoscaling/v2) on per-pod vLLM metrics, and KEDA on a summed one.

One rule (HpaRule: the replica calculator, stabilization and rate limits) under four metrics:
KV-cache usage (hpa-kv), token throughput (hpa-tokens), running + waiting requests
(hpa-inflight), each a Pods metric averaged over the pods reporting it; and KEDA's Prometheus
scaler on waiting requests summed over the service (keda-queue), an External AverageValue
metric. Facts: ../shared/reference/anchors.md.

The KV-usage target of hpa-kv is AIBrix's published sample (`gpu_cache_usage_perc` 0.5): a
user setting, not a default, and the one a user copying the docs would start from. No project
publishes a target for token throughput or in-flight requests; their defaults are what the EKS
guide's procedure ("Identify scaling metric thresholds for AI inference": load-test one replica,
read the metric where it saturates) gives on the capacity model: the highest rate one replica
serves within the ITL target (sim/catalog.py computes it).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from ebbtide.policy.observation import FleetState, Signals
from ebbtide.sim.peers.base import Peer


@dataclass
class HpaRule:
    """HPA semantics over one metric.

    Scale-up: no stabilization, at most max(4 pods, 100 %) per 15 s period; scale-down: the
    highest recommendation of the last 300 s wins, at most 100 % per period; within a tolerance
    of 0.1 of the target nothing moves.
    """

    target: float
    tolerance: float = 0.1
    down_window_s: float = 300.0
    _history: deque = field(default_factory=deque)
    _started: bool = False

    def pods_metric(self, average: float, ready: int, missing: int, current: int) -> int:
        """A Pods metric, as replica_calculator.go computes it: desired = ceil(ready x
        average / target). Pods without a metric yet (starting) count at the target when the
        fleet would shrink and at zero when it would grow; if that reverses the direction or
        lands within the tolerance, the fleet holds."""
        ratio = average / self.target
        if missing <= 0:
            return current if abs(ratio - 1.0) <= self.tolerance else math.ceil(ratio * ready)
        assumed = self.target if ratio < 1.0 else 0.0
        pods = ready + missing
        adjusted = (average * ready + assumed * missing) / (self.target * pods)
        if abs(adjusted - 1.0) <= self.tolerance or (ratio < 1.0) != (adjusted < 1.0):
            return current
        desired = math.ceil(adjusted * pods)
        if (adjusted < 1.0 and desired > current) or (adjusted > 1.0 and desired < current):
            return current
        return desired

    def external_average(self, total: float, current: int) -> int:
        """An External metric with an AverageValue target (KEDA): desired = ceil(total / target),
        the tolerance read against total / (target x current)."""
        if abs(total / (self.target * max(current, 1)) - 1.0) <= self.tolerance:
            return current
        return math.ceil(total / self.target)

    def stabilize(self, recommendation: int, current: int, now: float) -> int:
        if not self._started:  # the controller's first sight of the target counts its size as a recommendation
            self._started = True
            self._history.append((now, current))
        self._history.append((now, recommendation))
        while self._history and self._history[0][0] <= now - self.down_window_s:  # kept: strictly within
            self._history.popleft()
        if recommendation < current:
            recommendation = min(current, max(r for _, r in self._history))
        up_limit = max(current + 4, current * 2)
        return max(0, min(up_limit, recommendation))  # down: 100 % per period


@dataclass
class HpaPods(Peer):
    """An HPA on a per-pod average (sync period 15 s); subclasses say which metric."""

    target: float = 1.0
    name: str = "hpa"
    interval_s: float = 15.0
    observes: frozenset[str] = frozenset({"pods"})
    rule: HpaRule = field(init=False)

    def __post_init__(self) -> None:
        self.rule = HpaRule(target=self.target)

    def per_pod(self, signals: Signals) -> float | None:
        raise NotImplementedError

    def size(self, signals: Signals, fleet: FleetState, now: float) -> int:
        average = None if signals.error or not signals.pods else self.per_pod(signals)
        if average is None:
            return fleet.current  # missing metrics never cause a change
        reporting = len(signals.pods)
        recommendation = self.rule.pods_metric(average, reporting, fleet.starting, fleet.current)
        return self.rule.stabilize(recommendation, fleet.current, now)


KV_TARGET = 0.5


@dataclass
class Hpa(HpaPods):
    """HPA on mean KV-cache utilization over the pods reporting it."""

    target: float = KV_TARGET
    name: str = "hpa-kv"

    def per_pod(self, signals: Signals) -> float | None:
        return signals.kv_cache_usage


@dataclass
class HpaTokens(HpaPods):
    """HPA on each pod's token throughput, rate(prompt + generation tokens) over the metrics
    window (the signal Ebbtide reads), averaged over the pods reporting."""

    name: str = "hpa-tokens"
    observes: frozenset[str] = frozenset({"pods", "tokens"})

    def per_pod(self, signals: Signals) -> float | None:
        if signals.tokens_per_second is None:
            return None
        return signals.tokens_per_second / len(signals.pods)


@dataclass
class HpaInflight(HpaPods):
    """HPA on each pod's running + waiting requests, averaged over the pods reporting."""

    name: str = "hpa-inflight"

    def per_pod(self, signals: Signals) -> float | None:
        return (signals.running + signals.waiting) / len(signals.pods)


@dataclass
class Keda(Peer):
    """KEDA's Prometheus scaler as vLLM production-stack configures it.

    Trigger `vllm:num_requests_waiting` (summed), threshold 5 per replica, polling 15 s,
    HPA underneath (AverageValue target = threshold, 300 s scale-down stabilization);
    cooldownPeriod 360 s only applies to going to zero.
    """

    threshold: float = 5.0
    name: str = "keda-queue"
    interval_s: float = 15.0
    observes: frozenset[str] = frozenset({"pods"})
    cooldown_s: float = 360.0
    rule: HpaRule = field(init=False)
    _last_active: float = field(default=-math.inf, init=False)

    knob = "threshold"

    def __post_init__(self) -> None:
        self.rule = HpaRule(target=self.threshold)

    def size(self, signals: Signals, fleet: FleetState, now: float) -> int:
        waiting = signals.waiting
        if waiting is None or signals.error:
            return fleet.current
        if waiting > 0:
            self._last_active = now
        desired = self.rule.stabilize(self.rule.external_average(waiting, fleet.current), fleet.current, now)
        if self.min_replicas == 0 and now - self._last_active < self.cooldown_s:
            desired = max(desired, 1)
        return desired
