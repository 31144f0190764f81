"""A clock-free discrete-event model of one vLLM engine (V1 scheduler, continuous batching).

The caller owns time: `submit(..., now)` queues a request, `advance(until)` runs every scheduler
step that ends by `until` and returns what happened. The HTTP simulator drives it with the wall
clock, the fleet simulator with virtual time.

Scheduling follows vLLM V1 (vllm/v1/core/sched/scheduler.py) in the parts that shape latency:
- Each step has a token budget (max_num_batched_tokens). Running requests come first: one token
  per decoding request, then chunks of prompts being prefilled; then waiting requests are
  admitted FCFS while running < max_num_seqs, the budget lasts and their KV blocks fit.
- KV blocks hold block_size tokens. A request is given the blocks for its whole prompt when it is
  admitted (vLLM allocates per chunk; whole-prompt allocation keeps admission simple and only
  differs while a long prompt is half prefilled) and one more block each time decoding fills its
  last one. When a step's growth does not fit, the newest running request is preempted: its
  blocks are freed and it goes back to the front of the queue, to be prefilled again over its
  prompt and the tokens generated so far (recompute). No admission happens in a step that
  preempted.
- A request emits its first token at the end of the step that completes its prefill; TTFT is
  counted from arrival, queue time included, as vLLM does.

Speed: runs of pure decode steps are advanced in one go (sim/decode_runs.py); `step_by_step=True`
turns the shortcut off, and tests check both modes agree.
"""

from __future__ import annotations

import heapq
import math
from collections import deque

from ebbtide.sim.capacity import CapacityModel
from ebbtide.sim.decode_runs import blocks_for_steps, coefficients, run_time, steps_before_full, steps_within
from ebbtide.sim.engine_types import (
    DECODE,
    DONE,
    PREFILL,
    WAITING,
    EngineBusy,
    EngineRequest,
    EngineSleeping,
    Event,
    Finished,
    FirstToken,
    Step,
    Tokens,
)


