"""Operator settings: from the command line (`ebbtide run`) or the environment (the Helm chart, tests)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class OperatorConfig:
    prometheus_url: str = "http://prometheus-server.monitoring.svc:80"
    metrics_port: int = 9090  # the operator's own /metrics; 0 turns it off
    tick_seconds: float = 5.0  # how often the scaling loop wakes; each service has its own interval
    # The longest one POST /sleep or /wake_up may take before it counts as failed (and is
    # retried, then the replica replaced): a level-2 wake reloads the weights from disk.
    engine_timeout_seconds: float = 120.0
    # `ebbtide run --namespace`: the only namespaces the operator lists pods and Deployments in,
    # so that a Role in each (the chart's rbac.scope=namespaced) is all it needs. Empty: all.
    namespaces: tuple[str, ...] = ()

    @classmethod
    def from_env(cls) -> OperatorConfig:
        return cls(
            prometheus_url=os.environ.get("EBBTIDE_PROMETHEUS_URL", cls.prometheus_url),
            metrics_port=int(os.environ.get("EBBTIDE_METRICS_PORT", cls.metrics_port)),
            tick_seconds=float(os.environ.get("EBBTIDE_TICK_SECONDS", cls.tick_seconds)),
            engine_timeout_seconds=float(os.environ.get("EBBTIDE_ENGINE_TIMEOUT_SECONDS",
                                                        cls.engine_timeout_seconds)),
        )
