"""Replay a trace through a policy over a simulated fleet, the way the operator would run it.

Time moves in steps (1 s request by request, 5 s for the fluid model). At each step boundary,
in this order: spot capacity changes (reclaims, the end of an outage); replicas whose cold
start is over become ready; if a scrape is due, the gauges and windowed quantiles are read as
they are at that instant (what Prometheus would hold); if a policy tick is due, the policy is
called with the latest scrape, so it sees the same lag the scrape interval gives the operator,
and its answer is carried out: new replicas become ready after the cold start, removed ones
drain first. Then the step's load is served. Between these events the serving model runs
several steps in one call.

Replicas run on demand or on spot, as two Deployments would. A policy that places replicas on
spot (one with a `place` method) says how many of each it wants; the others want on-demand
replicas only. Spot capacity behaves as `SpotMarket` says: reclaim events take several spot
replicas at once (after a notice), and during outages new spot replicas stay Pending.

GPU time is charged per capacity type from the moment a replica has a node (on demand: at
creation; on spot: once capacity is found) to the end of its drain, its reclaim, or the trace.

A policy with a warm pool (one whose `pool` is not None: Ebbtide with spec.sleep enabled) is
carried out as the operator carries it out: its decision is the awake target, and
`policy.warm_pool.plan_pool` (through `policy.pool`) turns it into replicas to wake, put to
sleep, delete or create. Surplus replicas first leave the endpoints and drain (they finish
what they hold and take nothing new, and can rejoin at once); idle long enough, they sleep.
A sleeping replica holds its GPU (charged as "asleep"), serves nothing, and wakes in the
capacity model's wake time for the spec's sleep level instead of a cold start. A policy that
also places replicas on spot has one pool per capacity type, each planned on its share of the
awake target, as the operator runs one per Deployment: surplus spot and on-demand replicas
sleep, and a spot sleeper that is reclaimed is gone (its asleep GPU time stops there).

Down to zero and back: with replicas.min 0 the awake target can reach 0 (the last replica
sleeps, or with allowScaleToZero or no pool, goes). Requests that arrive while no replica is
in the endpoints wait at the gateway, and that wait counts in their TTFT. A policy that reads
the gateway (`reads_gateway`: Ebbtide with scaling.activation) is given the count of requests
pending there as the last scrape saw it, which is what its activation query reads in a
cluster; policy.activation.activate turns it into one awake replica: a sleeper woken, or a
cold start.
"""

from __future__ import annotations

import datetime
import math
import random
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ebbtide.policy.observation import FleetState, Signals
from ebbtide.policy.startup import Startup
from ebbtide.policy.warm_pool import PoolPlan
from ebbtide.policy.warm_pool import Replica as PoolReplica
from ebbtide.sim.capacity import CapacityModel
from ebbtide.sim.serving import ALL_SIGNALS, FluidServing, LatencyRecords, RequestServing, fluid_mix
from ebbtide.sim.traces import Trace

ON_DEMAND = "on-demand"
SPOT = "spot"
ASLEEP = "asleep"  # GPU time of sleeping replicas (report.py prices it with sleep.reclaimedFraction)
ASLEEP_SPOT = "asleep-spot"  # of ASLEEP, the spot sleepers' (a spot GPU costs the spot price asleep too)


@dataclass(frozen=True)
class SpotReplica:
    """What a spot-aware policy is shown of one spot replica (as the operator sees its pod)."""

    name: str
    created: float  # unix seconds, like the `now` a policy is given
    ready: bool
    scheduled: bool  # has a node; False: Pending, no spot capacity found yet
    reclaimed: bool  # its node announced a reclaim


class Policy(Protocol):
    """What the fleet simulator calls. Optional attributes: `observes` (the signals it reads,
    a subset of serving.ALL_SIGNALS; default all), `instant_start` (its replicas need no cold
    start), `initial(guess) -> int` (its own starting size), and, for a policy that uses spot
    capacity, `place(signals, fleet, spot, now) -> (on_demand, spot)` (called instead of
    decide; `spot` is its spot replicas as SpotReplica views) and
    `initial_placement(size, now) -> (on_demand, spot)` (its warm start). A policy with a warm
    pool has `pool(desired, replicas, now) -> PoolPlan` (policy.warm_pool.plan_pool with its
    sleep settings) and `wake_level` (its sleep level); `pool` None: no warm pool. A policy
    with `reads_gateway` True takes `pending=` in decide and place: the requests held at the
    gateway at the last scrape (see the module docstring). A policy with
    `observe_startups(startups, now)` is given, before each tick's decision, the replicas that
    became Ready since the last one (policy.startup.Startup, unix seconds), as the operator
    measures startups from the pods it lists."""

    name: str
    interval_s: float

    def decide(self, signals: Signals, fleet: FleetState, now: float) -> int: ...


