"""Signals without a Prometheus binary: PromQL's histogram_quantile in Python, and direct scraping
of fake vLLM pods served over HTTP (quantiles and rates from deltas between ticks)."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from ebbtide.signals.prometheus import ServiceQuery
from ebbtide.signals.quantiles import bucket_quantile, quantile_or_none
from ebbtide.signals.scrape import ScrapeQuery, ScrapeSource
from tests.testbed.exporter import ITL_BUCKETS, TTFT_BUCKETS
from tests.testbed.fixtures import fake_vllm_exporter  # noqa: F401

INF = math.inf


# --- histogram_quantile in Python (no binary needed) ---


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        (0.5, {1.0: 10, 2.0: 20, INF: 20}, 1.0),  # rank 10 reaches the first bucket's count exactly
        (0.75, {1.0: 10, 2.0: 20, INF: 20}, 1.5),  # linear inside (1, 2]
        (0.25, {1.0: 10, 2.0: 20, INF: 20}, 0.5),  # lowest bucket interpolates from 0
        (0.99, {1.0: 10, 2.0: 20, INF: 40}, 2.0),  # in the +Inf bucket: highest finite bound
        (0.9, {1.0: 0, 2.0: 0, INF: 0}, math.nan),  # no observations
        (0.9, {1.0: 5, 2.0: 10}, math.nan),  # no +Inf bucket
        (0.9, {INF: 10}, math.nan),  # fewer than two buckets
        (-0.1, {1.0: 1, INF: 1}, -INF),
        (1.1, {1.0: 1, INF: 1}, INF),
        (0.5, {-1.0: 10, 0.0: 10, INF: 10}, -1.0),  # lowest bound <= 0 is returned as is
        (0.5, {1.0: 10, 2.0: 8, INF: 20}, 1.0),  # non-monotonic counts are lifted to the envelope
        (1.0, {0.1: 3, 0.5: 6, INF: 6}, 0.5),
    ],
)
def test_bucket_quantile_follows_promql(q, buckets, expected):
    result = bucket_quantile(q, buckets)
    if math.isnan(expected):
        assert math.isnan(result)
    else:
        assert result == pytest.approx(expected)


def test_quantile_or_none_hides_nan_and_unset_quantiles():
    assert quantile_or_none(None, {1.0: 1, INF: 1}) is None
    assert quantile_or_none(0.9, {}) is None
    assert quantile_or_none(0.9, {1.0: 0, INF: 0}) is None
    assert quantile_or_none(0.5, {1.0: 2, INF: 2}) == pytest.approx(0.5)


# --- direct scraping (no binary needed) ---


def test_scrape_quantiles_and_rates_come_from_deltas_between_ticks(fake_vllm_exporter):  # noqa: F811
    exporter = fake_vllm_exporter
    x1, x2 = exporter.add_pod("x1"), exporter.add_pod("x2")
    x1.set(waiting=2, running=6, kv_cache_usage=0.4)
    x2.set(waiting=1, running=3, kv_cache_usage=0.2, asleep=True)
    x1.observe_ttft(9.0, 100)  # before the first tick: not in any window
    service = ServiceQuery("ns/x", "ns", ("x-1", "x-2", "x-3"), ttft_quantile=0.9, tpot_quantile=0.5,
                           window_seconds=60)
    query = ScrapeQuery(service, {"x-1": exporter.metrics_url("x1"), "x-2": exporter.metrics_url("x2")})
    source = ScrapeSource(timeout=1)

    first = asyncio.run(source.observe([query], time.time()))["ns/x"]
    assert [(p.pod, p.waiting, p.running, p.kv_cache_usage, p.asleep) for p in first.pods] == [
        ("x-1", 2, 6, 0.4, False), ("x-2", 1, 3, 0.2, True)]
    assert first.ttft_seconds is None and first.tokens_per_second is None  # nothing to compare with yet

    x1.observe_ttft(0.3, 20)
    x2.observe_ttft(3.0, 4)
    x1.observe_itl(0.04, 30)
    x2.observe_itl(0.12, 10)
    x1.add_tokens(prompt=600, generated=300)
    started = time.time()
    time.sleep(0.2)
    second = asyncio.run(source.observe([query], time.time()))["ns/x"]
    elapsed = time.time() - started

    def cumulative(bounds, observations):
        buckets = {b: float(sum(n for v, n in observations if v <= b)) for b in bounds}
        buckets[INF] = float(sum(n for _, n in observations))
        return buckets

    assert second.ttft_seconds == pytest.approx(bucket_quantile(0.9, cumulative(TTFT_BUCKETS, [(0.3, 20), (3.0, 4)])))
    assert second.tpot_seconds == pytest.approx(bucket_quantile(0.5, cumulative(ITL_BUCKETS, [(0.04, 30), (0.12, 10)])))
    assert 900 / (elapsed + 0.5) < second.tokens_per_second < 900 / 0.2 * 1.5
    # The mix (policy/performance.py): the prompt share of the same counters.
    assert second.prompt_tokens_per_second == pytest.approx(second.tokens_per_second * 600 / 900)

    # A restarted engine (same pod, counters from zero) is read as a restart, not a negative rate.
    exporter.pods["x1"] = type(x1)("x1").set(waiting=0)
    exporter.pods["x1"].observe_ttft(0.07, 5)
    time.sleep(0.1)
    only_x1 = ScrapeQuery(ServiceQuery("ns/x1", "ns", ("x-1",), ttft_quantile=0.9), {"x-1": exporter.metrics_url("x1")})
    third = asyncio.run(source.observe([only_x1], time.time()))["ns/x1"]
    assert 0.06 < third.ttft_seconds <= 0.08 and third.tokens_per_second == 0


def test_scrape_source_leaves_out_dead_pods_and_says_why(fake_vllm_exporter):  # noqa: F811
    exporter = fake_vllm_exporter
    exporter.add_pod("y1").set(waiting=4)
    exporter.add_pod("y2").up = False
    source = ScrapeSource(timeout=1)
    some = ServiceQuery("ns/some", "ns", ("y-1", "y-2"))
    none = ServiceQuery("ns/none", "ns", ("y-2", "y-3", "y-4"))
    queries = [
        ScrapeQuery(some, {"y-1": exporter.metrics_url("y1"), "y-2": exporter.metrics_url("y2")}),
        ScrapeQuery(none, {"y-2": exporter.metrics_url("y2"), "y-3": "http://127.0.0.1:1/metrics"}),
    ]
    signals = asyncio.run(source.observe(queries, time.time()))
    assert [p.pod for p in signals["ns/some"].pods] == ["y-1"] and signals["ns/some"].waiting == 4
    dead = signals["ns/none"]
    assert dead.source == "scrape" and dead.sampled_at is None and dead.pods == ()
    assert dead.error.startswith("no pod of namespace ns answered /metrics (y-2: HTTP 503; y-3: ")
    assert dead.error.endswith("; y-4: no address)")
