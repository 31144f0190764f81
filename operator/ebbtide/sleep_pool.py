"""The warm pool, acted out for one Deployment: what policy/warm_pool.plan_pool decides, done
to the pods and their engines.

Order matters, for the hazards in reference/vllm.md (a request reaching a sleeping engine, or
/sleep with requests in flight, has crashed vLLM):
- a replica leaves the Service (serving label "false") at least one tick before /sleep, so no
  new request is routed to it; /sleep is sent only once it is out of the endpoints and idle;
- a sleeper rejoins the Service only after /wake_up has answered;
- deletion costs are written before the Deployment's count drops, so the ReplicaSet controller
  removes the pods the plan chose (sleepers first), not the ones it would pick.
A /sleep or /wake_up that still fails after its retries gets the pod deleted (its ReplicaSet
starts a fresh replica in its place) and a Warning Event.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from ebbtide.api.ref import ServiceRef
from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.cluster.engine import EngineClient
from ebbtide.cluster.kube import Kube
from ebbtide.cluster.pods import ANNOTATION_ASLEEP_SINCE, ANNOTATION_DELETION_COST, PodRecord
from ebbtide.cluster.render import LABEL_SERVING
from ebbtide.policy.observation import Signals
from ebbtide.policy.warm_pool import PoolPlan, Replica, plan_pool

log = logging.getLogger(__name__)


@dataclass
class PoolActions:
    """What one tick did to one Deployment's pods, for Events and status."""

    plan: PoolPlan
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)


def idle_since(previous: dict[str, float], signals: Signals, now: float) -> dict[str, float]:
    """Pod -> since when it has had nothing running or waiting, from this tick's samples.

    A pod without a sample this tick is not idle: unknown load is not zero load, and a
    replica must never be put to sleep on a guess.
    """
    out = {}
    for p in signals.pods:
        if not p.asleep and p.running + p.waiting <= 0:
            out[p.pod] = previous.get(p.pod, now)
    return out


def plan_for(spec: InferenceServiceSpec, members: list[PodRecord], target: int, idle: dict[str, float],
             now: float) -> PoolPlan:
    """The pool plan for one Deployment's pods and the awake size it should have."""
    replicas = [Replica(m.name, m.state, idle.get(m.name), m.asleep_since, m.capacity) for m in members]
    return plan_pool(target, replicas, spec.sleep, now, spec.replicas.allow_scale_to_zero)


async def act(kube: Kube, engines: EngineClient, ref: ServiceRef, spec: InferenceServiceSpec,
              members: list[PodRecord], plan: PoolPlan, now: float) -> PoolActions:
    """Carry out the plan's wake, drain, sleep and ranking (the caller then sets the count)."""
    actions = PoolActions(plan)
    pods = {m.name: m for m in members}
    moves = [_wake(kube, engines, ref, pods[n], plan, actions) for n in plan.wake]
    moves += [_sleep(kube, engines, ref, spec, pods[n], plan, actions, now) for n in plan.sleep]
    await asyncio.gather(*moves)
    for name in plan.draining:
        if pods[name].serving:
            await kube.patch_pod_metadata(ref.namespace, name, labels={LABEL_SERVING: "false"})
            actions.events.append(("Normal", "Draining", f"{name} left the Service: {plan.about(name)}"))
    for name in plan.serving:
        pod = pods[name]
        if not pod.serving and pod.state == "awake":  # drained, then needed again before it slept
            # (or a sleeper whose engine restarted: its asleep mark no longer holds)
            await kube.patch_pod_metadata(ref.namespace, name, labels={LABEL_SERVING: "true"},
                                          annotations={ANNOTATION_ASLEEP_SINCE: None})
    for name, cost in plan.deletion_costs.items():
        if name in pods and pods[name].deletion_cost != str(cost):
            await kube.patch_pod_metadata(ref.namespace, name, annotations={ANNOTATION_DELETION_COST: str(cost)})
    removed = [n for n in plan.delete if pods[n].state != "starting"]
    if removed:
        actions.events.append(("Normal", "Released", "; ".join(plan.about(n) for n in removed)))
    return actions


async def _wake(kube: Kube, engines: EngineClient, ref: ServiceRef, pod: PodRecord, plan: PoolPlan,
                actions: PoolActions) -> None:
    took, error = await engines.wake_up(pod.url) if pod.url else (0.0, "the pod has no IP")
    if error:
        await _replace(kube, ref, pod, "WakeFailed", error, actions)
        return
    # Back in the Service only now that the weights are on the GPU again.
    await kube.patch_pod_metadata(ref.namespace, pod.name, labels={LABEL_SERVING: "true"},
                                  annotations={ANNOTATION_ASLEEP_SINCE: None})
    actions.events.append(("Normal", "Woken", f"{pod.name} awake in {took:.1f} s and back in the Service: "
                                              f"{plan.about(pod.name)}"))


async def _sleep(kube: Kube, engines: EngineClient, ref: ServiceRef, spec: InferenceServiceSpec, pod: PodRecord,
                 plan: PoolPlan, actions: PoolActions, now: float) -> None:
    if pod.serving:  # drain first: out of the endpoints this tick, to sleep at the next
        await kube.patch_pod_metadata(ref.namespace, pod.name, labels={LABEL_SERVING: "false"})
        actions.events.append(("Normal", "Draining", f"{pod.name} left the Service to sleep: "
                                                     f"{plan.about(pod.name)}"))
        return
    took, error = await engines.sleep(pod.url, spec.sleep.level) if pod.url else (0.0, "the pod has no IP")
    if error:
        await _replace(kube, ref, pod, "SleepFailed", error, actions)
        return
    await kube.patch_pod_metadata(ref.namespace, pod.name, annotations={ANNOTATION_ASLEEP_SINCE: f"{now:.0f}"})
    actions.events.append(("Normal", "Sleeping", f"{pod.name} asleep (level {spec.sleep.level}, {took:.1f} s): "
                                                 f"{plan.about(pod.name)}"))


async def _replace(kube: Kube, ref: ServiceRef, pod: PodRecord, reason: str, error: str,
                   actions: PoolActions) -> None:
    log.warning("%s/%s: %s on %s (%s); deleting the pod for a fresh one", ref.namespace, ref.name, reason,
                pod.name, error)
    await kube.delete_pod(ref.namespace, pod.name)
    actions.events.append(("Warning", reason, f"{pod.name}: {error}; replacing the replica"))

