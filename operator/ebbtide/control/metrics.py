"""The operator's own Prometheus metrics: what it decided, on which signals, at what cost.

Prometheus conventions: base units in the name (seconds, dollars, ratio), totals as counters
ending in _total, one unit per metric. Each operator instance has its own registry, so several
can run in one process (tests).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics import MetricWrapperBase

from ebbtide.policy.capacity_types import CAPACITY_TYPES

SERVICE = ("namespace", "service")
TIERS = (*CAPACITY_TYPES, "starting", "draining", "asleep")  # ebbtide_replicas{tier}
# ebbtide_gpu_seconds_total{capacity_type}; asleep: the charged share; reserved: variants' reserved
# replicas, all of them (paid for whether they run or not)
GPU_TIME = (*CAPACITY_TYPES, "asleep", "reserved")

# A decision's signals (status.lastDecision.signals) -> (unit, the `signal` label). One gauge per
# unit, so that a panel never plots seconds against requests; a signal not listed is not exported.
SIGNALS = {
    "waiting": ("requests", "waiting"), "running": ("requests", "running"),
    "ready": ("replicas", "ready"), "starting": ("replicas", "starting"),
    "podsReporting": ("replicas", "reporting"), "recommended": ("replicas", "recommended"),
    "ttftSeconds": ("seconds", "ttft"), "tpotSeconds": ("seconds", "tpot"),
    "sampleAgeSeconds": ("seconds", "sample_age"),
    "kvCacheUsage": ("ratio", "kv_cache_usage"),
    "tokensPerSecond": ("tokens_per_second", "throughput"),
    "capacityTokensPerSecond": ("tokens_per_second", "capacity"),
    "activation": ("activation", "activation"),  # the user's activation query: its own unit
}
SIGNAL_HELP = {
    "requests": "Requests the last decision saw, per signal (waiting, running)",
    "replicas": "Replica counts the last decision used, per signal",
    "seconds": "Latencies and ages the last decision used, per signal (ttft, tpot quantiles; sample_age)",
    "ratio": "Ratios the last decision used (kv_cache_usage: mean over the reporting pods, 0 to 1)",
    "tokens_per_second": "Token throughput the last decision used (throughput now; capacity per replica)",
    "activation": "The value of spec.scaling.activation's query at the last decision",
}


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.desired = Gauge("ebbtide_desired_replicas", "Replicas the autoscaler wants", SERVICE, registry=r)
        self.ready = Gauge("ebbtide_ready_replicas", "Replicas ready to serve", SERVICE, registry=r)
        self.replicas = Gauge("ebbtide_replicas", "Pods by tier: serving on-demand or spot, starting, draining, asleep",
                              (*SERVICE, "tier"), registry=r)
        self.signals = {unit: Gauge(f"ebbtide_signal_{unit}", text, (*SERVICE, "signal"), registry=r)
                        for unit, text in SIGNAL_HELP.items()}
        self.decisions = Counter("ebbtide_scaling_decisions_total", "Decisions that changed the size, by reason",
                                 (*SERVICE, "reason", "applied"), registry=r)
        self.metrics_unavailable = Gauge("ebbtide_metrics_unavailable", "1 while a service's signals are missing",
                                         SERVICE, registry=r)
        self.usd_per_hour = Gauge("ebbtide_cost_usd_per_hour", "Dollars per hour at the current fleet",
                                  SERVICE, registry=r)
        self.usd_per_million_tokens = Gauge("ebbtide_cost_usd_per_million_tokens",
                                            "Dollars per million tokens, recent window", SERVICE, registry=r)
        self.usd = Counter("ebbtide_cost_usd", "Dollars spent on GPUs, as accounted by this operator process",
                           SERVICE, registry=r)
        self.gpu_seconds = Counter("ebbtide_gpu_seconds", "GPU time held, by capacity type (asleep: its charged "
                                   "share)", (*SERVICE, "capacity_type"), registry=r)
        self.leader = Gauge("ebbtide_leader", "1 in the operator process that runs (holds the Lease), 0 in a standby",
                            registry=r)
        self.ticks = Counter("ebbtide_ticks_total", "Scaling loop iterations", registry=r)
        self.tick_seconds = Histogram("ebbtide_tick_duration_seconds", "Time one tick takes for the whole fleet",
                                      registry=r, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.observe_errors = Counter("ebbtide_observe_errors_total", "Ticks whose observation failed", registry=r)
        self.per_service = [self.desired, self.ready, self.replicas, *self.signals.values(), self.decisions,
                            self.metrics_unavailable, self.usd_per_hour, self.usd_per_million_tokens, self.usd,
                            self.gpu_seconds]
        # The labels each metric has had, per service: what forget() removes.
        self._children: dict[tuple[str, str], set[tuple[MetricWrapperBase, tuple[str, ...]]]] = {}
        # The ledger's running totals at the last export: the counters grow by the difference.
        self._ledger: dict[tuple[str, str], tuple[float, ...]] = {}

    def serve(self, port: int) -> None:
        if port:
            start_http_server(port, registry=self.registry)

    def of(self, metric: MetricWrapperBase, namespace: str, service: str, *extra: str):
        """metric.labels(namespace, service, *extra), remembered for forget()."""
        self._children.setdefault((namespace, service), set()).add((metric, extra))
        return metric.labels(namespace, service, *extra)

    def signal(self, namespace: str, service: str, name: str, value: float) -> None:
        unit, label = SIGNALS.get(name, (None, None))
        if unit is not None:
            self.of(self.signals[unit], namespace, service, label).set(value)

    def accrue(self, namespace: str, service: str, usd: float, gpu_hours: dict[str, float]) -> None:
        """Counters from the ledger's running totals (restored from status after a restart): the
        first export of a process sets the baseline, so a restart adds nothing but a counter reset."""
        key = (namespace, service)
        totals = (usd, *(gpu_hours[c] for c in GPU_TIME))
        before = self._ledger.get(key, totals)
        self._ledger[key] = totals
        if any(now < then for now, then in zip(totals, before, strict=True)):
            return  # the ledger started over (status lost or reset): a new baseline, no negative step
        self.of(self.usd, namespace, service).inc(totals[0] - before[0])
        for capacity, now, then in zip(GPU_TIME, totals[1:], before[1:], strict=True):
            self.of(self.gpu_seconds, namespace, service, capacity).inc((now - then) * 3600.0)

    def forget(self, namespace: str, service: str) -> None:
        """Drop every series of a deleted service, so dashboards do not show ghosts."""
        for metric, extra in self._children.pop((namespace, service), set()):
            try:
                metric.remove(namespace, service, *extra)
            except KeyError:
                pass
        self._ledger.pop((namespace, service), None)
