"""Signals from a real Prometheus scraping real HTTP exporters (direct scraping: test_signals_scrape.py).

No mocks: the Prometheus tests start the `prometheus` binary (skipped if it is not installed)
against fake vLLM pods served over HTTP, each pod its own scrape target whose `namespace` and
`pod` labels come from file_sd, as they would from Kubernetes service discovery.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import pytest

from ebbtide.api.manifest import parse_spec
from ebbtide.api.ref import ServiceRef
from ebbtide.cluster.render import LABEL_SERVICE
from ebbtide.cluster.variants import LABEL_VARIANT
from ebbtide.control.observe import Snapshot, signal_queries
from ebbtide.signals.prometheus import HISTOGRAMS, MAX_NAMED_PODS, QUERY_NAMES, PrometheusSource, ServiceQuery
from ebbtide.signals.scrape import ScrapeQuery, ScrapeSource
from tests.testbed.exporter import FakeVllmExporter
from tests.testbed.fixtures import fake_vllm_exporter  # noqa: F401
from tests.testbed.prometheus import MISSING_BINARY, PrometheusServer, prometheus_binary

needs_prometheus = pytest.mark.skipif(prometheus_binary() is None, reason=MISSING_BINARY)
MANY = 50
WINDOW = 10


# --- the shared bed: one exporter, two Prometheus servers (started together) ---


@dataclass
class Bed:
    exporter: FakeVllmExporter
    prometheus: PrometheusServer
    spare: PrometheusServer  # for the outage test, which kills it
    at: float  # evaluation time of the comparisons: all the data is in by then


def _groups(exporter: FakeVllmExporter, spec: dict[str, tuple[str, str]]) -> list[dict]:
    return [exporter.target_group(name, namespace=ns, pod=pod) for name, (ns, pod) in spec.items()]


@pytest.fixture(scope="module")
def bed():
    if prometheus_binary() is None:
        pytest.skip(MISSING_BINARY)
    exporter = FakeVllmExporter().start()
    # Two services in two namespaces whose pods have the same name (p-1), ns-b running an old vLLM.
    a1 = exporter.add_pod("a1").set(waiting=3, running=8, kv_cache_usage=0.5, asleep=False)
    a2 = exporter.add_pod("a2").set(waiting=1, running=4, kv_cache_usage=0.25, asleep=True)
    b1 = exporter.add_pod("b1", legacy_names=True).set(waiting=7, running=2, kv_cache_usage=0.9)
    a1.set_gpu(used_mib=60_000, free_mib=20_000, util_percent=75)
    for k in range(MANY):
        exporter.add_pod(f"m{k}").set(waiting=k, running=1)
    exporter.add_pod("c1").set(waiting=2)
    exporter.add_pod("c2").set(waiting=5)
    exporter.add_pod("s1").set(waiting=9)  # the spare Prometheus's only target
    targets = {"a1": ("ns-a", "p-1"), "a2": ("ns-a", "p-2"), "b1": ("ns-b", "p-1"),
               "c1": ("ns-c", "p-1"), "c2": ("ns-c", "p-2")}
    targets |= {f"m{k}": ("ns-many", f"p-{k}") for k in range(MANY)}
    prometheus = PrometheusServer()
    spare = PrometheusServer()
    prometheus.set_targets(_groups(exporter, targets))
    spare.set_targets(_groups(exporter, {"s1": ("ns-s", "p-1")}))
    try:
        prometheus.start()
        spare.start()
        prometheus.wait_for_targets_up(len(targets))
        spare.wait_for_targets_up(1)
        # Latencies and tokens arrive after the first scrapes, in two batches, so rates see them.
        for _ in range(2):
            time.sleep(1.1)
            # Quantiles well inside a bucket (rate() extrapolates each pod a little differently).
            a1.observe_ttft(0.3, 20)
            a1.observe_ttft(3.0, 12)
            a2.observe_ttft(0.07, 8)
            a1.observe_itl(0.04, 60)
            a2.observe_itl(0.12, 20)
            b1.observe_ttft(1.5, 10)
            b1.observe_itl(0.2, 40)  # legacy name: vllm:time_per_output_token_seconds
            b1.observe_itl(0.6, 5)
            a1.add_tokens(prompt=1000, generated=500)
            b1.add_tokens(prompt=200, generated=100)
        time.sleep(2.2)
        yield Bed(exporter=exporter, prometheus=prometheus, spare=spare, at=time.time() - 1.5)
    finally:
        prometheus.close()
        spare.close()
        exporter.stop()


SERVICE_A = ServiceQuery("ns-a/chat", "ns-a", ("p-1", "p-2"), ttft_quantile=0.9, tpot_quantile=0.5,
                         window_seconds=WINDOW)
SERVICE_B = ServiceQuery("ns-b/chat", "ns-b", ("p-1",), ttft_quantile=0.5, tpot_quantile=0.99,
                         window_seconds=2 * WINDOW)


def _promql_scalar(prometheus: PrometheusServer, promql: str, at: float) -> float:
    result = prometheus.query(promql, at=at)
    assert len(result) == 1, (promql, result)
    return float(result[0]["value"][1])


@pytest.mark.prometheus
@needs_prometheus
def test_gauges_are_mapped_to_services_by_namespace_and_pod(bed):
    source = PrometheusSource(bed.prometheus.url)
    signals = source.observe([SERVICE_A, SERVICE_B], bed.at)

    a, b = signals["ns-a/chat"], signals["ns-b/chat"]
    assert (a.source, a.error, b.error) == ("prometheus", None, None)
    a_pods = {p.pod: p for p in a.pods}
    assert set(a_pods) == {"p-1", "p-2"}
    assert (a_pods["p-1"].waiting, a_pods["p-1"].running, a_pods["p-1"].kv_cache_usage) == (3, 8, 0.5)
    assert (a_pods["p-2"].waiting, a_pods["p-2"].running, a_pods["p-2"].kv_cache_usage) == (1, 4, 0.25)
    assert not a_pods["p-1"].asleep and a_pods["p-2"].asleep
    assert a.waiting == 4 and a.running == 12
    assert a.kv_cache_usage == 0.5  # the sleeping replica is left out of the mean
    # DCGM where present (MiB -> bytes, percent -> fraction), None where absent.
    assert a_pods["p-1"].gpu_memory_used_bytes == 60_000 * 2**20
    assert a_pods["p-1"].gpu_memory_free_bytes == 20_000 * 2**20
    assert a_pods["p-1"].gpu_utilization == 0.75
    assert a_pods["p-2"].gpu_memory_used_bytes is None and a_pods["p-2"].gpu_utilization is None
    # Same pod name in another namespace: its own values; old vLLM metric names still read.
    (b_pod,) = b.pods
    assert (b_pod.pod, b_pod.waiting, b_pod.running, b_pod.kv_cache_usage, b_pod.asleep) == ("p-1", 7, 2, 0.9, False)
    # sampled_at is the sample's own time (scrapes every second), not the query's.
    for s in (a, b):
        assert bed.at - 2.5 < s.sampled_at <= bed.at
        assert s.sampled_at == max(p.sampled_at for p in s.pods)


@pytest.mark.prometheus
@needs_prometheus
def test_quantiles_and_throughput_match_promql(bed):
    source = PrometheusSource(bed.prometheus.url)
    signals = source.observe([SERVICE_A, SERVICE_B], bed.at)
    a, b = signals["ns-a/chat"], signals["ns-b/chat"]

    def promql_quantile(q: float, series: str, matchers: str, window: int) -> float:
        return _promql_scalar(
            bed.prometheus, f"histogram_quantile({q}, sum by (le) (rate({series}_bucket{{{matchers}}}[{window}s])))",
            bed.at,
        )

    a_pods = 'namespace="ns-a", pod=~"p-1|p-2"'
    b_pods = 'namespace="ns-b", pod="p-1"'
    expected = {
        "a ttft": promql_quantile(0.9, "vllm:time_to_first_token_seconds", a_pods, WINDOW),
        "a tpot": promql_quantile(0.5, "vllm:inter_token_latency_seconds", a_pods, WINDOW),
        "b ttft": promql_quantile(0.5, "vllm:time_to_first_token_seconds", b_pods, 2 * WINDOW),
        "b tpot": promql_quantile(0.99, "vllm:time_per_output_token_seconds", b_pods, 2 * WINDOW),
    }
    got = {"a ttft": a.ttft_seconds, "a tpot": a.tpot_seconds, "b ttft": b.ttft_seconds, "b tpot": b.tpot_seconds}
    assert got == pytest.approx(expected, rel=1e-9)
    # And they are where the observations put them: A's p90 TTFT lies in (2.5, 5] (the 3 s
    # requests), its median inter-token latency in (0.025, 0.05]; B's p99 TPOT in (0.5, 0.75].
    assert 2.5 < a.ttft_seconds <= 5 and 0.025 < a.tpot_seconds <= 0.05
    assert 1.0 < b.ttft_seconds <= 2.5 and 0.5 < b.tpot_seconds <= 0.75

    for service, matchers, window in ((a, a_pods, WINDOW), (b, b_pods, 2 * WINDOW)):
        tokens = _promql_scalar(
            bed.prometheus,
            f"sum(rate(vllm:prompt_tokens_total{{{matchers}}}[{window}s]))"
            f" + sum(rate(vllm:generation_tokens_total{{{matchers}}}[{window}s]))",
            bed.at,
        )
        assert tokens > 0 and service.tokens_per_second == pytest.approx(tokens, rel=1e-9)
        prompt = _promql_scalar(bed.prometheus, f"sum(rate(vllm:prompt_tokens_total{{{matchers}}}[{window}s]))", bed.at)
        assert service.prompt_tokens_per_second == pytest.approx(prompt, rel=1e-9)


@pytest.mark.prometheus
@needs_prometheus
def test_query_count_does_not_grow_with_services(bed):
    source = PrometheusSource(bed.prometheus.url)
    one = [ServiceQuery("ns-many/s0", "ns-many", ("p-0",), window_seconds=WINDOW)]
    # Fifty services, with different quantiles and two different windows.
    many = [
        ServiceQuery(f"ns-many/s{k}", "ns-many", (f"p-{k}",), ttft_quantile=0.5 + k / 200,
                     tpot_quantile=0.9, window_seconds=WINDOW if k % 2 else 2 * WINDOW)
        for k in range(MANY)
    ]

    def counted(services):
        mine, theirs = source.queries_made, bed.prometheus.http_requests("/api/v1/query")
        signals = source.observe(services, bed.at)
        time.sleep(0.3)  # Prometheus counts a request just after answering it
        return signals, source.queries_made - mine, bed.prometheus.http_requests("/api/v1/query") - theirs

    signals_one, mine_one, theirs_one = counted(one)
    signals_many, mine_many, theirs_many = counted(many)

    assert mine_one == mine_many == theirs_one == theirs_many == len(QUERY_NAMES) == source.queries_per_observe
    assert source.last_queries == len(QUERY_NAMES)
    assert signals_one["ns-many/s0"].waiting == 0
    assert len(signals_many) == MANY
    for k in range(MANY):
        s = signals_many[f"ns-many/s{k}"]
        assert s.error is None and [p.pod for p in s.pods] == [f"p-{k}"] and s.waiting == k


def test_each_query_reads_only_the_pods_of_the_services_asked_about():
    """A tick asks about the services due (a third of the fleet at the default interval and
    tick): the other pods' series are not read (bench/operator_scale.py)."""
    source = PrometheusSource("http://127.0.0.1:9")
    asked = [ServiceQuery("a", "ns", ("p-1", "p-2")), ServiceQuery("b", "ns", ("p-3",))]
    queries = source.queries(asked)
    assert all('pod=~"p-1|p-2|p-3"' in q for name, q in queries.items()
               if not name.startswith("gpu_") and name not in HISTOGRAMS), queries
    assert 'pod=~""' in queries["ttft_buckets"]  # none served in the window
    assert 'pod=~"p-2"' in source.queries(asked, served=["p-2"])["tpot_buckets"]
    everyone = [ServiceQuery(f"s{k}", "ns", (f"p-{k}",)) for k in range(MAX_NAMED_PODS + 1)]
    assert "pod=~" not in source.queries(everyone)["waiting"]  # too many to name: all of them


