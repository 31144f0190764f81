"""Signals for the whole fleet from Prometheus, in a fixed number of queries per tick.

Every query aggregates `by (namespace, pod)` (and `le` for histograms) over all services at
once; results are mapped back to services in Python through (namespace, pod). So the number of
HTTP queries per `observe()` is `len(QUERY_NAMES)` whether the fleet has one service or five
hundred, and whatever quantiles or windows those services ask for:

- latency quantiles are not computed by PromQL (one `histogram_quantile` per quantile would
  mean one query per distinct quantile); the per-pod bucket rates are fetched once and each
  service's quantile is computed here from the sum of its pods' buckets, with the same
  arithmetic as PromQL (signals/quantiles.py);
- windows: services may ask for different `metricsWindowSeconds`. Using only the largest one
  would silently smooth the signals of services that asked for a short window (slower
  reaction than configured); one query per distinct window would make the query count depend
  on the fleet's configuration. Instead each windowed query computes every distinct window in
  the same request, tagged with an `ebbtide_window` label (`label_replace(...) or ...`): one
  HTTP query per signal, and each service gets exactly its own window. The query text grows
  with the number of distinct windows, which in practice is one or two.

- pods: only those of the services asked about (a tick asks about those due: a third of the
  fleet at the default interval and tick), named in the query, up to MAX_NAMED_PODS;
- histograms: their buckets are the bulk of a fleet's series; they are read second, only for
  the pods that served requests in the window (see `queries()`).

All queries are evaluated at the same instant (`time=now`), so they describe one moment; they
are sent side by side, a few at a time.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import re
import threading
import time
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import requests
from prometheus_api_client import PrometheusApiClientException, PrometheusConnect
from urllib3.util.retry import Retry

from ebbtide.policy.observation import PodSignals, Signals
from ebbtide.signals.quantiles import parse_le, quantile_or_none, sum_buckets

if TYPE_CHECKING:
    from ebbtide.api.spec import InferenceServiceSpec

log = logging.getLogger(__name__)

SOURCE = "prometheus"
MIB = 1024 * 1024
WINDOW_LABEL = "ebbtide_window"
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-]+")  # needs no escaping inside a PromQL regex string

# The signals fetched each tick, one HTTP query each.
QUERY_NAMES = (
    "sampled_at",
    "waiting",
    "running",
    "kv_cache_usage",
    "awake",
    "tokens_per_second",
    "prompt_tokens_per_second",
    "requests_per_second",
    "ttft_served",
    "tpot_served",
    "gpu_memory_used",
    "gpu_memory_free",
    "gpu_utilization",
    "ttft_buckets",  # these two after the others, for the pods served only (see queries())
    "tpot_buckets",
)
HISTOGRAMS = ("ttft_buckets", "tpot_buckets")
MAX_NAMED_PODS = 2000  # pods named in a query (~60 KB of URL, in the limit of Prometheus's 1 MiB); more: all


@dataclass(frozen=True)
class ServiceQuery:
    """What to observe for one service: its pods (from the Kubernetes API) and its SLO quantiles."""

    key: Hashable  # returned as the key of observe()'s result, e.g. "namespace/name"
    namespace: str
    pods: tuple[str, ...]
    ttft_quantile: float | None = 0.9  # None: no TTFT target, skip it
    tpot_quantile: float | None = 0.9
    window_seconds: int = 60  # for rates and quantiles

    @classmethod
    def for_spec(cls, key: Hashable, namespace: str, pods: Iterable[str], spec: InferenceServiceSpec) -> ServiceQuery:
        targets = spec.scaling.targets
        return cls(
            key=key,
            namespace=namespace,
            pods=tuple(pods),
            ttft_quantile=targets.ttft.quantile if targets.ttft else None,
            tpot_quantile=targets.tpot.quantile if targets.tpot else None,
            window_seconds=spec.scaling.behavior.metrics_window_seconds,
        )


class PrometheusUnavailable(Exception):
    """Prometheus could not be asked or did not answer properly."""


class PrometheusSource:
    """Observes every service from one Prometheus (see the module docstring for the queries).

    `selector` is added to every vLLM series selector (for example `job="vllm"`); the DCGM
    series come from another exporter and are not filtered by it. `namespace_label` and
    `pod_label` name the target labels that identify a pod (the Prometheus Operator and the
    usual Kubernetes SD relabeling produce `namespace` and `pod`).
    """

    def __init__(
        self,
        url: str,
        timeout: float = 5.0,
        selector: str = "",
        namespace_label: str = "namespace",
        pod_label: str = "pod",
        headers: dict[str, str] | None = None,
    ):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.selector = selector
        self.namespace_label = namespace_label
        self.pod_label = pod_label
        # No retries inside a tick: a failed tick is reported as missing data, the next tick retries.
        self._client = PrometheusConnect(
            url=self.url, headers=headers, retry=Retry(total=0, read=False, raise_on_status=False), timeout=timeout
        )
        # A few at a time: Prometheus evaluates each query on one core, and the rest wait.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="prometheus")
        self._counting = threading.Lock()  # the counts below, from the pool's threads
        self.queries_made = 0  # HTTP queries sent since creation
        self.last_queries = 0  # HTTP queries sent by the last observe()
        self.failing = False  # the last observation failed as a whole: every service's signals `missing`

    queries_per_observe = len(QUERY_NAMES)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    # --- the tick ---

    def observe(self, services: Sequence[ServiceQuery], now: float) -> dict[Hashable, Signals]:
        """Signals of every service at `now` (unix seconds). Never raises: failures become
        `Signals.missing(...)` for every service."""
        self.last_queries = 0
        if not services:
            return {}
        # `timeout` bounds the whole tick, not each query: a Prometheus that answers every query
        # slowly must not hold the control loop for 11 timeouts.
        deadline = time.monotonic() + self.timeout
        try:
            first = self._query_all({name: q for name, q in self.queries(services).items()
                                     if name not in HISTOGRAMS}, now, deadline)
            served = {labels[self.pod_label] for name in ("ttft_served", "tpot_served") for labels in
                      (r["metric"] for r in first[name]) if self.pod_label in labels}
            second = self.queries(services, served)
            results = {**first, **self._query_all({name: second[name] for name in HISTOGRAMS}, now, deadline)}
            observed = self._assemble(services, results)
        except PrometheusUnavailable as error:
            return self._failed(services, str(error))
        except Exception as error:  # a bug in parsing must not stop the operator's loop either
            log.exception("unexpected error querying Prometheus at %s", self.url)
            return self._failed(services, f"Prometheus query failed at {self.url}: {error!r}")
        if self.failing:
            log.info("Prometheus at %s answers again", self.url)
            self.failing = False
        return observed

    def queries(self, services: Sequence[ServiceQuery], served: Iterable[str] = ()) -> dict[str, str]:
        """The PromQL of one tick, by signal name (public so that it can be shown and tested).

        The latency histograms come second: only for the pods `served` (the pod names with
        requests in the window, from the first queries' `*_served`). Their buckets are ~40
        series a pod; rated for every pod of 1,000 services, each histogram took Prometheus longer
        than the tick (bench/operator_scale.py), for idle pods whose buckets add nothing."""
        namespaces = sorted({s.namespace for s in services})
        windows = sorted({s.window_seconds for s in services})
        # Only the services' namespaces: less work on a Prometheus shared with the rest of the cluster.
        plain = all(_PLAIN_NAME.fullmatch(ns) for ns in namespaces)
        scope = f'{self.namespace_label}=~"{"|".join(namespaces)}"' if plain else ""
        # Only the services' pods (the others' series would be read and dropped); the histograms
        # only the pods served (none served: `pod=~""` selects nothing, every series has a pod).
        asked = self._named(sorted({pod for s in services for pod in s.pods}))
        vllm = ", ".join(m for m in (scope, self.selector, asked) if m)
        awake = ", ".join(m for m in ('sleep_state="awake"', vllm) if m)
        pods = ", ".join(m for m in (scope, self.selector, self._named(sorted(set(served))) or asked) if m)
        by = f"by ({self.namespace_label}, {self.pod_label})"
        by_le = f"by ({self.namespace_label}, {self.pod_label}, le)"

        def per_window(template: str) -> str:
            return " or ".join(
                f'label_replace({template.replace("[WINDOW]", f"[{w}s]")}, "{WINDOW_LABEL}", "{w}", "", "")' for w in windows
            )

        return {
            # The newest sample's own time, so stale series can be told from fresh ones.
            "sampled_at": f"max {by} (timestamp(vllm:num_requests_waiting{{{vllm}}}))",
            # A pod may run several data-parallel engines (label `engine`): queues add up.
            "waiting": f"sum {by} (vllm:num_requests_waiting{{{vllm}}})",
            "running": f"sum {by} (vllm:num_requests_running{{{vllm}}})",
            # The fullest engine is the one about to preempt. Old name (before vLLM 0.9.2) as fallback.
            "kv_cache_usage": f"max {by} (vllm:kv_cache_usage_perc{{{vllm}}})"
            f" or max {by} (vllm:gpu_cache_usage_perc{{{vllm}}})",
            # 1 while any engine of the pod is awake; no series at all on vLLM without sleep mode.
            "awake": f"max {by} (vllm:engine_sleep_state{{{awake}}})",
            "tokens_per_second": per_window(
                f"(sum {by} (rate(vllm:prompt_tokens_total{{{vllm}}}[WINDOW]))"
                f" + sum {by} (rate(vllm:generation_tokens_total{{{vllm}}}[WINDOW])))"
            ),
            # The mix: prompt tokens cost a replica less than generated ones (policy/performance.py).
            "prompt_tokens_per_second": per_window(f"sum {by} (rate(vllm:prompt_tokens_total{{{vllm}}}[WINDOW]))"),
            "requests_per_second": per_window(f"sum {by} (rate(vllm:request_success_total{{{vllm}}}[WINDOW]))"),
            # The pods with requests in the window (a histogram's count, one series a pod).
            "ttft_served": f"sum {by} (rate(vllm:time_to_first_token_seconds_count{{{vllm}}}[{windows[-1]}s])) > 0",
            # inter_token_latency_seconds replaced time_per_output_token_seconds (same buckets).
            "tpot_served": f"sum {by} (rate(vllm:inter_token_latency_seconds_count{{{vllm}}}[{windows[-1]}s])) > 0"
            f" or sum {by} (rate(vllm:time_per_output_token_seconds_count{{{vllm}}}[{windows[-1]}s])) > 0",
            # DCGM exporter, where the cluster has it (MiB and percent); one pod may hold several GPUs.
            "gpu_memory_used": f"sum {by} (DCGM_FI_DEV_FB_USED{{{scope}}})",
            "gpu_memory_free": f"sum {by} (DCGM_FI_DEV_FB_FREE{{{scope}}})",
            "gpu_utilization": f"avg {by} (DCGM_FI_DEV_GPU_UTIL{{{scope}}})",
            # Second: only for the pods served (see above).
            "ttft_buckets": per_window(f"sum {by_le} (rate(vllm:time_to_first_token_seconds_bucket{{{pods}}}[WINDOW]))"),
            "tpot_buckets": per_window(
                f"(sum {by_le} (rate(vllm:inter_token_latency_seconds_bucket{{{pods}}}[WINDOW]))"
                f" or sum {by_le} (rate(vllm:time_per_output_token_seconds_bucket{{{pods}}}[WINDOW])))"
            ),
        }

    def _named(self, pods: list[str]) -> str:
        """A matcher of these pods by name (DNS labels need no escaping); "" (all) past MAX_NAMED_PODS."""
        return f'{self.pod_label}=~"{"|".join(pods)}"' if len(pods) <= MAX_NAMED_PODS else ""

    def read_value(self, promql: str, now: float) -> float:
        """The sum of a user's query (an activation query) at `now`; 0 when it returns no
        series, as KEDA reads it. Raises PrometheusUnavailable with the reason.

        One HTTP query per call: it is asked only for services with no replica awake, and a
        user's query cannot be batched with others without one bad query failing them all.
        """
        result = self._query(promql, now, time.monotonic() + self.timeout)
        try:
            if result and not isinstance(result[0], dict):  # a scalar result: [time, "value"]
                values = [float(result[1])]
            else:  # a vector: the series' values
                values = [float(r["value"][1]) for r in result]
        except (TypeError, ValueError, KeyError, IndexError) as error:
            raise PrometheusUnavailable(f"activation query returned something unreadable: {error!r}") from None
        return sum(v for v in values if math.isfinite(v))

    # --- HTTP ---

    def _query_all(self, queries: dict[str, str], now: float, deadline: float) -> dict[str, list[dict]]:
        """The queries side by side: one after the other, the two histograms' alone took longer
        than the budget at 1,000 services (bench/operator_scale.py)."""
        asked = {name: self._pool.submit(self._query, promql, now, deadline) for name, promql in queries.items()}
        done, waiting = concurrent.futures.wait(asked.values(), timeout=max(0.0, deadline - time.monotonic()),
                                                return_when=concurrent.futures.FIRST_EXCEPTION)
        for future in waiting:  # the first failure ends the observation: the queries not sent yet are not
            future.cancel()
        for future in done:
            future.result()  # raises the failure
        if waiting:
            raise PrometheusUnavailable(f"Prometheus unreachable at {self.url}: no answer within {self.timeout:g} s")
        return {name: future.result() for name, future in asked.items()}

    def _query(self, promql: str, now: float, deadline: float) -> list[dict]:
        too_slow = PrometheusUnavailable(f"Prometheus unreachable at {self.url}: no answer within {self.timeout:g} s")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise too_slow
        with self._counting:
            self.queries_made += 1
            self.last_queries += 1
        try:
            return self._client.custom_query(promql, params={"time": f"{now:.3f}"}, timeout=remaining)
        except requests.Timeout:
            raise too_slow from None
        except requests.ConnectionError as error:
            raise PrometheusUnavailable(f"Prometheus unreachable at {self.url}: {_short_reason(error)}") from None
        except (PrometheusApiClientException, requests.RequestException, ValueError, KeyError) as error:
            raise PrometheusUnavailable(f"Prometheus query failed at {self.url}: {str(error)[:300]}") from None

    def _failed(self, services: Sequence[ServiceQuery], error: str) -> dict[Hashable, Signals]:
        if not self.failing:
            log.warning("%s; services decide on their last samples until staleAfterSeconds, then hold", error)
            self.failing = True
        else:
            log.debug("%s (still)", error)
        return {service.key: Signals.missing(error, source=SOURCE) for service in services}

    # --- mapping results to services ---

    def _assemble(self, services: Sequence[ServiceQuery], results: dict[str, list[dict]]) -> dict[Hashable, Signals]:
        windowed = ("tokens_per_second", "prompt_tokens_per_second", "requests_per_second", "ttft_buckets",
                    "tpot_buckets")
        per_pod = {name: self._by_pod(results[name]) for name in QUERY_NAMES
                   if name not in windowed and not name.endswith("_served")}
        tokens = self._by_window_pod(results["tokens_per_second"])
        prompt = self._by_window_pod(results["prompt_tokens_per_second"])
        finished = self._by_window_pod(results["requests_per_second"])
        ttft = self._buckets(results["ttft_buckets"])
        tpot = self._buckets(results["tpot_buckets"])

        observed: dict[Hashable, Signals] = {}
        for service in services:
            pods = []
            for pod in service.pods:
                key = (service.namespace, pod)
                sampled_at = per_pod["sampled_at"].get(key)
                if sampled_at is None:
                    continue  # no series for this pod (not started, not scraped, or gone stale)
                awake = per_pod["awake"].get(key)
                used = per_pod["gpu_memory_used"].get(key)
                free = per_pod["gpu_memory_free"].get(key)
                utilization = per_pod["gpu_utilization"].get(key)
                pods.append(
                    PodSignals(
                        pod=pod,
                        sampled_at=sampled_at,
                        waiting=per_pod["waiting"].get(key, 0.0),
                        running=per_pod["running"].get(key, 0.0),
                        kv_cache_usage=per_pod["kv_cache_usage"].get(key, 0.0),
                        asleep=awake is not None and awake == 0,
                        gpu_memory_used_bytes=None if used is None else used * MIB,
                        gpu_memory_free_bytes=None if free is None else free * MIB,
                        gpu_utilization=None if utilization is None else utilization / 100.0,
                    )
                )
            keys = [(service.window_seconds, service.namespace, pod) for pod in service.pods]
            pod_tokens = [tokens[k] for k in keys if k in tokens]
            pod_prompt = [prompt[k] for k in keys if k in tokens and k in prompt]
            pod_finished = [finished[k] for k in keys if k in tokens and k in finished]
            if not pods:
                error = (
                    f"no vLLM metrics in Prometheus for pods {', '.join(service.pods)} in namespace {service.namespace}"
                    if service.pods
                    else None
                )
                observed[service.key] = Signals(source=SOURCE, sampled_at=None, error=error)
                continue
            observed[service.key] = Signals(
                source=SOURCE,
                sampled_at=max(p.sampled_at for p in pods),
                pods=tuple(pods),
                ttft_seconds=quantile_or_none(service.ttft_quantile, sum_buckets(ttft[k] for k in keys if k in ttft)),
                tpot_seconds=quantile_or_none(service.tpot_quantile, sum_buckets(tpot[k] for k in keys if k in tpot)),
                tokens_per_second=sum(pod_tokens) if pod_tokens else None,
                # Over the same pods as the total, or not at all: a partial sum would skew the mix.
                prompt_tokens_per_second=sum(pod_prompt) if pod_tokens and len(pod_prompt) == len(pod_tokens) else None,
                requests_per_second=sum(pod_finished) if pod_tokens and len(pod_finished) == len(pod_tokens) else None,
            )
        return observed

    def _pod_key(self, labels: dict[str, str]) -> tuple[str, str] | None:
        namespace, pod = labels.get(self.namespace_label), labels.get(self.pod_label)
        return (namespace, pod) if namespace is not None and pod is not None else None

    def _by_pod(self, result: list[dict]) -> dict[tuple[str, str], float]:
        values = {}
        for item in result:
            key = self._pod_key(item["metric"])
            value = float(item["value"][1])
            if key is not None and not math.isnan(value):
                values[key] = value
        return values

    def _by_window_pod(self, result: list[dict]) -> dict[tuple[int, str, str], float]:
        values = {}
        for item in result:
            key = self._pod_key(item["metric"])
            value = float(item["value"][1])
            if key is not None and not math.isnan(value):
                values[(int(item["metric"][WINDOW_LABEL]), *key)] = value
        return values

    def _buckets(self, result: list[dict]) -> dict[tuple[int, str, str], dict[float, float]]:
        histograms: dict[tuple[int, str, str], dict[float, float]] = {}
        for item in result:
            key = self._pod_key(item["metric"])
            le = item["metric"].get("le")
            if key is None or le is None:
                continue
            histogram = histograms.setdefault((int(item["metric"][WINDOW_LABEL]), *key), {})
            histogram[parse_le(le)] = float(item["value"][1])
        return histograms


def _short_reason(error: Exception) -> str:
    """'[Errno 111] Connection refused' out of requests' long nested message."""
    match = re.search(r"\[Errno -?\d+\] [^'\")]+", str(error))
    return match.group(0).strip() if match else type(error).__name__
