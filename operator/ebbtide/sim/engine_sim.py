"""The state behind one simulated vLLM server: the engine on the wall clock, its per-request
streams, and vLLM's metrics (names, labels and buckets)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from ebbtide.sim.capacity import CapacityModel
from ebbtide.sim.engine_core import EngineCore
from ebbtide.sim.engine_types import EngineBusy, Finished

log = logging.getLogger("ebbtide.engine-sim")

# Bucket boundaries exactly as vLLM publishes them (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

SLEEP_STATES = {0: "awake", 1: "weights_offloaded", 2: "discard_all"}
DEFAULT_MAX_TOKENS = 16
CHARS_PER_TOKEN = 4
TOKEN_TEXT = " tok"


class _Histogram:
    """A histogram that takes weighted observations: a run of decode steps adds its ITL once
    with the number of tokens, instead of once per token."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += count  # le is inclusive
        self.sum += value * count

    def family(self, name: str, doc: str, label_names: list[str], labels: list[str]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=label_names)
        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        family.add_metric(labels, buckets, self.sum)
        return family


class EngineDead(RuntimeError):
    """The engine loop crashed (a bug): like a dead vLLM engine, the server answers 503/500."""


@dataclasses.dataclass
class Stats:
    """What /ebbtide/stats reports: the calls an operator made and what was refused."""

    requests_received: int = 0
    requests_refused_asleep: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    sleep_calls: int = 0
    sleeps_refused: int = 0
    wake_up_calls: int = 0


class EngineSimulator:
    """The state behind one server: the engine, its clock, per-request streams and metrics."""

    def __init__(self, model: CapacityModel, *, model_path: str, served_model_name: str | None = None,
                 sleep_routes: bool = False, min_tick: float = 0.005) -> None:
        self.model = model
        self.model_path = model_path
        self.served_model_name = served_model_name or model_path
        self.sleep_routes = sleep_routes
        self.min_tick = min_tick
        self.core = EngineCore(model, emit_tokens=True)
        self.stats = Stats()
        self._t0 = time.monotonic()
        self.created = int(time.time())
        self._streams: dict[str, asyncio.Queue] = {}
        self._kick = asyncio.Event()
        self._waking: asyncio.Task | None = None
        self.dead = False  # the engine loop crashed: /health says 503, as vLLM's does
        self._success: dict[str, int] = {"stop": 0, "length": 0, "abort": 0}
        self._ttft = _Histogram(TTFT_BUCKETS)
        self._itl = _Histogram(ITL_BUCKETS)
        self._tpot = _Histogram(ITL_BUCKETS)
        self._e2e = _Histogram(REQUEST_LATENCY_BUCKETS)
        self._queue = _Histogram(REQUEST_LATENCY_BUCKETS)
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def now(self) -> float:
        return time.monotonic() - self._t0

    @property
    def asleep(self) -> bool:
        """Asleep or still waking: either way no request may be served."""
        return self.core.is_sleeping

    # -- the engine loop ---------------------------------------------------------------------

    async def drive(self) -> None:
        """Advance the engine with the clock; sleep until the step in flight ends, or until a
        request arrives when idle."""
        try:
            while True:
                self.advance()
                next_event = self.core.next_event_time()
                if next_event is None:
                    self._kick.clear()
                    await self._kick.wait()
                else:
                    # Waking once per step is plenty; min_tick coalesces very short steps.
                    await asyncio.sleep(max(next_event - self.now(), self.min_tick))
        except Exception:
            log.exception("engine loop crashed")
            self.dead = True
            for queue in self._streams.values():
                queue.put_nowait(None)  # fail the waiting handlers instead of hanging them
            raise

    def advance(self) -> None:
        for event in self.core.advance(self.now()):
            queue = self._streams.get(event.request_id)
            if isinstance(event, Finished):
                self._record_finished(event)
            if queue is not None:
                queue.put_nowait(event)
        for itl, count in self.core.take_itl_samples():
            self._itl.observe(itl, count)

    def _record_finished(self, event: Finished) -> None:
        self._success[event.reason] += 1
        if event.reason == "abort":
            self.stats.requests_aborted += 1
            return
        self.stats.requests_finished += 1
        self._ttft.observe(event.ttft)
        self._e2e.observe(event.e2e)
        self._queue.observe(event.queue_time)
        if event.mean_itl is not None:
            self._tpot.observe(event.mean_itl)

    def submit(self, request_id: str, prompt_tokens: int, max_tokens: int) -> asyncio.Queue:
        if self.dead:
            raise EngineDead("the engine loop has crashed")
        self.core.submit(request_id, prompt_tokens, max_tokens, self.now())
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        self._kick.set()
        return queue

    def release(self, request_id: str, finished: bool) -> None:
        """Forget a request's stream; abort it in the engine if the client left early."""
        self._streams.pop(request_id, None)
        if not finished:
            self.advance()  # it may have finished in the meantime
            event = self.core.abort(request_id, self.now())
            if event is not None:
                self._record_finished(event)

    # -- sleep -------------------------------------------------------------------------------

    def sleep(self, level: int) -> None:
        """Raises EngineBusy when requests are in flight, or while waking up."""
        if self._waking is not None:
            raise EngineBusy("engine is waking up")
        self.advance()
        self.core.sleep(level)

    async def wake_up(self) -> None:
        if not self.core.is_sleeping:
            return
        if self._waking is None:
            self._waking = asyncio.get_running_loop().create_task(self._wake(self.core.sleep_level))
        # A caller that disconnects must not cancel the wake-up others wait for.
        await asyncio.shield(self._waking)

    async def _wake(self, level: int) -> None:
        try:
            await asyncio.sleep(self.model.wake_seconds(level))
            self.core.wake_up()
        finally:
            self._waking = None

    # -- metrics -----------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        self.advance()
        core, names, values = self.core, ["engine", "model_name"], ["0", self.served_model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            return family

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.", core.num_running)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", core.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", core.kv_cache_usage)
        sleep_state = GaugeMetricFamily("vllm:engine_sleep_state", "Engine sleep state; 1 on the active state.",
                                        labels=[*names, "sleep_state"])
        for level, state in SLEEP_STATES.items():
            sleep_state.add_metric([*values, state], 1.0 if core.sleep_level == level else 0.0)
        yield sleep_state
        info = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                                 labels=["block_size", "engine", "num_gpu_blocks"])
        info.add_metric([str(self.model.block_size), "0", str(self.model.num_gpu_blocks)], 1.0)
        yield info
        yield counter("vllm:num_preemptions", "Cumulative number of preemptions from the engine.",
                      core.preemptions_total)
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", core.prompt_tokens_total)
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.",
                      core.generation_tokens_total)
        success = CounterMetricFamily("vllm:request_success", "Count of successfully processed requests.",
                                      labels=[*names, "finished_reason"])
        for reason, count in self._success.items():
            success.add_metric([*values, reason], count)
        yield success
        yield self._ttft.family("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                                names, values)
        yield self._itl.family("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                               names, values)
        yield self._tpot.family("vllm:request_time_per_output_token_seconds",
                                "Histogram of time_per_output_token_seconds per request.", names, values)
        yield self._e2e.family("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                               names, values)
        yield self._queue.family("vllm:request_queue_time_seconds",
                                 "Histogram of time spent in WAITING phase for request.", names, values)
        yield counter("ebbtide_sim_requests_refused_asleep", "Requests refused because the engine was asleep.",
                      self.stats.requests_refused_asleep)
