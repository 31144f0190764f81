"""Replay a trace through a policy over a simulated fleet, the way the operator would run it.

Each step the fleet serves the step's arrivals; every scrape interval a snapshot of the gauges
and windowed latency quantiles is taken (what Prometheus would hold); every policy interval the
policy is called with the latest snapshot (so it sees the same lag a scrape interval gives the
operator) and its answer is carried out: new replicas become ready after the cold start,
removed ones drain first. GPU time is charged from creation to the end of draining.
"""

from __future__ import annotations

import datetime
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ebbtide.policy.observation import FleetState, Signals
from ebbtide.sim.capacity import CapacityModel
from ebbtide.sim.serving import FluidServing, LatencyRecords, RequestServing
from ebbtide.sim.traces import Trace

ON_DEMAND = "on-demand"


class Policy(Protocol):
    name: str
    interval_s: float

    def decide(self, signals: Signals, fleet: FleetState, now: float) -> int: ...


@dataclass(frozen=True)
class SimSettings:
    capacity: CapacityModel
    cold_start_s: float = 180.0
    scrape_interval_s: float = 15.0
    metrics_window_s: float = 60.0
    ttft_quantile: float | None = 0.9
    tpot_quantile: float | None = 0.9
    fluid_step_s: float = 5.0
    gpus_per_replica: int = 1
    seed: int = 0


@dataclass
class Replica:
    rid: int
    created: float
    ready_at: float
    capacity_type: str = ON_DEMAND
    ready: bool = False


@dataclass
class Timeline:
    """One row per minute, for plots."""

    minute: list[float] = field(default_factory=list)
    arrivals_per_s: list[float] = field(default_factory=list)
    replicas: list[int] = field(default_factory=list)
    ready: list[int] = field(default_factory=list)


@dataclass
class PolicyRun:
    name: str
    gpu_seconds: dict[str, float]
    scale_actions: int
    records: LatencyRecords
    tokens_served: float
    timeline: Timeline


def _initial_replicas(policy: Policy, trace: Trace, settings: SimSettings) -> int:
    """Every policy starts warm, sized for the first minute's load at 70 % of saturation,
    unless it knows its own start (static and oracle policies do)."""
    first = float(trace.counts[:60].sum()) / 60.0
    mean_p = float(trace.prompt_sum.sum() / max(trace.requests, 1))
    mean_o = float(max(trace.output_sum.sum() / max(trace.requests, 1), 1.0))
    guess = max(1, math.ceil(first / (0.7 * settings.capacity.max_request_rate(mean_p, mean_o))))
    initial = getattr(policy, "initial", None)
    return initial(guess) if initial else guess


