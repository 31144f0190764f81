"""Replay a trace through a policy over a simulated fleet, the way the operator would run it.

Time moves in steps (1 s request by request, 5 s for the fluid model). At each step boundary,
in this order: spot capacity changes (reclaims, the end of an outage); replicas whose cold
start is over become ready; if a scrape is due, the gauges and windowed quantiles are read as
they are at that instant (what Prometheus would hold); if a policy tick is due, the policy is
called with the latest scrape, so it sees the same lag the scrape interval gives the operator,
and its answer is carried out: new replicas become ready after the cold start, removed ones
drain first. Then the step's load is served. Between these events the serving model runs
several steps in one call.

Replicas run on demand or on spot, as two Deployments would. A policy that uses spot says how
many of each it wants; the others want on-demand replicas only (sim/policy.py: what a policy is
shown, and what it answers). Spot capacity behaves as `SpotMarket` says: reclaim events take
several spot replicas at once (after a notice), and during outages new spot replicas stay
Pending.

GPU time is charged per capacity type from the moment a replica has a node (on demand: at
creation; on spot: once capacity is found) to the end of its drain, its reclaim, or the trace.

A policy with a warm pool (Ebbtide with spec.sleep enabled) answers with a pool plan per
Deployment (policy.warm_pool.plan_pool, from the operator's own tick), carried out as the
operator carries it out: replicas to wake, put to sleep, delete or create. Surplus replicas
first leave the endpoints and drain (they finish what they hold and take nothing new, and can
rejoin at once); idle long enough, they sleep. A sleeping replica holds its GPU (charged as
"asleep"), serves nothing, and wakes in the capacity model's wake time for the spec's sleep
level instead of a cold start. A policy that also places replicas on spot has one pool per
capacity type, each planned on its share of the awake target, as the operator runs one per
Deployment: surplus spot and on-demand replicas sleep, and a spot sleeper that is reclaimed is
gone (its asleep GPU time stops there).

Down to zero and back: with replicas.min 0 the awake target can reach 0 (the last replica
sleeps, or with allowScaleToZero or no pool, goes). Requests that arrive while no replica is in
the endpoints wait at the gateway, and that wait counts in their TTFT. Every policy is shown
the count of requests pending there as the last scrape saw it, which is what Ebbtide's
activation query reads in a cluster; its tick turns it into one awake replica: a sleeper woken,
or a cold start.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from ebbtide.policy.capacity_types import CAPACITY_TYPES, ON_DEMAND, SPOT
from ebbtide.policy.observation import Deployments, Signals
from ebbtide.policy.warm_pool import PoolPlan
from ebbtide.sim.capacity import CapacityModel
from ebbtide.sim.fluid_mix import fluid_mix
from ebbtide.sim.fluid_serving import FluidServing
from ebbtide.sim.latency import LatencyRecords
from ebbtide.sim.policy import SimulatedPolicy
from ebbtide.sim.replicas import Fleet, Replica
from ebbtide.sim.request_serving import RequestServing
from ebbtide.sim.size_mix import SizeMix
from ebbtide.sim.spot_market import SpotClock, SpotMarket, SpotStats
from ebbtide.sim.traces import Trace

Serving = RequestServing | FluidServing


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
    spot: SpotMarket = SpotMarket()
    # Request by request: how requests reach replicas (request_serving.ROUTINGS). `simulate`'s
    # default is random, as a Service spreads them; power of two here is what the engine-level
    # tests were written against.
    routing: str = "power-of-two"


@dataclass
class Timeline:
    """One row per minute, for plots."""

    minute: list[float] = field(default_factory=list)
    arrivals_per_s: list[float] = field(default_factory=list)
    replicas: list[int] = field(default_factory=list)
    ready: list[int] = field(default_factory=list)
    spot: list[int] = field(default_factory=list)  # of `replicas`, on spot (Pending ones included)
    spot_ready: list[int] = field(default_factory=list)
    asleep: list[int] = field(default_factory=list)  # of `replicas`, asleep (warm pool)


@dataclass
class PolicyRun:
    name: str
    gpu_seconds: dict[str, float]
    scale_actions: int
    records: LatencyRecords
    tokens_served: float
    timeline: Timeline
    spot: SpotStats = SpotStats()


def _initial_guess(trace: Trace, settings: SimSettings) -> int:
    """Every policy starts warm, sized for the first minute's load at 70 % of saturation,
    unless it knows its own start (static and oracle policies do)."""
    first = float(trace.counts[:60].sum()) / 60.0
    mean_p, mean_o = fluid_mix(float(trace.prompt_sum.sum()), float(trace.output_sum.sum()), trace.requests)
    return max(1, math.ceil(first / (0.7 * settings.capacity.max_request_rate(mean_p, mean_o))))


def _resize(fleet: Fleet, serving: Serving, kind: str, desired: int, t: float,
            obtainable: bool, spot_kinds: frozenset[str] = frozenset({SPOT})) -> None:
    """Carry out one Deployment's replica count, as its ReplicaSet would (only spot ones can
    find no capacity)."""
    have = fleet.count(kind)
    for _ in range(desired - have):
        fleet.add(t, kind=kind, obtainable=obtainable or kind not in spot_kinds)
    for _ in range(have - desired):
        victim = fleet.victim(kind)
        drain_end = serving.remove_replica(victim.rid, t) if victim.ready else None
        fleet.remove(victim, t, drain_end)


def _carry_out(plan: PoolPlan, by_name: dict[str, Replica], fleet: Fleet, serving: Serving,
               t: float, wake_seconds: float, kind: str, obtainable: bool) -> bool:
    """One Deployment's pool plan done to its replicas; whether any of them moved."""
    for name in plan.delete:
        replica = by_name[name]
        if replica.serving:  # sleep disabled or maxPool 0: it drains, then it is gone
            fleet.remove(replica, t, serving.remove_replica(replica.rid, t))
        elif replica.ready and replica.idle_since is not None and replica.idle_since > t:
            fleet.remove(replica, t, None if math.isinf(replica.idle_since) else replica.idle_since)
        else:  # starting, asleep, or idle: its GPU is free at once
            fleet.delete(replica, t)
    for name in plan.sleep:
        replica = by_name[name]
        if replica.serving:  # idle in the endpoints: nothing to drain
            serving.remove_replica(replica.rid, t)
        fleet.sleep(replica, t)
    for name in plan.wake:
        fleet.wake(by_name[name], t, wake_seconds)
    for _ in range(plan.create):
        fleet.add(t, kind=kind, obtainable=obtainable)
    left = rejoined = 0
    for name in plan.draining:
        replica = by_name[name]
        if replica.serving:
            left += 1  # leaves the endpoints; idle once its drain is over
            drain_end = serving.remove_replica(replica.rid, t)
            replica.serving, replica.idle_since = False, math.inf if drain_end is None else drain_end
            replica.left_at = t
    for name in plan.serving:
        replica = by_name.get(name)
        if replica is not None and replica.ready and not replica.serving:  # back in the endpoints
            serving.add_replica(replica.rid, t)
            replica.serving, replica.idle_since, replica.left_at = True, None, None
            rejoined += 1
    return bool(plan.delete or plan.sleep or plan.wake or plan.create or rejoined or left)