@pytest.mark.prometheus
@needs_prometheus
def test_each_variant_gets_its_own_pods_signals_out_of_the_same_queries(bed):
    """With spec.variants the operator asks once more per variant, keyed (service, variant), with that
    variant's pods (control/observe.py): the same 11 queries, each variant's own series."""
    spec = parse_spec({"model": {"name": "m"}, "variants": [
        {"name": name, "accelerator": name.upper(), "pricePerGpuHour": 1.0} for name in ("h100", "l4")]})
    pods = [{"metadata": {"name": name, "namespace": "ns-a", "labels": {LABEL_SERVICE: "chat", LABEL_VARIANT: variant}},
             "spec": {"nodeName": "n"}, "status": {"phase": "Running"}} for name, variant in (("p-1", "h100"),
                                                                                           ("p-2", "l4"))]
    due = [(ServiceRef(name="chat", namespace="ns-a", uid="u"), spec, None)]
    source = PrometheusSource(bed.prometheus.url)
    signals = source.observe(signal_queries(Snapshot.of(bed.at, pods, [], [], {}), due), bed.at)
    assert source.last_queries == len(QUERY_NAMES)
    service, h100, l4 = signals[("ns-a", "chat")], signals[(("ns-a", "chat"), "h100")], signals[(("ns-a", "chat"), "l4")]
    assert [p.pod for p in h100.pods] == ["p-1"] and [p.pod for p in l4.pods] == ["p-2"]
    assert (h100.waiting, l4.waiting, service.waiting) == (3, 1, 4)
    assert h100.tokens_per_second == pytest.approx(service.tokens_per_second) and not l4.tokens_per_second


