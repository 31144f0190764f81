"""Serving over replicas of several accelerator variants (issue 19): each replica is an engine of
its own variant's capacity model, and the gateway sends a request only to replicas whose
max_model_len holds it (power of two choices among those, as RequestServing does among all).

That is the routing assumption of spec.variants: the user's gateway knows which variants admit
which request sizes (a vLLM replica refuses a request longer than its --max-model-len). Beyond
that it balances on requests in flight, which sends fewer requests to slower replicas.

With `routes` set (the mix's size routing, MixPlan.routes), the gateway also follows the
decision: a request goes to the variants the plan holds for its size (the smallest size class
that holds it), if any of their replicas is serving; otherwise wherever it fits. The first of
them is the size's own (a variant a longer size shares comes later): it takes the request while
one of its replicas has nothing waiting in its queue, and only then do the others share the
load (a queue-aware gateway's spill, e.g. llm-d's queue scorer). Routing by
prompt length is the user's gateway's part (a header set by the client, or one endpoint per
size class); the simulator assumes the gateway is set up to follow the plan.

What the operator reads per variant is scraped per variant too: its pods, its token rate
(vLLM's counters summed over the variant's replicas, including those gone since), its TTFT and
TPOT quantiles over the window (the operator sums the variant's pods' histogram buckets,
signals/prometheus.py), and the shares of the token rate by the context the requests need (the
shell's `context_mix`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ebbtide.policy.observation import Signals
from ebbtide.sim.capacity import CapacityModel
from ebbtide.sim.engine_core import EngineCore
from ebbtide.sim.request_serving import RequestServing, _tokens_counted, window_quantiles


class VariantServing(RequestServing):
    def __init__(self, models: Mapping[str, CapacityModel], kind_of: Callable[[int], str], arrivals: np.ndarray,
                 prompts: np.ndarray, outputs: np.ndarray, dt: float = 1.0, seed: int = 0):
        widest = max(models.values(), key=lambda m: m.max_model_len)
        super().__init__(widest, arrivals, prompts, outputs, dt=dt, seed=seed)
        self.models = dict(models)
        self._kind_of = kind_of
        self.kinds: dict[int, str] = {}  # replica -> its variant
        self._ever: dict[str, list[EngineCore]] = {kind: [] for kind in models}  # for the token counters
        self._marks: dict[str, deque[tuple[float, float]]] = {kind: deque() for kind in models}
        # Each variant's latency samples, as the service's: (time, TTFT) and (time, ITL, tokens).
        self._ttft_by_kind: dict[str, deque[tuple[float, float]]] = {kind: deque() for kind in models}
        self._itl_by_kind: dict[str, deque[tuple[float, float, int]]] = {kind: deque() for kind in models}
        self.routes: tuple[tuple[int | None, tuple[str, ...]], ...] = ()  # MixPlan.routes; () routes by fit only
        self._now = 0.0

    def model_for(self, rid: int) -> CapacityModel:
        kind = self.kinds[rid] = self._kind_of(rid)
        return self.models[kind]

    def add_replica(self, rid: int, now: float) -> None:
        new = rid not in self.draining and rid not in self.engines
        super().add_replica(rid, now)
        if new:
            self._ever[self.kinds[rid]].append(self.engines[rid])

    def _route(self, arrival: float, prompt: int, output: int, now: float) -> None:
        self._now = now  # for admitting's look at the queues
        super()._route(arrival, prompt, output, now)

    def admitting(self, prompt: int, output: int) -> list[int]:
        need = prompt + output + 1
        fits = [rid for rid, engine in self.engines.items() if engine.model.max_model_len >= need]
        planned = route_for(self.routes, need)
        if len(planned) > 1:  # the size's own variant first, while one of its replicas has no queue
            own = [rid for rid in fits if self.kinds[rid] == planned[0]]
            free = [rid for rid in own if self._queue_now(rid) == 0]
            if free:
                return own
        routed = [rid for rid in fits if self.kinds[rid] in planned]
        return routed or fits or list(self.engines)

    def _queue_now(self, rid: int) -> int:
        """Requests waiting in the replica's own queue as it is now (vLLM's num_requests_waiting,
        what a queue-aware gateway scores on)."""
        self._collect(rid, self.engines[rid].advance(self._now))
        return self.engines[rid].num_waiting

    def _record_ttft(self, rid: int, at: float, ttft: float) -> None:
        super()._record_ttft(rid, at, ttft)
        self._ttft_by_kind[self.kinds[rid]].append((at, ttft))

    def _record_itl(self, rid: int, at: float, itl: float, count: int) -> None:
        super()._record_itl(rid, at, itl, count)
        self._itl_by_kind[self.kinds[rid]].append((at, itl, count))

    def variant_signals(self, t: float, window: float, service: Signals, ttft_q: float | None = None,
                        itl_q: float | None = None) -> dict[str, Signals]:
        """Each variant's pods (as the service's scrape saw them), its token rate and its latency
        quantiles over the window (call it right after the service's scrape at `t`)."""
        by_pod = {f"replica-{rid}": kind for rid, kind in self.kinds.items()}
        out = {}
        for kind, engines in self._ever.items():
            counted = sum(_tokens_counted(e)[0] for e in engines)  # prompt + generated
            marks = self._marks[kind]
            marks.append((t, counted))
            while marks[0][0] < t - window:
                marks.popleft()
            first_t, first = marks[0]
            ttft, itl = window_quantiles(self._ttft_by_kind[kind], self._itl_by_kind[kind], t, window,
                                         ttft_q, itl_q)
            out[kind] = Signals(source=service.source, sampled_at=service.sampled_at,
                                pods=tuple(p for p in service.pods if by_pod.get(p.pod) == kind),
                                tokens_per_second=(counted - first) / (t - first_t) if t > first_t else None,
                                ttft_seconds=ttft, tpot_seconds=itl)
        return out


def route_for(routes: tuple[tuple[int | None, tuple[str, ...]], ...], need: int) -> tuple[str, ...]:
    """The variants the plan holds for a request needing `need` tokens of context: those of the
    smallest size class that holds it (None: any size); () when no class does."""
    holding = [(math.inf if bound is None else bound, names) for bound, names in routes
               if bound is None or bound >= need]
    return min(holding, key=lambda entry: entry[0])[1] if holding else ()


def context_mix(arrivals: np.ndarray, prompts: np.ndarray, outputs: np.ndarray, t: float, window: float,
                limits: Sequence[int]) -> tuple[tuple[int, float], ...]:
    """Shares of the tokens that arrived over the window by the context their requests need,
    in classes at the variants' limits (a request goes to the smallest limit that holds it)."""
    bounds = sorted(set(limits))
    if len(bounds) < 2:
        return ()
    lo, hi = np.searchsorted(arrivals, [t - window, t], side="right")
    if hi <= lo:
        return ()
    need = prompts[lo:hi] + outputs[lo:hi] + 1
    tokens = (prompts[lo:hi] + outputs[lo:hi]).astype(float)
    cls = np.minimum(np.searchsorted(bounds, need, side="left"), len(bounds) - 1)
    per_class = np.bincount(cls, weights=tokens, minlength=len(bounds))
    total = per_class.sum()
    if total <= 0:
        return ()
    return tuple((bound, float(share / total)) for bound, share in zip(bounds, per_class, strict=True) if share > 0)