def _idle_since(serving: Serving, t: float) -> Callable[[Replica], float | None]:
    """When an awake replica last had nothing to do: in the endpoints, as the serving model
    sees it; out of them, from the end of its drain (inf while not known)."""
    return lambda r: serving.idle_since(r.rid, t) if r.serving else r.idle_since


def simulate(trace: Trace, policy: SimulatedPolicy, settings: SimSettings, per_request: bool | None = None
             ) -> PolicyRun:
    per_request = trace.per_request if per_request is None else per_request
    dt = 1.0 if per_request else settings.fluid_step_s
    steps = int(math.ceil(trace.duration_s / dt))
    end = steps * dt
    epoch = (trace.start_utc or datetime.datetime(2024, 1, 1)).replace(tzinfo=datetime.UTC).timestamp()
    if per_request:
        serving: Serving = RequestServing(
            settings.capacity, trace.arrivals, trace.prompt_tokens, trace.output_tokens, dt=dt, seed=settings.seed,
            routing=settings.routing)
    else:
        serving = FluidServing(settings.capacity, fluid_sizes(trace), _binned(trace.counts, dt, steps), dt)
    fleet = Fleet(settings.gpus_per_replica, 0.0 if policy.instant_start else settings.cold_start_s)
    wake_s = settings.capacity.wake_seconds(policy.wake_level)
    # Only a fleet that can hold spot replicas meets the spot market (and pays for its events).
    market = SpotClock(settings.spot, end, settings.seed) if policy.uses_spot else None
    start = policy.start(_initial_guess(trace, settings), epoch)
    wanted = (start.get(ON_DEMAND, 0), start.get(SPOT, 0))
    for kind, count in zip(CAPACITY_TYPES, wanted, strict=True):
        for _ in range(count):
            serving.add_replica(fleet.add(0.0, ready=True, kind=kind).rid, 0.0)

    snapshot = Signals.missing("no scrape yet")
    pending = 0.0  # requests held at the gateway, as the last scrape saw them
    next_scrape = next_tick = 0.0
    scale_actions = 0
    pooled = False  # the policy has planned a warm pool
    changes: list[tuple[int, ...]] = []  # (step, replicas, ready, spot, spot ready, asleep) on change
    n = 0
    while n < steps:
        t = n * dt
        if market is not None:
            _spot_events(market, fleet, serving, {SPOT: wanted[1]}, t)
        for replica in fleet.promote(t):
            serving.add_replica(replica.rid, t)
        if t >= next_scrape:
            snapshot = serving.scrape(t, epoch, settings.metrics_window_s, settings.ttft_quantile,
                                      settings.tpot_quantile, policy.observes)
            pending = serving.pending()
            next_scrape += settings.scrape_interval_s
        if t >= next_tick:
            deployments = Deployments(wanted[0], wanted[1] if policy.uses_spot else None)
            idle = _idle_since(serving, t)
            orders = policy.orders(fleet.view(t, epoch, snapshot, pending, deployments, idle))
            obtainable = market is None or market.obtainable(t)
            if orders.pools:
                pooled, moved = True, False  # sleepers are counted from now on
                for kind, plan in orders.pools.items():
                    mine = {r.name: r for r in fleet.replicas if r.capacity_type == kind}
                    moved |= _carry_out(plan, mine, fleet, serving, t, wake_s, kind, obtainable or kind != SPOT)
                scale_actions += moved
                # The Deployments hold sleepers too: a reclaimed spot sleeper is recreated by its
                # ReplicaSet (as a fresh replica), and the next plan deletes it if it is surplus.
                wanted = (fleet.count(ON_DEMAND), fleet.count(SPOT))
            else:
                asked = (max(0, orders.replicas.get(ON_DEMAND, 0)), max(0, orders.replicas.get(SPOT, 0)))
                if asked != wanted:
                    scale_actions += 1
                wanted = asked
                for kind, count in zip(CAPACITY_TYPES, wanted, strict=True):
                    _resize(fleet, serving, kind, count, t, obtainable)
            next_tick += policy.interval_s
        spot_now = (0, 0) if market is None else (
            fleet.count(SPOT), sum(1 for r in fleet.replicas if r.capacity_type == SPOT and r.ready))
        asleep = sum(1 for r in fleet.replicas if r.asleep_since is not None) if pooled else 0
        row = (len(fleet.replicas), fleet.ready, *spot_now, asleep)
        if not changes or changes[-1][1:] != row:
            changes.append((n, *row))
        upcoming = min(next_scrape, next_tick, fleet.next_ready_at(),
                       market.next_at(t) if market is not None else math.inf)
        following = min(steps, max(n + 1, math.ceil(upcoming / dt - 1e-9)))
        for rid, when in serving.advance(n, following):
            fleet.drained(rid, when)
        n = following

    records = serving.finish(end)
    return PolicyRun(name=policy.name, gpu_seconds=fleet.finish(end), scale_actions=scale_actions, records=records,
                     tokens_served=serving.tokens_served, timeline=_timeline(trace, changes, dt, steps),
                     spot=market.stats if market is not None else SpotStats())


