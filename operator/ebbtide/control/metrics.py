"""The operator's own Prometheus metrics: what it decided, on which signals, at what cost.

Each operator instance has its own registry, so several can run in one process (tests).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ebbtide.policy.capacity_types import CAPACITY_TYPES

SERVICE = ("namespace", "service")
TIERS = (*CAPACITY_TYPES, "starting", "draining", "asleep")  # ebbtide_replicas{tier}


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.desired = Gauge("ebbtide_desired_replicas", "Replicas the autoscaler wants", SERVICE, registry=r)
        self.ready = Gauge("ebbtide_ready_replicas", "Replicas ready to serve", SERVICE, registry=r)
        self.asleep = Gauge("ebbtide_asleep_replicas", "Replicas in vLLM sleep", SERVICE, registry=r)
        self.replicas = Gauge("ebbtide_replicas", "Pods by tier: serving on-demand or spot, starting, draining, asleep",
                              (*SERVICE, "tier"), registry=r)
        self.signal = Gauge("ebbtide_signal_value", "Signal values the last decision used",
                            (*SERVICE, "signal"), registry=r)
        self.decisions = Counter("ebbtide_scaling_decisions_total", "Decisions that changed the size, by reason",
                                 (*SERVICE, "reason", "applied"), registry=r)
        self.metrics_unavailable = Gauge("ebbtide_metrics_unavailable", "1 while a service's signals are missing",
                                         SERVICE, registry=r)
        self.usd_per_hour = Gauge("ebbtide_cost_usd_per_hour", "Dollars per hour at the current fleet",
                                  SERVICE, registry=r)
        self.usd_per_million_tokens = Gauge("ebbtide_cost_usd_per_million_tokens",
                                            "Dollars per million tokens, recent window", SERVICE, registry=r)
        self.gpu_hours = Gauge("ebbtide_gpu_hours", "GPU-hours since accounting began, by capacity type",
                               (*SERVICE, "capacity_type"), registry=r)
        self.ticks = Counter("ebbtide_ticks_total", "Scaling loop iterations", registry=r)
        self.tick_seconds = Histogram("ebbtide_tick_duration_seconds", "Time one tick takes for the whole fleet",
                                      registry=r, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.observe_errors = Counter("ebbtide_observe_errors_total", "Ticks whose observation failed", registry=r)

    def serve(self, port: int) -> None:
        if port:
            start_http_server(port, registry=self.registry)

    def forget(self, namespace: str, service: str) -> None:
        """Drop a deleted service's series so dashboards do not show ghosts."""
        for metric in (self.desired, self.ready, self.asleep, self.metrics_unavailable, self.usd_per_hour,
                       self.usd_per_million_tokens):
            try:
                metric.remove(namespace, service)
            except KeyError:
                pass
        for tier in TIERS:
            try:
                self.replicas.remove(namespace, service, tier)
            except KeyError:
                pass
