"""The warm pool: which replicas to wake, put to sleep or delete, as a pure function.

    plan_pool(desired, replicas, policy, now, allow_scale_to_zero=False, drain_seconds=0,
              serving_elsewhere=0, service_target=0) -> PoolPlan

`desired` is the awake size decide() asked for. The plan meets it with the cheapest moves:
1. Short: wake sleepers first (oldest asleep first: it is the next to expire, and the young
   ones keep the pool warm longest), create replicas only when no sleeper is left.
2. Surplus: replicas still starting go first (they serve nothing yet, and the ReplicaSet
   controller deletes not-ready pods first whatever their deletion cost). Awake surplus leaves
   the Service at once (`serving`), and once idle for `idle_seconds` goes to sleep while the
   pool has room. Awake surplus that is to go (sleep disabled, or the pool full) is deleted
   only once drained: out of the Service and seen with nothing in flight since (`drained`), or
   `drain_seconds` after it left. Until then it drains: a draining replica is the fastest warm
   capacity there is. Replicas already draining are the first surplus, so none flips back and forth.
   A replica on a node that announced its end (spot reclaim notice, cordon) leaves the Service,
   surplus or not, once the other replicas in it (here and `serving_elsewhere`, in the service's
   other Deployment) carry the service's awake size `service_target`, so that its requests in
   flight finish within the rest of the notice.
3. Sleepers are deleted after `ttl_seconds`, and beyond `max_pool` (oldest first). A TTL
   deletion waits while a replica is starting: the ReplicaSet controller would delete the
   starting pod instead, whatever the deletion costs say. The pool bound never waits.
4. With sleep mode, replicas.min 0 and no allowScaleToZero, the last replica is kept: asleep
   if the pool may hold one (its TTL does not apply), else awake. Without sleep mode, min 0
   is scale to zero.

The Deployment is asked for every replica that remains (awake + starting + asleep) plus the
ones to create; `deletion_costs` ranks the pods so that, when the count drops, the ReplicaSet
controller removes the planned ones first, then sleepers, then the awake replicas idle longest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ebbtide.api.spec import SleepPolicy
from ebbtide.policy.capacity_types import ON_DEMAND
from ebbtide.policy.observation import PodState as State


@dataclass(frozen=True, slots=True)
class Replica:
    name: str
    state: State
    idle_since: float | None = None  # awake with nothing running or waiting since then; None if busy
    asleep_since: float | None = None
    capacity_type: str = ON_DEMAND
    left_at: float | None = None  # out of the Service since (unix seconds); None while in it
    drained: bool = False  # out of the Service and seen with nothing in flight since (policy/idle.py)
    reclaimed: bool = False  # its node announced its end (a spot reclaim notice, a cordon)


@dataclass(frozen=True, slots=True)
class PoolPlan:
    wake: tuple[str, ...]
    sleep: tuple[str, ...]
    delete: tuple[str, ...]
    create: int
    replicas: int  # the Deployment's spec.replicas: everything that remains, plus creations
    serving: tuple[str, ...]  # awake replicas that belong in the Service endpoints (incl. woken)
    draining: tuple[str, ...]  # awake surplus kept out of the endpoints until it sleeps or goes
    deletion_costs: dict[str, int] = field(hash=False)  # pod -> controller.kubernetes.io/pod-deletion-cost
    reasons: tuple[str, ...] = ()
    starting: int = 0  # replicas still starting that the plan keeps
    # pod -> the plan's last words about it, for its Events (keyed, not found by name in
    # `reasons`: one pod's name can be a prefix of another's)
    said: dict[str, str] = field(default_factory=dict, hash=False)

    def about(self, name: str) -> str:
        """What the plan said about this pod (its name if nothing)."""
        return self.said.get(name, name)

    @property
    def awake(self) -> int:
        """Replicas awake or on their way after the plan (serving, draining, starting, created)."""
        return len(self.serving) + len(self.draining) + self.starting + self.create

    @property
    def asleep(self) -> int:
        """Replicas asleep after the plan."""
        return self.replicas - self.awake


def _idle_for(r: Replica, now: float) -> float:
    return now - r.idle_since if r.idle_since is not None else -1.0


def _asleep_for(r: Replica, now: float) -> float:
    return now - r.asleep_since if r.asleep_since is not None else 0.0


def plan_pool(desired: int, replicas: list[Replica] | tuple[Replica, ...], policy: SleepPolicy, now: float,
              allow_scale_to_zero: bool = False, drain_seconds: float = 0.0, serving_elsewhere: int = 0,
              service_target: int = 0) -> PoolPlan:
    desired = max(0, desired)
    pool_size = policy.max_pool if policy.enabled else 0
    reasons: list[str] = []
    said: dict[str, str] = {}

    def note(r: Replica, words: str) -> None:
        reasons.append(words)
        said[r.name] = words

    def remove(r: Replica, why: str) -> None:
        """An awake replica goes once drained; until then it drains out of the Service."""
        out_for = None if r.left_at is None else now - r.left_at
        if r.drained:
            delete.append(r)
            note(r, f"deleting {r.name}: {why}; drained (out of the Service {out_for or 0:.0f} s, nothing in flight)")
        elif drain_seconds <= 0 or (out_for is not None and out_for >= drain_seconds):
            delete.append(r)
            note(r, f"deleting {r.name}: {why}" + (f"; drain deadline ({drain_seconds:g} s) passed"
                                                    if drain_seconds > 0 else ""))
        else:
            draining.append(r)
            going.append(r)
            note(r, f"draining {r.name} before deleting it: {why}")
    starting = sorted((r for r in replicas if r.state == "starting"), key=lambda r: r.name)
    awake = [r for r in replicas if r.state == "awake"]
    asleep = sorted((r for r in replicas if r.state == "asleep"), key=lambda r: (-_asleep_for(r, now), r.name))

    wake: list[Replica] = []
    create = 0
    delete: list[Replica] = []
    sleep: list[Replica] = []
    draining: list[Replica] = []
    going: list[Replica] = []  # the draining ones that go once drained (not to sleep)
    serving = list(awake)

    short = desired - len(awake) - len(starting)
    if short > 0:
        wake = asleep[:short]
        asleep = asleep[short:]
        for r in wake:
            note(r, f"waking {r.name} (asleep {_asleep_for(r, now):.0f} s): "
                    f"{len(awake) + len(starting)} awake < {desired} desired")
        create = short - len(wake)
        if create:
            reasons.append(f"creating {create}: {desired} desired and no sleeping replica left")
    elif short < 0:
        surplus = -short
        # Newest starting replica first: it has the least of its startup behind it.
        for r in reversed(starting[-surplus:]):
            delete.append(r)
            note(r, f"deleting {r.name}: still starting and {desired} awake are enough")
        starting = starting[:max(0, len(starting) - surplus)]
        surplus -= len(delete)
        # Out of the Service already first, then idle longest; busy replicas (no idle time) last.
        by_idle = sorted(awake, key=lambda r: (not r.reclaimed, r.left_at is None, -_idle_for(r, now), r.name))
        for r in by_idle[:surplus]:
            serving.remove(r)
            idle = _idle_for(r, now)
            if r.reclaimed:  # never to sleep on a node about to go
                remove(r, f"surplus ({desired} desired) and its node announced a reclaim")
            elif pool_size == 0:
                remove(r, f"surplus ({desired} desired) and sleep is "
                          + ("disabled" if not policy.enabled else "limited to maxPool 0"))
            elif idle >= policy.idle_seconds:
                if len(asleep) + len(sleep) < pool_size:
                    sleep.append(r)
                    note(r, f"putting {r.name} to sleep: surplus, idle {idle:.0f} s >= "
                            f"{policy.idle_seconds} s")
                else:
                    remove(r, f"surplus and the pool is full ({pool_size} asleep)")
            else:
                draining.append(r)
                what = "busy" if idle < 0 else f"idle {idle:.0f} s < {policy.idle_seconds} s"
                note(r, f"draining {r.name}: surplus, {what}")

    # A replica on a node announcing its end stops taking requests once the replicas left would
    # carry the service's awake size (its cover is ready), so that those in flight finish within
    # the rest of the notice. It keeps its place in the count (spot placement covers it, and the
    # ReplicaSet replaces it once the node is gone). Until then it serves: leaving earlier would
    # pile its load on the others and queue requests for a cold start.
    doomed = [r for r in serving if r.reclaimed]
    if doomed and len(serving) - len(doomed) + serving_elsewhere >= max(1, service_target):
        for r in doomed:
            serving.remove(r)
            draining.append(r)
            note(r, f"draining {r.name}: its node announced a reclaim")

    # Sleepers that stay asleep: expire past the TTL, and beyond the pool (oldest first).
    kept: list[Replica] = []
    for r in asleep:
        age = _asleep_for(r, now)
        if age >= policy.ttl_seconds or not policy.enabled:
            why = f"asleep {age:.0f} s >= ttl {policy.ttl_seconds} s" if policy.enabled else "sleep is disabled"
            delete.append(r)
            note(r, f"deleting {r.name}: {why}")
        else:
            kept.append(r)
    room = pool_size - len(sleep)
    for r in kept[:max(0, len(kept) - room)]:
        delete.append(r)
        note(r, f"deleting {r.name}: more than maxPool {pool_size} asleep")
    kept = kept[max(0, len(kept) - room):]

    # A deletion waits while something starts (see the module docstring); a starting replica
    # the plan deletes itself is the exception: it is what the controller removes first anyway.
    if starting:
        # Never beyond the pool's bound: only TTL deletions wait, and only while there is room.
        postponed = [r for r in delete if r.state == "asleep"][:max(0, room - len(kept))]
        if postponed:
            names = {r.name for r in postponed}
            delete = [r for r in delete if r.name not in names]
            kept = postponed + kept
            for r in postponed:
                note(r, f"keeping {r.name} asleep until {len(starting)} starting replicas are ready")

    # The last replica sleeps rather than disappears.
    remaining = len(serving) + len(draining) - len(going) + len(starting) + len(sleep) + len(kept) + len(wake) + create
    if remaining == 0 and replicas and policy.enabled and not allow_scale_to_zero:
        last = _last_replica(delete + going)
        (delete if last in delete else draining).remove(last)
        if last.state == "asleep" and pool_size > 0:
            kept.append(last)
            note(last, f"keeping {last.name} asleep: the last replica (allowScaleToZero is off)")
        elif last.state == "awake" and pool_size > 0 and _idle_for(last, now) >= policy.idle_seconds:
            sleep.append(last)
            note(last, f"putting {last.name} to sleep instead: the last replica (allowScaleToZero is off)")
        else:
            {"asleep": wake, "awake": serving, "starting": starting}[last.state].append(last)
            note(last, f"keeping {last.name} {'awake' if last.state != 'starting' else 'starting'}: "
                       "the last replica (allowScaleToZero is off)")
        # Whatever was said about deleting it no longer holds.
        reasons[:] = [x for x in reasons if not x.startswith((f"deleting {last.name}:", f"draining {last.name} "))]

    delete_names = [r.name for r in delete]
    order = (delete_names
             + [r.name for r in kept]
             + [r.name for r in sleep]
             + [r.name for r in starting]
             + [r.name for r in sorted(draining, key=lambda r: (-_idle_for(r, now), r.name))]
             + [r.name for r in sorted(serving, key=lambda r: (-_idle_for(r, now), r.name))]
             + [r.name for r in wake])
    costs = {name: rank for rank, name in enumerate(order)}
    total = len(replicas) - len(delete) + create
    return PoolPlan(
        wake=tuple(r.name for r in wake), sleep=tuple(r.name for r in sleep), delete=tuple(delete_names),
        create=create, replicas=total,
        serving=tuple(r.name for r in serving) + tuple(r.name for r in wake),
        draining=tuple(r.name for r in draining), deletion_costs=costs, reasons=tuple(reasons),
        starting=len(starting), said=said,
    )


def _last_replica(candidates: list[Replica]) -> Replica:
    """The replica to keep when all would go: a sleeper (youngest), else an awake one, else any."""
    for state in ("asleep", "awake", "starting"):
        of_state = [r for r in candidates if r.state == state]
        if of_state:
            return min(of_state, key=lambda r: (r.asleep_since is None, -(r.asleep_since or 0), r.name))
    raise AssertionError("no replica to keep")
