"""What the operator does for one tick's Turn, worked out before anything is done: pure.

    actions(ref, turn, deployments, pods) -> Actions

cluster/warm_pool.py works out and carries out the pods' moves; the loop then sets the
Deployments' counts (after the deletion costs, so that the ReplicaSet controller removes the
pods the plan chose).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ebbtide.api.ref import ServiceRef
from ebbtide.cluster.pods import PodRecord
from ebbtide.cluster.render import deployment_name
from ebbtide.cluster.variants import variant_deployment_name
from ebbtide.cluster.warm_pool import PoolMoves, pool_moves
from ebbtide.policy.capacity_types import ON_DEMAND, SPOT
from ebbtide.policy.observation import Deployments
from ebbtide.policy.tick import Turn


@dataclass(frozen=True)
class Actions:
    scale: tuple[tuple[str, int], ...]  # (Deployment, replicas) for the counts that change
    pools: Mapping[str, PoolMoves]  # capacity type -> its pods' moves


def actions(ref: ServiceRef, turn: Turn, deployments: Deployments, pods: list[PodRecord],
            variants: Mapping[str, int] | None = None) -> Actions:
    """`variants`: with spec.variants, each variant's Deployment's count (those there)."""
    if turn.decision.variants is not None:
        # One Deployment per variant, sized as the mix says (turn.replicas is keyed by variant); one
        # not there yet is the reconciler's to create. No warm pool: a surplus goes with its count.
        have = variants or {}
        return Actions(tuple((variant_deployment_name(ref, name), n) for name, n in turn.replicas.items()
                             if name in have and have[name] != n), {})
    held = {ON_DEMAND: deployments.on_demand}
    if deployments.spot is not None:  # absent: the reconciler is creating it, with its own count
        held[SPOT] = deployments.spot
    scale = tuple((deployment_name(ref, capacity), turn.replicas[capacity]) for capacity, have in held.items()
                  if turn.replicas[capacity] != have)
    return Actions(scale, {capacity: pool_moves(plan, [p for p in pods if p.capacity == capacity])
                           for capacity, plan in turn.pools.items()})
