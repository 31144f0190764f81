"""Serving request by request: one `EngineCore` (the engine simulator's own scheduler) per
replica, every request routed to one of them as the Service in front of them would (ROUTINGS)."""

from __future__ import annotations

import random
from collections import deque

import numpy as np

from ebbtide.policy.observation import PodSignals, Signals
from ebbtide.sim.capacity import CapacityModel
from ebbtide.sim.engine_core import EngineCore
from ebbtide.sim.engine_types import Finished, FirstToken
from ebbtide.sim.latency import LatencyRecords, weighted_quantile
from ebbtide.sim.serving import ALL_SIGNALS

# How requests reach replicas:
# - random: a Kubernetes Service (kube-proxy picks an endpoint at random per connection; one
#   request per connection here). What the operator's own Service does with no gateway in front.
# - least-requests: the replica with the fewest requests outstanding (kube-proxy's IPVS `lc`
#   mode, a gateway that tracks every endpoint).
# - power-of-two: the less loaded of two random replicas (Envoy's LEAST_REQUEST default, most
#   inference gateways).
ROUTINGS = ("random", "least-requests", "power-of-two")


def _tokens_counted(engine: EngineCore) -> tuple[float, float]:
    """(prompt + generated, prompt): vllm:prompt_tokens_total and vllm:generation_tokens_total."""
    return float(engine.prompt_tokens_total + engine.generation_tokens_total), float(engine.prompt_tokens_total)


