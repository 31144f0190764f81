"""Replay a trace through a policy over a simulated fleet, the way the operator would run it.

Time moves in steps (1 s request by request, 5 s for the fluid model). At each step boundary,
in this order: replicas whose cold start is over become ready; if a scrape is due, the gauges
and windowed quantiles are read as they are at that instant (what Prometheus would hold); if
a policy tick is due, the policy is called with the latest scrape, so it sees the same lag the
scrape interval gives the operator, and its answer is carried out: new replicas become ready
after the cold start, removed ones drain first. Then the step's load is served. Between these
events the serving model runs several steps in one call.

GPU time is charged from a replica's creation to the end of its drain (or to the end of the
trace), per capacity type.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ebbtide.policy.observation import FleetState, Signals
from ebbtide.sim.capacity import CapacityModel
from ebbtide.sim.serving import ALL_SIGNALS, FluidServing, LatencyRecords, RequestServing, fluid_mix
from ebbtide.sim.traces import Trace

ON_DEMAND = "on-demand"


class Policy(Protocol):
    """What the fleet simulator calls. Optional attributes: `observes` (the signals it reads,
    a subset of serving.ALL_SIGNALS; default all), `instant_start` (its replicas need no cold
    start) and `initial(guess) -> int` (its own starting size)."""

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
    mean_p, mean_o = fluid_mix(float(trace.prompt_sum.sum()), float(trace.output_sum.sum()), trace.requests)
    guess = max(1, math.ceil(first / (0.7 * settings.capacity.max_request_rate(mean_p, mean_o))))
    initial = getattr(policy, "initial", None)
    return initial(guess) if initial else guess


class _Fleet:
    """The replicas of one service: starting, ready, draining, and the GPU time they hold."""

    def __init__(self, gpus_per_replica: int, cold_start: float):
        self.replicas: list[Replica] = []
        self.draining: dict[int, tuple[Replica, float]] = {}  # rid -> (replica, drain end; inf: unknown)
        self.gpu_seconds: dict[str, float] = {ON_DEMAND: 0.0}
        self.gpus = gpus_per_replica
        self.cold_start = cold_start
        self.ready = 0
        self._next_rid = 0

    def add(self, now: float, ready: bool = False) -> Replica:
        replica = Replica(rid=self._next_rid, created=now, ready_at=now if ready else now + self.cold_start,
                          ready=ready)
        self._next_rid += 1
        self.replicas.append(replica)
        self.ready += ready
        return replica

    def next_ready_at(self) -> float:
        return min((r.ready_at for r in self.replicas if not r.ready), default=math.inf)

    def promote(self, now: float) -> list[Replica]:
        """The replicas whose cold start is over by `now`, marked ready."""
        done = [r for r in self.replicas if not r.ready and r.ready_at <= now]
        for r in done:
            r.ready = True
        self.ready += len(done)
        return done

    def victim(self) -> Replica:
        """Like the ReplicaSet controller: not-ready pods go first, then the newest."""
        starting = [r for r in self.replicas if not r.ready]
        return max(starting or self.replicas, key=lambda r: r.created)

    def remove(self, replica: Replica, now: float, drain_end: float | None) -> None:
        """A starting replica is gone at once; a ready one holds its GPU until `drain_end`
        (None: until the serving model says it is idle)."""
        self.replicas.remove(replica)
        if replica.ready:
            self.ready -= 1
            self.draining[replica.rid] = (replica, math.inf if drain_end is None else drain_end)
        else:
            self._charge(replica, now)

    def drained(self, rid: int, now: float) -> None:
        replica, _ = self.draining.pop(rid)
        self._charge(replica, now)

    def finish(self, end: float) -> dict[str, float]:
        for replica in self.replicas:
            self._charge(replica, end)
        for replica, until in self.draining.values():
            self._charge(replica, min(until, end))
        self.replicas, self.draining = [], {}
        return self.gpu_seconds

    def _charge(self, replica: Replica, until: float) -> None:
        kind = replica.capacity_type
        self.gpu_seconds[kind] = self.gpu_seconds.get(kind, 0.0) + max(0.0, until - replica.created) * self.gpus


def simulate(trace: Trace, policy: Policy, settings: SimSettings, per_request: bool | None = None) -> PolicyRun:
    per_request = trace.per_request if per_request is None else per_request
    dt = 1.0 if per_request else settings.fluid_step_s
    steps = int(math.ceil(trace.duration_s / dt))
    end = steps * dt
    epoch = (trace.start_utc or datetime.datetime(2024, 1, 1)).replace(tzinfo=datetime.UTC).timestamp()
    mean_p, mean_o = fluid_mix(float(trace.prompt_sum.sum()), float(trace.output_sum.sum()), trace.requests)
    if per_request:
        serving: RequestServing | FluidServing = RequestServing(
            settings.capacity, trace.arrivals, trace.prompt_tokens, trace.output_tokens, dt=dt, seed=settings.seed)
    else:
        sizes = trace.prompt_tokens if trace.prompt_tokens is not None and len(trace.prompt_tokens) else None
        serving = FluidServing(settings.capacity, sizes if sizes is not None else np.array([mean_p]), mean_p, mean_o,
                               _binned(trace.counts, dt, steps), dt)
    observes = frozenset(getattr(policy, "observes", ALL_SIGNALS))
    fleet = _Fleet(settings.gpus_per_replica,
                   0.0 if getattr(policy, "instant_start", False) else settings.cold_start_s)
    for _ in range(_initial_replicas(policy, trace, settings)):
        serving.add_replica(fleet.add(0.0, ready=True).rid, 0.0)

    snapshot = Signals.missing("no scrape yet")
    next_scrape = next_tick = 0.0
    scale_actions = 0
    changes: list[tuple[int, int, int]] = []  # (step, replicas, ready) whenever they change
    n = 0
    while n < steps:
        t = n * dt
        for replica in fleet.promote(t):
            serving.add_replica(replica.rid, t)
        if t >= next_scrape:
            snapshot = serving.scrape(t, epoch, settings.metrics_window_s, settings.ttft_quantile,
                                      settings.tpot_quantile, observes)
            next_scrape += settings.scrape_interval_s
        if t >= next_tick:
            current = len(fleet.replicas)
            state = FleetState(current=current, ready=fleet.ready, starting=current - fleet.ready)
            desired = max(0, policy.decide(snapshot, state, epoch + t))
            if desired != current:
                scale_actions += 1
            while len(fleet.replicas) < desired:
                fleet.add(t)
            while len(fleet.replicas) > desired:
                victim = fleet.victim()
                drain_end = serving.remove_replica(victim.rid, t) if victim.ready else None
                fleet.remove(victim, t, drain_end)
            next_tick += policy.interval_s
        if not changes or changes[-1][1:] != (len(fleet.replicas), fleet.ready):
            changes.append((n, len(fleet.replicas), fleet.ready))
        upcoming = min(next_scrape, next_tick, fleet.next_ready_at())
        following = min(steps, max(n + 1, math.ceil(upcoming / dt - 1e-9)))
        for rid, when in serving.advance(n, following):
            fleet.drained(rid, when)
        n = following

    records = serving.finish(end)
    return PolicyRun(name=policy.name, gpu_seconds=fleet.finish(end), scale_actions=scale_actions, records=records,
                     tokens_served=serving.tokens_served, timeline=_timeline(trace, changes, dt, steps))


def _binned(counts: np.ndarray, dt: float, steps: int) -> np.ndarray:
    """Arrivals per step of `dt` seconds from arrivals per second."""
    factor = int(round(dt))
    if factor <= 1:
        return np.pad(counts.astype(float), (0, max(0, steps - len(counts))))[:steps]
    padded = np.pad(counts.astype(float), (0, max(0, steps * factor - len(counts))))[: steps * factor]
    return padded.reshape(steps, factor).sum(axis=1)


def _timeline(trace: Trace, changes: list[tuple[int, int, int]], dt: float, steps: int) -> Timeline:
    """Per minute (and the last, partial one): arrivals per second, and the replicas and ready
    replicas during the minute's last step."""
    end = steps * dt
    minute_ends = np.arange(60.0, end + 1e-9, 60.0)
    if not len(minute_ends) or minute_ends[-1] < end - 1e-9:
        minute_ends = np.append(minute_ends, end)
    last_steps = np.maximum(0, np.ceil(minute_ends / dt - 1e-9).astype(int) - 1)
    at = np.array([c[0] for c in changes])
    index = np.searchsorted(at, last_steps, side="right") - 1
    replicas = np.array([c[1] for c in changes])[index]
    ready = np.array([c[2] for c in changes])[index]
    per_second = np.pad(trace.counts.astype(float), (0, max(0, int(math.ceil(end)) - len(trace.counts))))
    cumulative = np.concatenate([[0.0], np.cumsum(per_second)])
    seconds = np.minimum(np.ceil(minute_ends - 1e-9).astype(int), len(per_second))
    lengths = np.diff(np.concatenate([[0.0], minute_ends]))  # the last minute may be partial
    arrivals = np.diff(np.concatenate([[0.0], cumulative[seconds]])) / lengths
    return Timeline(minute=(minute_ends / 60.0).tolist(), arrivals_per_s=arrivals.tolist(),
                    replicas=replicas.tolist(), ready=ready.tolist())
