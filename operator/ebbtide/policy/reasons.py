"""The words a decision is given: its reasons and the conditions it reports, as they appear in
status, Events and the operator's metrics."""

from __future__ import annotations

QUEUE_BACKLOG = "QueueBacklog"
KV_CACHE = "KVCache"
CONCURRENCY = "Concurrency"
THROUGHPUT = "Throughput"
TTFT = "TTFT"
TPOT = "TPOT"
MIN_REPLICAS = "MinReplicas"
MAX_REPLICAS = "MaxReplicas"
STABILIZING = "Stabilizing"
RATE_LIMITED = "RateLimited"
METRICS_UNAVAILABLE = "MetricsUnavailable"
SCALED_TO_ZERO = "ScaledToZero"
STEADY = "Steady"

METRICS_AVAILABLE = "MetricsAvailable"
SCALING_LIMITED = "ScalingLimited"