@dataclass(frozen=True)
class SpotMarket:
    """How spot capacity behaves during a replay (sim/simulate.py sets the CLI's defaults).

    Reclaim events arrive as a Poisson process, `preemptions_per_hour` of them per hour
    whatever the fleet holds (a provider reclaims capacity pools, not one customer's pods);
    each takes 1 + Poisson(burst - 1) of the spot replicas that have a node (at least one, the
    mean is `burst`), chosen at random. A reclaimed replica keeps serving for `notice_s` (the
    provider's warning; the operator sees the reclaim taint at once), then it is gone and its
    requests in flight are retried on other replicas. During an outage (start, end) in trace
    seconds, new spot replicas find no capacity: they stay Pending, not ready and not charged,
    until it ends. `reclaims` adds reclaim events at given times, (trace seconds, replicas
    taken), to set up a scenario. Everything is seeded by SimSettings.seed.
    """

    preemptions_per_hour: float = 0.0
    burst: float = 1.0
    notice_s: float = 0.0
    outages: tuple[tuple[float, float], ...] = ()
    reclaims: tuple[tuple[float, int], ...] = ()


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


@dataclass
class Replica:
    rid: int
    created: float
    ready_at: float  # inf while Pending
    capacity_type: str = ON_DEMAND
    ready: bool = False
    # The pod passed its readiness probe: it stays Ready asleep and waking (the engine answers
    # its health check), which is how the operator sees and classifies it.
    pod_ready: bool = False
    scheduled_at: float | None = None  # got a node (GPU time is charged from here); None: Pending
    reclaimed_at: float | None = None  # its node announced a reclaim
    # Warm pool only (see simulate): in the endpoints; out of them, idle from `idle_since` (the
    # end of its drain; inf while that is not known yet); asleep since `asleep_since`.
    serving: bool = False
    idle_since: float | None = None
    asleep_since: float | None = None
    charged_to: float | None = None  # GPU time before this is charged already (sleep and wake split it)

    @property
    def name(self) -> str:
        return f"replica-{self.rid}"

    def view(self, epoch: float) -> SpotReplica:
        return SpotReplica(name=self.name, created=epoch + self.created, ready=self.pod_ready,
                           scheduled=self.scheduled_at is not None, reclaimed=self.reclaimed_at is not None)


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


@dataclass(frozen=True)
class SpotStats:
    """What spot capacity did during a run."""

    reclaim_events: int = 0  # events that took at least one of this fleet's replicas
    replicas_reclaimed: int = 0
    requests_retried: float = 0.0  # in flight on a reclaimed replica (fluid: a fractional count)


@dataclass
class PolicyRun:
    name: str
    gpu_seconds: dict[str, float]
    scale_actions: int
    records: LatencyRecords
    tokens_served: float
    timeline: Timeline
    spot: SpotStats = SpotStats()


def _initial_replicas(policy: Policy, trace: Trace, settings: SimSettings) -> int:
    """Every policy starts warm, sized for the first minute's load at 70 % of saturation,
    unless it knows its own start (static and oracle policies do)."""
    first = float(trace.counts[:60].sum()) / 60.0
    mean_p, mean_o = fluid_mix(float(trace.prompt_sum.sum()), float(trace.output_sum.sum()), trace.requests)
    guess = max(1, math.ceil(first / (0.7 * settings.capacity.max_request_rate(mean_p, mean_o))))
    initial = getattr(policy, "initial", None)
    return initial(guess) if initial else guess