def fluid_sizes(trace: Trace) -> SizeMix:
    """The request mix the fluid model serves: a rate trace's drifting windows, or a request
    log's own mean mix and prompt sizes as one window."""
    if trace.mix is not None:
        return trace.mix
    mean_p, mean_o = fluid_mix(float(trace.prompt_sum.sum()), float(trace.output_sum.sum()), trace.requests)
    has_sizes = trace.prompt_tokens is not None and len(trace.prompt_tokens)
    return SizeMix(np.array([0.0]), (trace.prompt_tokens if has_sizes else np.array([mean_p]),), (np.array([mean_o]),))


def _spot_events(market: SpotClock, fleet: Fleet, serving: Serving, wanted: Mapping[str, int], t: float,
                 spot_kinds: frozenset[str] = frozenset({SPOT})) -> None:
    """At a step boundary: capacity that came back is used, reclaim notices mark their
    replicas, and replicas whose notice is over are gone. Each spot Deployment's ReplicaSet
    (`wanted`: its replicas; with variants, one per spot variant) then recreates the pods it
    lost (Pending if no capacity is to be had)."""
    obtainable = market.obtainable(t)
    if obtainable:
        fleet.schedule_pending(t)
    market.notice(t, fleet, spot_kinds)
    lost = False
    for replica in market.due(t):
        if replica.ready or replica.rid in fleet.draining:
            market.retried(serving.preempt_replica(replica.rid, t))
        lost |= fleet.kill(replica, t)
    if lost:
        for kind in spot_kinds:
            _resize(fleet, serving, kind, wanted.get(kind, 0), t, obtainable, spot_kinds)


