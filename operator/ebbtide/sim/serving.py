"""How a simulated fleet serves its load: request by request, or as a fluid.

Both models are driven the same way (replicas join and leave, time advances in steps, and at
every scrape the gauges and windowed quantiles Prometheus would hold are read), and both leave
behind the same latency records. Both read replica performance from one `CapacityModel`.

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
  queueing of Poisson bursts inside one step below saturation and imbalance between replicas;
  tests/test_fleet.py measures the gap against `RequestServing` (docs/simulator.md has the
  numbers).

Signals are only computed for what the policy reads (`observes`: "pods", "latency",
"tokens"): a quantile nobody reads costs time and changes nothing.
"""

from __future__ import annotations

import bisect
import random
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ebbtide.policy.observation import PodSignals, Signals
from ebbtide.sim.capacity import CapacityModel
from ebbtide.sim.engine_core import EngineCore, Finished, FirstToken

# Each step's requests are represented by this many points in the fluid model's latency records:
# prompt-size quantiles paired (Latin-hypercube style, fixed permutation) with quantiles of the
# wait behind other prompts' prefill.
PROMPT_POINTS = 32

ALL_SIGNALS = frozenset({"pods", "latency", "tokens"})

# The prefill load of a step (rho, see FluidServing._ttft_rows) is kept to 1/RHO_LEVELS, and
# capped below 1 where the M/D/1 wait has no steady state.
RHO_LEVELS = 10_000
RHO_MAX = 0.95

# Fewer requests than this in the fluid pool are the residue of its float sums, not a request:
# the pool counts as idle, and its gauges read 0 (vLLM's count whole requests). A residue read
# as load would keep a service with replicas.min 0 from ever reaching zero.
RESIDUE = 1e-6


@dataclass
class LatencyRecords:
    """Per-request (or per-group) latencies: TTFT, mean inter-token latency, weight, arrival time.

    `group`: consecutive points that share their arrival time and ITL (the fluid model writes
    PROMPT_POINTS per step), so ITL quantiles can be taken over one point per group.
    """

    arrival: list[np.ndarray] = field(default_factory=list)
    ttft: list[np.ndarray] = field(default_factory=list)
    itl: list[np.ndarray] = field(default_factory=list)
    weight: list[np.ndarray] = field(default_factory=list)
    group: int = 1
    _one: list[tuple[float, float, float]] = field(default_factory=list)  # single requests, batched

    def add(self, arrival, ttft, itl, weight) -> None:
        self._flush()
        self.arrival.append(np.asarray(arrival, dtype=float).ravel())
        self.ttft.append(np.asarray(ttft, dtype=float).ravel())
        self.itl.append(np.asarray(itl, dtype=float).ravel())
        self.weight.append(np.asarray(weight, dtype=float).ravel())

    def add_request(self, arrival: float, ttft: float, itl: float) -> None:
        """One request of weight 1 (four arrays per request would cost more than its replay)."""
        self._one.append((arrival, ttft, itl))

    def _flush(self) -> None:
        if self._one:
            block = np.array(self._one, dtype=float)
            self._one = []
            self.arrival.append(block[:, 0])
            self.ttft.append(block[:, 1])
            self.itl.append(block[:, 2])
            self.weight.append(np.ones(len(block)))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        self._flush()
        if not self.ttft:
            empty = np.zeros(0)
            return empty, empty, empty, empty
        if len(self.ttft) == 1:
            return self.arrival[0], self.ttft[0], self.itl[0], self.weight[0]
        return (np.concatenate(self.arrival), np.concatenate(self.ttft), np.concatenate(self.itl),
                np.concatenate(self.weight))


def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float | None:
    """The smallest value whose cumulative weight (in value order) reaches q of the total."""
    return weighted_quantiles(values, weights, (q,))[0]


# Above this many values, quantiles are found by bucketing (one pass) and sorting only the
# bucket that holds each quantile: argsort of millions of points costs half a second each.
_BUCKET_ABOVE = 100_000
_BUCKETS = 1 << 16


