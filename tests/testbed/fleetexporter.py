"""
vLLM metrics for thousands of fake pods, cheaply: one scrape target per namespace.

`FakeVllmExporter` gives every pod its own prometheus-client registry and target; at 3,000
pods that is 3,000 scrapes and 3,000 expositions rendered per scrape interval. `FleetExporter`
serves the same series (vLLM's names and buckets, from exporter.py) for all the pods of a
namespace at `/<namespace>/metrics`, with the `namespace` and `pod` labels in the exposition (as
a federating exporter does), and renders a namespace's text again only when one of its pods
changed. Prometheus keeps those labels: the target has none of its own by those names.

    exporter = FleetExporter().start()
    exporter.add_pod('ns-1', 'chat-7d9f-abcde')
    exporter.set('ns-1', 'chat-7d9f-abcde', waiting=40)
    prometheus.set_targets(exporter.target_groups())
"""
from __future__ import annotations

import dataclasses
import threading

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tests.testbed.exporter import ITL_BUCKETS, SLEEP_STATES, TTFT_BUCKETS, FakeVllmExporter

GAUGES = (("vllm:num_requests_running", "running"), ("vllm:num_requests_waiting", "waiting"),
          ("vllm:kv_cache_usage_perc", "kv_cache_usage"))
COUNTERS = ("vllm:prompt_tokens", "vllm:generation_tokens")
HISTOGRAMS = (("vllm:time_to_first_token_seconds", TTFT_BUCKETS), ("vllm:inter_token_latency_seconds", ITL_BUCKETS))


@dataclasses.dataclass
class FleetPod:
    namespace: str
    name: str
    model: str
    waiting: float = 0.0
    running: float = 0.0
    kv_cache_usage: float = 0.0
    asleep: bool = False

    @property
    def labels(self) -> str:
        return f'namespace="{self.namespace}",pod="{self.name}",model_name="{self.model}",engine="0"'


class FleetExporter(FakeVllmExporter):
    """`histograms=False` leaves out the two latency histograms (42 of a pod's 52 series)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, histograms: bool = True) -> None:
        super().__init__(host, port)
        self.histograms = histograms
        self.fleet: dict[str, dict[str, FleetPod]] = {}  # namespace -> pod name -> pod
        self._rendered: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def add_pod(self, namespace: str, name: str, model: str = "test-model") -> FleetPod:  # type: ignore[override]
        pod = FleetPod(namespace, name, model)
        with self._lock:
            self.fleet.setdefault(namespace, {})[name] = pod
            self._rendered.pop(namespace, None)
        return pod

    def remove_pod(self, namespace: str, name: str) -> None:
        with self._lock:
            self.fleet.get(namespace, {}).pop(name, None)
            self._rendered.pop(namespace, None)

    def set(self, namespace: str, name: str, **values: float | bool) -> None:
        with self._lock:
            pod = self.fleet.get(namespace, {}).get(name)
            if pod is None:
                raise KeyError(f"no pod {namespace}/{name} in the exporter")
            for key, value in values.items():
                setattr(pod, key, value)
            self._rendered.pop(namespace, None)

    def series(self) -> int:
        pods = sum(len(p) for p in self.fleet.values())
        per_pod = len(GAUGES) + len(SLEEP_STATES) + len(COUNTERS)
        if self.histograms:
            per_pod += sum(len(buckets) + 3 for _, buckets in HISTOGRAMS)
        return pods * per_pod

    def target_groups(self, namespaces: list[str] | None = None) -> list[dict]:
        """One file_sd target group per namespace, all on this server."""
        return [{"targets": [self.address], "labels": {"__metrics_path__": self.metrics_path(ns)}}
                for ns in sorted(namespaces if namespaces is not None else self.fleet)]

    async def _metrics(self, request: web.Request) -> web.Response:
        self.requests += 1
        namespace = request.match_info["name"]
        with self._lock:
            body = self._rendered.get(namespace)
            if body is None:
                body = self._rendered[namespace] = self._render(list(self.fleet.get(namespace, {}).values()))
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _render(self, pods: list[FleetPod]) -> bytes:
        lines: list[str] = []
        for name, attribute in GAUGES:
            lines += [f"# TYPE {name} gauge", *(f"{name}{{{p.labels}}} {getattr(p, attribute)}" for p in pods)]
        lines.append("# TYPE vllm:engine_sleep_state gauge")
        for p in pods:
            active = "weights_offloaded" if p.asleep else "awake"
            lines += [f'vllm:engine_sleep_state{{{p.labels},sleep_state="{s}"}} {int(s == active)}'
                      for s in SLEEP_STATES]
        for name in COUNTERS:
            lines += [f"# TYPE {name} counter", *(f"{name}_total{{{p.labels}}} 0.0" for p in pods)]
        if self.histograms:
            for name, buckets in HISTOGRAMS:
                lines.append(f"# TYPE {name} histogram")
                for p in pods:
                    lines += [f'{name}_bucket{{{p.labels},le="{le}"}} 0.0' for le in (*buckets, "+Inf")]
                    lines += [f"{name}_sum{{{p.labels}}} 0.0", f"{name}_count{{{p.labels}}} 0.0"]
        return ("\n".join(lines) + "\n").encode()
