"""The operator and the simulator decide alike, tick by tick.

The same scripted observations go through the operator's loop (control/decide.py: a snapshot
of the objects the API server returns and of the Prometheus samples, turned into the tick's
inputs, the tick, and the actions its Turn asks for) and through the simulator's policy
(sim/ebbtide_policy.py, shown the same replicas as sim/replicas.py shows its fleet), and what
each decided is compared: the awake size and its reason, the replicas each Deployment is
asked for, and each warm pool's plan.

The first script is the case the two once disagreed on: examples/spot-sleep.yaml in an
off-peak window that is always open, asking for 4 replicas. Off-peak, consolidation drops the
on-demand base (the operator placed 0 on demand, the simulator, splitting with the spec as
written, 1).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import pytest

from ebbtide.api.manifest import load_manifests
from ebbtide.api.spec import Activation, InferenceServiceSpec, ScheduleWindow
from ebbtide.cluster.objects import rfc3339
from ebbtide.cluster.pods import ANNOTATION_ASLEEP_SINCE
from ebbtide.cluster.render import LABEL_CAPACITY, LABEL_SERVICE, LABEL_SERVING, deployment_name
from ebbtide.control.decide import decide
from ebbtide.control.observe import Snapshot
from ebbtide.control.state import ServiceState
from ebbtide.policy.capacity_types import ON_DEMAND, SPOT
from ebbtide.policy.observation import Deployments, PodSignals, Signals
from ebbtide.policy.startup import Startup
from ebbtide.policy.warm_pool import PoolPlan
from ebbtide.sim.ebbtide_policy import EbbtideSpotPolicy
from ebbtide.sim.replicas import Fleet, Replica

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "spot-sleep.yaml"
T0 = datetime.datetime(2024, 5, 13, 10, 0, tzinfo=datetime.UTC).timestamp()  # a Monday
STARTED = 60.0  # an engine is Ready this long after its pod was created
SAMPLE_LAG = 5.0  # Prometheus samples are this old at a tick


@dataclass(frozen=True)
class Seen:
    """One replica as a tick observes it (times in seconds after T0)."""

    rid: int
    capacity: str = ON_DEMAND
    state: str = "awake"  # awake, starting, asleep
    serving: bool = True  # in the Service
    idle_since: float | None = None  # nothing running or waiting since then; None: busy
    asleep_since: float | None = None
    node: bool = True  # False: Pending on no node
    reclaimed: bool = False  # its node announces a reclaim
    created: float = -3600.0

    @property
    def name(self) -> str:
        return f"replica-{self.rid}"


@dataclass(frozen=True)
class Moment:
    at: float  # seconds after T0
    replicas: tuple[Seen, ...]
    deployments: tuple[int, int]  # on-demand, spot
    gateway: float = 0.0  # requests held at the gateway: what the activation query reads


@dataclass(frozen=True)
class Decided:
    desired: int
    reason: str
    replicas: dict[str, int]  # each Deployment's count, after the tick
    pools: dict[str, tuple]  # capacity type -> its plan: wake, sleep, delete, create, draining, serving, count

    @staticmethod
    def pool(plan: PoolPlan) -> tuple:
        return plan.wake, plan.sleep, plan.delete, plan.create, plan.draining, plan.serving, plan.replicas


def example(**changes) -> tuple[str, InferenceServiceSpec]:
    ((ref, spec),) = load_manifests(EXAMPLE)
    return ref.name, spec.model_copy(update=changes)


def signals(moment: Moment, now: float) -> Signals:
    """Awake replicas report; an idle one shows nothing running or waiting."""
    pods = tuple(PodSignals(r.name, now - SAMPLE_LAG, running=0.0 if r.idle_since is not None else 3.0,
                            kv_cache_usage=0.2) for r in moment.replicas if r.state == "awake")
    busy = sum(1 for r in moment.replicas if r.state == "awake" and r.idle_since is None)
    return Signals(source="prometheus", sampled_at=now - SAMPLE_LAG, pods=pods, tokens_per_second=1500.0 * busy)


# -- the operator: the objects the API server returns, through its loop ----------------------

def pod_object(service: str, r: Seen) -> dict:
    ready = r.state != "starting"
    conditions = [{"type": "Ready", "status": "True" if ready else "False",
                   "lastTransitionTime": rfc3339(T0 + r.created + STARTED)}]
    if r.node:
        conditions.append({"type": "PodScheduled", "status": "True", "lastTransitionTime": rfc3339(T0 + r.created)})
    annotations = {} if r.asleep_since is None else {ANNOTATION_ASLEEP_SINCE: f"{T0 + r.asleep_since:.0f}"}
    return {
        "metadata": {"name": r.name, "namespace": "ml", "creationTimestamp": rfc3339(T0 + r.created),
                     "labels": {LABEL_SERVICE: service, LABEL_CAPACITY: r.capacity,
                                LABEL_SERVING: "true" if r.serving else "false"},
                     "annotations": annotations},
        "spec": {"containers": [{"name": "vllm", "ports": [{"containerPort": 8000}]}],
                 **({"nodeName": f"node-{r.name}"} if r.node else {})},
        "status": {"phase": "Running" if r.node else "Pending", "podIP": "10.0.0.1", "conditions": conditions,
                   "containerStatuses": [{"name": "vllm", "ready": ready, "restartCount": 0,
                                          "state": {"running": {"startedAt": rfc3339(T0 + r.created)}}}]},
    }


def node_object(r: Seen) -> dict:
    taints = [{"key": "karpenter.sh/disrupted", "effect": "NoSchedule"}] if r.reclaimed else []
    return {"metadata": {"name": f"node-{r.name}"}, "spec": {"taints": taints}}


def operator(service: str, spec: InferenceServiceSpec, target: int, script: list[Moment]) -> list[Decided]:
    from ebbtide.api.ref import ServiceRef

    ref = ServiceRef(name=service, namespace="ml", uid="uid-1")
    state = ServiceState.restore({"scaler": {"spot": {"target": target, "cover": []}}}, T0)
    names = {deployment_name(ref, c): c for c in (ON_DEMAND, SPOT)}
    decided = []
    for moment in script:
        now = T0 + moment.at
        deployments = [{"metadata": {"namespace": "ml", "name": deployment_name(ref, c)}, "spec": {"replicas": n}}
                       for c, n in zip((ON_DEMAND, SPOT), moment.deployments, strict=True)]
        snapshot = Snapshot.of(now, [pod_object(service, r) for r in moment.replicas], deployments,
                               [node_object(r) for r in moment.replicas if r.node],
                               {("ml", service): signals(moment, now)}, {("ml", service): moment.gateway})
        step = decide(snapshot, ref, spec, state.tick)
        assert step is not None
        state.tick = step.turn.state  # as the loop keeps it once the counts are set
        counts = dict(zip((ON_DEMAND, SPOT), moment.deployments, strict=True))
        counts.update({names[name]: n for name, n in step.actions.scale})
        decided.append(Decided(step.turn.decision.desired, step.turn.decision.reason, counts,
                               {c: Decided.pool(m.plan) for c, m in step.actions.pools.items()}))
    return decided


# -- the simulator: the same replicas as its fleet shows them, through its policy -------------

def sim_replica(r: Seen) -> Replica:
    awake = r.state == "awake"
    return Replica(rid=r.rid, created=r.created, ready_at=r.created + STARTED if r.node else float("inf"),
                   capacity_type=r.capacity, ready=awake, pod_ready=r.state != "starting",
                   scheduled_at=r.created if r.node else None, reclaimed_at=0.0 if r.reclaimed else None,
                   serving=awake and r.serving, asleep_since=r.asleep_since)


def simulator(spec: InferenceServiceSpec, target: int, script: list[Moment]) -> list[Decided]:
    policy = EbbtideSpotPolicy(spec)
    policy.start(target, T0)
    decided = []
    for moment in script:
        fleet = Fleet(gpus_per_replica=1, cold_start=STARTED)
        fleet.replicas = [sim_replica(r) for r in moment.replicas]
        # The replicas Ready now (each is counted once).
        fleet.startups = [Startup(r.created, r.created, r.created + STARTED, r.capacity == SPOT)
                          for r in moment.replicas if r.state == "awake" and r.serving]
        idle = {r.name: r.idle_since for r in moment.replicas}
        view = fleet.view(moment.at, T0, signals(moment, T0 + moment.at), moment.gateway,
                          Deployments(*moment.deployments), lambda replica, idle=idle: idle[replica.name])
        orders = policy.orders(view)
        assert policy.last is not None
        decided.append(Decided(policy.last.decision.desired, policy.last.decision.reason,
                               {c: orders.replicas[c] for c in (ON_DEMAND, SPOT)},
                               {c: Decided.pool(plan) for c, plan in orders.pools.items()}))
    return decided


# -- the scripts ------------------------------------------------------------------------------

ALWAYS_OFF_PEAK = ScheduleWindow(name="always", cron="0 0 * * *", duration_minutes=1440, timezone="UTC",
                                 min_replicas=4, off_peak=True)


def off_peak_on_spot() -> tuple[str, InferenceServiceSpec, int, list[Moment]]:
    """Four awake, one on demand and three on spot; off-peak the on-demand one drains and
    sleeps, spot takes the whole target; a spot replica Pending past the timeout is covered by
    waking the sleeper, which drains again once the cover is given back; a reclaim brings it
    back into the Service."""
    service, spec = example(schedules=[ALWAYS_OFF_PEAK])
    od, s = ON_DEMAND, SPOT
    busy = (Seen(1, s), Seen(2, s), Seen(3, s))
    script = [
        Moment(0, (Seen(0, od), *busy), (1, 3)),
        Moment(15, (Seen(0, od, serving=False, idle_since=15), *busy, Seen(4, s, "starting", created=1),
                    Seen(5, s, "starting", created=1)), (1, 5)),
        Moment(30, (Seen(0, od, "asleep", serving=False, asleep_since=16), *busy, Seen(4, s, created=1),
                    Seen(5, s, "starting", node=False, created=1)), (1, 5)),
        Moment(150, (Seen(0, od, "asleep", serving=False, asleep_since=16), *busy, Seen(4, s, created=1),
                     Seen(5, s, "starting", node=False, created=1)), (1, 5)),
        Moment(165, (Seen(0, od), *busy, Seen(4, s, created=1), Seen(5, s, "starting", created=1)), (1, 5)),
        Moment(240, (Seen(0, od), *busy, Seen(4, s, created=1), Seen(5, s, created=1)), (1, 5)),
        Moment(480, (Seen(0, od), *busy, Seen(4, s, created=1), Seen(5, s, created=1)), (1, 5)),
        Moment(495, (Seen(0, od, serving=False, idle_since=495), *busy, Seen(4, s, created=1),
                     Seen(5, s, created=1)), (1, 5)),
        Moment(510, (Seen(0, od, serving=False, idle_since=495), Seen(1, s, reclaimed=True), *busy[1:],
                     Seen(4, s, created=1), Seen(5, s, created=1)), (1, 5)),
    ]
    return service, spec, 4, script


def woken_from_zero() -> tuple[str, InferenceServiceSpec, int, list[Moment]]:
    """Nothing awake, a sleeper in each Deployment; requests held at the gateway wake the
    on-demand one (the base), and the reactive core takes over from it."""
    _, spec = example()
    service, spec = example(replicas=spec.replicas.model_copy(update={"min": 0}), scaling=spec.scaling.model_copy(
        update={"activation": Activation(query='sum(gateway_pending{service="code"})', threshold=0)}))
    od, s = ON_DEMAND, SPOT
    asleep = (Seen(0, od, "asleep", serving=False, asleep_since=-600), Seen(1, s, "asleep", serving=False,
                                                                            asleep_since=-600))
    script = [
        Moment(0, asleep, (1, 1)),
        Moment(15, asleep, (1, 1), gateway=3),
        Moment(30, (Seen(0, od), asleep[1]), (1, 1), gateway=3),
        Moment(45, (Seen(0, od), asleep[1]), (1, 1)),
    ]
    return service, spec, 0, script


@pytest.mark.parametrize("script", [off_peak_on_spot, woken_from_zero])
def test_the_operator_and_the_simulator_decide_alike(script):
    service, spec, target, moments = script()
    by_operator = operator(service, spec, target, moments)
    by_simulator = simulator(spec, target, moments)
    for moment, ours, theirs in zip(moments, by_operator, by_simulator, strict=True):
        assert ours == theirs, f"at {moment.at:g} s"


def test_off_peak_spot_places_nothing_on_demand():
    """What the first script decides at its first tick: the target of 4 all on spot (and the
    spare), the on-demand replica draining towards sleep."""
    service, spec, target, moments = off_peak_on_spot()
    first = operator(service, spec, target, moments[:1])[0]
    assert (first.desired, first.replicas[ON_DEMAND], first.replicas[SPOT]) == (4, 1, 5)
    wake, sleep, delete, create, draining, serving, replicas = first.pools[ON_DEMAND]
    assert draining == ("replica-0",) and not (wake or sleep or delete or create) and replicas == 1
    assert first.pools[SPOT][3] == 2, "two spot replicas created: 4 + 1 spare"
