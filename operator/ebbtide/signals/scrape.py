"""Signals straight from each pod's /metrics, for clusters without Prometheus.

Every pod is fetched concurrently once per tick (aiohttp, short timeout) and parsed with
prometheus-client's parser into the same `Signals` the Prometheus source produces
(source="scrape").

Rates and latency quantiles need two points in time. This source keeps a short history of
each pod's counters and cumulative histogram buckets (one snapshot per tick) and compares the
newest snapshot with the oldest one still inside the service's window; with ticks longer than
the window, with the previous tick's. Approximations, compared with PromQL's rate() over the
same window:
- the window is whole ticks wide (for example 45 s for a 60 s window and 15 s ticks; at most
  10 % slack is allowed so that jitter does not drop a tick), and nothing is extrapolated;
- a pod's first scrape has nothing to compare with, so it contributes gauges but no latency
  or throughput (right after the operator starts, and for new pods, until the next tick);
- a counter that went down is taken to have restarted from zero (a container restart keeps
  the pod name), per series, as rate() does.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from ebbtide.policy.observation import PodSignals, Signals
from ebbtide.signals.prometheus import MIB, ServiceQuery
from ebbtide.signals.quantiles import parse_le, quantile_or_none, sum_buckets

log = logging.getLogger(__name__)

SOURCE = "scrape"
WINDOW_SLACK = 1.1  # a snapshot up to 10 % older than the window still counts as inside it
MAX_CONCURRENT = 64

_TOKEN_COUNTERS = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total")
_FINISHED = "vllm:request_success_total"  # requests finished (any reason), for the mean context


@dataclass(frozen=True)
class ScrapeQuery:
    """A service to observe, and where each of its pods serves /metrics (pods without an address yet are left out)."""

    service: ServiceQuery
    metrics_urls: Mapping[str, str]  # pod name -> "http://10.0.0.7:8000/metrics"


@dataclass
class _Snapshot:
    """One pod's /metrics at one moment: gauges summed (or maxed) over its engines."""

    at: float
    waiting: float = 0.0
    running: float = 0.0
    kv_cache_usage: float | None = None
    legacy_kv_cache_usage: float | None = None
    awake: float | None = None
    gpu_memory_used_mib: float | None = None
    gpu_memory_free_mib: float | None = None
    gpu_utilization_percent: list[float] = field(default_factory=list)
    counters: dict[tuple, float] = field(default_factory=dict)  # (name, labels...) -> cumulative value
    ttft: dict[tuple, float] = field(default_factory=dict)  # (labels without le..., le) -> cumulative count
    itl: dict[tuple, float] = field(default_factory=dict)
    legacy_tpot: dict[tuple, float] = field(default_factory=dict)

    @property
    def tpot(self) -> dict[tuple, float]:
        return self.itl or self.legacy_tpot


