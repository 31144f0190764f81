"""
An open-loop load generator for OpenAI-style completions (against the load balancer or a pod).

`LoadGenerator` sends ``/v1/completions`` requests with Poisson arrivals at ``rate`` requests
per second (``set_rate()`` changes it while running; 0 pauses), each with an exact prompt size
(the simulator's ``ebbtide_prompt_tokens`` extension) and ``max_tokens``. Open loop: arrivals do
not wait for answers; when ``max_concurrency`` requests are in flight an arrival is dropped
(counted), so a slow server cannot slow the arrivals down. It stops issuing after ``duration``
seconds and waits for the requests in flight for at most ``drain_timeout`` more: it always
ends by itself.

Per request it records the start (seconds since the run began), HTTP status, time to first
token (streaming: the first chunk with text), latency, the pod that served it (the load
balancer's ``X-Testbed-Pod`` header), any error and its cause (`failure_cause`: refused, reset,
timeout, no endpoint, an asleep engine, HTTP status, ...). ``summary()`` gives counts, failures
by cause and TTFT/latency percentiles, over the whole run or a window of start times.

    gen = LoadGenerator(lb.url, rate=20, duration=10, prompt_tokens=100, max_tokens=20).start()
    gen.set_rate(60)
    summary = gen.wait()
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp

from tests.testbed.engines import LoopThread
from tests.testbed.loadbalancer import POD_HEADER

IntOrSampler = int | Callable[[random.Random], int]


@dataclasses.dataclass
class RequestRecord:
    start: float  # seconds since the run began
    prompt_tokens: int
    max_tokens: int
    status: int = 0  # HTTP status; 0: no answer (connection error, timeout)
    ttft: float | None = None
    latency: float | None = None
    output_tokens: int = 0
    pod: str | None = None
    error: str | None = None
    cause: str | None = None  # why it failed (failure_cause); None when it succeeded

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


# What the test bed's load balancer and the engine simulator answer, told apart by their bodies:
# a 503 with no endpoint behind the Service is not the same failure as an engine that is asleep.
BODY_CAUSES = (("no ready endpoint", "no_endpoint"), ("engine is sleeping", "engine_asleep"))


def failure_cause(status: int, error: BaseException | str) -> str:
    """One word for why a request failed: its HTTP status (refined by what the body says), or
    what happened to the connection."""
    if status:
        text = str(error)
        named = next((cause for needle, cause in BODY_CAUSES if needle in text), None)
        if status == 502:  # the load balancer could not reach the pod (kube-proxy's reset)
            named = "upstream_refused" if "Connect" in text else "upstream_reset"
        return f"http_{status}" + (f"_{named}" if named else "")
    if isinstance(error, str):
        return error
    if isinstance(error, aiohttp.ClientConnectorError):
        return "connection_refused"
    if isinstance(error, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | ConnectionResetError):
        return "connection_reset"
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, ValueError):
        return "bad_response"
    return type(error).__name__


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class LoadGenerator:
    """
    Open-loop Poisson load (see the module doc).

    ``url`` is the base URL (``http://127.0.0.1:PORT``); ``prompt_tokens`` and ``max_tokens``
    are ints or callables ``f(random.Random) -> int``; ``model`` goes in the body if given;
    ``stream`` measures TTFT (non-streaming requests get none); ``request_timeout`` bounds
    one request; ``seed`` makes arrivals and sizes reproducible.
    """

    def __init__(self, url: str, *, rate: float, duration: float, prompt_tokens: IntOrSampler = 100,
                 max_tokens: IntOrSampler = 32, max_concurrency: int = 256, model: str | None = None,
                 stream: bool = True, request_timeout: float = 60.0, drain_timeout: float | None = None,
                 path: str = "/v1/completions", seed: int | None = None) -> None:
        self.url = url.rstrip("/")
        self.rate = float(rate)
        self.duration = float(duration)
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.max_concurrency = max_concurrency
        self.model = model
        self.stream = stream
        self.request_timeout = request_timeout
        self.drain_timeout = request_timeout if drain_timeout is None else drain_timeout
        self.path = path
        self.random = random.Random(seed)
        self.records: list[RequestRecord] = []
        self.dropped = 0
        self.in_flight = 0
        self.started_at: float | None = None  # monotonic
        self.finished = False
        self._rate_changed: asyncio.Event | None = None
        self._stopping: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: LoopThread | None = None
        self._future: Any = None

    # ------------------------------------------------------------------------------ control

    def start(self) -> LoadGenerator:
        """Run in a background thread; returns at once."""
        self._thread = LoopThread("load-generator")
        self._thread.start()
        self._future = self._thread.submit(self.run())
        return self

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Block until the run ends by itself (duration + drain); returns summary()."""
        if self._future is not None:
            limit = timeout if timeout is not None else self.duration + self.drain_timeout + 30
            self._future.result(limit)
        self._close_thread()
        return self.summary()

    def stop(self) -> dict[str, Any]:
        """End early: no more arrivals, cancel the requests in flight; returns summary()."""
        if self._loop is not None and self._stopping is not None and not self.finished:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stopping.set)
        if self._future is not None:
            with contextlib.suppress(Exception):
                self._future.result(30)
        self._close_thread()
        return self.summary()

    def set_rate(self, rate: float) -> None:
        """Change the arrival rate (requests/s) now; 0 pauses arrivals."""
        self.rate = max(0.0, float(rate))
        if self._loop is not None and self._rate_changed is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._rate_changed.set)

    def elapsed(self) -> float:
        return 0.0 if self.started_at is None else time.monotonic() - self.started_at

    def _close_thread(self) -> None:
        if self._thread is not None:
            self._thread.stop()
            self._thread = None

    # ------------------------------------------------------------------------------ running

    async def run(self) -> dict[str, Any]:
        """The whole run in the current loop (for async callers); returns summary()."""
        self._loop = asyncio.get_running_loop()
        self._rate_changed = asyncio.Event()
        self._stopping = asyncio.Event()
        self.started_at = time.monotonic()
        end = self.started_at + self.duration
        tasks: set[asyncio.Task] = set()
        timeout = aiohttp.ClientTimeout(total=self.request_timeout)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            try:
                while not self._stopping.is_set():
                    remaining = end - time.monotonic()
                    if remaining <= 0:
                        break
                    gap = self.random.expovariate(self.rate) if self.rate > 0 else math.inf
                    self._rate_changed.clear()
                    # Sleep until the next arrival, the end, a rate change (memoryless: draw again) or stop.
                    waiters = [asyncio.ensure_future(self._rate_changed.wait()),
                               asyncio.ensure_future(self._stopping.wait())]
                    done, pending = await asyncio.wait(waiters, timeout=min(gap, remaining),
                                                       return_when=asyncio.FIRST_COMPLETED)
                    for waiter in pending:
                        waiter.cancel()
                    if done or gap > remaining:
                        continue
                    if self.in_flight >= self.max_concurrency:
                        self.dropped += 1
                        continue
                    task = asyncio.get_running_loop().create_task(self._one(session))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks and not self._stopping.is_set():
                    # Drain: the requests in flight, for at most drain_timeout, unless stopped.
                    drained = asyncio.ensure_future(asyncio.wait(set(tasks)))
                    stop_waiter = asyncio.ensure_future(self._stopping.wait())
                    await asyncio.wait([drained, stop_waiter], timeout=self.drain_timeout,
                                       return_when=asyncio.FIRST_COMPLETED)
                    drained.cancel()
                    stop_waiter.cancel()
            finally:
                for task in list(tasks):
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self.finished = True
        return self.summary()

    def _size(self, value: IntOrSampler) -> int:
        return int(value(self.random)) if callable(value) else int(value)

    async def _one(self, session: aiohttp.ClientSession) -> None:
        record = RequestRecord(start=self.elapsed(), prompt_tokens=self._size(self.prompt_tokens),
                               max_tokens=self._size(self.max_tokens))
        self.records.append(record)
        body: dict[str, Any] = {"prompt": "x", "ebbtide_prompt_tokens": record.prompt_tokens,
                                "max_tokens": record.max_tokens, "stream": self.stream}
        if self.model is not None:
            body["model"] = self.model
        self.in_flight += 1
        started = time.monotonic()
        try:
            async with session.post(self.url + self.path, json=body) as response:
                record.status = response.status
                record.pod = response.headers.get(POD_HEADER)
                if response.status != 200:
                    record.error = (await response.text())[:300]
                    record.cause = failure_cause(response.status, record.error)
                elif self.stream:
                    done = False
                    async for line in response.content:
                        if not line.startswith(b"data: "):
                            continue
                        payload = line[6:].strip()
                        if payload == b"[DONE]":
                            done = True
                            break
                        chunk = json.loads(payload)
                        choices = chunk.get("choices") or []
                        if choices and (choices[0].get("text") or (choices[0].get("delta") or {}).get("content")):
                            record.output_tokens += 1
                            if record.ttft is None:
                                record.ttft = time.monotonic() - started
                    if not done:
                        record.error = "the stream ended without [DONE]"
                        record.cause = "stream_cut"
                else:
                    data = await response.json()
                    record.output_tokens = (data.get("usage") or {}).get("completion_tokens", 0)
                record.latency = time.monotonic() - started
        except asyncio.CancelledError:
            record.error = record.cause = "cancelled"
            raise
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
            record.error = repr(e)
            record.cause = failure_cause(0, e)
            record.latency = time.monotonic() - started
        finally:
            self.in_flight -= 1

    # ------------------------------------------------------------------------------ results

    def summary(self, since: float | None = None, until: float | None = None) -> dict[str, Any]:
        """Counts and percentiles of the requests that started in [since, until) seconds of the run."""
        records = [r for r in list(self.records)
                   if (since is None or r.start >= since) and (until is None or r.start < until)]
        ok = [r for r in records if r.ok]
        ttfts = [r.ttft for r in ok if r.ttft is not None]
        latencies = [r.latency for r in ok if r.latency is not None]
        span = (until if until is not None else self.elapsed()) - (since or 0.0)
        return {
            "sent": len(records),
            "ok": len(ok),
            "errors": len(records) - len(ok),
            "failed_by_cause": dict(Counter(r.cause or ("in_flight" if r.latency is None else "unknown")
                                            for r in records if not r.ok)),
            "dropped": self.dropped if since is None and until is None else None,
            "statuses": dict(Counter(r.status for r in records)),
            "per_pod": dict(Counter(r.pod for r in records if r.pod)),
            "rate": len(records) / span if span > 0 else None,
            "ttft_p50": percentile(ttfts, 0.5),
            "ttft_p90": percentile(ttfts, 0.9),
            "ttft_p99": percentile(ttfts, 0.99),
            "latency_p50": percentile(latencies, 0.5),
            "latency_p90": percentile(latencies, 0.9),
            "latency_p99": percentile(latencies, 0.99),
            "output_tokens": sum(r.output_tokens for r in ok),
        }


def steady_load(url: str, rate: float, duration: float) -> LoadGenerator:
    """The operator tests' load: short prompts and answers at a steady rate, started."""
    return LoadGenerator(url, rate=rate, duration=duration, prompt_tokens=100, max_tokens=32, seed=1).start()