def simulate(trace: Trace, policy: Policy, settings: SimSettings, per_request: bool | None = None) -> PolicyRun:
    per_request = trace.per_request if per_request is None else per_request
    dt = 1.0 if per_request else settings.fluid_step_s
    epoch = (trace.start_utc or datetime.datetime(2024, 1, 1)).replace(tzinfo=datetime.UTC).timestamp()
    mean_p = float(trace.prompt_sum.sum() / max(trace.requests, 1))
    mean_o = float(max(trace.output_sum.sum() / max(trace.requests, 1), 1.0))
    if per_request:
        serving: RequestServing | FluidServing = RequestServing(settings.capacity, seed=settings.seed)
    else:
        sizes = trace.prompt_tokens if trace.prompt_tokens is not None else np.array([mean_p])
        serving = FluidServing(settings.capacity, sizes if len(sizes) else np.array([mean_p]), mean_p, mean_o,
                               steps=int(math.ceil(trace.duration_s / dt)))

    replicas: list[Replica] = []
    draining: dict[int, tuple[str, float]] = {}  # rid -> (capacity type, fluid drain end)
    gpu_seconds = {ON_DEMAND: 0.0}
    next_rid = 0

    cold_start = 0.0 if getattr(policy, "instant_start", False) else settings.cold_start_s

    def add(now: float, ready: bool = False) -> None:
        nonlocal next_rid
        replica = Replica(rid=next_rid, created=now, ready_at=now if ready else now + cold_start)
        next_rid += 1
        replicas.append(replica)

    initial = _initial_replicas(policy, trace, settings)
    for _ in range(initial):
        add(0.0, ready=True)

    timeline = Timeline()
    snapshot = Signals.missing("no scrape yet")
    token_counters: deque[tuple[float, float]] = deque()
    next_scrape = 0.0
    next_tick = 0.0
    scale_actions = 0
    steps = int(math.ceil(trace.duration_s / dt))
    counts, p_sum, o_sum = _binned(trace, dt, steps)
    arrivals = trace.arrivals
    cursor = 0
    minute_arrivals = 0.0

    for step in range(steps):
        t0, t1 = step * dt, (step + 1) * dt
        for r in replicas:
            if not r.ready and r.ready_at <= t0:
                r.ready = True
                serving.add_replica(r.rid, t0)
        if per_request:
            end = int(np.searchsorted(arrivals, t1, side="left"))
            serving.step(t0, t1, arrivals[cursor:end], trace.prompt_tokens[cursor:end],
                         trace.output_tokens[cursor:end])
            cursor = end
            for rid in serving.drained():
                draining.pop(rid, None)
        else:
            serving.step(t0, t1, counts[step], p_sum[step], o_sum[step])
            for rid, (_, until) in list(draining.items()):
                if until <= t1:
                    del draining[rid]
        # GPU time: everything created and not yet gone holds its GPUs.
        for r in replicas:
            gpu_seconds[r.capacity_type] = gpu_seconds.get(r.capacity_type, 0.0) + dt * settings.gpus_per_replica
        for kind, _ in draining.values():
            gpu_seconds[kind] = gpu_seconds.get(kind, 0.0) + dt * settings.gpus_per_replica

        if t0 >= next_scrape:
            snapshot = _scrape(serving, t0, epoch, settings, dt, token_counters)
            next_scrape += settings.scrape_interval_s
        if t0 >= next_tick:
            ready = sum(r.ready for r in replicas)
            fleet = FleetState(current=len(replicas), ready=ready, starting=len(replicas) - ready)
            desired = max(0, policy.decide(snapshot, fleet, epoch + t0))
            if desired != len(replicas):
                scale_actions += 1
            while len(replicas) < desired:
                add(t0)
            while len(replicas) > desired:
                victim = _pick_victim(replicas)
                replicas.remove(victim)
                if victim.ready:
                    if per_request:
                        serving.remove_replica(victim.rid)
                        draining[victim.rid] = (victim.capacity_type, math.inf)
                    else:
                        drain = serving.drain_seconds()
                        serving.remove_replica(victim.rid)
                        draining[victim.rid] = (victim.capacity_type, t1 + drain)
            next_tick += policy.interval_s

        minute_arrivals += counts[step]
        if int(t1) % 60 == 0 or step == steps - 1:
            timeline.minute.append(t1 / 60.0)
            timeline.arrivals_per_s.append(minute_arrivals / 60.0)
            timeline.replicas.append(len(replicas))
            timeline.ready.append(sum(r.ready for r in replicas))
            minute_arrivals = 0.0

    if per_request:
        serving.finish(steps * dt)
        records = serving.records
    else:
        records = serving.records(dt)
    return PolicyRun(name=policy.name, gpu_seconds=gpu_seconds, scale_actions=scale_actions, records=records,
                     tokens_served=serving.tokens_served, timeline=timeline)


def _binned(trace: Trace, dt: float, steps: int):
    factor = int(round(dt))
    if factor <= 1:
        return trace.counts.astype(float), trace.prompt_sum, trace.output_sum
    pad = steps * factor - len(trace.counts)

    def fold(a: np.ndarray) -> np.ndarray:
        return np.pad(a.astype(float), (0, max(0, pad)))[: steps * factor].reshape(steps, factor).sum(axis=1)

    return fold(trace.counts), fold(trace.prompt_sum), fold(trace.output_sum)


def _pick_victim(replicas: list[Replica]) -> Replica:
    """Like the ReplicaSet controller: not-ready pods go first, then the newest."""
    starting = [r for r in replicas if not r.ready]
    pool = starting or replicas
    return max(pool, key=lambda r: r.created)


def _scrape(serving: RequestServing | FluidServing, t: float, epoch: float, settings: SimSettings,
            dt: float, counters: deque[tuple[float, float]]) -> Signals:
    """What Prometheus would hold at trace time `t`: gauges now, rates and quantiles over the
    window (`counters` keeps the token counter at past scrapes, as Prometheus' storage does)."""
    if isinstance(serving, FluidServing):
        ttft, itl = serving.latency_window(t, settings.metrics_window_s, settings.ttft_quantile,
                                           settings.tpot_quantile, dt)
    else:
        ttft, itl = serving.latency_window(t, settings.metrics_window_s, settings.ttft_quantile,
                                           settings.tpot_quantile)
    counters.append((t, serving.tokens_served))
    while counters[0][0] < t - settings.metrics_window_s:
        counters.popleft()
    first_t, first_tokens = counters[0]
    tokens_per_second = (serving.tokens_served - first_tokens) / (t - first_t) if t > first_t else None
    return Signals(source="simulator", sampled_at=epoch + t, pods=serving.pods(epoch + t),
                   ttft_seconds=ttft, tpot_seconds=itl, tokens_per_second=tokens_per_second)