class ScrapeSource:
    """Observes services by fetching their pods' /metrics directly (see the module docstring)."""

    def __init__(self, timeout: float = 2.0):
        self.timeout = timeout
        self._history: dict[tuple[str, str], deque[_Snapshot]] = {}
        self.scrapes_made = 0

    async def observe(self, services: Sequence[ScrapeQuery], now: float) -> dict[Hashable, Signals]:
        """Signals of every service. Never raises: unreachable pods are left out, and a service
        none of whose pods answered gets `sampled_at=None` and an error saying why."""
        targets = {
            (query.service.namespace, pod): url
            for query in services
            for pod, url in query.metrics_urls.items()
            if pod in query.service.pods
        }
        connector = aiohttp.TCPConnector(limit=MAX_CONCURRENT)
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            outcomes = await asyncio.gather(
                *(self._scrape(session, url) for url in targets.values()), return_exceptions=True
            )
        snapshots: dict[tuple[str, str], _Snapshot] = {}
        failures: dict[tuple[str, str], str] = {}
        for key, outcome in zip(targets, outcomes, strict=True):
            if isinstance(outcome, _Snapshot):
                snapshots[key] = outcome
            elif isinstance(outcome, BaseException):
                failures[key] = repr(outcome)
            else:
                failures[key] = outcome
        windows = {}
        for query in services:
            for pod in query.service.pods:
                key = (query.service.namespace, pod)
                windows[key] = max(windows.get(key, 0), query.service.window_seconds)
        for key, snapshot in snapshots.items():
            self._remember(key, snapshot, windows[key])
        self._forget_old(now)
        return {query.service.key: self._signals(query, snapshots, failures) for query in services}

    # --- fetching ---

    async def _scrape(self, session: aiohttp.ClientSession, url: str) -> _Snapshot | str:
        """A snapshot, or why there is none."""
        self.scrapes_made += 1
        try:
            async with session.get(url) as response:
                if response.status != 200:
                    return f"HTTP {response.status}"
                text = await response.text()
                at = time.time()
        except TimeoutError:
            return f"no answer within {self.timeout:g} s"
        except (aiohttp.ClientError, OSError, ValueError) as error:
            return str(error) or type(error).__name__
        try:
            return _parse(text, at)
        except Exception as error:  # a malformed exposition is this pod's problem, not the tick's
            return f"unreadable /metrics: {error}"

    # --- history ---

    def _remember(self, key: tuple[str, str], snapshot: _Snapshot, window: float) -> None:
        history = self._history.setdefault(key, deque())
        history.append(snapshot)
        # Keep what a window needs, plus the one just before it (the fallback baseline).
        while len(history) > 2 and history[1].at < snapshot.at - window * WINDOW_SLACK:
            history.popleft()

    def _forget_old(self, now: float) -> None:
        for key in [k for k, h in self._history.items() if h[-1].at < now - 3600]:
            del self._history[key]

    def _baseline(self, key: tuple[str, str], window: float) -> _Snapshot | None:
        history = self._history.get(key)
        if not history or len(history) < 2:
            return None
        current = history[-1]
        earlier = list(history)[:-1]
        inside = [s for s in earlier if s.at >= current.at - window * WINDOW_SLACK]
        return inside[0] if inside else earlier[-1]

    # --- assembling ---

    def _signals(self, query: ScrapeQuery, snapshots: dict[tuple[str, str], _Snapshot],
                 failures: dict[tuple[str, str], str]) -> Signals:
        service = query.service
        pods: list[PodSignals] = []
        ttft: list[dict[float, float]] = []
        tpot: list[dict[float, float]] = []
        rates: list[float] = []
        prompt_rates: list[float] = []
        finished_rates: list[float] = []
        for pod in service.pods:
            key = (service.namespace, pod)
            snapshot = snapshots.get(key)
            if snapshot is None:
                continue
            pods.append(_pod_signals(pod, snapshot))
            baseline = self._baseline(key, service.window_seconds)
            if baseline is None or snapshot.at <= baseline.at:
                continue
            ttft.append(_bucket_increase(snapshot.ttft, baseline.ttft))
            tpot.append(_bucket_increase(snapshot.tpot, baseline.tpot))
            increases = {k: _increase(value, baseline.counters.get(k)) for k, value in snapshot.counters.items()}
            seconds = snapshot.at - baseline.at
            rates.append(sum(v for k, v in increases.items() if k[0] in _TOKEN_COUNTERS) / seconds)
            prompt_rates.append(sum(v for k, v in increases.items() if k[0] == "vllm:prompt_tokens_total") / seconds)
            finished_rates.append(sum(v for k, v in increases.items() if k[0] == _FINISHED) / seconds)
        if not pods:
            error = None
            if service.pods:
                reasons = [f"{pod}: {failures.get((service.namespace, pod), 'no address')}" for pod in service.pods]
                error = f"no pod of namespace {service.namespace} answered /metrics ({'; '.join(reasons)})"
            return Signals(source=SOURCE, sampled_at=None, error=error)
        return Signals(
            source=SOURCE,
            sampled_at=max(p.sampled_at for p in pods),
            pods=tuple(pods),
            ttft_seconds=quantile_or_none(service.ttft_quantile, sum_buckets(ttft)),
            tpot_seconds=quantile_or_none(service.tpot_quantile, sum_buckets(tpot)),
            tokens_per_second=sum(rates) if rates else None,
            prompt_tokens_per_second=sum(prompt_rates) if rates else None,
            requests_per_second=sum(finished_rates) if rates else None,
        )


