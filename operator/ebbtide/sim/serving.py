"""How a simulated fleet serves its load: request by request, or as a fluid.

Both models take the same inputs each step (the arrivals of [t, t + dt) and the replicas that
can serve), report the same gauges a Prometheus scrape would see, and leave behind the same
latency records. Both read replica performance from one `CapacityModel`.

- `RequestServing` runs one `EngineCore` (the engine simulator's own scheduler) per replica
  and routes every request (power of two choices on outstanding requests, as gateways do).
  Exact, and fast enough for hour-long request logs.
- `FluidServing` treats the replicas as one pool fed by a FCFS queue and moves load in
  aggregates per step. A week of traffic at a hundred requests per second is tens of millions
  of requests: too many to replay one by one within a minute, and the fluid view is accurate
  where it matters for autoscaling: when replicas are busy, the pool runs at the capacity
  model's steady-state throughput, and when they are not, the queue is empty and TTFT is the
  prefill time. The queueing delay of each arrival is the exact fluid FCFS delay: the time until
  cumulative admissions reach the arrival's position. What it does not see is the short-term
  queueing of Poisson bursts below saturation and imbalance between replicas;
  tests/test_fleet.py measures the gap against `RequestServing`.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ebbtide.policy.observation import PodSignals
from ebbtide.sim.capacity import CapacityModel
from ebbtide.sim.engine_core import EngineCore, Finished, FirstToken

# Each step's requests are represented by this many points in the fluid model's latency records:
# prompt-size quantiles paired (Latin-hypercube style, fixed permutation) with quantiles of the
# wait behind other prompts' prefill.
PROMPT_POINTS = 32


@dataclass
class LatencyRecords:
    """Per-request (or per-group) latencies: TTFT, mean inter-token latency, weight, arrival time."""

    arrival: list[np.ndarray] = field(default_factory=list)
    ttft: list[np.ndarray] = field(default_factory=list)
    itl: list[np.ndarray] = field(default_factory=list)
    weight: list[np.ndarray] = field(default_factory=list)

    def add(self, arrival, ttft, itl, weight) -> None:
        self.arrival.append(np.asarray(arrival, dtype=float).ravel())
        self.ttft.append(np.asarray(ttft, dtype=float).ravel())
        self.itl.append(np.asarray(itl, dtype=float).ravel())
        self.weight.append(np.asarray(weight, dtype=float).ravel())

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if not self.ttft:
            empty = np.zeros(0)
            return empty, empty, empty, empty
        return (np.concatenate(self.arrival), np.concatenate(self.ttft), np.concatenate(self.itl),
                np.concatenate(self.weight))


def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float | None:
    if len(values) == 0 or weights.sum() <= 0:
        return None
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    index = int(np.searchsorted(cumulative, q * cumulative[-1], side="left"))
    return float(values[order][min(index, len(values) - 1)])


class RequestServing:
    """Every request through a real engine scheduler, one `EngineCore` per replica."""

    def __init__(self, capacity: CapacityModel, seed: int = 0):
        self.capacity = capacity
        self.engines: dict[int, EngineCore] = {}
        self.draining: dict[int, EngineCore] = {}
        self.gateway: deque[tuple[str, float, int, int]] = deque()  # held while no replica serves
        self.records = LatencyRecords()
        self._first_tokens: deque[tuple[float, float]] = deque()  # (time, ttft) for the TTFT signal
        self._itl_samples: deque[tuple[float, float, int]] = deque()
        self._outstanding: dict[int, int] = {}
        self._rng = random.Random(seed)
        self._next_id = 0
        self._held: dict[str, float] = {}  # request id -> seconds it waited at the gateway
        self.tokens_served = 0.0

    def add_replica(self, rid: int, now: float) -> None:
        engine = EngineCore(self.capacity)
        engine.advance(now)
        self.engines[rid] = engine
        self._outstanding[rid] = 0

    def remove_replica(self, rid: int) -> None:
        """Stop routing to it; it finishes what it holds (drains), then is gone."""
        engine = self.engines.pop(rid, None)
        if engine is not None:
            self.draining[rid] = engine

    def drained(self) -> list[int]:
        done = [rid for rid, e in self.draining.items() if e.idle]
        for rid in done:
            del self.draining[rid]
            self._outstanding.pop(rid, None)
        return done

    def _route(self, arrival: float, prompt: int, output: int, now: float) -> None:
        ids = list(self.engines)
        candidates = ids if len(ids) == 1 else self._rng.sample(ids, 2)
        for rid in candidates:  # compare them as they are now, not as last seen
            self._collect(rid, self.engines[rid].advance(now))
        rid = min(candidates, key=self._outstanding.__getitem__)
        engine = self.engines[rid]
        prompt = max(1, min(prompt, self.capacity.max_model_len - output - 1))
        request_id = str(self._next_id)
        if now > arrival:  # waited at the gateway while no replica could take it
            self._held[request_id] = now - arrival
        engine.submit(request_id, prompt, output, now)
        self._next_id += 1
        self._outstanding[rid] += 1

    def step(self, t0: float, t1: float, arrivals: np.ndarray, prompts: np.ndarray, outputs: np.ndarray) -> None:
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
                self._first_tokens.append((event.time, event.ttft + self._held.get(event.request_id, 0.0)))
            elif isinstance(event, Finished):
                self._outstanding[rid] -= 1
                self.tokens_served += event.prompt_tokens + event.output_tokens
                itl = event.mean_itl if event.mean_itl is not None else 0.0
                held = self._held.pop(event.request_id, 0.0)
                self.records.add(event.arrival - held, event.ttft + held, itl, 1.0)

    def finish(self, end: float) -> None:
        """Requests still queued or running at the end count with the latency they had so far."""
        for arrival, _, _ in self.gateway:
            self.records.add(arrival, end - arrival, 0.0, 1.0)
        for pool in (self.engines, self.draining):
            for engine in pool.values():
                for req in list(engine._requests.values()):  # noqa: SLF001  (end-of-run census)
                    ttft = (req.first_token_at - req.arrival) if req.first_token_at else end - req.arrival
                    self.records.add(req.arrival, ttft, 0.0, 1.0)

    def pods(self, now: float) -> tuple[PodSignals, ...]:
        return tuple(PodSignals(pod=f"replica-{rid}", sampled_at=now, waiting=e.num_waiting + (
            len(self.gateway) / len(self.engines)), running=e.num_running, kv_cache_usage=e.kv_cache_usage)
            for rid, e in self.engines.items())

    def latency_window(self, now: float, window: float, ttft_q: float | None, itl_q: float | None):
        while self._first_tokens and self._first_tokens[0][0] < now - window:
            self._first_tokens.popleft()
        for engine in self.engines.values():
            for itl, count in engine.take_itl_samples():
                self._itl_samples.append((now, itl, count))
        while self._itl_samples and self._itl_samples[0][0] < now - window:
            self._itl_samples.popleft()
        ttft = itl = None
        if ttft_q is not None and self._first_tokens:
            values = np.array([v for _, v in self._first_tokens])
            ttft = weighted_quantile(values, np.ones(len(values)), ttft_q)
        if itl_q is not None and self._itl_samples:
            values = np.array([v for _, v, _ in self._itl_samples])
            counts = np.array([c for _, _, c in self._itl_samples], dtype=float)
            itl = weighted_quantile(values, counts, itl_q)
        return ttft, itl


class FluidServing:
    """The fleet as one pool fed by a FCFS queue; load moves in aggregates per step."""

    def __init__(self, capacity: CapacityModel, prompt_sizes: np.ndarray, mean_prompt: float, mean_output: float,
                 steps: int):
        self.capacity = capacity
        qs = (np.arange(PROMPT_POINTS) + 0.5) / PROMPT_POINTS
        self.prompt_points = np.quantile(prompt_sizes, qs)
        self._prefill_points = np.array([capacity.prefill_seconds(p) for p in self.prompt_points])
        self._wait_quantiles = np.random.default_rng(7).permutation(qs)
        self.P, self.O = mean_prompt, mean_output
        self.n_max = capacity.max_concurrency(self.P, self.O)
        # itl(n) = c0 + c1 n: the capacity model's steady state for this mix (see capacity.py).
        self._c0 = capacity.itl_at(0.0, self.P, self.O)
        self._c1 = capacity.itl_at(1.0, self.P, self.O) - self._c0
        self.ready = 0
        self.queue = 0.0  # waiting requests
        self.running = 0.0  # requests in the batches of all ready replicas
        self.draining_until: dict[int, float] = {}
        self.tokens_served = 0.0
        # Per step: start time, arrivals, ITL; cumulative arrivals and admissions at each step end
        # (index 0: the start). Preallocated: windows are read every scrape, over a week.
        self._n = 0
        self._t = np.zeros(steps)
        self._arrivals = np.zeros(steps)
        self._itl = np.zeros(steps)
        self._cum_in = np.zeros(steps + 1)
        self._cum_admitted = np.zeros(steps + 1)
        self._rho = np.zeros(steps)  # prefill load per replica (fraction of its time)
        self._completed = 0.0

    def add_replica(self, rid: int, now: float) -> None:
        self.ready += 1

    def remove_replica(self, rid: int, now: float | None = None) -> None:
        """Leaves the pool; it keeps its GPU while its in-flight requests finish (about one
        request's decode time), which the caller charges via `drain_seconds`."""
        self.ready -= 1

    def drain_seconds(self) -> float:
        n = self.running / self.ready if self.ready else 0.0
        return self.O * (self._c0 + self._c1 * min(n, self.n_max))

    def step(self, t0: float, t1: float, count: float, prompt_sum: float, output_sum: float) -> None:
        """Move one step: completions, then FCFS admissions into the free batch slots.

        A request admitted at time a completes at a + O x itl: completions are the admissions
        of one service time ago (a delay line), which is Little's law in steady state and also
        right in transients: a fresh replica produces nothing for its first service time. The
        request mix is the trace's mean mix (a rate trace draws every request from one size
        distribution, so the mean does not drift)."""
        dt = t1 - t0
        cap = self.capacity
        ready = self.ready
        n = self._n
        per_replica = self.running / ready if ready else 0.0
        itl = self._c0 + self._c1 * min(per_replica, self.n_max)
        # Cumulative admissions one service time ago (step ends are at i x dt, interpolated).
        k = (t1 - self.O * itl) / dt
        if k > 0:
            i = min(int(k), n)
            before = self._cum_admitted[i]
            after = self._cum_admitted[min(i + 1, n)]
            done_by = before + (after - before) * (k - i)
        else:
            done_by = 0.0
        completed = max(0.0, min(self.running, done_by - self._completed))
        self._completed += completed
        self.running -= completed
        self.tokens_served += completed * (self.P + self.O)
        self.queue += count
        admitted = min(self.queue, max(0.0, ready * self.n_max - self.running))
        self.queue -= admitted
        self.running += admitted
        self._t[n] = t0
        self._arrivals[n] = count
        self._cum_in[n + 1] = self._cum_in[n] + count
        self._cum_admitted[n + 1] = self._cum_admitted[n] + admitted
        self._itl[n] = itl
        if ready:
            self._rho[n] = admitted / dt / ready * self.P / cap.prefill_tokens_per_s
        self._n = n + 1

    def pods(self, now: float) -> tuple[PodSignals, ...]:
        if not self.ready:
            return ()
        n = self.running / self.ready
        kv = min(1.0, n * (self.P + self.O / 2) / self.capacity.kv_cache_tokens)
        waiting = self.queue / self.ready
        return tuple(PodSignals(pod=f"replica-{i}", sampled_at=now, waiting=waiting, running=n, kv_cache_usage=kv)
                     for i in range(self.ready))

    def _waits(self, first: int, last: int, dt: float) -> np.ndarray:
        """FCFS delay of the arrivals of steps [first, last): the time until cumulative
        admissions reach the middle of each step's arrivals (admissions are spread evenly over
        their step, so the time is interpolated inside it)."""
        cum_in = self._cum_in
        if (cum_in[first:last + 1] - self._cum_admitted[first:last + 1]).max() < 1e-3:
            return np.zeros(last - first)  # no queue at any step end: everyone was admitted on arrival
        # FCFS: an arrival of step k is admitted at or after step k, so search from there on.
        cum_adm = self._cum_admitted[first:self._n + 1]
        target = (cum_in[first:last] + cum_in[first + 1:last + 1]) * 0.5 - 1e-3  # float sums of millions
        idx = np.searchsorted(cum_adm, target, side="left")  # first step end that reached it
        reached = idx < len(cum_adm)
        i = np.minimum(np.maximum(idx, 1), max(1, len(cum_adm) - 1))
        before, after = cum_adm[i - 1], cum_adm[i]
        frac = np.minimum(np.maximum((target - before) / np.maximum(after - before, 1e-12), 0.0), 1.0)
        admitted_at = np.where(reached, (first + i - 1 + frac) * dt, np.inf)
        return np.maximum(0.0, admitted_at - (self._t[first:last] + dt / 2))

    def _ttft_points(self, steps: slice, waits: np.ndarray) -> np.ndarray:
        """TTFT = queue wait + wait behind prompts already being prefilled + own prefill + one step.

        The replica prefills prompts one step at a time, so an arrival that finds another
        prompt's prefill step running waits for it: an M/D/1 queue of prefill work with load
        rho = arrivals per replica x mean prefill time. Its wait is approximated by the
        M/D/1 mean with an exponential tail: 0 with probability 1 - rho, else exponential with
        mean D / (2 (1 - rho)) (Pollaczek-Khinchine). tests/test_fleet.py checks the result
        against the engine scheduler itself.
        """
        itl = self._itl[steps]
        mean_prefill = self.P / self.capacity.prefill_tokens_per_s
        rho = np.minimum(0.95, self._rho[steps])[:, None]
        u = self._wait_quantiles[None, :]
        tail = np.maximum(0.0, -np.log(np.maximum(1e-12, (1.0 - u) / np.maximum(rho, 1e-9))))
        prefill_wait = np.where(u > 1.0 - rho, mean_prefill / (2.0 * (1.0 - rho)) * tail, 0.0)
        return waits[:, None] + prefill_wait + self._prefill_points[None, :] + itl[:, None]

    def latency_window(self, now: float, window: float, ttft_q: float | None, itl_q: float | None, dt: float):
        """TTFT and ITL quantiles of what finished its prefill in the window: the requests
        admitted in it (Prometheus' histograms observe at the first token)."""
        last = self._n
        first = max(0, last - int(window / dt))
        if last == first:
            return None, None
        ttft = itl = None
        weights = self._arrivals[first:last]
        if ttft_q is not None and weights.sum() > 0:
            waits = self._waits(first, last, dt)
            admitted = np.isfinite(waits)
            if admitted.any():
                points = self._ttft_points(slice(first, last), np.where(admitted, waits, 0.0))[admitted]
                w = np.repeat(weights[admitted] / PROMPT_POINTS, PROMPT_POINTS)
                ttft = weighted_quantile(points.ravel(), w, ttft_q)
        if itl_q is not None and self.ready:
            itl = float(self._itl[first:last].max()) if weights.sum() else None
        return ttft, itl

    def records(self, dt: float) -> LatencyRecords:
        steps = self._n
        waits = self._waits(0, steps, dt)
        end = steps * dt
        start = self._t[:steps]
        # Arrivals never admitted by the end waited at least until the end.
        waits = np.where(np.isfinite(waits), waits, end - start)
        points = self._ttft_points(slice(0, steps), waits)
        weights = np.repeat(self._arrivals[:steps] / PROMPT_POINTS, PROMPT_POINTS)
        itl = np.repeat(self._itl[:steps], PROMPT_POINTS)
        records = LatencyRecords()
        records.add(np.repeat(start, PROMPT_POINTS), points.ravel(), itl, weights)
        return records
