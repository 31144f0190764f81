"""Spot placement with on-demand fallback: how many of the awake replicas run on each capacity type.

The rule is SkyServe's (SpotHedge, arXiv 2411.01438; anchors.md):

    spot      = target + overprovision - base
    on-demand = base + (spot wanted but not there), capped at the target

with these refinements, each explained where it is made:
- the base never exceeds the target, and spares (overprovision) are kept only while some
  spot replica is wanted (`shares`);
- `placement.maxSpotFraction` caps spot's share; what the cap takes from spot runs on demand;
- a spot pod still looking for capacity within `pendingTimeoutSeconds`, or loading its
  model, is on its way and is not covered (an on-demand replica would take as long to start);
  one Pending past the limit, or on a node announcing a reclaim, is covered at once
  (`classify`, `split`);
- the cover is given back only after the scale-down stabilization window, so that spot
  capacity that flickers back for a minute does not bounce on-demand replicas (`split`).

Pure: time comes in as `now`, the cover's history comes in and goes out as Entries.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from ebbtide.api.spec import SpotPlacement
from ebbtide.policy.behavior import prune, push_highest
from ebbtide.policy.decision import Entries

# Node taints that announce the node is about to go (anchors.md, "Reclaim signals on nodes").
# A pod on such a node is lost capacity even while it still answers: the replacement must start
# now, not when the node is gone, because it takes minutes and the notice is seconds to minutes.
RECLAIM_TAINTS: tuple[str, ...] = (
    "karpenter.sh/disrupted",  # Karpenter v1: interruption (spot), consolidation, drift
    "karpenter.sh/disruption",  # the same before Karpenter v1 (value "disrupting")
    "aws-node-termination-handler/spot-itn",  # the AWS spot interruption notice
    "cloud.google.com/impending-node-termination",  # GKE graceful node shutdown
    "ToBeDeletedByClusterAutoscaler",
    "node.kubernetes.io/unschedulable",  # cordoned: drained next
)


@dataclass(frozen=True)
class PodView:
    """What placement needs to know of one spot pod; the shell builds it from the pod object."""

    name: str
    ready: bool
    phase: str  # status.phase: Pending, Running, ...
    created_at: float  # metadata.creationTimestamp, in the same clock as `now`
    node: str | None = None  # spec.nodeName; None while no node has been found for it


@dataclass(frozen=True)
class SpotPods:
    """What the shell (or simulator) sees of the spot Deployment's pods at one tick."""

    ready: int = 0
    starting: int = 0  # not ready yet, but Pending less than pendingTimeoutSeconds and not on a reclaimed node
    unavailable: int = 0  # Pending past the limit, or on a node showing a reclaim signal


@dataclass(frozen=True)
class Split:
    on_demand: int  # replicas for the on-demand Deployment
    spot: int  # replicas for the spot Deployment
    cover: Entries  # give-back history (time, cover needed): store it and pass it back next tick
    message: str  # one sentence with the numbers, for Events and status
    covering: int = 0  # of `on_demand`, the replicas covering spot ones (held during the give-back window)


@dataclass(frozen=True)
class Shares:
    """The split before looking at any pod: what runs where if every spot replica were ready."""

    base: int  # on-demand replicas: the on-demand base, plus what the spot cap moved to on-demand
    spot: int  # spot replicas, spares included
    spares: int  # of `spot`, the over-provisioned ones
    over_cap: int  # of `base`, the replicas the spot cap moved to on-demand


def classify(pods: Iterable[PodView], tainted_nodes: set[str], pending_timeout: float, now: float) -> SpotPods:
    """Count spot pods as ready, on their way, or unavailable.

    The pending limit is for pods that no node has taken yet: that is what spot capacity
    running out looks like. A pod with a node has its capacity; pulling the image or loading
    the weights would take as long on demand, so it stays "starting" however long that takes
    (the startup probe's budget bounds it). Finished pods are not counted: the ReplicaSet
    replaces them, and a pod not created yet counts as on its way (see `split`).
    """
    ready = starting = unavailable = 0
    for pod in pods:
        if pod.phase in ("Succeeded", "Failed"):
            continue
        if pod.node is not None and pod.node in tainted_nodes:
            unavailable += 1  # ready or not: its node is going away
        elif pod.ready:
            ready += 1
        elif pod.node is None and now - pod.created_at > pending_timeout:
            unavailable += 1
        else:
            starting += 1
    return SpotPods(ready=ready, starting=starting, unavailable=unavailable)


