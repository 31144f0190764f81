"""A small vLLM-metrics exporter for tests: many fake pods behind one HTTP server.

Each `FakeVllmPod` owns a prometheus-client registry with vLLM's real series names, labels
and histogram buckets (see /work/shared/reference/vllm.md), and the test sets their values.
All pods are served by one aiohttp server running in a background thread, each at its own
path (`/<name>/metrics`), so that fifty "pods" cost one port. The pod and namespace labels are
not in the exposition, as with real vLLM: Prometheus adds them from the scrape target
(`target_group()` builds the file_sd entry, with `__metrics_path__` pointing at the pod).

    with FakeVllmExporter() as exporter:
        pod = exporter.add_pod("a-p1")
        pod.set(waiting=3, running=8, kv_cache_usage=0.5)
        pod.observe_ttft(0.3, count=10)
        prometheus.set_targets([exporter.target_group("a-p1", namespace="ns-a", pod="p-1")])
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")


class FakeVllmPod:
    """The /metrics of one vLLM engine, with values the test sets.

    `legacy_names=True` exposes the names of vLLM before 0.9.2 / 0.11
    (`vllm:gpu_cache_usage_perc`, `vllm:time_per_output_token_seconds`) instead of the new
    ones. `up = False` makes the route answer 503, as a dead or unreachable pod would.
    """

    def __init__(self, name: str, model: str = "test-model", engine: str = "0", legacy_names: bool = False):
        self.name = name
        self.up = True
        self.registry = CollectorRegistry()
        labels = ["model_name", "engine"]
        self._labels = (model, engine)
        kv_name = "vllm:gpu_cache_usage_perc" if legacy_names else "vllm:kv_cache_usage_perc"
        itl_name = "vllm:time_per_output_token_seconds" if legacy_names else "vllm:inter_token_latency_seconds"
        r = self.registry
        self._running = Gauge("vllm:num_requests_running", "Requests in the running batch.", labels, registry=r)
        self._waiting = Gauge("vllm:num_requests_waiting", "Requests waiting.", labels, registry=r)
        self._kv = Gauge(kv_name, "KV-cache usage, 1 means 100 percent.", labels, registry=r)
        self._sleep = Gauge("vllm:engine_sleep_state", "Engine sleep state.", [*labels, "sleep_state"], registry=r)
        self._prompt = Counter("vllm:prompt_tokens", "Prefill tokens processed.", labels, registry=r)
        self._generation = Counter("vllm:generation_tokens", "Generation tokens processed.", labels, registry=r)
        self._ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", labels,
                               buckets=TTFT_BUCKETS, registry=r)
        self._itl = Histogram(itl_name, "Inter-token latency.", labels, buckets=ITL_BUCKETS, registry=r)
        self._gpu: tuple[Gauge, Gauge, Gauge] | None = None
        self.set(waiting=0, running=0, kv_cache_usage=0, asleep=False)
        # Histograms and counters appear at 0 from the start, as vLLM's do once the engine is up.
        self._ttft.labels(*self._labels)
        self._itl.labels(*self._labels)
        self._prompt.labels(*self._labels)
        self._generation.labels(*self._labels)

    def set(self, waiting: float | None = None, running: float | None = None,
            kv_cache_usage: float | None = None, asleep: bool | None = None) -> FakeVllmPod:
        if waiting is not None:
            self._waiting.labels(*self._labels).set(waiting)
        if running is not None:
            self._running.labels(*self._labels).set(running)
        if kv_cache_usage is not None:
            self._kv.labels(*self._labels).set(kv_cache_usage)
        if asleep is not None:
            active = "weights_offloaded" if asleep else "awake"
            for state in SLEEP_STATES:
                self._sleep.labels(*self._labels, state).set(1 if state == active else 0)
        return self

    def observe_ttft(self, seconds: float, count: int = 1) -> None:
        for _ in range(count):
            self._ttft.labels(*self._labels).observe(seconds)

    def observe_itl(self, seconds: float, count: int = 1) -> None:
        for _ in range(count):
            self._itl.labels(*self._labels).observe(seconds)

    def add_tokens(self, prompt: float = 0, generated: float = 0) -> None:
        self._prompt.labels(*self._labels).inc(prompt)
        self._generation.labels(*self._labels).inc(generated)

    def set_gpu(self, used_mib: float, free_mib: float, util_percent: float, gpu: str = "0") -> None:
        """DCGM exporter series (normally another exporter's; here on the pod's target for brevity)."""
        if self._gpu is None:
            gpu_labels = ["gpu", "UUID", "modelName"]
            self._gpu = (
                Gauge("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", gpu_labels, registry=self.registry),
                Gauge("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", gpu_labels, registry=self.registry),
                Gauge("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", gpu_labels, registry=self.registry),
            )
        labels = (gpu, f"GPU-{self.name}-{gpu}", "NVIDIA H100 80GB HBM3")
        for gauge, value in zip(self._gpu, (used_mib, free_mib, util_percent), strict=True):
            gauge.labels(*labels).set(value)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class FakeVllmExporter:
    """One aiohttp server on a free loopback port serving many `FakeVllmPod`s at `/<name>/metrics`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        self.port = port
        self.pods: dict[str, FakeVllmPod] = {}
        self.requests = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    # --- pods ---

    def add_pod(self, name: str, **kwargs) -> FakeVllmPod:
        if "/" in name or not name:
            raise ValueError(f"pod path name must be one non-empty path segment, got {name!r}")
        pod = FakeVllmPod(name, **kwargs)
        self.pods[name] = pod
        return pod

    def add_pods(self, names: Iterable[str], **kwargs) -> list[FakeVllmPod]:
        return [self.add_pod(name, **kwargs) for name in names]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def metrics_path(self, name: str) -> str:
        return f"/{name}/metrics"

    def metrics_url(self, name: str) -> str:
        return f"http://{self.address}{self.metrics_path(name)}"

    def target_group(self, name: str, namespace: str, pod: str, **labels: str) -> dict:
        """A file_sd target group that scrapes pod `name` and labels it as Kubernetes would."""
        return {
            "targets": [self.address],
            "labels": {"namespace": namespace, "pod": pod, "__metrics_path__": self.metrics_path(name), **labels},
        }

    # --- server ---

    async def _metrics(self, request: web.Request) -> web.Response:
        self.requests += 1
        pod = self.pods.get(request.match_info["name"])
        if pod is None:
            return web.Response(status=404, text="no such pod\n")
        if not pod.up:
            return web.Response(status=503, text="engine down\n")
        body = pod.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def start(self) -> FakeVllmExporter:
        started = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                app = web.Application()
                app.router.add_get("/{name}/metrics", self._metrics)
                self._runner = web.AppRunner(app, access_log=None)
                loop.run_until_complete(self._runner.setup())
                site = web.TCPSite(self._runner, self.host, self.port)
                loop.run_until_complete(site.start())
                self.port = site._server.sockets[0].getsockname()[1]  # the port the OS chose for 0
            except BaseException as error:  # reported to start()'s caller
                failure.append(error)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name="fake-vllm-exporter", daemon=True)
        self._thread.start()
        started.wait(10)
        if failure:
            raise RuntimeError(f"fake vLLM exporter failed to start: {failure[0]!r}") from failure[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._thread = None
        self._loop = None

    def __enter__(self) -> FakeVllmExporter:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