def weighted_quantiles(values: np.ndarray, weights: np.ndarray, qs) -> list[float | None]:
    """`weighted_quantile` for several q at once; exact at any size (up to float rounding of the
    cumulative weights)."""
    values = np.asarray(values, dtype=float)
    weights = np.asarray(weights, dtype=float)
    total = float(weights.sum()) if len(values) else 0.0
    if total <= 0:
        return [None for _ in qs]
    if len(values) <= _BUCKET_ABOVE:
        order = np.argsort(values, kind="stable")
        cumulative = np.cumsum(weights[order])
        ordered = values[order]
        out: list[float | None] = []
        for q in qs:
            index = int(np.searchsorted(cumulative, q * cumulative[-1], side="left"))
            out.append(float(ordered[min(index, len(values) - 1)]))
        return out
    # Buckets by a monotone transform of the value (log-like, so heavy tails get resolution):
    # bucket order is value order, so the cumulative weight below a bucket is exact.
    low = float(values.min())
    spread = float(values.max()) - low
    if spread <= 0:
        return [low for _ in qs]
    scaled = np.log1p((values - low) * (1e6 / spread))
    index = np.minimum((scaled * ((_BUCKETS - 1) / scaled.max())).astype(np.int64), _BUCKETS - 1)
    cumulative = np.cumsum(np.bincount(index, weights=weights, minlength=_BUCKETS))
    out = []
    for q in qs:
        target = q * cumulative[-1]
        bucket = int(np.searchsorted(cumulative, target, side="left"))
        bucket = min(bucket, _BUCKETS - 1)
        below = float(cumulative[bucket - 1]) if bucket else 0.0
        inside = index == bucket
        vals, wts = values[inside], weights[inside]
        if not len(vals):  # only for q = 0 with an empty first bucket
            vals, wts, below = values[index >= bucket], weights[index >= bucket], below
        order = np.argsort(vals, kind="stable")
        running = below + np.cumsum(wts[order])
        # Float sums in a different order can differ in the last bits: clamp into the bucket.
        j = min(int(np.searchsorted(running, target, side="left")), len(vals) - 1)
        out.append(float(vals[order][j]))
    return out


_POD_NAMES = [f"replica-{i}" for i in range(1024)]


def _pods(count: int, now: float, waiting: float, running: float, kv: float) -> tuple[PodSignals, ...]:
    """`count` replicas reporting the same sample (the fluid pool's mean replica).

    Copies of one instance that differ in the name only: a frozen dataclass's __init__ costs
    2.3 us, a copy 0.7 us, and a week replays 1.5 million pods.
    """
    first = PodSignals(pod=_POD_NAMES[0], sampled_at=now, waiting=waiting, running=running, kv_cache_usage=kv)
    fields = first.__dict__
    pods = [first]
    new = object.__new__
    for i in range(1, count):
        pod = new(PodSignals)
        pod.__dict__.update(fields)
        pod.__dict__["pod"] = _POD_NAMES[i] if i < len(_POD_NAMES) else f"replica-{i}"
        pods.append(pod)
    return tuple(pods)


def _tokens_counted(engine: EngineCore) -> float:
    return float(engine.prompt_tokens_total + engine.generation_tokens_total)