class _Fleet:
    """The replicas of one service: starting (or Pending), ready, draining, and the GPU time
    they hold, per capacity type."""

    def __init__(self, gpus_per_replica: int, cold_start: float):
        self.replicas: list[Replica] = []
        self.draining: dict[int, tuple[Replica, float]] = {}  # rid -> (replica, drain end; inf: unknown)
        self.gpu_seconds: dict[str, float] = {ON_DEMAND: 0.0}
        self.gpus = gpus_per_replica
        self.cold_start = cold_start
        self.ready = 0
        self._next_rid = 0
        # Replicas Ready for the first time since the policy last looked (a woken one is not:
        # its pod stayed Ready), in trace seconds: the startups the operator measures.
        self.startups: list[Startup] = []

    def add(self, now: float, ready: bool = False, kind: str = ON_DEMAND, obtainable: bool = True) -> Replica:
        """A new pod. One that finds no capacity (`obtainable` False) stays Pending."""
        replica = Replica(rid=self._next_rid, created=now, capacity_type=kind, ready=ready, serving=ready,
                          pod_ready=ready,
                          ready_at=now if ready else (now + self.cold_start if obtainable else math.inf),
                          scheduled_at=now if ready or obtainable else None)
        self._next_rid += 1
        self.replicas.append(replica)
        self.ready += ready
        return replica

    def get(self, rid: int) -> Replica | None:
        return next((r for r in self.replicas if r.rid == rid), None)

    def ready_serving(self) -> int:
        """Ready replicas in the endpoints (without a warm pool: every ready replica)."""
        return sum(1 for r in self.replicas if r.ready and r.serving)

    def count(self, kind: str) -> int:
        return sum(1 for r in self.replicas if r.capacity_type == kind)

    def next_ready_at(self) -> float:
        return min((r.ready_at for r in self.replicas if not r.ready), default=math.inf)

    def promote(self, now: float) -> list[Replica]:
        """The replicas whose cold start is over by `now`, marked ready."""
        done = [r for r in self.replicas if not r.ready and r.ready_at <= now]
        for r in done:
            if not r.pod_ready:
                self.startups.append(Startup(r.created, r.scheduled_at, r.ready_at, r.capacity_type == SPOT))
            r.ready = r.serving = r.pod_ready = True
        self.ready += len(done)
        return done

    def schedule_pending(self, now: float) -> None:
        """Spot capacity is back: Pending replicas get nodes and start."""
        for r in self.replicas:
            if r.scheduled_at is None:
                r.scheduled_at, r.ready_at = now, now + self.cold_start

    def victim(self, kind: str = ON_DEMAND) -> Replica:
        """Like the ReplicaSet controller: not-ready pods go first (Pending before started),
        then the newest."""
        mine = [r for r in self.replicas if r.capacity_type == kind]
        starting = [r for r in mine if not r.ready]
        return max(starting or mine, key=lambda r: (r.scheduled_at is None, r.created, r.rid))

    def remove(self, replica: Replica, now: float, drain_end: float | None) -> None:
        """A starting replica is gone at once; a ready one holds its GPU until `drain_end`
        (None: until the serving model says it is idle)."""
        self.replicas.remove(replica)
        if replica.ready:
            self.ready -= 1
            self.draining[replica.rid] = (replica, math.inf if drain_end is None else drain_end)
        else:
            self._charge(replica, now)

    def kill(self, replica: Replica, now: float) -> bool:
        """Its node is gone: charged until now. Returns whether it was still there (serving,
        starting or draining)."""
        if replica in self.replicas:
            self.replicas.remove(replica)
            self.ready -= replica.ready
        elif replica.rid in self.draining:
            replica, until = self.draining.pop(replica.rid)
            now = min(now, until)
        else:
            return False
        self._charge(replica, now)
        return True

    def drained(self, rid: int, now: float) -> None:
        """A replica finished its drain: gone if it was removed, else (warm pool) idle from now."""
        if rid in self.draining:
            replica, _ = self.draining.pop(rid)
            self._charge(replica, now)
            return
        replica = self.get(rid)
        if replica is not None and not replica.serving and replica.asleep_since is None:
            replica.idle_since = now

    def sleep(self, replica: Replica, now: float) -> None:
        """It holds its GPU, now charged as asleep, and serves nothing."""
        self._charge(replica, now)
        self.ready -= replica.ready
        replica.ready, replica.serving, replica.asleep_since = False, False, now
        replica.ready_at = math.inf  # promote() leaves it alone until it is woken

    def wake(self, replica: Replica, now: float, wake_seconds: float) -> None:
        """Awake again after `wake_seconds` (promote() then puts it in the endpoints)."""
        self._charge(replica, now)
        replica.asleep_since, replica.ready_at, replica.idle_since = None, now + wake_seconds, None

    def delete(self, replica: Replica, now: float) -> None:
        """Gone now (asleep, starting, or awake and done with its work)."""
        self.replicas.remove(replica)
        self.ready -= replica.ready
        self._charge(replica, now)

    def finish(self, end: float) -> dict[str, float]:
        for replica in self.replicas:
            self._charge(replica, end)
        for replica, until in self.draining.values():
            self._charge(replica, min(until, end))
        self.replicas, self.draining = [], {}
        return self.gpu_seconds

    def _charge(self, replica: Replica, until: float) -> None:
        """GPU time from where the last charge stopped (or the node was found) to `until`, as
        asleep or as its capacity type."""
        if replica.scheduled_at is None:  # a Pending pod on no node costs nothing
            return
        since = replica.scheduled_at if replica.charged_to is None else replica.charged_to
        seconds = max(0.0, until - since) * self.gpus
        kinds = (replica.capacity_type,) if replica.asleep_since is None else (
            (ASLEEP, ASLEEP_SPOT) if replica.capacity_type == SPOT else (ASLEEP,))
        for kind in kinds:
            self.gpu_seconds[kind] = self.gpu_seconds.get(kind, 0.0) + seconds
        replica.charged_to = max(since, until)


