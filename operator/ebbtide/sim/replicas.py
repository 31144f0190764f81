"""The replicas of one simulated service, as two Deployments would hold them, and the GPU time
they are charged."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from ebbtide.policy.capacity_types import ON_DEMAND, SPOT
from ebbtide.policy.observation import Deployments, Pod, Signals
from ebbtide.policy.startup import Startup
from ebbtide.sim.policy import FleetView

ASLEEP = "asleep"  # GPU time of sleeping replicas (report.py prices it with sleep.reclaimedFraction)
ASLEEP_SPOT = "asleep-spot"  # of ASLEEP, the spot sleepers' (a spot GPU costs the spot price asleep too)


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
    left_at: float | None = None  # left the endpoints to drain (trace seconds); None while in them
    asleep_since: float | None = None
    charged_to: float | None = None  # GPU time before this is charged already (sleep and wake split it)
    _pod: tuple[tuple, Pod] | None = field(default=None, repr=False, compare=False)  # (what it shows, its view)

    @property
    def name(self) -> str:
        return f"replica-{self.rid}"

    @property
    def node(self) -> str | None:
        """Each replica with a node has a node of its own."""
        return None if self.scheduled_at is None else f"node-{self.name}"

    def pod(self, epoch: float) -> Pod:
        """Its pod as the operator would see it (times as unix seconds): asleep; starting while not
        ready (Pending, starting, or waking); else awake. Kept while nothing it shows changes."""
        shows = (self.ready, self.pod_ready, self.serving, self.asleep_since, self.scheduled_at, self.left_at)
        if self._pod is None or self._pod[0] != shows:
            asleep = self.asleep_since is not None
            state = "asleep" if asleep else "awake" if self.ready else "starting"
            self._pod = shows, Pod(self.name, self.capacity_type, state, self.serving,
                                   epoch + self.asleep_since if asleep else None, epoch + self.created, self.node,
                                   "Running" if self.scheduled_at is not None else "Pending", self.pod_ready,
                                   None if self.left_at is None else epoch + self.left_at)
        return self._pod[1]


class Fleet:
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
            r.left_at = None
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

    def view(self, t: float, epoch: float, signals: Signals, pending: float, deployments: Deployments,
             idle_since: Callable[[Replica], float | None]) -> FleetView:
        """The service at trace time `t` as the operator would observe it (times as unix seconds;
        `idle_since` in trace seconds). The startups are the replicas Ready since the last view."""
        startups = tuple(_unix(s, epoch) for s in self.startups)
        self.startups.clear()

        def idle() -> dict[str, float]:
            out = {}
            for r in self.replicas:
                since = idle_since(r) if r.ready and r.asleep_since is None else None
                if since is not None and since <= t:
                    out[r.name] = epoch + since
            return out

        return FleetView(epoch + t, signals, deployments, self.ready, pending,
                         pods=lambda: tuple(r.pod(epoch) for r in self.replicas),
                         idle=idle, startups=lambda: startups,
                         reclaimed_nodes=lambda: frozenset(r.node for r in self.replicas if r.reclaimed_at is not None))

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


def _unix(startup: Startup, epoch: float) -> Startup:
    scheduled = None if startup.scheduled is None else epoch + startup.scheduled
    return Startup(epoch + startup.created, scheduled, epoch + startup.ready, startup.spot)