class RequestServing:
    """Every request through a real engine scheduler, one `EngineCore` per replica.

    Time advances in steps of `dt`: the step's arrivals are routed, then every engine runs to
    the step's end.
    """

    def __init__(self, capacity: CapacityModel, arrivals: np.ndarray, prompts: np.ndarray, outputs: np.ndarray,
                 dt: float = 1.0, seed: int = 0):
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
        self._token_marks: deque[tuple[float, float]] = deque()  # (scrape time, tokens served)
        self._outstanding: dict[int, int] = {}
        self._rng = random.Random(seed)
        self._next_id = 0
        self._held: dict[str, float] = {}  # request id -> seconds it waited at the gateway
        self.tokens_served = 0.0
        self._tokens_of_gone = 0.0  # vLLM's token counters of replicas that have drained
        self._idle: dict[int, float] = {}  # replica -> first tick it was seen idle (see idle_since)

    def add_replica(self, rid: int, now: float) -> None:
        """A replica joins (or, still draining, rejoins with what it holds) the endpoints."""
        engine = self.draining.pop(rid, None)
        if engine is None:
            engine = EngineCore(self.capacity)
            engine.advance(now)
            self._outstanding[rid] = 0
        self.engines[rid] = engine

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
        self._tokens_of_gone += _tokens_counted(engine)
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
                self._tokens_of_gone += _tokens_counted(self.draining.pop(rid))
                self._outstanding.pop(rid, None)
                gone.append((rid, t1))
        return gone

    def _route(self, arrival: float, prompt: int, output: int, now: float) -> None:
        ids = list(self.engines)
        if len(ids) == 1:
            candidates = ids
        else:  # two distinct replicas at random (random.sample costs more than the rest of this)
            first = int(self._rng.random() * len(ids))
            second = int(self._rng.random() * (len(ids) - 1))
            candidates = [ids[first], ids[second + (second >= first)]]
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
                self._first_tokens.append((event.time, event.ttft + self._held.get(event.request_id, 0.0)))
            elif isinstance(event, Finished):
                self._outstanding[rid] -= 1
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
        counted = self._tokens_of_gone + sum(_tokens_counted(e) for pool in (self.engines, self.draining)
                                             for e in pool.values())
        self._token_marks.append((t, counted))
        while self._token_marks[0][0] < t - window:
            self._token_marks.popleft()
        first_t, first_tokens = self._token_marks[0]
        tokens = (counted - first_tokens) / (t - first_t) if t > first_t else None
        pods = tuple(PodSignals(pod=f"replica-{rid}", sampled_at=epoch + t, waiting=e.num_waiting + (
            len(self.gateway) / len(self.engines)), running=e.num_running, kv_cache_usage=e.kv_cache_usage)
            for rid, e in self.engines.items())
        return Signals(source="simulator", sampled_at=epoch + t, pods=pods,
                       ttft_seconds=ttft if latency else None, tpot_seconds=itl if latency else None,
                       tokens_per_second=tokens if "tokens" in observes else None)

    def _latency_window(self, now: float, window: float, ttft_q: float | None, itl_q: float | None):
        while self._first_tokens and self._first_tokens[0][0] < now - window:
            self._first_tokens.popleft()
        for engine in self.engines.values():
            for itl, count in engine.take_itl_samples():
                self._itl_samples.append((now, itl, count))
        for engine in self.draining.values():
            engine.take_itl_samples()  # a draining replica has left the Service: not scraped
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
    """The fleet as one pool fed by a FCFS queue; load moves in aggregates per step of `dt`.

    State is kept per step in plain lists (a week is 120 960 steps of 5 s, and list indexing is
    several times cheaper than numpy scalar indexing); windows read slices of them.
    """

    def __init__(self, capacity: CapacityModel, prompt_sizes: np.ndarray, mean_prompt: float, mean_output: float,
                 counts: np.ndarray, dt: float):
        self.capacity = capacity
        self.dt = dt
        qs = (np.arange(PROMPT_POINTS) + 0.5) / PROMPT_POINTS
        self.prompt_points = np.quantile(prompt_sizes, qs)
        self._prefill_points = np.array([capacity.prefill_seconds(p) for p in self.prompt_points])
        wait_quantiles = np.random.default_rng(7).permutation(qs)
        self.P, self.O = mean_prompt, mean_output
        # TTFT points of a step's arrivals before their queue wait and ITL, by the step's
        # prefill load rho in steps of 1/RHO_LEVELS (see _ttft_rows): a table lookup per step
        # instead of a log and a where over its points.
        rho = np.minimum(RHO_MAX, np.arange(int(RHO_MAX * RHO_LEVELS) + 1) / RHO_LEVELS)[:, None]
        mean_prefill = self.P / capacity.prefill_tokens_per_s
        u = wait_quantiles[None, :]
        tail = np.maximum(0.0, -np.log(np.maximum(1e-12, (1.0 - u) / np.maximum(rho, 1e-9))))
        prefill_wait = np.where(u > 1.0 - rho, mean_prefill / (2.0 * (1.0 - rho)) * tail, 0.0)
        self._rho_table = prefill_wait + self._prefill_points[None, :]
        self.n_max = capacity.max_concurrency(self.P, self.O)
        # itl(n) = c0 + c1 n: the capacity model's steady state for this mix (see capacity.py).
        self._c0 = capacity.itl_at(0.0, self.P, self.O)
        self._c1 = capacity.itl_at(1.0, self.P, self.O) - self._c0
        self.ready = 0
        self.queue = 0.0  # waiting requests
        self.running = 0.0  # requests in the batches of all ready replicas
        self.tokens_served = 0.0
        self._tokens_counted = 0.0
        self._completed = 0.0
        steps = len(counts)
        self._counts = np.asarray(counts, dtype=float).tolist()
        # Per step n (covering [n dt, (n+1) dt)): ITL and prefill load per replica (a fraction of
        # its time, as a row of the rho table); at each step end n (index 0: the start):
        # cumulative arrivals, admissions, and tokens counted as vLLM counts them (prompt tokens
        # when prefilled, output tokens as generated; `tokens_served` counts whole requests
        # when they finish, which is what the cost report divides by, but as a rate it comes in
        # bursts one service time after a backlog is admitted).
        self._itl = [0.0] * steps
        self._rho_level = [0] * steps
        self._cum_in = [0.0] * (steps + 1)
        self._cum_admitted = [0.0] * (steps + 1)
        self._cum_tokens = [0.0] * (steps + 1)
        self._n = 0  # steps served
        self._queued_at = -1  # the last step that ended with requests waiting
        self._busy_at = -1  # the last step that ended with requests running or waiting
        self._pool: set[int] = set()  # the replicas serving (draining ones have left it)
        # Preempted work, for the latency records (see preempt_replica): step -> requests
        # retried from it, and their mean age then; arrival step -> share of its requests
        # whose first attempt was lost (they are recorded as retries instead).
        self._retried: dict[int, tuple[float, float]] = {}
        self._lost: dict[int, float] = {}

    def add_replica(self, rid: int, now: float) -> None:
        self.ready += 1
        self._pool.add(rid)

    def idle_since(self, rid: int, now: float) -> float | None:
        """The pool's replicas share its load, so they are busy or idle together: idle since the
        end of the last step that ended with a request running or waiting (None if that is the
        last step served). Under load a fluid replica is never idle: a surplus replica becomes
        idle only once it has left the pool and its drain is over (see remove_replica)."""
        return None if self._busy_at >= self._n - 1 else (self._busy_at + 1) * self.dt

    def remove_replica(self, rid: int, now: float) -> float:
        """Leaves the pool; it keeps its GPU while its in-flight requests finish (about one
        request's decode time). Returns when it is gone."""
        per_replica = self.running / self.ready if self.ready else 0.0
        self.ready -= 1
        self._pool.discard(rid)
        return now + self.O * (self._c0 + self._c1 * min(per_replica, self.n_max))

    def pending(self) -> float:
        """Requests held at the gateway now: the queue, while no replica is in the pool (with
        one, the queue waits in the engines, which the gateway has handed it to)."""
        return 0.0 if self.ready or self.queue <= RESIDUE else self.queue

    def preempt_replica(self, rid: int, now: float) -> float:
        """Its node is reclaimed at `now` (a step boundary): the replica leaves the pool with its
        share of the requests in flight, which re-enter at the head of this step's arrivals
        (retried by the gateway) and are served again in full. The work spent on them stays in
        vLLM's counters and in the GPU time charged, not in the tokens served. A draining
        replica's work was already handed to the pool (see remove_replica): nothing is lost.
        Returns the requests retried.

        In the delay line (advance) the lost share counts as completed, without its tokens,
        so the pool's running requests stay equal to admissions minus completions. For the
        latency records, the requests in flight are the admission positions (cum_admitted -
        running, cum_admitted], which FCFS maps to arrival steps through cum_in; a 1/ready
        share of each is recorded as retried, from its original arrival."""
        n = self._n
        if rid not in self._pool or n >= len(self._counts):
            return 0.0
        self._pool.discard(rid)
        share = self.running / self.ready
        self.ready -= 1
        self.running -= share
        self._completed += share
        self._counts[n] += share
        if share <= 0:
            return 0.0
        lost_age = 0.0
        for j, overlap in _arrival_overlaps(self._cum_in, n, self._cum_admitted[n] - (self.running + share),
                                            self._cum_admitted[n]):
            lost = overlap / (self.ready + 1)
            self._lost[j] = self._lost.get(j, 0.0) + lost
            lost_age += lost * (now - (j + 0.5) * self.dt)
        amount, age = self._retried.get(n, (0.0, 0.0))
        self._retried[n] = (amount + share, (amount * age + lost_age) / (amount + share))
        return share

    def advance(self, first: int, last: int) -> list[tuple[int, float]]:
        """Serve steps [first, last) with the current ready replicas: completions, then FCFS
        admissions into the free batch slots.

        A request admitted at time a completes at a + s, s = O x itl (its service time): the
        completions of earlier steps' admissions are those of one service time ago (a delay
        line), which is Little's law in steady state and also right in transients: a fresh
        replica produces nothing for its first service time. Admissions are spread evenly over
        their step, so when s is shorter than a step (short outputs: 28 tokens of code take
        half a second) the first 1 - s/dt of them also finish within it, and a batch slot
        serves dt/s requests per step: the batch limit holds for the requests in flight at the
        step's end. The request mix is the trace's mean mix (a rate trace draws every request
        from one size distribution, so the mean does not drift). Nothing drains here: the pool
        returns []."""
        assert first == self._n, "steps are served in order"
        dt = self.dt
        ready = self.ready
        c0, c1, n_max, mean_output = self._c0, self._c1, self.n_max, self.O
        tokens_per_request = self.P + self.O
        slots = ready * n_max
        level_per_admission = (self.P / self.capacity.prefill_tokens_per_s / dt / ready * RHO_LEVELS
                               if ready else 0.0)
        top_level = int(RHO_MAX * RHO_LEVELS)
        counts, itls, levels = self._counts, self._itl, self._rho_level
        queued_at, busy_at = self._queued_at, self._busy_at
        cum_in, cum_adm, cum_tokens = self._cum_in, self._cum_admitted, self._cum_tokens
        running, queue, completed_total, tokens = self.running, self.queue, self._completed, self.tokens_served
        counted = self._tokens_counted
        prompt = self.P
        for n in range(first, last):
            per_replica = running / ready if ready else 0.0
            itl = c0 + c1 * (per_replica if per_replica < n_max else n_max)
            service = mean_output * itl
            # Earlier steps' admissions made one service time before this step's end (step
            # ends are at i x dt, interpolated between them).
            k = n + 1 - service / dt
            earlier_done = 0.0
            if k > 0:
                i = int(k)
                if i >= n:
                    done_by = cum_adm[n]
                else:
                    before = cum_adm[i]
                    done_by = before + (cum_adm[i + 1] - before) * (k - i)
                earlier_done = done_by - completed_total
                if earlier_done > running:
                    earlier_done = running
                if earlier_done > 0:
                    completed_total += earlier_done
                else:
                    earlier_done = 0.0
            # Output tokens (one per running request per ITL) of the requests admitted before.
            in_service = dt * (running - 0.5 * earlier_done)
            running -= earlier_done
            count = counts[n]
            queue += count
            # Of this step's admissions, the share still running at its end.
            still = service / dt if service < dt else 1.0
            free = slots - running
            capacity = free / still if free > 0 else 0.0
            admitted = queue if queue <= capacity else capacity
            queue -= admitted
            done_now = admitted * (1.0 - still)
            completed_total += done_now
            running += admitted * still
            done = earlier_done + done_now
            tokens += done * tokens_per_request
            # ... and of this step's: each admitted at tau serves until min(tau + s, step end).
            in_service += admitted * (service * (1.0 - 0.5 * still) if still < 1.0 else 0.5 * dt)
            counted += admitted * prompt + in_service / itl
            cum_in[n + 1] = cum_in[n] + count
            cum_adm[n + 1] = cum_adm[n] + admitted
            cum_tokens[n + 1] = counted
            itls[n] = itl
            level = int(admitted * level_per_admission + 0.5)
            levels[n] = level if level < top_level else top_level
            if queue > RESIDUE:
                queued_at = n
                busy_at = n
            elif running > RESIDUE:
                busy_at = n
        self.running, self.queue, self._completed, self.tokens_served = running, queue, completed_total, tokens
        self._tokens_counted = counted
        self._queued_at, self._busy_at = queued_at, busy_at
        self._n = last
        return []

    # -- what Prometheus sees ---------------------------------------------------------------

    def scrape(self, t: float, epoch: float, window: float, ttft_q: float | None, itl_q: float | None,
               observes: frozenset[str] = ALL_SIGNALS) -> Signals:
        """Gauges at `t` (which must be the end of the last step served), token rate and latency
        quantiles over the window before it."""
        n = self._n
        pods: tuple[PodSignals, ...] = ()
        if "pods" in observes and self.ready:
            running, queue = (x if x > RESIDUE else 0.0 for x in (self.running, self.queue))
            per_replica = running / self.ready
            kv = min(1.0, per_replica * (self.P + self.O / 2) / self.capacity.kv_cache_tokens)
            pods = _pods(self.ready, epoch + t, queue / self.ready, per_replica, kv)
        w = max(1, int(round(window / self.dt)))
        first = max(0, n - w)
        tokens = ttft = itl = None
        if "tokens" in observes and n > first:
            tokens = (self._cum_tokens[n] - self._cum_tokens[first]) / ((n - first) * self.dt)
        if "latency" in observes and n > first:
            if ttft_q is not None:
                ttft = self._ttft_window(first, n, ttft_q)
            if itl_q is not None and self.ready and self._cum_in[n] > self._cum_in[first]:
                itl = max(self._itl[first:n])
        return Signals(source="simulator", sampled_at=epoch + t, pods=pods, ttft_seconds=ttft, tpot_seconds=itl,
                       tokens_per_second=tokens)

    def _ttft_window(self, first: int, last: int, q: float) -> float | None:
        """TTFT quantile of the requests whose first token came in steps [first, last): those
        admitted in them (the histogram observes at the first token, as vLLM's does), whatever
        step they arrived in. An arrival step's requests count where the middle of them was
        admitted."""
        if self._queued_at < first - 1:
            # No queue since before the window: every arrival in it was admitted on arrival.
            counts = self._counts[first:last]
            if not any(counts):
                return None
            points = self._ttft_rows(first, last)
            weights = np.repeat(np.array(counts) / PROMPT_POINTS, PROMPT_POINTS)
            return weighted_quantile(points.ravel(), weights, q)
        cum_in, cum_adm = self._cum_in, self._cum_admitted
        lo, hi = cum_adm[first], cum_adm[last]
        if hi - lo < 1e-9:
            return None
        # Arrival steps j whose middle position (cum_in[j] + cum_in[j+1]) / 2 is in (lo, hi].
        j0 = max(0, bisect.bisect_left(cum_in, lo, 0, last + 1) - 1)
        j1 = min(last, bisect.bisect_right(cum_in, hi, 0, last + 1))
        cin = np.array(cum_in[j0:j1 + 1])
        mids = (cin[:-1] + cin[1:]) * 0.5
        arrived = cin[1:] - cin[:-1]
        take = (mids > lo) & (mids <= hi) & (arrived > 0)
        if not take.any():
            return None
        js = np.nonzero(take)[0]
        mids = mids[take]
        # When each middle was admitted: inside the window's steps, interpolated.
        adm = np.array(cum_adm[first:last + 1])
        i = np.clip(np.searchsorted(adm, mids - 1e-3, side="left"), 1, len(adm) - 1)
        before, after = adm[i - 1], adm[i]
        frac = np.clip((mids - before) / np.maximum(after - before, 1e-12), 0.0, 1.0)
        waits = np.maximum(0.0, (first + i - 1 + frac) - (js + j0 + 0.5)) * self.dt
        points = waits[:, None] + self._ttft_rows(j0, j1)[js]
        weights = np.repeat(arrived[take] / PROMPT_POINTS, PROMPT_POINTS)
        return weighted_quantile(points.ravel(), weights, q)

    def _ttft_rows(self, first: int, last: int) -> np.ndarray:
        """TTFT points of the arrivals of steps [first, last), without their queue wait:
        wait behind prompts already being prefilled + own prefill + one step.

        The replica prefills prompts one step at a time, so an arrival that finds another
        prompt's prefill step running waits for it: an M/D/1 queue of prefill work with load
        rho = arrivals per replica x mean prefill time. Its wait is approximated by the
        M/D/1 mean with an exponential tail: 0 with probability 1 - rho, else exponential with
        mean D / (2 (1 - rho)) (Pollaczek-Khinchine). tests/test_fleet.py checks the result
        against the engine scheduler itself."""
        rows = self._rho_table[np.array(self._rho_level[first:last], dtype=np.int64)]
        rows += np.array(self._itl[first:last])[:, None]
        return rows

    # -- after the run ------------------------------------------------------------------------

    def _waits(self) -> np.ndarray:
        """FCFS delay of every step's arrivals: the time until cumulative admissions reach the
        middle of the step's arrivals (admissions are spread evenly over their step, so the
        time is interpolated inside it); inf if that never happened."""
        steps, dt = self._n, self.dt
        cum_in = np.array(self._cum_in[:steps + 1])
        cum_adm = np.array(self._cum_admitted[:steps + 1])
        if (cum_in - cum_adm).max() < 1e-3:
            return np.zeros(steps)  # no queue at any step end: everyone was admitted on arrival
        target = (cum_in[:-1] + cum_in[1:]) * 0.5 - 1e-3  # float sums of millions
        idx = np.searchsorted(cum_adm, target, side="left")  # first step end that reached it
        reached = idx < len(cum_adm)
        i = np.minimum(np.maximum(idx, 1), max(1, len(cum_adm) - 1))
        before, after = cum_adm[i - 1], cum_adm[i]
        frac = np.minimum(np.maximum((target - before) / np.maximum(after - before, 1e-12), 0.0), 1.0)
        admitted_at = np.where(reached, (i - 1 + frac) * dt, np.inf)
        return np.maximum(0.0, admitted_at - (np.arange(steps) + 0.5) * dt)

    def finish(self, end: float) -> LatencyRecords:
        """Latency records of every step's arrivals; those never admitted waited at least
        until the end."""
        steps, dt = self._n, self.dt
        starts = np.arange(steps) * dt
        waits = self._waits()
        waits = np.where(np.isfinite(waits), waits, np.maximum(0.0, end - starts - dt / 2))
        rows = self._ttft_rows(0, steps)
        itl = np.array(self._itl[:steps])
        weights = np.array(self._counts[:steps])
        for n, (amount, _) in self._retried.items():
            weights[n] -= amount
        for j, lost in self._lost.items():
            weights[j] -= lost
        records = LatencyRecords(group=PROMPT_POINTS)
        records.add(np.repeat(starts, PROMPT_POINTS), (waits[:, None] + rows).ravel(),
                    np.repeat(itl, PROMPT_POINTS),
                    np.repeat(np.maximum(weights, 0.0) / PROMPT_POINTS, PROMPT_POINTS))
        if self._retried:  # retried requests, from their first arrival
            at = np.array(sorted(self._retried))
            amount, age = (np.array([self._retried[n][k] for n in at]) for k in (0, 1))
            records.add(np.repeat(at * dt - age, PROMPT_POINTS),
                        ((waits[at] + age)[:, None] + rows[at]).ravel(),
                        np.repeat(itl[at], PROMPT_POINTS), np.repeat(amount / PROMPT_POINTS, PROMPT_POINTS))
        return records


def _arrival_overlaps(cum_in: list[float], steps: int, low: float, high: float) -> list[tuple[int, float]]:
    """(arrival step, requests) of the FCFS positions (low, high]: the steps whose arrivals
    [cum_in[j], cum_in[j + 1]) overlap them, among the first `steps`."""
    out = []
    j = max(0, bisect.bisect_right(cum_in, low, 0, steps + 1) - 1)
    while j < steps and cum_in[j] < high:
        overlap = min(high, cum_in[j + 1]) - max(low, cum_in[j])
        if overlap > 0:
            out.append((j, overlap))
        j += 1
    return out


def fluid_mix(trace_prompt_sum: float, trace_output_sum: float, requests: int) -> tuple[float, float]:
    """(mean prompt, mean output) tokens of a trace; an output is at least one token."""
    mean_p = trace_prompt_sum / max(requests, 1)
    mean_o = max(trace_output_sum / max(requests, 1), 1.0)
    return float(mean_p), float(mean_o)

