"""The real kopf operator against the real API server: it owns, restores and protects the workload."""

import time

from ebbtide.cluster.render import ANNOTATION_SPEC
from tests.testbed.operator import ISVC, isvc, running_operator
from tests.testbed.waiting import wait_for

DEPLOYMENTS, SERVICES, PDBS, EVENTS = ("apps/v1/deployments", "v1/services", "policy/v1/poddisruptionbudgets",
                                       "v1/events")


def events(server, name, reason=None):
    found = server.list_objects(EVENTS, "default", field_selector=f"involvedObject.name={name}")
    return [e for e in found if reason is None or e["reason"] == reason]


def condition(server, name, type):
    obj = server.get_object(ISVC, "default", name) or {}
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == type), None)


def test_create_edit_restore_delete(apiserver):
    server = apiserver.server
    with running_operator(apiserver):
        created = server.create_object(isvc("chat", replicas={"min": 2, "max": 5}))
        uid = created["metadata"]["uid"]

        deployment = wait_for(lambda: server.get_object(DEPLOYMENTS, "default", "chat"), what="the Deployment")
        service = wait_for(lambda: server.get_object(SERVICES, "default", "chat"), what="the Service")
        pdb = wait_for(lambda: server.get_object(PDBS, "default", "chat"), what="the PDB")
        for obj in (deployment, service, pdb):
            (owner,) = obj["metadata"]["ownerReferences"]
            assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
                "InferenceService", "chat", uid, True)
        assert deployment["spec"]["replicas"] == 2
        assert wait_for(lambda: condition(server, "chat", "SpecValid"), what="SpecValid")["status"] == "True"
        assert wait_for(lambda: events(server, "chat", "Applied"), what="an Applied event")

        # No Prometheus answers here: the scaling loop holds the size, says why, and keeps its
        # history in status so that a restarted operator does not start from nothing.
        blind = wait_for(lambda: (c := condition(server, "chat", "MetricsAvailable")) and c["status"] == "False"
                         and c, what="MetricsAvailable=False")
        assert "Prometheus unreachable at http://127.0.0.1:1" in blind["message"], blind
        stored = server.get_object(ISVC, "default", "chat")["status"]
        assert stored["scaler"]["since"] > 0 and stored["lastDecision"]["reason"] == "MetricsUnavailable"
        assert stored["replicas"]["desired"] == 2

        # The autoscaler owns the replica count: a scale done elsewhere survives spec edits.
        server.patch_object(DEPLOYMENTS, "default", "chat", {"spec": {"replicas": 4}})
        server.patch_object(ISVC, "default", "chat", {"spec": {"engine": {"image": "vllm/vllm-openai:v0.12.0"}}})
        image = lambda: server.get_object(DEPLOYMENTS, "default", "chat")["spec"]["template"]["spec"][  # noqa: E731
            "containers"][0]["image"]
        wait_for(lambda: image() == "vllm/vllm-openai:v0.12.0", what="the new image in the Deployment")
        assert server.get_object(DEPLOYMENTS, "default", "chat")["spec"]["replicas"] == 4
        time.sleep(0.5)
        assert not events(server, "chat", "DriftCorrected"), "a spec edit is not drift"

        # Drift: an edit by hand is put back, a deletion by hand is undone.
        server.patch_object(DEPLOYMENTS, "default", "chat", {"spec": {"template": {"spec": {"containers": [
            {"name": "vllm", "image": "someone/else:latest"}]}}}})
        wait_for(lambda: image() == "vllm/vllm-openai:v0.12.0", what="the hand edit reverted")
        server.delete_object(DEPLOYMENTS, "default", "chat")
        wait_for(lambda: server.get_object(DEPLOYMENTS, "default", "chat"), what="the Deployment re-created")
        server.delete_object(SERVICES, "default", "chat")
        wait_for(lambda: server.get_object(SERVICES, "default", "chat"), what="the Service re-created")
        assert wait_for(lambda: events(server, "chat", "DriftCorrected"), what="a DriftCorrected event")

        # Delete: owner references take everything with it; nothing is re-created.
        server.delete_object(ISVC, "default", "chat")
        wait_for(lambda: not server.get_object(DEPLOYMENTS, "default", "chat")
                 and not server.get_object(SERVICES, "default", "chat")
                 and not server.get_object(PDBS, "default", "chat"), what="owned objects garbage-collected")
        # The InferenceService itself goes (no finalizer holds it), and nothing is re-created:
        # give the operator a moment to (wrongly) react to the deletions, then check again.
        wait_for(lambda: server.get_object(ISVC, "default", "chat") is None, what="the InferenceService gone")
        time.sleep(1.0)
        assert server.get_object(DEPLOYMENTS, "default", "chat") is None