@pytest.mark.prometheus
@needs_prometheus
def test_a_rejected_query_is_an_error_not_an_exception(bed):
    source = PrometheusSource(bed.prometheus.url, selector='job=~"("')  # not a valid regex: HTTP 400
    signals = source.observe([SERVICE_A], time.time())
    assert signals["ns-a/chat"].sampled_at is None
    assert signals["ns-a/chat"].error.startswith(f"Prometheus query failed at {bed.prometheus.url}: HTTP Status Code 400")


@pytest.mark.prometheus
@needs_prometheus
def test_a_pod_that_stops_answering_drops_out(bed):
    source = PrometheusSource(bed.prometheus.url)
    service = ServiceQuery("ns-c/chat", "ns-c", ("p-1", "p-2", "p-3"), window_seconds=WINDOW)
    before = source.observe([service], time.time())["ns-c/chat"]
    assert sorted(p.pod for p in before.pods) == ["p-1", "p-2"]  # p-3 has no series at all
    assert time.time() - before.sampled_at < 3

    bed.exporter.pods["c1"].up = False  # the next scrape fails: Prometheus marks its series stale
    try:
        deadline = time.monotonic() + 6
        while True:
            after = source.observe([service], time.time())["ns-c/chat"]
            if [p.pod for p in after.pods] == ["p-2"] or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert [p.pod for p in after.pods] == ["p-2"]
        assert after.waiting == 5 and time.time() - after.sampled_at < 3

        nobody = source.observe([ServiceQuery("ns-c/old", "ns-c", ("p-1",))], time.time())["ns-c/old"]
        assert nobody.sampled_at is None and nobody.pods == () and nobody.waiting is None
        assert nobody.error == "no vLLM metrics in Prometheus for pods p-1 in namespace ns-c"
    finally:
        bed.exporter.pods["c1"].up = True