def _binned(counts: np.ndarray, dt: float, steps: int) -> np.ndarray:
    """Arrivals per step of `dt` seconds from arrivals per second."""
    factor = int(round(dt))
    if factor <= 1:
        return np.pad(counts.astype(float), (0, max(0, steps - len(counts))))[:steps]
    padded = np.pad(counts.astype(float), (0, max(0, steps * factor - len(counts))))[: steps * factor]
    return padded.reshape(steps, factor).sum(axis=1)


def _timeline(trace: Trace, changes: list[tuple[int, ...]], dt: float, steps: int) -> Timeline:
    """Per minute (and the last, partial one): arrivals per second, and the replicas (all, spot
    and asleep) and ready replicas during the minute's last step."""
    end = steps * dt
    minute_ends = np.arange(60.0, end + 1e-9, 60.0)
    if not len(minute_ends) or minute_ends[-1] < end - 1e-9:
        minute_ends = np.append(minute_ends, end)
    last_steps = np.maximum(0, np.ceil(minute_ends / dt - 1e-9).astype(int) - 1)
    at = np.array([c[0] for c in changes])
    index = np.searchsorted(at, last_steps, side="right") - 1
    replicas, ready, spot, spot_ready, asleep = (np.array([c[k] for c in changes])[index] for k in (1, 2, 3, 4, 5))
    per_second = np.pad(trace.counts.astype(float), (0, max(0, int(math.ceil(end)) - len(trace.counts))))
    cumulative = np.concatenate([[0.0], np.cumsum(per_second)])
    seconds = np.minimum(np.ceil(minute_ends - 1e-9).astype(int), len(per_second))
    lengths = np.diff(np.concatenate([[0.0], minute_ends]))  # the last minute may be partial
    arrivals = np.diff(np.concatenate([[0.0], cumulative[seconds]])) / lengths
    return Timeline(minute=(minute_ends / 60.0).tolist(), arrivals_per_s=arrivals.tolist(),
                    replicas=replicas.tolist(), ready=ready.tolist(), spot=spot.tolist(),
                    spot_ready=spot_ready.tolist(), asleep=asleep.tolist())