class EngineCore:
    """One engine. Times are floats in any unit-consistent clock (seconds)."""

    def __init__(self, model: CapacityModel, *, emit_tokens: bool = False, step_by_step: bool = False) -> None:
        self.model = model
        self._emit_tokens = emit_tokens
        self._step_by_step = step_by_step
        self._bs = model.block_size
        self._total_blocks = model.num_gpu_blocks
        self._watermark_blocks = math.ceil(model.admission_watermark * self._total_blocks)

        self._requests: dict[str, EngineRequest] = {}
        self._waiting: deque[EngineRequest] = deque()
        self._running: dict[str, EngineRequest] = {}  # admission order; popitem() yields the newest
        self._prefilling: dict[str, EngineRequest] = {}
        # Decoding sequences in aggregate: count, sum of bases, count per base % block_size,
        # and finish heap (entries of preempted or aborted sequences are skipped lazily).
        self._n_dec = 0
        self._sum_base = 0
        self._residues = [0] * self._bs
        self._finish_heap: list[tuple[int, int, EngineRequest]] = []
        self._heap_seq = 0

        self._G = 0  # steps completed
        self._used_blocks = 0
        self._clock = 0.0  # start of the in-flight step, or the time the engine went idle
        self._now = 0.0  # latest time the caller has shown us
        self._inflight: Step | None = None
        self._itl_samples: list[tuple[float, int]] = []
        self._sleep_level = 0

        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.preemptions_total = 0

    # -- gauges ----------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_cache_usage(self) -> float:
        return self._used_blocks / self._total_blocks

    @property
    def idle(self) -> bool:
        return not self._requests and self._inflight is None

    @property
    def sleep_level(self) -> int:
        """0 when awake, else the level of the last sleep."""
        return self._sleep_level

    @property
    def is_sleeping(self) -> bool:
        return self._sleep_level > 0

    @property
    def now(self) -> float:
        return self._now

    def next_event_time(self) -> float | None:
        """End of the step in flight (None when idle): the earliest time advance() can report more."""
        return None if self._inflight is None else self._inflight.end

    def take_itl_samples(self) -> list[tuple[float, int]]:
        """Inter-token latencies since the last call, as (seconds, number of tokens) pairs; a run
        of decode steps is reported as its mean step time (steps differ by nanoseconds)."""
        samples, self._itl_samples = self._itl_samples, []
        return samples

    # -- requests --------------------------------------------------------------------------

    def submit(self, request_id: str, prompt_tokens: int, max_output_tokens: int, now: float) -> None:
        if self._sleep_level:
            raise EngineSleeping(f"engine is asleep (level {self._sleep_level}); request {request_id} refused")
        self._check_time(now)
        if request_id in self._requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        if prompt_tokens < 1 or max_output_tokens < 1:
            raise ValueError("prompt_tokens and max_output_tokens must be >= 1")
        total = prompt_tokens + max_output_tokens
        if total > self.model.max_model_len:
            raise ValueError(f"prompt ({prompt_tokens}) + max_tokens ({max_output_tokens}) = {total} tokens "
                             f"exceeds the maximum context length {self.model.max_model_len}")
        if -(-total // self._bs) > self._total_blocks:
            raise ValueError(f"{total} tokens do not fit in the KV cache ({self.model.kv_cache_tokens} tokens)")
        self._now = now
        req = EngineRequest(request_id, prompt_tokens, max_output_tokens, now)
        self._requests[request_id] = req
        self._waiting.append(req)

    def abort(self, request_id: str, now: float) -> Finished | None:
        """Drop a request (client went away). Returns its Finished(reason="abort"), or None if
        it is unknown or already finished."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return None
        self._check_time(now)
        self._now = now
        if req.state == WAITING:
            self._waiting.remove(req)
        elif req.state == PREFILL:
            del self._running[request_id]
            del self._prefilling[request_id]
            self._used_blocks -= req.blocks
        else:
            del self._running[request_id]
            # While a step is in flight its block growth is already allocated.
            self._drop_decoding(req, self._G + (self._inflight is not None))
        req.state = DONE
        return Finished(req.rid, "abort", req.prompt, req.generated, req.arrival, req.scheduled_at,
                        req.first_token_at, now)

    # -- sleep -----------------------------------------------------------------------------

    def sleep(self, level: int) -> None:
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level!r}")
        if not self.idle:
            raise EngineBusy(f"cannot sleep with requests in flight ({self.num_running} running, "
                             f"{self.num_waiting} waiting)")
        if not self._sleep_level:
            self._sleep_level = level

    def wake_up(self) -> None:
        self._sleep_level = 0

    # -- time ------------------------------------------------------------------------------

    def advance(self, until: float) -> list[Event]:
        """Run every step that ends by `until`; return the events in time order.
        `advance(math.inf)` runs until idle (and no request can be submitted after it)."""
        self._check_time(until)
        self._now = until
        events: list[Event] = []
        while True:
            step = self._inflight
            if step is not None:
                if step.end > until:
                    break
                self._inflight = None
                self._complete_step(step, events)
                continue
            if not self._step_by_step and self._n_dec and not self._prefilling:
                k = self._decode_run_length(until)
                if k:
                    self._run_decode(k, events)
                    continue
            if self._plan_step():
                continue
            # Idle: nothing running, and no one waiting who had arrived by the clock (an empty
            # engine admits any request that passed submit's checks).
            if self._waiting:
                arrival = self._waiting[0].arrival
                assert arrival > self._clock, "an idle engine failed to admit a waiting request"
                if arrival <= until:
                    self._clock = arrival
                    continue
            self._clock = until
            break
        return events

    def _check_time(self, t: float) -> None:
        if t < self._now:
            raise ValueError(f"time went backwards: {t} < {self._now}")

    # -- one step --------------------------------------------------------------------------

    def _decode_need(self) -> int:
        """Blocks the next step's decode growth needs: sequences whose last block is full."""
        return self._residues[(1 - self._G) % self._bs] if self._n_dec else 0

    def _plan_step(self) -> bool:
        """Schedule the step starting at the clock; False when there is nothing to run."""
        t = self._clock
        preempted = False
        need = self._decode_need()
        while need > self._total_blocks - self._used_blocks:
            self._preempt_newest()
            preempted = True
            need = self._decode_need()

        budget = self.model.max_num_batched_tokens - self._n_dec
        chunks: list[tuple[EngineRequest, int]] = []
        prefill_tokens = 0
        for req in self._prefilling.values():
            if budget <= 0:
                break
            n = min(req.prefill_left, budget)
            chunks.append((req, n))
            budget -= n
            prefill_tokens += n
        if not preempted:
            free = self._total_blocks - self._used_blocks - need
            waiting, running = self._waiting, self._running
            while waiting and budget > 0 and len(running) < self.model.max_num_seqs:
                req = waiting[0]
                if req.arrival > t:
                    break
                length = req.prompt + req.generated
                blocks = -(-length // self._bs)
                if blocks > free or (running and free - blocks < self._watermark_blocks):
                    break
                waiting.popleft()
                free -= blocks
                self._used_blocks += blocks
                req.state, req.blocks, req.prefill_left = PREFILL, blocks, length
                if req.scheduled_at is None:
                    req.scheduled_at = t
                running[req.rid] = req
                self._prefilling[req.rid] = req
                n = min(length, budget)
                chunks.append((req, n))
                budget -= n
                prefill_tokens += n
        if not self._n_dec and not chunks:
            return False
        self._used_blocks += need
        duration = self.model.step_seconds(self._n_dec, self._sum_base + self._n_dec * self._G, prefill_tokens)
        self._inflight = Step(t + duration, duration, chunks)
        return True

    def _complete_step(self, step: Step, events: list[Event]) -> None:
        t = step.end
        self._clock = t
        self._G += 1
        n = self._n_dec  # decoders of this step, minus any aborted meanwhile
        if n:
            self.generation_tokens_total += n
            self._itl_samples.append((step.duration, n))
            if self._emit_tokens:
                events.extend(Tokens(r.rid, 1, t) for r in self._running.values() if r.state == DECODE)
        self._finish_due(t, events)
        for req, n in step.chunks:
            if req.state != PREFILL:  # aborted while the step ran
                continue
            req.prefill_left -= n
            if not req.prefill_left:
                self._prefill_done(req, t, events)

    # -- many decode steps at once ---------------------------------------------------------

    def _decode_run_length(self, until: float) -> int:
        """How many pure decode steps can run from the clock without any scheduling change,
        all ending by `until` (0: take the general path)."""
        heap, G = self._finish_heap, self._G
        while heap[0][2].state != DECODE or heap[0][2].g_fin != heap[0][0]:
            heapq.heappop(heap)
        k = min(heap[0][0] - G, steps_before_full(self._total_blocks - self._used_blocks, self._n_dec, self._bs,
                                                   G, self._residues))
        if k <= 0:
            return 0
        a, delta = coefficients(self.model, self._n_dec, self._sum_base, self._G)
        waiting = self._waiting
        if waiting and len(self._running) < self.model.max_num_seqs:
            head = waiting[0]
            # Free blocks only shrink during a run, so a head that does not fit now will not fit
            # until a finish or preemption, which ends the run anyway.
            free = self._total_blocks - self._used_blocks - self._decode_need()
            blocks = -(-(head.prompt + head.generated) // self._bs)
            if blocks <= free and free - blocks >= self._watermark_blocks:
                wait = head.arrival - self._clock
                if wait <= 0:
                    return 0
                i = steps_within(a, delta, wait)
                if run_time(a, delta, i) < wait:
                    i += 1  # the first step boundary at or after its arrival
                k = min(k, i)
        return min(k, steps_within(a, delta, until - self._clock))

    def _run_decode(self, k: int, events: list[Event]) -> None:
        a, delta = coefficients(self.model, self._n_dec, self._sum_base, self._G)
        elapsed = run_time(a, delta, k)
        n = self._n_dec
        self._used_blocks += blocks_for_steps(k, n, self._bs, self._G, self._residues)
        self._G += k
        self._clock += elapsed
        self.generation_tokens_total += n * k
        self._itl_samples.append((elapsed / k, n * k))
        if self._emit_tokens:
            events.extend(Tokens(r.rid, k, self._clock) for r in self._running.values())
        self._finish_due(self._clock, events)

    # -- request transitions ---------------------------------------------------------------

    def _prefill_done(self, req: EngineRequest, t: float, events: list[Event]) -> None:
        del self._prefilling[req.rid]
        req.generated += 1
        self.generation_tokens_total += 1
        if req.generated == 1:
            req.first_token_at = t
            self.prompt_tokens_total += req.prompt
            events.append(FirstToken(req.rid, t, t - req.arrival))
        elif self._emit_tokens:  # recomputed after a preemption: the next token, not a first one
            events.append(Tokens(req.rid, 1, t))
        if req.generated >= req.max_out:
            del self._running[req.rid]
            self._used_blocks -= req.blocks
            self._finish(req, t, events)
            return
        req.state = DECODE
        # Length (prompt + generated) = base + G, from now on without per-step updates.
        req.base = req.prompt + req.generated - self._G
        req.g_fin = self._G + req.max_out - req.generated
        self._n_dec += 1
        self._sum_base += req.base
        self._residues[req.base % self._bs] += 1
        self._heap_seq += 1
        heapq.heappush(self._finish_heap, (req.g_fin, self._heap_seq, req))

    def _finish_due(self, t: float, events: list[Event]) -> None:
        heap, G = self._finish_heap, self._G
        while heap and heap[0][0] <= G:
            g_fin, _, req = heapq.heappop(heap)
            if req.state != DECODE or req.g_fin != g_fin:
                continue
            del self._running[req.rid]
            self._drop_decoding(req, G)
            self._finish(req, t, events)

    def _finish(self, req: EngineRequest, t: float, events: list[Event]) -> None:
        req.state = DONE
        del self._requests[req.rid]
        events.append(Finished(req.rid, "length", req.prompt, req.generated, req.arrival, req.scheduled_at,
                               req.first_token_at, t))

    def _drop_decoding(self, req: EngineRequest, g_alloc: int) -> None:
        """Take a decoding sequence out of the aggregates and free its blocks. Blocks are
        allocated for every step up to (excluding) counter g_alloc."""
        self._n_dec -= 1
        self._sum_base -= req.base
        self._residues[req.base % self._bs] -= 1
        self._used_blocks -= -(-(req.base + g_alloc - 1) // self._bs)
        req.generated = req.base + self._G - req.prompt

    def _preempt_newest(self) -> None:
        _, req = self._running.popitem()
        if req.state == DECODE:
            self._drop_decoding(req, self._G)
        else:
            del self._prefilling[req.rid]
            self._used_blocks -= req.blocks
        req.state = WAITING
        self._waiting.appendleft(req)
        self.preemptions_total += 1