@pytest.mark.prometheus
@needs_prometheus
def test_prometheus_outage_gives_missing_signals_then_old_samples(bed, caplog):
    spare = bed.spare
    service = ServiceQuery("ns-s/chat", "ns-s", ("p-1",), window_seconds=WINDOW)
    source = PrometheusSource(spare.url, timeout=1)
    assert source.observe([service], time.time())["ns-s/chat"].pods

    caplog.set_level(logging.INFO, logger="ebbtide.signals.prometheus")
    spare.pause()  # the port accepts connections but nothing answers
    try:
        hung = source.observe([service], time.time())["ns-s/chat"]
    finally:
        spare.resume()
    assert hung.sampled_at is None and hung.source == "prometheus"
    assert hung.error == f"Prometheus unreachable at {spare.url}: no answer within 1 s"
    # The first failure ends the tick: no 11 timeouts in a row, only the few sent side by side.
    assert 1 <= source.last_queries <= 4

    crashed_at = time.time()
    spare.stop(crash=True)  # SIGKILL: no staleness markers are written
    for _ in range(3):
        down = source.observe([service], time.time())
        assert down == {"ns-s/chat": down["ns-s/chat"]}
        assert down["ns-s/chat"].pods == () and down["ns-s/chat"].sampled_at is None
        assert down["ns-s/chat"].error == f"Prometheus unreachable at {spare.url}: [Errno 111] Connection refused"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "one warning per failure streak, not one per tick"

    # Back, but the pod is no longer a target: Prometheus still answers its last samples, with
    # their own old timestamps, which is how the core tells them from fresh ones.
    spare.set_targets([])
    spare.start()
    back = source.observe([service], time.time())["ns-s/chat"]
    assert back.error is None and [p.pod for p in back.pods] == ["p-1"]
    assert back.sampled_at <= crashed_at
    time.sleep(1.2)
    later = source.observe([service], time.time())["ns-s/chat"]
    assert later.sampled_at == back.sampled_at and time.time() - later.sampled_at > 1  # ageing, not refreshed
    assert any("answers again" in r.getMessage() for r in caplog.records)


@pytest.mark.prometheus
@needs_prometheus
def test_scrape_source_sees_the_same_gauges_as_prometheus(bed):
    from_prometheus = PrometheusSource(bed.prometheus.url).observe([SERVICE_A, SERVICE_B], time.time())
    urls = {
        "ns-a/chat": {"p-1": bed.exporter.metrics_url("a1"), "p-2": bed.exporter.metrics_url("a2")},
        "ns-b/chat": {"p-1": bed.exporter.metrics_url("b1")},
    }
    queries = [ScrapeQuery(s, urls[s.key]) for s in (SERVICE_A, SERVICE_B)]
    from_scrape = asyncio.run(ScrapeSource().observe(queries, time.time()))

    def gauges(signals):
        return [(p.pod, p.waiting, p.running, p.kv_cache_usage, p.asleep, p.gpu_memory_used_bytes,
                 p.gpu_utilization) for p in signals.pods]

    for key in ("ns-a/chat", "ns-b/chat"):
        assert from_scrape[key].source == "scrape"
        assert gauges(from_scrape[key]) == gauges(from_prometheus[key])
        assert time.time() - from_scrape[key].sampled_at < 2