def test_invalid_edit_is_reported_and_changes_nothing(apiserver):
    server = apiserver.server
    with running_operator(apiserver):
        server.create_object(isvc("code", replicas={"min": 1, "max": 3}))
        before = wait_for(lambda: server.get_object(DEPLOYMENTS, "default", "code"), what="the Deployment")
        wait_for(lambda: (condition(server, "code", "SpecValid") or {}).get("status") == "True", what="valid")

        # A cron expression no schema can check (min > max the API server's CEL rule refuses).
        server.patch_object(ISVC, "default", "code", {"spec": {
            "schedules": [{"name": "peak", "cron": "at eight", "durationMinutes": 60}]}})
        invalid = wait_for(lambda: (c := condition(server, "code", "SpecValid")) and c["status"] == "False" and c,
                           what="SpecValid=False")
        assert invalid["reason"] == "InvalidSpec"
        assert "'at eight' is not a 5-field cron expression" in invalid["message"]
        assert "keeping the last valid spec" in invalid["message"]
        (warning,) = wait_for(lambda: events(server, "code", "InvalidSpec"), what="an InvalidSpec event")
        assert warning["type"] == "Warning" and "'at eight'" in warning["message"]

        after = server.get_object(DEPLOYMENTS, "default", "code")
        # (resourceVersion moves with the Deployment controller's status writes; generation only with spec)
        assert after["metadata"]["generation"] == before["metadata"]["generation"]
        assert after["spec"] == before["spec"]

        # Fixing the spec applies it and clears the condition.
        server.patch_object(ISVC, "default", "code", {"spec": {"replicas": {"min": 1, "max": 6}, "schedules": []}})
        wait_for(lambda: (condition(server, "code", "SpecValid") or {}).get("status") == "True", what="valid again")
        wait_for(lambda: '"max":6' in server.get_object(DEPLOYMENTS, "default", "code")["metadata"]["annotations"][
            ANNOTATION_SPEC], what="the fixed spec applied")


def test_an_existing_deployment_that_is_not_ours_is_never_taken_over(apiserver):
    server = apiserver.server
    theirs = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "default"},
              "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                       "template": {"metadata": {"labels": {"app": "web"}},
                                    "spec": {"containers": [{"name": "web", "image": "nginx"}]}}}}
    server.create_object(theirs)
    with running_operator(apiserver):
        server.create_object(isvc("web"))
        (event,) = wait_for(lambda: events(server, "web", "OwnershipConflict"), what="an OwnershipConflict event")
        assert "is not owned by this InferenceService" in event["message"]
    assert server.get_object(DEPLOYMENTS, "default", "web")["spec"]["template"]["spec"]["containers"][0][
        "image"] == "nginx"


def test_a_restarted_operator_keeps_the_autoscaler_history(apiserver):
    server = apiserver.server

    def status():
        return server.get_object(ISVC, "default", "keep").get("status") or {}

    with running_operator(apiserver):
        server.create_object(isvc("keep", replicas={"min": 1, "max": 3}))
        wait_for(lambda: status().get("scaler"), what="autoscaler memory in status")
    before = status()
    time.sleep(1.5)  # decision times have one-second resolution
    with running_operator(apiserver):
        wait_for(lambda: status()["lastDecision"]["time"] > before["lastDecision"]["time"],
                 what="a decision by the restarted operator")
        # It continued the stored history; a fresh one would begin now and allow nothing to
        # shrink for a whole window, which is safe, but it would also forget what it learned.
        assert status()["scaler"]["since"] == before["scaler"]["since"]