_ALL = 1 << 30  # a reclaim event that takes every spot replica


class _SpotClock:
    """The spot market's events over one replay: reclaim notices, the reclaims that follow
    them, and outage boundaries. The reclaim times and burst sizes depend only on the seed and
    the market, so every policy of a run faces the same market."""

    def __init__(self, market: SpotMarket, end: float, seed: int):
        self.market = market
        rng = np.random.default_rng([seed, 0x5B07])
        times: list[float] = []
        if market.preemptions_per_hour > 0:
            mean_gap = 3600.0 / market.preemptions_per_hour
            t = float(rng.exponential(mean_gap))
            while t < end:
                times.append(t)
                t += float(rng.exponential(mean_gap))
        sizes = 1 + rng.poisson(max(0.0, market.burst - 1.0), len(times))
        self.outages = sorted((float(a), float(b)) for a, b in market.outages if b > a)
        # An outage is a pool out of capacity: the provider takes back every spot replica it
        # runs (with the usual notice), and new ones stay Pending until it ends.
        everything = [(a, _ALL) for a, _ in self.outages]
        # Pending events (time, replicas to take), in time order.
        self.notices = sorted([*zip(times, sizes.tolist(), strict=True), *market.reclaims, *everything])
        self.reclaims: list[tuple[float, Replica]] = []  # (when, replica), noticed, in time order
        self._victims = random.Random(seed * 7919 + 0x5B07)
        self.stats = SpotStats()

    def obtainable(self, t: float) -> bool:
        return not any(a <= t < b for a, b in self.outages)

    def next_at(self, t: float) -> float:
        """The next time something changes, after `t`."""
        upcoming = [self.notices[0][0] if self.notices else math.inf,
                    self.reclaims[0][0] if self.reclaims else math.inf]
        upcoming += [b for a, b in self.outages if b > t] + [a for a, b in self.outages if a > t]
        return min(upcoming)

    def notice(self, t: float, fleet: _Fleet) -> None:
        """Reclaim events due by `t` mark their victims: spot replicas with a node."""
        while self.notices and self.notices[0][0] <= t:
            _, size = self.notices.pop(0)
            held = [r for r in fleet.replicas
                    if r.capacity_type == SPOT and r.scheduled_at is not None and r.reclaimed_at is None]
            if not held:
                continue
            taken = self._victims.sample(held, min(size, len(held)))
            for r in taken:
                r.reclaimed_at = t
                self.reclaims.append((t + self.market.notice_s, r))
            self.reclaims.sort(key=lambda e: (e[0], e[1].rid))
            self.stats = SpotStats(self.stats.reclaim_events + 1, self.stats.replicas_reclaimed + len(taken),
                                   self.stats.requests_retried)

    def due(self, t: float) -> list[Replica]:
        """The reclaimed replicas whose notice is over by `t`."""
        out = []
        while self.reclaims and self.reclaims[0][0] <= t:
            out.append(self.reclaims.pop(0)[1])
        return out

    def retried(self, requests: float) -> None:
        self.stats = SpotStats(self.stats.reclaim_events, self.stats.replicas_reclaimed,
                               self.stats.requests_retried + requests)


