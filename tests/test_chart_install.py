"""The chart in a real cluster: `helm install` and `helm uninstall`, and the operator running with
nothing but its ServiceAccount's permissions (a token minted by the TokenRequest API).

The ClusterRole is least privilege (tests/test_chart_rbac.py derives it from the code); here the API
server's RBAC judges it: the operator works with exactly that, and when one verb is taken away
it says so once, clearly, on the InferenceService and in its log, instead of failing every tick.
"""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from ebbtide.api.crd import crd
from tests.testbed.fixtures import Cluster
from tests.testbed.helm import (
    HELM,
    MISSING_HELM,
    AsServiceAccount,
    helm,
    installed_release,
    service_account_kubeconfig,
)
from tests.testbed.kubeapi import KubeApi, resource_of
from tests.testbed.operator import DEPLOYMENTS, ISVC, condition, isvc, refusals, running_operator
from tests.testbed.waiting import wait_for

pytestmark = pytest.mark.skipif(not HELM.is_file(), reason=MISSING_HELM)
CRDS = "apiextensions.k8s.io/v1/customresourcedefinitions"
CLUSTER_ROLES = "rbac.authorization.k8s.io/v1/clusterroles"
ISVC_CRD = crd()["metadata"]["name"]
DENIED = 'cannot patch resource "deployments" in API group "apps"'


def test_helm_install_establishes_the_crds_and_applies_rbac_then_uninstalls(apiserver):
    server = apiserver.server
    # helm installs a chart's crds/ only where they are missing: take ours away so that it does.
    server.delete_crd(ISVC_CRD)
    try:
        with installed_release(apiserver, name="install", namespace="ebbtide-install") as release:
            server.wait_established(ISVC_CRD)
            installed = server.get_object(CRDS, None, ISVC_CRD)
            assert installed["spec"]["versions"][0]["schema"] == crd()["spec"]["versions"][0]["schema"]
            manifest = [d for d in yaml.safe_load_all(
                helm("get", "manifest", release.name, "-n", release.namespace,
                     kubeconfig=apiserver.kubeconfig_path).stdout) if d]
            kinds = {d["kind"] for d in manifest}
            assert {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service"} <= kinds
            for doc in manifest:  # every object of the release is in the cluster as rendered
                namespace = release.namespace if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding") else None
                held = server.get_object(resource_of(doc), namespace, doc["metadata"]["name"])
                assert held is not None, f"{doc['kind']} {doc['metadata']['name']} not applied"
                for field in ("rules", "roleRef", "subjects"):
                    assert held.get(field) == doc.get(field), (doc["kind"], field)
            deployment = server.get_object(DEPLOYMENTS, release.namespace, release.fullname)
            assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == release.fullname
            status = json.loads(helm("status", release.name, "-n", release.namespace, "-o", "json",
                                     kubeconfig=apiserver.kubeconfig_path).stdout)
            assert status["info"]["status"] == "deployed"
        assert server.get_object(CLUSTER_ROLES, None, release.fullname) is None, "uninstall leaves RBAC behind"
        assert server.get_object("v1/namespaces", None, release.namespace) is None
        assert server.wait_established(ISVC_CRD), "helm keeps CRDs on uninstall (the services stay)"
    finally:
        apiserver.register_crd(crd())


# --- the operator with the chart's ServiceAccount ----------------------------------------------------

@pytest.fixture(scope="module")
def release(control_plane):
    cluster = Cluster(control_plane)
    try:
        with installed_release(cluster) as installed:
            yield installed
    finally:
        cluster.close()


@pytest.fixture()
def as_operator(apiserver, release, tmp_path) -> AsServiceAccount:
    kubeconfig = service_account_kubeconfig(apiserver, release, tmp_path / "operator.kubeconfig")
    cluster = AsServiceAccount(apiserver.plane, kubeconfig)
    yield cluster
    cluster.close()


def allowed(server, user: str, verb: str, group: str, resource: str, namespace: str = "default") -> bool:
    """The API server's RBAC verdict for a user (a SubjectAccessReview, asked as the admin)."""
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
              "spec": {"user": user, "groups": ["system:serviceaccounts", "system:authenticated"],
                       "resourceAttributes": {"verb": verb, "group": group, "resource": resource,
                                              "namespace": namespace}}}
    return server.request("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", review)["status"]["allowed"]


