"""The operator's own metrics follow Prometheus conventions: counters for totals (GPU seconds,
dollars), one unit per metric, no duplicate, nothing left of a deleted service."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ebbtide.control.metrics import SIGNALS, OperatorMetrics
from ebbtide.policy.capacity_types import ON_DEMAND, SPOT


def series(metrics: OperatorMetrics) -> dict[str, list]:
    text = generate_latest(metrics.registry).decode()
    return {f.name: [s for s in f.samples if not s.name.endswith("_created")]
            for f in text_string_to_metric_families(text)}


def hours(on_demand: float, spot: float = 0.0, asleep: float = 0.0, reserved: float = 0.0) -> dict[str, float]:
    return {ON_DEMAND: on_demand, SPOT: spot, "asleep": asleep, "reserved": reserved}


def test_gpu_time_and_dollars_are_counters_that_grow_by_the_ledgers_increase():
    m = OperatorMetrics()
    m.accrue("ns", "chat", 10.0, hours(100.0))  # a restored ledger: the baseline, not 100 h at once
    m.accrue("ns", "chat", 12.5, hours(100.5, spot=0.25, reserved=1.0))
    found = series(m)
    gpu = {s.labels["capacity_type"]: s.value for s in found["ebbtide_gpu_seconds"] if s.name.endswith("_total")}
    assert gpu == {ON_DEMAND: 1800.0, SPOT: 900.0, "asleep": 0.0, "reserved": 3600.0}
    (usd,) = [s.value for s in found["ebbtide_cost_usd"] if s.name == "ebbtide_cost_usd_total"]
    assert usd == 2.5
    m.accrue("ns", "chat", 1.0, hours(0.1))  # the ledger started over: a new baseline, no negative step
    m.accrue("ns", "chat", 2.0, hours(0.1))
    (usd,) = [s.value for s in series(m)["ebbtide_cost_usd"] if s.name == "ebbtide_cost_usd_total"]
    assert usd == 3.5


def test_signals_are_one_gauge_per_unit():
    m = OperatorMetrics()
    for name in SIGNALS:
        m.signal("ns", "chat", name, 1.0)
    found = series(m)
    units = {name: {s.labels["signal"] for s in found[name]} for name in found if name.startswith("ebbtide_signal_")}
    assert units["ebbtide_signal_seconds"] == {"ttft", "tpot", "sample_age"}
    assert units["ebbtide_signal_requests"] == {"waiting", "running"}
    assert units["ebbtide_signal_ratio"] == {"kv_cache_usage"}
    assert units["ebbtide_signal_tokens_per_second"] == {"throughput", "capacity"}
    assert sum(len(v) for v in units.values()) == len(SIGNALS)  # each signal in exactly one metric
    assert "ebbtide_signal_value" not in found and "ebbtide_asleep_replicas" not in found
    assert not [name for name in found if name.startswith("ebbtide_gpu_hours")]


def test_forget_removes_every_series_of_the_service_and_only_those():
    m = OperatorMetrics()
    for service in ("chat", "code"):
        m.of(m.desired, "ns", service).set(2)
        m.of(m.ready, "ns", service).set(2)
        for tier in ("on-demand", "asleep"):
            m.of(m.replicas, "ns", service, tier).set(1)
        for name in SIGNALS:
            m.signal("ns", service, name, 0.5)
        m.of(m.decisions, "ns", service, "QueueBacklog", "true").inc()
        m.of(m.metrics_unavailable, "ns", service).set(0)
        m.of(m.usd_per_hour, "ns", service).set(3.0)
        m.of(m.usd_per_million_tokens, "ns", service).set(0.4)
        m.accrue("ns", service, 1.0, hours(1.0))
        m.accrue("ns", service, 2.0, hours(2.0))
    m.forget("ns", "chat")
    text = generate_latest(m.registry).decode()
    assert 'service="chat"' not in text
    per_service = [f for f in series(m).values() if any("service" in s.labels for s in f)]
    assert len(per_service) == len(m.per_service)  # every per-service metric still has code's series ...
    m.forget("ns", "code")
    assert "service=" not in generate_latest(m.registry).decode()  # ... until it goes too
