"""The warm pool's plan for one Deployment as moves on its pods, and the moves done to the pods
and their engines.

Order matters, for vLLM sleep mode's hazards (a request reaching a sleeping engine,
or /sleep with requests in flight, has crashed vLLM):
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
from dataclasses import dataclass

from ebbtide.api.ref import ServiceRef
from ebbtide.cluster.engine import EngineClient
from ebbtide.cluster.kube import Kube
from ebbtide.cluster.pods import (
    ANNOTATION_ASLEEP_SINCE,
    ANNOTATION_DELETION_COST,
    ANNOTATION_LEFT_SERVICE_AT,
    PodRecord,
)
from ebbtide.cluster.render import LABEL_SERVING
from ebbtide.policy.telling import Said
from ebbtide.policy.warm_pool import PoolPlan

log = logging.getLogger(__name__)
# Back in the Service (woken, or needed again while draining): no longer asleep, no drain under way.
REJOINED = {ANNOTATION_ASLEEP_SINCE: None, ANNOTATION_LEFT_SERVICE_AT: None}


@dataclass(frozen=True)
class PoolMoves:
    """One Deployment's warm pool plan as moves on its pods."""

    plan: PoolPlan  # for what it says about each pod
    wake: tuple[str, ...]  # /wake_up, then back in the Service
    sleep: tuple[str, ...]  # /sleep: out of the Service since an earlier tick, so nothing reaches it
    leave_to_sleep: tuple[str, ...]  # out of the Service now, to sleep at a later tick
    leave: tuple[str, ...]  # surplus out of the Service: it drains, then sleeps or goes
    rejoin: tuple[str, ...]  # back in the Service: drained, then needed again before it slept
    costs: tuple[tuple[str, int], ...]  # deletion costs that change, written before the count drops
    released: tuple[str, ...]  # awake or asleep pods the count drop removes

    @property
    def moved(self) -> bool:
        return bool(self.wake or self.sleep or self.leave_to_sleep or self.leave or self.rejoin or self.released)


def pool_moves(plan: PoolPlan, members: list[PodRecord]) -> PoolMoves:
    pods = {m.name: m for m in members}
    return PoolMoves(
        plan=plan,
        wake=plan.wake,
        sleep=tuple(n for n in plan.sleep if not pods[n].serving),
        leave_to_sleep=tuple(n for n in plan.sleep if pods[n].serving),
        leave=tuple(n for n in plan.draining if pods[n].serving),
        # (or a sleeper whose engine restarted: its asleep mark no longer holds)
        rejoin=tuple(n for n in plan.serving if not pods[n].serving and pods[n].state == "awake"),
        costs=tuple((n, cost) for n, cost in plan.deletion_costs.items()
                    if n in pods and pods[n].deletion_cost != str(cost)),
        released=tuple(n for n in plan.delete if pods[n].state != "starting"),
    )


async def carry_out(kube: Kube, engines: EngineClient, ref: ServiceRef, level: int, members: list[PodRecord],
                    moves: PoolMoves, now: float) -> list[Said]:
    """Wake, put to sleep, drain, rejoin and rank (the caller then sets the count); the Events to post."""
    said: list[Said] = []
    pods = {m.name: m for m in members}
    plan = moves.plan
    steps = [_wake(kube, engines, ref, pods[n], plan.about(n), said) for n in moves.wake]
    steps += [_leave(kube, ref, n, f"{n} left the Service to sleep: {plan.about(n)}", said, now)
              for n in moves.leave_to_sleep]
    steps += [_sleep(kube, engines, ref, level, pods[n], plan.about(n), said, now) for n in moves.sleep]
    await asyncio.gather(*steps)
    for name in moves.leave:
        await _leave(kube, ref, name, f"{name} left the Service: {plan.about(name)}", said, now)
    for name in moves.rejoin:
        await kube.patch_pod_metadata(ref.namespace, name, labels={LABEL_SERVING: "true"},
                                      annotations=REJOINED)
    for name, cost in moves.costs:
        await kube.patch_pod_metadata(ref.namespace, name, annotations={ANNOTATION_DELETION_COST: str(cost)})
    if moves.released:
        said.append(Said("Normal", "Released", "; ".join(plan.about(n) for n in moves.released)))
    return said


async def _leave(kube: Kube, ref: ServiceRef, name: str, message: str, said: list[Said], now: float) -> None:
    await kube.patch_pod_metadata(ref.namespace, name, labels={LABEL_SERVING: "false"},
                                  annotations={ANNOTATION_LEFT_SERVICE_AT: f"{now:.1f}"})
    said.append(Said("Normal", "Draining", message))


async def _wake(kube: Kube, engines: EngineClient, ref: ServiceRef, pod: PodRecord, why: str,
                said: list[Said]) -> None:
    took, error = await engines.wake_up(pod.url) if pod.url else (0.0, "the pod has no IP")
    if error:
        await _replace(kube, ref, pod, "WakeFailed", error, said)
        return
    # Back in the Service only now that the weights are on the GPU again.
    await kube.patch_pod_metadata(ref.namespace, pod.name, labels={LABEL_SERVING: "true"},
                                  annotations=REJOINED)
    said.append(Said("Normal", "Woken", f"{pod.name} awake in {took:.1f} s and back in the Service: {why}"))


async def _sleep(kube: Kube, engines: EngineClient, ref: ServiceRef, level: int, pod: PodRecord, why: str,
                 said: list[Said], now: float) -> None:
    took, error = await engines.sleep(pod.url, level) if pod.url else (0.0, "the pod has no IP")
    if error:
        await _replace(kube, ref, pod, "SleepFailed", error, said)
        return
    await kube.patch_pod_metadata(ref.namespace, pod.name, annotations={ANNOTATION_ASLEEP_SINCE: f"{now:.0f}"})
    said.append(Said("Normal", "Sleeping", f"{pod.name} asleep (level {level}, {took:.1f} s): {why}"))


async def _replace(kube: Kube, ref: ServiceRef, pod: PodRecord, reason: str, error: str, said: list[Said]) -> None:
    log.warning("%s/%s: %s on %s (%s); deleting the pod for a fresh one", ref.namespace, ref.name, reason,
                pod.name, error)
    await kube.delete_pod(ref.namespace, pod.name)
    said.append(Said("Warning", reason, f"{pod.name}: {error}; replacing the replica"))