def _parse(text: str, at: float) -> _Snapshot | str:
    snapshot = _Snapshot(at=at)
    seen_vllm = False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, float(sample.value)
            if math.isnan(value):
                continue
            series = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
            if name == "vllm:num_requests_waiting":
                seen_vllm = True
                snapshot.waiting += value
            elif name == "vllm:num_requests_running":
                snapshot.running += value
            elif name == "vllm:kv_cache_usage_perc":
                snapshot.kv_cache_usage = max(value, snapshot.kv_cache_usage or 0.0)
            elif name == "vllm:gpu_cache_usage_perc":
                snapshot.legacy_kv_cache_usage = max(value, snapshot.legacy_kv_cache_usage or 0.0)
            elif name == "vllm:engine_sleep_state" and labels.get("sleep_state") == "awake":
                snapshot.awake = max(value, snapshot.awake or 0.0)
            elif name in _TOKEN_COUNTERS or name == _FINISHED:
                snapshot.counters[(name, *series)] = value
            elif name == "vllm:time_to_first_token_seconds_bucket":
                snapshot.ttft[(*series, parse_le(labels["le"]))] = value
            elif name == "vllm:inter_token_latency_seconds_bucket":
                snapshot.itl[(*series, parse_le(labels["le"]))] = value
            elif name == "vllm:time_per_output_token_seconds_bucket":
                snapshot.legacy_tpot[(*series, parse_le(labels["le"]))] = value
            elif name == "DCGM_FI_DEV_FB_USED":  # only if the pod also exposes DCGM (rare)
                snapshot.gpu_memory_used_mib = (snapshot.gpu_memory_used_mib or 0.0) + value
            elif name == "DCGM_FI_DEV_FB_FREE":
                snapshot.gpu_memory_free_mib = (snapshot.gpu_memory_free_mib or 0.0) + value
            elif name == "DCGM_FI_DEV_GPU_UTIL":
                snapshot.gpu_utilization_percent.append(value)
    if not seen_vllm:
        return "no vLLM series in /metrics"
    return snapshot


def _pod_signals(pod: str, s: _Snapshot) -> PodSignals:
    kv = s.kv_cache_usage if s.kv_cache_usage is not None else s.legacy_kv_cache_usage
    util = s.gpu_utilization_percent
    return PodSignals(
        pod=pod,
        sampled_at=s.at,
        waiting=s.waiting,
        running=s.running,
        kv_cache_usage=kv or 0.0,
        asleep=s.awake is not None and s.awake == 0,
        gpu_memory_used_bytes=None if s.gpu_memory_used_mib is None else s.gpu_memory_used_mib * MIB,
        gpu_memory_free_bytes=None if s.gpu_memory_free_mib is None else s.gpu_memory_free_mib * MIB,
        gpu_utilization=sum(util) / len(util) / 100.0 if util else None,
    )


def _increase(current: float, before: float | None) -> float:
    """Counter increase, reading a decrease as a restart from zero."""
    if before is None or current < before:
        return current if before is not None else 0.0
    return current - before


def _bucket_increase(current: dict[tuple, float], before: dict[tuple, float]) -> dict[float, float]:
    """Per-`le` increase of cumulative buckets between two snapshots, summed over engines."""
    increase: dict[float, float] = {}
    for key, value in current.items():
        le = key[-1]
        increase[le] = increase.get(le, 0.0) + _increase(value, before.get(key))
    return increase
