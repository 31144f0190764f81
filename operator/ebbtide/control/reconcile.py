"""Keep each InferenceService's owned workload as its spec says: apply, validate, restore.

This is the shell's side of the foundation: it talks to the API and reports, it decides
nothing about scaling.
"""

from __future__ import annotations

import asyncio
import logging
import operator
from dataclasses import dataclass, field

from ebbtide.api.conditions import set_condition
from ebbtide.api.manifest import InvalidSpec, check_name, parse_spec
from ebbtide.api.ref import ServiceRef
from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.cluster.kube import Conflict, Kube
from ebbtide.cluster.objects import controller_of, is_subset, now_rfc3339, without_replicas
from ebbtide.cluster.render import (
    LABEL_SERVICE,
    SPOT,
    applied_spec,
    deployment_name,
    render_workload,
)
from ebbtide.cluster.variants import variant_of

log = logging.getLogger(__name__)


@dataclass
class Registry:
    """The services this operator runs, with the spec it runs each on (the last valid one).

    Rebuilt from the cluster on start (kopf's resume handlers), so losing it loses nothing.
    """

    services: dict[tuple[str, str], tuple[ServiceRef, InferenceServiceSpec]] = field(default_factory=dict)
    # The status a service had when first seen after a restart: the scaling loop restores its
    # state from it (status.scaler: memory, cost ledger, spot cover; status.startup).
    stored: dict[tuple[str, str], dict] = field(default_factory=dict)
    # kopf handles an InferenceService's edit and its Deployment's events side by side. Applying
    # a spec and correcting drift take turns per service: a drift correction that read the old
    # spec before an edit and wrote after it would put the old workload back (then the edit's
    # own events would put the new one back again, each time with a DriftCorrected Event).
    _turns: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)

    def turn(self, namespace: str, name: str) -> asyncio.Lock:
        """The lock a service's spec application and drift correction take turns with."""
        return self._turns.setdefault((namespace, name), asyncio.Lock())

    def put(self, ref: ServiceRef, spec: InferenceServiceSpec) -> None:
        self.services[(ref.namespace, ref.name)] = (ref, spec)

    def get(self, namespace: str, name: str) -> tuple[ServiceRef, InferenceServiceSpec] | None:
        return self.services.get((namespace, name))

    def forget(self, namespace: str, name: str) -> None:
        self.services.pop((namespace, name), None)
        self.stored.pop((namespace, name), None)
        self._turns.pop((namespace, name), None)

    def recall(self, ref: ServiceRef, status: dict | None) -> None:
        """Keep the scaling state persisted in status, for a service not seen before."""
        key = (ref.namespace, ref.name)
        if key not in self.services and key not in self.stored and status:
            self.stored[key] = status


async def last_applied_spec(kube: Kube, ref: ServiceRef) -> InferenceServiceSpec | None:
    """The spec the running Deployment was rendered from (kept in an annotation on it, its env
    values in its pod template: see api/redaction.py)."""
    deployment = await kube.read("Deployment", ref.namespace, deployment_name(ref))
    if deployment is None:  # with variants there is no `<service>` Deployment: any of its own will do
        owned = next(iter(await _owned_deployments(kube, ref)), None)  # listed without annotations: read it
        deployment = owned and await kube.read("Deployment", ref.namespace, owned["metadata"]["name"])
    if deployment is None:
        return None
    try:
        return applied_spec(deployment)
    except ValueError as e:  # the words name env variables, never their values
        log.warning("%s/%s: the last applied spec cannot be read back: %s", ref.namespace, ref.name, e)
        return None


async def reconcile(kube: Kube, registry: Registry, ref: ServiceRef, raw_spec: dict, generation: int | None) -> None:
    """Validate the spec; if valid, apply the workload; either way, say so in status and Events."""
    async with registry.turn(ref.namespace, ref.name):
        await _reconcile(kube, registry, ref, raw_spec, generation)


