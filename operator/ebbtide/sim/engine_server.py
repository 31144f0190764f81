"""`ebbtide engine-sim`: an HTTP server that behaves like one vLLM replica, without a GPU.

It serves vLLM's OpenAI routes, /health, /metrics (vLLM's names, labels and buckets) and the
dev-mode sleep routes, and runs requests through EngineCore on the wall clock, so latencies,
queueing, KV-cache pressure and preemptions follow the CapacityModel in use.

Where it is deliberately stricter than vLLM: a request reaching a sleeping or waking engine gets
503, and /sleep with requests in flight gets 409 (real vLLM has crashed in both cases); both are
counted on GET /ebbtide/stats so tests can assert they never happened.

Request size: prompt tokens are estimated as ceil(characters / 4) of the prompt (or messages),
unless the body has `"ebbtide_prompt_tokens": N`; output is exactly max_tokens (default 16),
as with vLLM's ignore_eos.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import socket
import sys
import time
import uuid
from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sequence

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from ebbtide.arguments import Parser, port
from ebbtide.sim.capacity import PRESETS, CapacityModel, get_preset
from ebbtide.sim.engine_core import EngineBusy, EngineCore, EngineSleeping, Finished, FirstToken, Tokens

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


# -- HTTP ----------------------------------------------------------------------------------

def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": status}},
                             status=status)


def _estimate_prompt_tokens(body: Mapping, chat: bool) -> int:
    explicit = body.get("ebbtide_prompt_tokens")
    if explicit is not None:
        if not isinstance(explicit, int) or isinstance(explicit, bool) or explicit < 1:
            raise ValueError("ebbtide_prompt_tokens must be a positive integer")
        return explicit
    chars = 0
    if chat:
        for message in body.get("messages") or []:
            content = message.get("content") if isinstance(message, Mapping) else None
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):
                chars += sum(len(p.get("text", "")) for p in content if isinstance(p, Mapping))
    else:
        prompt = body.get("prompt", "")
        if isinstance(prompt, str):
            chars = len(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return len(prompt)  # token ids
        elif isinstance(prompt, list):
            chars = sum(len(p) for p in prompt if isinstance(p, str))
    return max(1, math.ceil(chars / CHARS_PER_TOKEN))


def _max_tokens(body: Mapping, chat: bool) -> int:
    value = body.get("max_completion_tokens") if chat else None
    if value is None:
        value = body.get("max_tokens")
    if value is None:
        return DEFAULT_MAX_TOKENS
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError("max_tokens must be a positive integer")
    return value


class _Routes:
    def __init__(self, sim: EngineSimulator) -> None:
        self.sim = sim

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=503 if self.sim.dead else 200)  # 200 while asleep too, like vLLM

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "ebbtide-engine-sim"})

    async def models(self, request: web.Request) -> web.Response:
        sim = self.sim
        return web.json_response({"object": "list", "data": [{
            "id": sim.served_model_name, "object": "model", "created": sim.created, "owned_by": "vllm",
            "root": sim.model_path, "parent": None, "max_model_len": sim.model.max_model_len}]})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.sim.registry),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def stats(self, request: web.Request) -> web.Response:
        sim = self.sim
        return web.json_response({**dataclasses.asdict(sim.stats), "is_sleeping": sim.asleep,
                                  "sleep_level": sim.core.sleep_level, "num_running": sim.core.num_running,
                                  "num_waiting": sim.core.num_waiting})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        sim = self.sim
        sim.stats.requests_received += 1
        if sim.asleep:
            sim.stats.requests_refused_asleep += 1
            log.warning("refused a request: engine is asleep")
            return _error(503, "The engine is sleeping; wake it up with POST /wake_up first.",
                          "ServiceUnavailableError")
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("request body must be a JSON object")
            prompt_tokens = _estimate_prompt_tokens(body, chat)
            max_tokens = _max_tokens(body, chat)
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            return _error(400, str(exc), "BadRequestError")
        model = body.get("model")
        if model is not None and model != sim.served_model_name:
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError")
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        try:
            queue = sim.submit(request_id, prompt_tokens, max_tokens)
        except EngineSleeping as exc:  # unreachable after the check above, kept for safety
            sim.stats.requests_refused_asleep += 1
            return _error(503, str(exc), "ServiceUnavailableError")
        except EngineDead as exc:
            return _error(500, str(exc), "InternalServerError")
        except ValueError as exc:
            return _error(400, str(exc), "BadRequestError")
        finished = False
        try:
            if body.get("stream"):
                response = await self._stream(request, body, chat, request_id, queue)
            else:
                response = await self._complete(chat, request_id, queue, prompt_tokens, max_tokens)
            finished = True
            return response
        finally:
            sim.release(request_id, finished)

    async def _complete(self, chat: bool, request_id: str, queue: asyncio.Queue, prompt_tokens: int,
                        max_tokens: int) -> web.Response:
        while not isinstance(event := await queue.get(), Finished):
            if event is None:
                return _error(500, "the engine loop has crashed", "InternalServerError")
        text = TOKEN_TEXT * max_tokens
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": "length"}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
        return web.json_response({
            "id": request_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": self.sim.served_model_name, "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens,
                      "total_tokens": prompt_tokens + max_tokens}})

    async def _stream(self, request: web.Request, body: Mapping, chat: bool, request_id: str,
                      queue: asyncio.Queue) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        created, model = int(time.time()), self.sim.served_model_name

        def chunk(delta_text: str | None, finish_reason: str | None = None, role: bool = False) -> str:
            if chat:
                delta: dict = {"role": "assistant", "content": ""} if role else {}
                if delta_text is not None:
                    delta["content"] = delta_text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish_reason}
            payload = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                       "created": created, "model": model, "choices": [choice]}
            return f"data: {json.dumps(payload)}\n\n"

        if chat:
            await response.write(chunk(None, role=True).encode())
        while True:
            event = await queue.get()
            if isinstance(event, FirstToken):
                await response.write(chunk(TOKEN_TEXT).encode())
            elif isinstance(event, Tokens):
                await response.write("".join(chunk(TOKEN_TEXT) for _ in range(event.count)).encode())
            elif event is None:  # engine crashed: end the stream without [DONE]
                await response.write_eof()
                return response
            else:
                break
        tail = [chunk(None if chat else "", "length")]
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.output_tokens,
                     "total_tokens": event.prompt_tokens + event.output_tokens}
            tail.append("data: " + json.dumps({
                "id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": model, "choices": [], "usage": usage}) + "\n\n")
        tail.append("data: [DONE]\n\n")
        await response.write("".join(tail).encode())
        await response.write_eof()
        return response

    async def sleep(self, request: web.Request) -> web.Response:
        sim = self.sim
        sim.stats.sleep_calls += 1
        try:
            level = int(request.query.get("level", "1"))
            sim.sleep(level)
        except ValueError as exc:
            return _error(400, f"bad sleep level: {exc}", "BadRequestError")
        except EngineBusy as exc:
            sim.stats.sleeps_refused += 1
            log.warning("refused /sleep: %s", exc)
            return _error(409, f"{exc}; drain the replica before putting it to sleep.", "ConflictError")
        log.info("asleep at level %d", level)
        return web.Response(status=200)

    async def wake_up(self, request: web.Request) -> web.Response:
        self.sim.stats.wake_up_calls += 1
        await self.sim.wake_up()  # ?tags= is accepted and ignored: one call wakes everything
        return web.Response(status=200)

    async def is_sleeping(self, request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": self.sim.asleep})

    async def no_op(self, request: web.Request) -> web.Response:
        # /reset_prefix_cache and /collective_rpc (reload_weights) in the level-2 wake sequence.
        return web.json_response({}) if request.path == "/collective_rpc" else web.Response(status=200)


def build_app(sim: EngineSimulator) -> web.Application:
    routes = _Routes(sim)
    app = web.Application()
    app.router.add_get("/health", routes.health)
    app.router.add_get("/version", routes.version)
    app.router.add_get("/v1/models", routes.models)
    app.router.add_get("/metrics", routes.metrics)
    app.router.add_get("/ebbtide/stats", routes.stats)
    app.router.add_post("/v1/completions", routes.completions)
    app.router.add_post("/v1/chat/completions", routes.chat_completions)
    if sim.sleep_routes:
        app.router.add_post("/sleep", routes.sleep)
        app.router.add_post("/wake_up", routes.wake_up)
        app.router.add_get("/is_sleeping", routes.is_sleeping)
        app.router.add_post("/reset_prefix_cache", routes.no_op)
        app.router.add_post("/collective_rpc", routes.no_op)

    async def engine_loop(app: web.Application):
        task = asyncio.get_running_loop().create_task(sim.drive())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(engine_loop)
    return app


async def start(sim: EngineSimulator, host: str, port: int, shutdown_timeout: float = 5.0) -> web.AppRunner:
    """Bind and serve; the caller calls `await runner.cleanup()` to stop, which lets requests in
    flight finish for up to `shutdown_timeout` seconds."""
    # handler_cancellation: a client that disconnects cancels its handler, which aborts the
    # request in the engine, as vLLM aborts requests of closed connections.
    runner = web.AppRunner(build_app(sim), handler_cancellation=True, access_log=None,
                           shutdown_timeout=shutdown_timeout)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    return runner


# -- command line --------------------------------------------------------------------------

_KNOBS = [f for f in dataclasses.fields(CapacityModel) if f.name != "name"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(prog="ebbtide engine-sim",
                                     description="Serve a simulated vLLM replica (OpenAI routes, /metrics, sleep mode).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port, default=8000)
    parser.add_argument("--model", default="meta-llama/Llama-3.1-8B-Instruct")
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="names the model is served under; the first labels the metrics")
    parser.add_argument("--preset", default="llama-3.1-8b-h100", choices=sorted(PRESETS),
                        help="capacity model of the replica")
    parser.add_argument("--startup-delay", type=float, default=0.0, metavar="SECONDS",
                        help="bind the port only after this long, as vLLM does after loading the model")
    parser.add_argument("--enable-sleep-mode", action="store_true",
                        help="serve /sleep, /wake_up, /is_sleeping (also needs VLLM_SERVER_DEV_MODE=1)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="on SIGTERM, stop accepting connections and let requests in flight finish "
                             "for up to this long")
    parser.add_argument("--min-tick", type=float, default=0.005, help=argparse.SUPPRESS)
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=logging.getLevelNamesMapping())
    knobs = parser.add_argument_group("capacity overrides (default: the preset's)")
    for f in _KNOBS:
        knobs.add_argument("--" + f.name.replace("_", "-"), type=int if f.type == "int" else float, default=None)
    return parser.parse_args(argv)


def simulator_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> EngineSimulator:
    environ = os.environ if environ is None else environ
    overrides = {f.name: getattr(args, f.name) for f in _KNOBS if getattr(args, f.name) is not None}
    model = get_preset(args.preset).with_overrides(**overrides)
    dev_mode = environ.get("VLLM_SERVER_DEV_MODE") == "1"
    if args.enable_sleep_mode and not dev_mode:
        log.warning("--enable-sleep-mode without VLLM_SERVER_DEV_MODE=1: sleep routes are not served")
    return EngineSimulator(model, model_path=args.model,
                           served_model_name=args.served_model_name[0] if args.served_model_name else None,
                           sleep_routes=args.enable_sleep_mode and dev_mode, min_tick=args.min_tick)


async def serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sim = simulator_from_args(args)
    if args.startup_delay > 0:
        log.info("loading (simulated) for %.1f s", args.startup_delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.startup_delay)
        if stop.is_set():
            return
    runner = await start(sim, args.host, args.port, args.shutdown_timeout)
    log.info("serving %s (%s) on http://%s:%d", sim.served_model_name, sim.model.name, args.host, args.port)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(args))
    except ValueError as exc:  # a capacity override out of range
        log.error("%s", exc)
        return 2
    except OSError as exc:  # e.g. the port is taken
        log.error("cannot serve: %s", exc)
        return 1
    return 0


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for tests and local runs)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