def shares(target: int, placement: SpotPlacement) -> Shares:
    """On-demand base and spot replicas for `target` awake replicas, all spot ones ready.

    - The base is capped at the target: a base above it would run more than the autoscaler asked.
    - Spares (overprovision) are kept only while some spot replica is wanted: their job is to
      absorb a reclaim of a spot replica, and with none (target 0, or the base carrying the
      whole target) a spare would be a replica the service does not need. Target 0 stays 0.
    - maxSpotFraction caps spot's share of all replicas (target + spares), rounding down; the
      replicas the cap takes from spot run on demand (never above the target: spares are a
      spot-only idea).
    """
    target = max(0, target)
    base = min(placement.on_demand_base, target)
    wanted = target - base
    spares = placement.overprovision if wanted > 0 else 0
    # The epsilon keeps 0.29 * 100 (28.999...) from rounding down to 28.
    cap = math.floor(placement.max_spot_fraction * (target + spares) + 1e-9)
    spot = min(wanted + spares, cap)
    over_cap = min(wanted + spares - spot, target - base)
    return Shares(base=base + over_cap, spot=spot, spares=min(spares, spot), over_cap=over_cap)


def split(target: int, placement: SpotPlacement, pods: SpotPods, cover: Entries, now: float,
          give_back_after: float) -> Split:
    """Replicas for the on-demand and spot Deployments, and the cover history to keep.

    Cover: on-demand replicas for the spot replicas wanted that are neither ready nor on their
    way. A pod the ReplicaSet has not created yet counts as on its way (it exists within
    seconds of a scale-up; covering it would start an on-demand replica on every scale-up and
    hold it for the whole give-back window), so the cover is at most the pods seen unavailable.

    Give-back: a cover in place is needed until the spot replicas it stands in for are ready;
    then it is the highest needed over the last `give_back_after` seconds (the scale-down
    stabilization window), kept as (time, cover) entries like the autoscaler's
    down_recommendations. Only the cover is held, not the on-demand count: the base follows
    the current target, and the held cover is capped by the spot replicas wanted now and the
    room left under the target. So when the autoscaler scales down (after its own window) the
    on-demand Deployment shrinks at once; what waits is handing capacity from on-demand back
    to spot, which is what must not flap while spot capacity comes and goes.
    """
    if not placement.enabled:
        return Split(on_demand=max(0, target), spot=0, cover=(),
                     message=f"target {target}: spot placement is off, all on demand")
    target = max(0, target)
    share = shares(target, placement)
    room = target - share.base
    missing = max(0, share.spot - pods.ready - pods.starting)
    history = prune(cover, now - give_back_after) if give_back_after > 0 else ()
    # A cover in place keeps covering while the spot replicas it stands in for are starting:
    # the give-back window starts once they are ready, not once they have a node (a cold start
    # can outlast the window, and handing back then would leave the service short).
    in_place = history[0][1] if history else 0
    needed = min(max(min(pods.unavailable, missing), min(in_place, max(0, share.spot - pods.ready))), room)
    held = max(needed, history[0][1]) if history else needed
    covering = min(held, share.spot, room)
    if give_back_after > 0 and needed > 0:  # a zero never decides the highest: not stored
        history = push_highest(history, now, needed)
    on_demand = share.base + covering
    return Split(on_demand=on_demand, spot=share.spot, cover=history,
                 message=_message(target, placement, share, pods, needed, covering, give_back_after),
                 covering=covering)


def _message(target: int, placement: SpotPlacement, share: Shares, pods: SpotPods, needed: int, covering: int,
             give_back_after: float) -> str:
    spares = f"{share.spares} spare; " if share.spares else ""
    spot = (f"spot {share.spot} ({spares}{pods.ready} ready, {pods.starting} starting, "
            f"{pods.unavailable} unavailable)")
    base = f"{share.base} base"
    if share.over_cap:
        base += f" ({share.over_cap} over the {placement.max_spot_fraction:.0%} spot cap)"
    cover = ""
    if covering:
        cover = f" + {covering} covering spot not ready"
        if needed < covering:
            cover += f" ({needed} needed now; given back {give_back_after:g} s after last needed)"
    return f"target {target}: {spot}, on-demand {base}{cover} = {share.base + covering}"