async def _reconcile(kube: Kube, registry: Registry, ref: ServiceRef, raw_spec: dict, generation: int | None) -> None:
    try:
        check_name(ref.name)  # the API server takes any DNS subdomain; a Service named so may not be
        spec = parse_spec(raw_spec)
    except InvalidSpec as e:
        await _reject(kube, registry, ref, str(e), generation)
        return

    # Registered before applying: the patches below come back as MODIFIED events, and drift
    # correction must compare them with this spec, not restore the previous one.
    registry.put(ref, spec)
    try:
        workload = render_workload(ref, spec)
        outcomes = {f'{obj["kind"]} {obj["metadata"]["name"]}': await kube.apply(obj, ref) for obj in workload}
        if not spec.placement.spot.enabled and await _delete_owned_spot_deployment(kube, ref, spec):
            outcomes[f"Deployment {deployment_name(ref, SPOT)}"] = "deleted (spot placement is off)"
        rendered = {obj["metadata"]["name"] for obj in workload if obj["kind"] == "Deployment"}
        for name in await _delete_unrendered(kube, ref, rendered):
            outcomes.setdefault(f"Deployment {name}", "deleted (no longer in the spec)")
    except Conflict as e:
        await kube.post_event(ref, "Warning", "OwnershipConflict", str(e))
        await _set_status(kube, ref, generation, "Ready", "False", "OwnershipConflict", str(e))
        raise
    changed = {obj: what for obj, what in outcomes.items() if what != "unchanged"}
    if changed:
        summary = ", ".join(f"{obj} {what}" for obj, what in changed.items())
        await kube.post_event(ref, "Normal", "Applied", f"{summary} (generation {generation})")
    await _set_status(kube, ref, generation, "SpecValid", "True", "Valid", "the spec is valid and applied")


async def _delete_owned_spot_deployment(kube: Kube, ref: ServiceRef, spec: InferenceServiceSpec) -> bool:
    """Spot placement turned off: its replicas move to on-demand, and its Deployment goes.

    On-demand grows by the spot count first (within replicas.max), so that turning spot off
    never drops serving capacity; the autoscaler trims any surplus after its window.
    """
    name = deployment_name(ref, SPOT)
    live = await kube.read("Deployment", ref.namespace, name)
    if live is None or (controller_of(live) or {}).get("uid") != ref.uid or variant_of(live) is not None:
        # Not there, or not ours (never touch someone else's workload), or a variant named "spot".
        return False
    on_demand = await kube.read("Deployment", ref.namespace, deployment_name(ref))
    moved = live["spec"].get("replicas") or 0
    if on_demand is not None and moved:
        have = on_demand["spec"].get("replicas") or 0
        await kube.scale(ref.namespace, deployment_name(ref), min(have + moved, max(have, spec.replicas.max)))
    await kube.delete("Deployment", ref.namespace, name)
    return True


async def _owned_deployments(kube: Kube, ref: ServiceRef) -> list[dict]:
    """The Deployments this service owns (labelled with its name, and controlled by it), from the
    scaling loop's mirror: a LIST per reconcile was 289 a tick while 1,000 services were created."""
    listed = await kube.watched_deployments()
    return [d for d in listed if d["metadata"].get("namespace") == ref.namespace
            and d["metadata"].get("labels", {}).get(LABEL_SERVICE) == ref.name
            and (controller_of(d) or {}).get("uid") == ref.uid]


async def _delete_unrendered(kube: Kube, ref: ServiceRef, rendered: set[str]) -> list[str]:
    """Delete the service's Deployments its spec no longer renders: a variant removed, the
    variants' Deployments once there is one or none, the single Deployment once there are several.
    Their replicas go at once: the new Deployments were applied first, and the tick sizes them."""
    gone = [d["metadata"]["name"] for d in await _owned_deployments(kube, ref)
            if d["metadata"]["name"] not in rendered and not d["metadata"].get("deletionTimestamp")]
    for name in gone:
        await kube.delete("Deployment", ref.namespace, name)
    return gone