def start_and_scale_by_hand(server, **spec) -> None:
    """A service whose on-demand Deployment is then scaled to 3 by hand: the operator must put the
    count back, which takes a `patch` on deployments."""
    # No Prometheus here: no drain can be seen to end, so its deadline (1 s) says when a replica goes.
    server.create_object(isvc("chat", scaling={"behavior": {"intervalSeconds": 1, "scaleDown": {"drainSeconds": 1}}},
                              **spec))
    wait_for(lambda: (server.get_object(ISVC, "default", "chat").get("status") or {}).get("lastDecision"),
             what="a first decision")
    server.patch_object(DEPLOYMENTS, "default", "chat", {"spec": {"replicas": 3}})


def on_demand_replicas(server) -> int:
    return server.get_object(DEPLOYMENTS, "default", "chat")["spec"]["replicas"]


def test_the_operator_works_with_the_charts_service_account_alone(apiserver, release, as_operator):
    server = apiserver.server
    review = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    who = KubeApi(as_operator.api_client()).request("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews",
                                                    review)["status"]["userInfo"]
    assert who["username"] == f"system:serviceaccount:{release.namespace}:{release.fullname}", who
    with running_operator(as_operator) as runner:
        # Spot placement, so that nodes are listed and two Deployments are owned: on-demand holds
        # the base of 1, spot the rest.
        start_and_scale_by_hand(server, replicas={"min": 2, "max": 3},
                                placement={"spot": {"enabled": True, "onDemandBase": 1}})
        assert server.get_object(DEPLOYMENTS, "default", "chat-spot")["spec"]["replicas"] == 1
        wait_for(lambda: on_demand_replicas(server) == 1, what="the hand scale put back")
        assert condition(server, "SpecValid")["status"] == "True"
    assert not refusals(runner.output), "\n".join(refusals(runner.output))
    assert "Traceback" not in runner.output, runner.output


def test_a_missing_permission_is_said_once_and_shown_on_the_service(apiserver, release, as_operator):
    server = apiserver.server
    user = f"system:serviceaccount:{release.namespace}:{release.fullname}"
    granted = server.get_object(CLUSTER_ROLES, None, release.fullname)["rules"]
    without_patch = copy.deepcopy(granted)
    (rule,) = [r for r in without_patch if r["resources"] == ["deployments"]]
    rule["verbs"].remove("patch")
    server.patch_object(CLUSTER_ROLES, None, release.fullname, {"rules": without_patch})
    try:
        wait_for(lambda: not allowed(server, user, "patch", "apps", "deployments"), what="patch taken away")
        with running_operator(as_operator) as runner:
            start_and_scale_by_hand(server, replicas={"min": 1, "max": 2})  # 3 is above max: back to 2
            said = wait_for(lambda: (c := condition(server, "Authorized")) and c["status"] == "False" and c,
                            what="Authorized=False")
            assert said["reason"] == "Forbidden" and DENIED in said["message"], said
            # Ticks go on, each trying the scale again: still one Event, no other noise. (An unchanged
            # status is written again every 20 intervals: control/explain.py.)
            stamp = server.get_object(ISVC, "default", "chat")["status"]["lastDecision"]["time"]
            for _ in range(2):
                wait_for(lambda s=stamp: (t := server.get_object(ISVC, "default", "chat")["status"]
                                          ["lastDecision"]["time"]) > s and t, timeout=60, what="a later tick")
                stamp = server.get_object(ISVC, "default", "chat")["status"]["lastDecision"]["time"]
            assert on_demand_replicas(server) == 3, "nothing could scale it"
            reasons = [e["reason"] for e in events_of(server)]
            # (no ScaledDown either: a scale that fails is not announced every tick)
            assert reasons.count("Forbidden") == 1 and not {"ScaleFailed", "ScaledDown"} & set(reasons), reasons
            (event,) = [e for e in events_of(server) if e["reason"] == "Forbidden"]
            assert event["type"] == "Warning" and DENIED in event["message"], event

            # Given back, the permission is used at once and the condition clears.
            server.patch_object(CLUSTER_ROLES, None, release.fullname, {"rules": granted})
            wait_for(lambda: on_demand_replicas(server) == 2, what="the hand scale put back")
            wait_for(lambda: condition(server, "Authorized")["status"] == "True", what="Authorized=True")
            assert [e["reason"] for e in events_of(server)].count("ScaledDown") == 1
    finally:
        server.patch_object(CLUSTER_ROLES, None, release.fullname, {"rules": granted})
    lines = refusals(runner.output)
    assert len(lines) == 1 and DENIED in lines[0] and "ClusterRole" in lines[0], "\n".join(lines)
    assert "Traceback" not in runner.output, runner.output
    assert "patch_namespaced_deployment is permitted again" in runner.output


def events_of(server, name: str = "chat") -> list[dict]:
    return server.list_objects("v1/events", "default", field_selector=f"involvedObject.name={name}")