def _resize(fleet: _Fleet, serving: RequestServing | FluidServing, kind: str, desired: int, t: float,
            obtainable: bool) -> None:
    """Carry out one Deployment's replica count, as its ReplicaSet would."""
    while fleet.count(kind) < desired:
        fleet.add(t, kind=kind, obtainable=obtainable or kind != SPOT)
    while fleet.count(kind) > desired:
        victim = fleet.victim(kind)
        drain_end = serving.remove_replica(victim.rid, t) if victim.ready else None
        fleet.remove(victim, t, drain_end)


def _pool_tick(fleet: _Fleet, serving: RequestServing | FluidServing, policy: Policy, signals: Signals,
               t: float, epoch: float, wake_seconds: float, obtainable: bool, gateway: dict) -> bool:
    """One tick of a policy with a warm pool: the awake target from `decide` (placed on spot:
    each capacity type's share of it from `place`), then a pool plan per capacity type carried
    out, as the operator plans one per Deployment. Returns whether it moved any replica (a
    scale action).

    The core sees the awake target it set as `current` (the replicas in the endpoints plus those
    starting or waking), not the ones draining out of them: those are surplus it already dropped.
    """
    starting = sum(1 for r in fleet.replicas if not r.ready and r.asleep_since is None)
    ready = fleet.ready_serving()
    state = FleetState(current=ready + starting, ready=ready, starting=starting,
                       asleep=sum(1 for r in fleet.replicas if r.asleep_since is not None))
    place = getattr(policy, "place", None)
    if place is None:
        targets = {ON_DEMAND: policy.decide(signals, state, epoch + t, **gateway)}
    else:
        spot = tuple(r.view(epoch) for r in fleet.replicas if r.capacity_type == SPOT)
        targets = dict(zip((ON_DEMAND, SPOT), place(signals, state, spot, epoch + t, **gateway), strict=True))
    moved = False
    for kind, desired in targets.items():
        mine = [r for r in fleet.replicas if r.capacity_type == kind]
        plan = policy.pool(max(0, desired), [_pool_view(r, serving, t, epoch) for r in mine], epoch + t)
        moved |= _carry_out(plan, {r.name: r for r in mine}, fleet, serving, t, wake_seconds,
                            kind, obtainable or kind != SPOT)
    return moved