async def _reject(kube: Kube, registry: Registry, ref: ServiceRef, problem: str, generation: int | None) -> None:
    """An invalid spec changes nothing that runs: the last valid spec stays in force."""
    if registry.get(ref.namespace, ref.name) is None:
        previous = await last_applied_spec(kube, ref)
        if previous is not None:
            registry.put(ref, previous)
    keeping = "keeping the last valid spec" if registry.get(ref.namespace, ref.name) else "nothing was created"
    message = f"invalid spec, {keeping}: {problem}"
    log.warning("%s/%s: %s", ref.namespace, ref.name, message)
    await kube.post_event(ref, "Warning", "InvalidSpec", message)
    await _set_status(kube, ref, generation, "SpecValid", "False", "InvalidSpec", message)


async def _set_status(kube: Kube, ref: ServiceRef, generation: int | None, type: str, status: str,
                      reason: str, message: str) -> None:
    now = now_rfc3339()

    def mutate(current: dict) -> dict:
        current["conditions"] = set_condition(current.get("conditions", []), type, status, reason, message,
                                              now, generation)
        if status == "True":
            current["observedGeneration"] = generation
        current.setdefault("phase", "Pending")
        return current

    await kube.update_status(ref, mutate, unchanged=operator.eq)  # a resumed service's valid spec: no news


async def restore_owned(kube: Kube, registry: Registry, obj: dict, gone: bool = True) -> str | None:
    """An owned object changed (`gone=False`: `obj` is how it is now) or vanished: put back what
    its service's spec renders.

    Returns what was done, or None when the object is not ours to restore (unknown owner,
    or the owner itself is going away, in which case garbage collection is doing its job).
    """
    owner = controller_of(obj)
    if owner is None:
        return None
    namespace = obj["metadata"]["namespace"]
    async with registry.turn(namespace, owner["name"]):
        if not gone and _as_rendered(registry, obj, namespace, owner):
            # Most events are the controllers' status updates (a Deployment's ready count as
            # its pods start): no drift, and no read of the owner and the object to prove it.
            # At 1,000 services those reads were ~60 GETs per tick (bench/operator_scale.py).
            return "unchanged"
        return await _restore_owned(kube, registry, obj, namespace, owner)


def _as_rendered(registry: Registry, obj: dict, namespace: str, owner: dict) -> bool:
    """True when the object, as the event shows it, has every field its service's spec renders."""
    entry = registry.get(namespace, owner["name"])
    if entry is None or entry[0].uid != owner.get("uid"):
        return False
    desired = next((o for o in render_workload(*entry)
                    if o["kind"] == obj["kind"] and o["metadata"]["name"] == obj["metadata"]["name"]), None)
    return desired is not None and is_subset(without_replicas(desired), obj)


async def _restore_owned(kube: Kube, registry: Registry, obj: dict, namespace: str, owner: dict) -> str | None:
    entry = registry.get(namespace, owner["name"])
    if entry is None or entry[0].uid != owner.get("uid"):
        return None
    ref, spec = entry
    if not await _still_there(kube, ref):
        registry.forget(namespace, ref.name)
        return None
    desired = next((o for o in render_workload(ref, spec)
                    if o["kind"] == obj["kind"] and o["metadata"]["name"] == obj["metadata"]["name"]), None)
    if desired is None:
        return None
    outcome = await kube.apply(desired, ref)
    if outcome == "created" and not await _still_there(kube, ref):
        # The owner went away between the check above and the create: undo it rather than
        # leave an orphan for the garbage collector (which only some clusters run promptly).
        await kube.delete(obj["kind"], namespace, obj["metadata"]["name"])
        registry.forget(namespace, ref.name)
        return None
    if outcome != "unchanged":
        what = "re-created" if outcome == "created" else "restored"
        await kube.post_event(ref, "Normal", "DriftCorrected",
                              f"{obj['kind']} {obj['metadata']['name']} was changed or deleted by hand: {what}")
    return outcome


async def _still_there(kube: Kube, ref: ServiceRef) -> bool:
    parent = await kube.read_service(ref.namespace, ref.name)
    return (parent is not None and parent["metadata"].get("uid") == ref.uid
            and not parent["metadata"].get("deletionTimestamp"))
