"""Serving as a fluid: the replicas as one pool fed by a FCFS queue, load moved in aggregates per
step (sim/serving.py says when it is accurate)."""

from __future__ import annotations

import bisect

import numpy as np

from ebbtide.policy.observation import PodSignals, Signals
from ebbtide.sim.capacity import CapacityModel
from ebbtide.sim.fluid_mix import PROMPT_POINTS, RHO_LEVELS, RHO_MAX, MixSchedule
from ebbtide.sim.latency import LatencyRecords, weighted_quantile
from ebbtide.sim.serving import ALL_SIGNALS
from ebbtide.sim.size_mix import SizeMix

# Fewer requests than this in the fluid pool are the residue of its float sums, not a request:
# the pool counts as idle, and its gauges read 0 (vLLM's count whole requests). A residue read
# as load would keep a service with replicas.min 0 from ever reaching zero.
RESIDUE = 1e-6


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


class FluidServing:
    """The fleet as one pool fed by a FCFS queue; load moves in aggregates per step of `dt`.

    State is kept per step in plain lists (a week is 120 960 steps of 5 s, and list indexing is
    several times cheaper than numpy scalar indexing); windows read slices of them.
    """

    def __init__(self, capacity: CapacityModel, mix: SizeMix, counts: np.ndarray, dt: float):
        self.capacity = capacity
        self.dt = dt
        # The request mix by window (a rate trace's drifts; a request log's is one window).
        self.mix = MixSchedule(capacity, mix, len(counts), dt)
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
        mix = self.mix.at(self._n)
        return now + mix.O * (mix.c0 + mix.c1 * min(per_replica, mix.n_max))

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
        step's end. Each step is served at its window's mean mix (a request log has one
        window, its mean; a rate trace's mix drifts window by window, sim/size_mix.py), and
        requests in flight when the window changes take the new window's service time. Nothing
        drains here: the pool returns []."""
        assert first == self._n, "steps are served in order"
        while first < last:
            end = self.mix.segment_end(first, last)
            self._advance_window(first, end)
            first = end
        return []

    def _advance_window(self, first: int, last: int) -> None:
        """advance() over steps in one window of the mix."""
        dt = self.dt
        ready = self.ready
        mix = self.mix.at(first)
        c0, c1, n_max, mean_output = mix.c0, mix.c1, mix.n_max, mix.O
        tokens_per_request = mix.P + mix.O
        slots = ready * n_max
        level_per_admission = (mix.P / self.capacity.prefill_tokens_per_s / dt / ready * RHO_LEVELS
                               if ready else 0.0)
        top_level = int(RHO_MAX * RHO_LEVELS)
        counts, itls, levels = self._counts, self._itl, self._rho_level
        queued_at, busy_at = self._queued_at, self._busy_at
        cum_in, cum_adm, cum_tokens = self._cum_in, self._cum_admitted, self._cum_tokens
        running, queue, completed_total, tokens = self.running, self.queue, self._completed, self.tokens_served
        counted = self._tokens_counted
        prompt = mix.P
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
            mix = self.mix.at(max(0, n - 1))
            kv = min(1.0, per_replica * (mix.P + mix.O / 2) / self.capacity.kv_cache_tokens)
            pods = _pods(self.ready, epoch + t, queue / self.ready, per_replica, kv)
        w = max(1, int(round(window / self.dt)))
        first = max(0, n - w)
        tokens = prompt = requests = ttft = itl = None
        if "tokens" in observes and n > first:
            tokens = (self._cum_tokens[n] - self._cum_tokens[first]) / ((n - first) * self.dt)
            requests = (self._cum_admitted[n] - self._cum_admitted[first]) / ((n - first) * self.dt)
            prompt = self.mix.at(n - 1).P * requests  # counted at prefill, at the mix of the moment
        if "latency" in observes and n > first:
            if ttft_q is not None:
                ttft = self._ttft_window(first, n, ttft_q)
            if itl_q is not None and self.ready and self._cum_in[n] > self._cum_in[first]:
                itl = max(self._itl[first:n])
        return Signals(source="simulator", sampled_at=epoch + t, pods=pods, ttft_seconds=ttft, tpot_seconds=itl,
                       tokens_per_second=tokens, prompt_tokens_per_second=prompt, requests_per_second=requests)

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
        rho = arrivals per replica x mean prefill time (fluid_mix.prefill_rows).
        tests/test_fleet.py checks the result against the engine scheduler itself."""
        rows = self.mix.rows(first, last, self._rho_level[first:last])
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
