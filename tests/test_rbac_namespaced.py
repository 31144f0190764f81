"""The chart's namespaced install on the real API server: `rbac.scope=namespaced` with one watched
namespace, and the operator (`ebbtide run --namespace`) under nothing but that ServiceAccount's token.

The API server's RBAC is the judge: asked with the token itself (SelfSubjectAccessReview, what
`kubectl auth can-i` asks), the ServiceAccount may do in the watched namespace exactly what the Role
says, nothing in another namespace, nothing across all namespaces but list and watch nodes, and nothing on
Secrets anywhere; and the operator runs an InferenceService there without one refusal in its log.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.testbed.fixtures import Cluster
from tests.testbed.helm import (
    HELM,
    MISSING_HELM,
    AsServiceAccount,
    installed_release,
    service_account_kubeconfig,
)
from tests.testbed.operator import DEPLOYMENTS, ISVC, Operator, isvc, refusals
from tests.testbed.waiting import wait_for

pytestmark = pytest.mark.skipif(not HELM.is_file(), reason=MISSING_HELM)
WATCHED, OTHER = "team-a", "team-b"
ROLES = "rbac.authorization.k8s.io/v1/roles"
VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
NAMESPACES = "v1/namespaces"


@pytest.fixture(scope="module")
def cluster(control_plane) -> Iterator[Cluster]:
    """The two namespaces (the chart's Roles go into existing ones), removed with what is left in them."""
    cluster = Cluster(control_plane)
    server = cluster.server
    for namespace in (WATCHED, OTHER):
        server.create_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    try:
        yield cluster
    finally:
        for namespace in (WATCHED, OTHER):
            cluster.empty_namespace(namespace)
            server.delete_object(NAMESPACES, None, namespace)
        for namespace in (WATCHED, OTHER):
            wait_for(lambda n=namespace: server.get_object(NAMESPACES, None, n) is None, timeout=60,
                     what=f"namespace {namespace} deleted")
        cluster.close()


@pytest.fixture(scope="module")
def release(cluster):
    with installed_release(cluster, "--set", "rbac.scope=namespaced", "--set", f"operator.namespaces={{{WATCHED}}}",
                           name="scoped", namespace="ebbtide-scoped") as installed:
        yield installed


@pytest.fixture()
def as_operator(cluster, release, tmp_path) -> Iterator[AsServiceAccount]:
    kubeconfig = service_account_kubeconfig(cluster, release, tmp_path / "operator.kubeconfig")
    as_operator = AsServiceAccount(cluster.plane, kubeconfig)
    yield as_operator
    as_operator.close()


def test_the_service_account_may_act_in_its_namespace_only_and_never_on_secrets(cluster, release, as_operator):
    role = cluster.server.get_object(ROLES, WATCHED, release.fullname)
    assert role is not None and cluster.server.get_object(ROLES, OTHER, release.fullname) is None
    resources = {(group, resource): set(rule["verbs"])
                 for rule in role["rules"] for group in rule["apiGroups"] for resource in rule["resources"]}
    assert ("apps", "deployments") in resources and ("", "pods") in resources
    wrong = []
    for (group, resource), granted in resources.items():
        for verb in VERBS:
            verdicts = {namespace: as_operator.can(verb, group, resource, namespace)
                        for namespace in (WATCHED, OTHER, None)}
            if verdicts != {WATCHED: verb in granted, OTHER: False, None: False}:
                wrong.append(f"{verb} {group}/{resource}: {verdicts}")
    assert not wrong, "the API server's verdicts differ from the Role in " + WATCHED + ":\n" + "\n".join(wrong)
    for namespace in (WATCHED, OTHER, release.namespace, None):
        for verb in ("get", "list", "watch"):
            assert not as_operator.can(verb, "", "secrets", namespace), (verb, namespace)
    # Cluster-wide, only what is cluster-scoped: nodes for spot; no CRD watch with kopf's scanning off.
    assert as_operator.can("list", "", "nodes") and as_operator.can("watch", "", "nodes")
    assert not as_operator.can("get", "", "nodes") and not as_operator.can("list", "", "namespaces")
    assert not as_operator.can("list", "apiextensions.k8s.io", "customresourcedefinitions")


def test_the_operator_runs_its_namespace_under_the_namespaced_rules(cluster, release, as_operator, tmp_path):
    server = cluster.server
    server.create_object(isvc("chat", namespace=OTHER))
    # Spot, so that nodes are listed (the ClusterRole) and two Deployments are owned (the Role).
    server.create_object(isvc("chat", namespace=WATCHED, replicas={"min": 2, "max": 3},
                              scaling={"behavior": {"intervalSeconds": 1}},
                              placement={"spot": {"enabled": True, "onDemandBase": 1}}))
    operator = Operator(as_operator, "scoped", tmp_path, "--namespace", WATCHED)
    try:
        wait_for(lambda: (server.get_object(ISVC, WATCHED, "chat").get("status") or {}).get("lastDecision"),
                 timeout=60, what="a first decision in " + WATCHED)
        assert server.get_object(DEPLOYMENTS, WATCHED, "chat-spot")["spec"]["replicas"] == 1
        # A hand scale is put back: Deployments listed in the namespace, then patched.
        server.patch_object(DEPLOYMENTS, WATCHED, "chat", {"spec": {"replicas": 3}})
        wait_for(lambda: server.get_object(DEPLOYMENTS, WATCHED, "chat")["spec"]["replicas"] == 1,
                 timeout=30, what="the hand scale put back")
        # The other namespace's service is not this operator's: no workload, no status.
        assert server.get_object(DEPLOYMENTS, OTHER, "chat") is None
        assert not server.get_object(ISVC, OTHER, "chat").get("status")
    finally:
        operator.stop()
    output = operator.output()
    assert not refusals(output), "\n".join(refusals(output))
    assert "Traceback" not in output, output