def _add(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return a[0] + b[0], a[1] + b[1]


class RequestServing:
    """Every request through a real engine scheduler, one `EngineCore` per replica.

    Time advances in steps of `dt`: the step's arrivals are routed, then every engine runs to
    the step's end.
    """

    def __init__(self, capacity: CapacityModel, arrivals: np.ndarray, prompts: np.ndarray, outputs: np.ndarray,
                 dt: float = 1.0, seed: int = 0, routing: str = "power-of-two"):
        if routing not in ROUTINGS:
            raise ValueError(f"unknown routing {routing!r}; known: {', '.join(ROUTINGS)}")
        self.routing = routing
        self.capacity = capacity
        self.dt = dt
        self._arrivals = arrivals
        self._prompts = prompts
        self._outputs = outputs
        self._cursor = 0
        self.engines: dict[int, EngineCore] = {}
        self.draining: dict[int, EngineCore] = {}
        self.gateway: deque[tuple[float, int, int]] = deque()  # held while no replica serves
        self.records = LatencyRecords()
        self._first_tokens: deque[tuple[float, float]] = deque()  # (time, ttft) for the TTFT signal
        self._itl_samples: deque[tuple[float, float, int]] = deque()
        # (scrape time, (tokens served, of which prompt tokens, requests finished))
        self._token_marks: deque[tuple[float, tuple[float, float, float]]] = deque()
        self._finished = 0.0  # vllm:request_success_total over the fleet
        self._outstanding: dict[int, int] = {}
        self._rng = random.Random(seed)
        self._next_id = 0
        self._held: dict[str, float] = {}  # request id -> seconds it waited at the gateway
        self.tokens_served = 0.0
        self._tokens_of_gone = (0.0, 0.0)  # vLLM's token counters of replicas that have drained
        self._idle: dict[int, float] = {}  # replica -> first tick it was seen idle (see idle_since)

    def add_replica(self, rid: int, now: float) -> None:
        """A replica joins (or, still draining, rejoins with what it holds) the endpoints."""
        engine = self.draining.pop(rid, None)
        if engine is None:
            engine = EngineCore(self.model_for(rid))
            engine.advance(now)
            self._outstanding[rid] = 0
        self.engines[rid] = engine

    def model_for(self, rid: int) -> CapacityModel:
        """The capacity model of a new replica: one for all here (sim/variant_serving.py: by variant)."""
        return self.capacity

    def admitting(self, prompt: int, output: int) -> list[int]:
        """The replicas the gateway may send a request of this size to: all of them here."""
        return list(self.engines)

    def idle_since(self, rid: int, now: float) -> float | None:
        """When the replica last had nothing running or waiting, or None if it has something
        now. Looked at when asked (each policy tick): a replica found idle counts as idle from
        that moment, so idle time is under-counted by at most one tick."""
        if self.engines[rid].idle:
            return self._idle.setdefault(rid, now)
        self._idle.pop(rid, None)
        return None

    def remove_replica(self, rid: int, now: float) -> float | None:
        """Stop routing to it; it finishes what it holds (drains), then is gone: `advance`
        reports when. Returns None (the drain end is not known yet)."""
        engine = self.engines.pop(rid, None)
        if engine is not None:
            self.draining[rid] = engine
        self._idle.pop(rid, None)
        return None

    def pending(self) -> int:
        """Requests held at the gateway now: with no replica in the endpoints, every arrival."""
        return len(self.gateway)

    def preempt_replica(self, rid: int, now: float) -> int:
        """Its node is reclaimed: the replica is gone at once, serving or draining. What it had
        finished by `now` stands; what it held (waiting or running) is retried by the gateway
        on another replica, ahead of anything queued there (it is older), and keeps its
        original arrival, so its latency counts the lost attempt. The work already spent on
        it stays in vLLM's counters and in the GPU time charged, not in the tokens served.
        Returns the number of requests retried."""
        engine = self.engines.pop(rid, None) or self.draining.pop(rid, None)
        if engine is None:
            return 0
        self._collect(rid, engine.advance(now))
        lost = [(req.arrival - self._held.pop(req.rid, 0.0), req.prompt, req.max_out)
                for req in engine._requests.values()]  # noqa: SLF001  (the requests a dead pod held)
        self._tokens_of_gone = _add(self._tokens_of_gone, _tokens_counted(engine))
        self._outstanding.pop(rid, None)
        for item in sorted(lost, reverse=True):
            self.gateway.appendleft(item)
        return len(lost)

    def advance(self, first: int, last: int) -> list[tuple[int, float]]:
        """Serve steps [first, last); returns (replica, time) of the drains that ended."""
        dt = self.dt
        gone: list[tuple[int, float]] = []
        for n in range(first, last):
            t0, t1 = n * dt, (n + 1) * dt
            end = int(np.searchsorted(self._arrivals, t1, side="left"))
            self._step(t0, t1, self._arrivals[self._cursor:end], self._prompts[self._cursor:end],
                       self._outputs[self._cursor:end])
            self._cursor = end
            done = [rid for rid, e in self.draining.items() if e.idle]
            for rid in done:
                self._tokens_of_gone = _add(self._tokens_of_gone, _tokens_counted(self.draining.pop(rid)))
                self._outstanding.pop(rid, None)
                gone.append((rid, t1))
        return gone

    def _route(self, arrival: float, prompt: int, output: int, now: float) -> None:
        ids = self.admitting(prompt, output)
        if len(ids) == 1 or self.routing == "random":
            candidates = [ids[int(self._rng.random() * len(ids))]]
        elif self.routing == "least-requests":
            candidates = ids
        else:  # two distinct replicas at random (random.sample costs more than the rest of this)
            first = int(self._rng.random() * len(ids))
            second = int(self._rng.random() * (len(ids) - 1))
            candidates = [ids[first], ids[second + (second >= first)]]
        for rid in candidates:  # compare them as they are now, not as last seen
            self._collect(rid, self.engines[rid].advance(now))
        rid = min(candidates, key=self._outstanding.__getitem__)
        engine = self.engines[rid]
        prompt = max(1, min(prompt, engine.model.max_model_len - output - 1))
        request_id = str(self._next_id)
        if now > arrival:  # waited at the gateway while no replica could take it
            self._held[request_id] = now - arrival
        engine.submit(request_id, prompt, output, now)
        self._next_id += 1
        self._outstanding[rid] += 1

    def _step(self, t0: float, t1: float, arrivals: np.ndarray, prompts: np.ndarray, outputs: np.ndarray) -> None:
        for arrival, prompt, output in zip(arrivals.tolist(), prompts.tolist(), outputs.tolist(), strict=True):
            self.gateway.append((arrival, int(prompt), int(output)))
        if self.engines:
            while self.gateway:
                arrival, prompt, output = self.gateway.popleft()
                self._route(arrival, prompt, output, max(arrival, t0))
        for pool in (self.engines, self.draining):
            for rid, engine in pool.items():
                self._collect(rid, engine.advance(t1))

    def _collect(self, rid: int, events: list) -> None:
        for event in events:
            if isinstance(event, FirstToken):
                self._record_ttft(rid, event.time, event.ttft + self._held.get(event.request_id, 0.0))
            elif isinstance(event, Finished):
                self._outstanding[rid] -= 1
                self._finished += 1
                self.tokens_served += event.prompt_tokens + event.output_tokens
                itl = event.mean_itl if event.mean_itl is not None else 0.0
                held = self._held.pop(event.request_id, 0.0)
                self.records.add_request(event.arrival - held, event.ttft + held, itl)

    def finish(self, end: float) -> LatencyRecords:
        """Requests still queued or running at the end count with the latency they had so far."""
        for arrival, _, _ in self.gateway:
            self.records.add_request(arrival, end - arrival, 0.0)
        for pool in (self.engines, self.draining):
            for engine in pool.values():
                for req in list(engine._requests.values()):  # noqa: SLF001  (end-of-run census)
                    # As for finished requests: the time held at the gateway counts too.
                    held = self._held.get(req.rid, 0.0)
                    ttft = (req.first_token_at - req.arrival) if req.first_token_at else end - req.arrival
                    self.records.add_request(req.arrival - held, ttft + held, 0.0)
        return self.records

    def scrape(self, t: float, epoch: float, window: float, ttft_q: float | None, itl_q: float | None,
               observes: frozenset[str] = ALL_SIGNALS) -> Signals:
        """What Prometheus holds at trace time `t`: gauges now, rates and quantiles over the window."""
        latency = "latency" in observes
        ttft, itl = self._latency_window(t, window, ttft_q if latency else None, itl_q if latency else None)
        # vllm:prompt_tokens_total + vllm:generation_tokens_total over the fleet, rate over the window.
        counted = self._tokens_of_gone
        for pool in (self.engines, self.draining):
            for e in pool.values():
                counted = _add(counted, _tokens_counted(e))
        self._token_marks.append((t, (*counted, self._finished)))
        while self._token_marks[0][0] < t - window:
            self._token_marks.popleft()
        first_t, first = self._token_marks[0]
        tokens = prompt = requests = None
        if t > first_t and "tokens" in observes:
            tokens, prompt, requests = ((now - then) / (t - first_t)
                                        for now, then in zip(self._token_marks[-1][1], first, strict=True))
        pods = tuple(PodSignals(pod=f"replica-{rid}", sampled_at=epoch + t, waiting=e.num_waiting + (
            len(self.gateway) / len(self.engines)), running=e.num_running, kv_cache_usage=e.kv_cache_usage)
            for rid, e in self.engines.items())
        return Signals(source="simulator", sampled_at=epoch + t, pods=pods,
                       ttft_seconds=ttft if latency else None, tpot_seconds=itl if latency else None,
                       tokens_per_second=tokens, prompt_tokens_per_second=prompt, requests_per_second=requests)

    def _record_ttft(self, rid: int, at: float, ttft: float) -> None:
        self._first_tokens.append((at, ttft))

    def _record_itl(self, rid: int, at: float, itl: float, count: int) -> None:
        self._itl_samples.append((at, itl, count))

    def _latency_window(self, now: float, window: float, ttft_q: float | None, itl_q: float | None):
        for rid, engine in self.engines.items():
            for itl, count in engine.take_itl_samples():
                self._record_itl(rid, now, itl, count)
        for engine in self.draining.values():
            engine.take_itl_samples()  # a draining replica has left the Service: not scraped
        return window_quantiles(self._first_tokens, self._itl_samples, now, window, ttft_q, itl_q)


def window_quantiles(ttfts: deque[tuple[float, float]], itls: deque[tuple[float, float, int]], now: float,
                     window: float, ttft_q: float | None, itl_q: float | None) -> tuple[float | None, float | None]:
    """The TTFT and ITL quantiles of the samples (time, TTFT) and (time, ITL, tokens) within the
    window before `now`, older ones dropped; None without samples or without a quantile."""
    for samples in (ttfts, itls):
        while samples and samples[0][0] < now - window:
            samples.popleft()
    ttft = itl = None
    if ttft_q is not None and ttfts:
        ttft = weighted_quantile(np.array([v for _, v in ttfts]), np.ones(len(ttfts)), ttft_q)
    if itl_q is not None and itls:
        itl = weighted_quantile(np.array([v for _, v, _ in itls]), np.array([c for _, _, c in itls], dtype=float),
                                itl_q)
    return ttft, itl
