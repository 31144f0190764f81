"""A Prometheus observation that fails for a tick is no news while the last samples are fresh.

At 1,000 services one observation past its 5 s budget turned every `MetricsAvailable` False
and back (2 x 1,000 status writes, the longest ticks: bench/notes.md, operator-scale). The shell
now decides on the last samples Prometheus returned while the policy's staleness rule
(spec.scaling.behavior.staleAfterSeconds) still takes them as fresh; past that, the failure
is told as before. A real Prometheus, paused with SIGSTOP: it accepts connections and answers
nothing, as a stalled one does.
"""

from __future__ import annotations

import time

import pytest

from ebbtide.api.manifest import parse_spec
from ebbtide.control.state import ServiceState
from ebbtide.policy.autoscaling import decide
from ebbtide.policy.decision import ConditionReport, Memory
from ebbtide.policy.observation import FleetState, Signals
from ebbtide.policy.reasons import METRICS_AVAILABLE
from ebbtide.signals.prometheus import PrometheusSource, ServiceQuery
from tests.testbed.exporter import FakeVllmExporter
from tests.testbed.prometheus import MISSING_BINARY, PrometheusServer, prometheus_binary
from tests.testbed.waiting import wait_for

pytestmark = pytest.mark.prometheus

KEY = ("ns-g", "chat")
SPEC = parse_spec({"model": {"name": "m"}})  # staleAfterSeconds: the default 60
STALE_AFTER = SPEC.scaling.behavior.stale_after_seconds
QUERY = ServiceQuery(KEY, "ns-g", ("chat-0",), window_seconds=SPEC.scaling.behavior.metrics_window_seconds)


@pytest.fixture(scope="module")
def prometheus():
    if prometheus_binary() is None:
        pytest.skip(MISSING_BINARY)
    exporter = FakeVllmExporter().start()
    exporter.add_pod("g").set(waiting=1, running=2, kv_cache_usage=0.3)
    server = PrometheusServer()
    server.set_targets([exporter.target_group("g", namespace="ns-g", pod="chat-0")])
    try:
        server.start()
        server.wait_for_targets_up(1)
        yield server
    finally:
        server.close()
        exporter.stop()


def tick(source: PrometheusSource, state: ServiceState, now: float,
         query: ServiceQuery = QUERY) -> tuple[Signals, ConditionReport]:
    """One service's tick as the operator takes it: observe, fall back or not, decide."""
    observed = source.observe([query], now)[KEY]
    signals = state.signals_through(KEY, observed, source.failing, now, STALE_AFTER)
    decision = decide(SPEC, signals, FleetState(current=1, ready=1), Memory.empty(now - 600), now)
    metrics = decision.condition(METRICS_AVAILABLE)
    assert metrics is not None
    return signals, metrics


def test_a_stalled_observation_keeps_metrics_available_until_the_last_samples_go_stale(prometheus):
    source = PrometheusSource(prometheus.url, timeout=2)
    state = ServiceState.restore(None, 0.0)

    def first_sample() -> float | None:
        at = time.time()
        return at if tick(source, state, at)[0].pods else None

    now = wait_for(first_sample, what="a first sample")
    good, metrics = tick(source, state, now)
    assert (metrics.status, metrics.reason) == ("True", "Fresh") and good.sampled_at is not None

    prometheus.pause()  # stalled: every query runs into the budget
    try:
        # One tick, or many, while the last samples are within staleAfterSeconds: decided on them.
        for later in (now + 1, good.sampled_at + STALE_AFTER):
            held, metrics = tick(source, state, later)
            assert source.failing
            assert held is good and (metrics.status, metrics.reason) == ("True", "Fresh"), metrics
        # Past it: the failure, as before, with Prometheus's own words.
        failed, metrics = tick(source, state, good.sampled_at + STALE_AFTER + 1)
        assert failed.error and (metrics.status, metrics.reason) == ("False", "QueryFailed"), metrics
        assert "no answer within 2 s" in metrics.message
    finally:
        prometheus.resume()

    # Prometheus answered that it has no samples: that is the news; nothing old is carried over it.
    absent = ServiceQuery(KEY, "ns-g", ("gone-0",))
    signals, metrics = tick(source, state, now, absent)
    assert signals.sampled_at is None and metrics.status == "False"
    prometheus.pause()
    try:
        signals, metrics = tick(source, state, now + 1, absent)
        assert source.failing and (metrics.status, metrics.reason) == ("False", "QueryFailed"), metrics
    finally:
        prometheus.resume()
