"""The reconciler against the real API server, called as the kopf handlers call it, with the
interleavings the handlers can produce (they run concurrently: a Deployment's MODIFIED event
and an InferenceService's spec edit are handled side by side). A fault proxy in front of the
server makes a read slow, as a busy API server does."""

from __future__ import annotations

import asyncio

from ebbtide.api.ref import ServiceRef
from ebbtide.cluster.kube import Kube
from ebbtide.control.reconcile import Registry, last_applied_spec, reconcile, restore_owned
from tests.testbed.faultproxy import FaultProxy
from tests.testbed.operator import ISVC, isvc

DEPLOYMENTS = "apps/v1/deployments"
OLD, NEW = "vllm/vllm-openai:v0.11.0", "vllm/vllm-openai:v0.12.0"


def spec(image: str) -> dict:
    return {"model": {"name": "tiny-model"}, "engine": {"image": image}}


def test_drift_correction_that_overlaps_a_spec_edit_does_not_restore_the_old_spec(apiserver):
    """A hand scale of the Deployment (a MODIFIED event) is being handled when the spec edit
    arrives. Drift correction must compare with the spec being applied, not put the old image
    back (and then the new one again, with two DriftCorrected Events for an edit that was no
    drift at all)."""
    created = apiserver.server.create_object(isvc("chat", engine={"image": OLD}))
    ref = ServiceRef(name="chat", namespace="default", uid=created["metadata"]["uid"])
    plane = apiserver.plane
    proxy = FaultProxy(plane.url, str(plane.pki / "ca.crt")).start()

    async def run() -> None:
        client = proxy.api_client(plane.tokens["admin"])
        try:
            kube, registry = Kube(client), Registry()
            await reconcile(kube, registry, ref, spec(OLD), 1)
            scaled_by_hand = apiserver.server.patch_object(DEPLOYMENTS, "default", "chat", {"spec": {"replicas": 3}})
            apiserver.server.patch_object(ISVC, "default", "chat", {"spec": spec(NEW)})
            # The event of the hand scale is handled first, and the spec edit while it runs: the
            # API is slow to answer the drift handler's read of the InferenceService, so the
            # edit's patches land meanwhile (a busy API server does this in a cluster).
            proxy.delay("GET", r"/inferenceservices/chat$", 0.5)
            await asyncio.gather(restore_owned(kube, registry, scaled_by_hand), reconcile(kube, registry, ref, spec(NEW), 2))
            # Then the events of the edit's own patches come back, as they do in a cluster.
            await restore_owned(kube, registry, apiserver.server.get_object(DEPLOYMENTS, "default", "chat"))
        finally:
            kube.stop_watching()
            client.close()

    try:
        asyncio.run(run())
    finally:
        proxy.stop()
    deployment = apiserver.server.get_object(DEPLOYMENTS, "default", "chat")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == NEW
    assert deployment["spec"]["replicas"] == 3, "the replica count is not drift"
    reasons = [e["reason"] for e in apiserver.server.list_objects("v1/events", "default")]
    assert "DriftCorrected" not in reasons, reasons


def test_variants_deployments_come_and_go_with_the_spec_and_a_variant_named_spot_is_not_spot_placement(apiserver):
    """Applying a spec with variants, then one without: the Deployments the spec no longer renders
    go; the last valid spec is read back from a variant's Deployment (there is no `<service>`
    one); a variant named "spot" is not taken for the spot Deployment of spot placement."""
    variants = [{"name": name, "accelerator": name.upper(), "pricePerGpuHour": 1.0} for name in ("l4", "spot")]
    created = apiserver.server.create_object(isvc("chat", variants=variants))
    ref = ServiceRef(name="chat", namespace="default", uid=created["metadata"]["uid"])

    def names() -> list[str]:
        return sorted(d["metadata"]["name"] for d in apiserver.server.list_objects(DEPLOYMENTS, "default"))

    async def run() -> None:
        client = apiserver.api_client()
        kube = Kube(client)
        await reconcile(kube, Registry(), ref, {**spec(OLD), "variants": variants}, 1)
        assert names() == ["chat-l4", "chat-spot"]
        kept = await last_applied_spec(kube, ref)
        assert kept is not None and [v.name for v in kept.variants] == ["l4", "spot"]
        await reconcile(kube, Registry(), ref, spec(OLD), 2)
        kube.stop_watching()
        assert names() == ["chat"]

    asyncio.run(run())
    applied = [e["message"] for e in apiserver.server.list_objects("v1/events", "default") if e["reason"] == "Applied"]
    assert any("chat-l4 deleted (no longer in the spec)" in m for m in applied), applied