def _carry_out(plan: PoolPlan, by_name: dict[str, Replica], fleet: _Fleet, serving: RequestServing | FluidServing,
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
    for name in plan.serving:
        replica = by_name.get(name)
        if replica is not None and replica.ready and not replica.serving:  # back in the endpoints
            serving.add_replica(replica.rid, t)
            replica.serving, replica.idle_since = True, None
            rejoined += 1
    return bool(plan.delete or plan.sleep or plan.wake or plan.create or rejoined or left)


def _unix(startup: Startup, epoch: float) -> Startup:
    scheduled = None if startup.scheduled is None else epoch + startup.scheduled
    return Startup(epoch + startup.created, scheduled, epoch + startup.ready, startup.spot)


def _pool_view(replica: Replica, serving: RequestServing | FluidServing, t: float, epoch: float) -> PoolReplica:
    """A replica as the operator shows it to plan_pool (times as unix seconds)."""
    if replica.asleep_since is not None:
        return PoolReplica(replica.name, "asleep", asleep_since=epoch + replica.asleep_since,
                           capacity_type=replica.capacity_type)
    if not replica.ready:  # starting, or waking (both not ready yet)
        return PoolReplica(replica.name, "starting", capacity_type=replica.capacity_type)
    idle = serving.idle_since(replica.rid, t) if replica.serving else replica.idle_since
    return PoolReplica(replica.name, "awake", idle_since=None if idle is None or idle > t else epoch + idle,
                       capacity_type=replica.capacity_type)


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
    place = getattr(policy, "place", None)
    pool = getattr(policy, "pool", None)
    reads_gateway = getattr(policy, "reads_gateway", False)
    observe_startups = getattr(policy, "observe_startups", None)
    wake_s = settings.capacity.wake_seconds(policy.wake_level) if pool is not None else 0.0
    # Only a fleet that can hold spot replicas meets the spot market (and pays for its events).
    market = _SpotClock(settings.spot, end, settings.seed) if place is not None else None
    size = _initial_replicas(policy, trace, settings)
    wanted = policy.initial_placement(size, epoch) if place is not None else (size, 0)
    for kind, count in zip((ON_DEMAND, SPOT), wanted, strict=True):
        for _ in range(count):
            serving.add_replica(fleet.add(0.0, ready=True, kind=kind).rid, 0.0)

    snapshot = Signals.missing("no scrape yet")
    pending = 0.0  # requests held at the gateway, as the last scrape saw them
    next_scrape = next_tick = 0.0
    scale_actions = 0
    changes: list[tuple[int, ...]] = []  # (step, replicas, ready, spot, spot ready, asleep) on change
    n = 0
    while n < steps:
        t = n * dt
        if market is not None:
            _spot_events(market, fleet, serving, wanted, t)
        for replica in fleet.promote(t):
            serving.add_replica(replica.rid, t)
        if t >= next_scrape:
            snapshot = serving.scrape(t, epoch, settings.metrics_window_s, settings.ttft_quantile,
                                      settings.tpot_quantile, observes)
            pending = serving.pending()
            next_scrape += settings.scrape_interval_s
        gateway = {"pending": pending} if reads_gateway else {}
        if t >= next_tick and observe_startups is not None and fleet.startups:
            observe_startups([_unix(s, epoch) for s in fleet.startups], epoch + t)
            fleet.startups.clear()
        if t >= next_tick and pool is not None:
            scale_actions += _pool_tick(fleet, serving, policy, snapshot, t, epoch, wake_s,
                                        market is None or market.obtainable(t), gateway)
            # The Deployments hold sleepers too: a reclaimed spot sleeper is recreated by its
            # ReplicaSet (as a fresh replica), and the next plan deletes it if it is surplus.
            wanted = (fleet.count(ON_DEMAND), fleet.count(SPOT))
            next_tick += policy.interval_s
        elif t >= next_tick:
            current = len(fleet.replicas)
            state = FleetState(current=current, ready=fleet.ready, starting=current - fleet.ready)
            if place is not None:
                spot = tuple(r.view(epoch) for r in fleet.replicas if r.capacity_type == SPOT)
                asked = tuple(max(0, k) for k in place(snapshot, state, spot, epoch + t, **gateway))
            else:
                asked = (max(0, policy.decide(snapshot, state, epoch + t, **gateway)), 0)
            if asked != wanted:
                scale_actions += 1
            wanted = asked
            obtainable = market is None or market.obtainable(t)
            for kind, count in zip((ON_DEMAND, SPOT), wanted, strict=True):
                _resize(fleet, serving, kind, count, t, obtainable)
            next_tick += policy.interval_s
        spot_now = (0, 0) if market is None else (
            fleet.count(SPOT), sum(1 for r in fleet.replicas if r.capacity_type == SPOT and r.ready))
        asleep = 0 if pool is None else sum(1 for r in fleet.replicas if r.asleep_since is not None)
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


def _spot_events(market: _SpotClock, fleet: _Fleet, serving: RequestServing | FluidServing,
                 wanted: tuple[int, int], t: float) -> None:
    """At a step boundary: capacity that came back is used, reclaim notices mark their
    replicas, and replicas whose notice is over are gone. The spot Deployment's ReplicaSet
    then recreates the pods it lost (Pending if no capacity is to be had)."""
    obtainable = market.obtainable(t)
    if obtainable:
        fleet.schedule_pending(t)
    market.notice(t, fleet)
    lost = False
    for replica in market.due(t):
        if replica.ready or replica.rid in fleet.draining:
            market.retried(serving.preempt_replica(replica.rid, t))
        lost |= fleet.kill(replica, t)
    if lost:
        _resize(fleet, serving, SPOT, wanted[1], t, obtainable)


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
