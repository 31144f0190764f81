"""The chart's RBAC against the code, offline: every API call the operator makes (found in
cluster/kube.py and control/leader.py by their client methods) and what kopf calls for its handlers
is granted, and nothing else, in the cluster scope (one ClusterRole) and in the namespaced scope
(a Role per watched namespace, a ClusterRole with only the cluster-scoped calls). No Secrets.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import kubernetes
import pytest

from ebbtide import api
from tests.test_chart import (
    ALL_ON,
    CHART,
    CONFIGS,
    NAMESPACE,
    PACKAGE,
    RELEASE,
    ROOT,
    WATCHED,
    _container,
    _lease_role,
    by_kind,
    one,
    render,
)
from tests.testbed.helm import HELM, MISSING_HELM, helm

pytestmark = pytest.mark.skipif(not HELM.is_file(), reason=MISSING_HELM)


CLIENT_VERBS = {"read": "get", "get": "get", "list": "list", "create": "create", "patch": "patch",
                "replace": "update", "delete": "delete"}
API_GROUPS = {kubernetes.client.CoreV1Api: "", kubernetes.client.AppsV1Api: "apps",
              kubernetes.client.PolicyV1Api: "policy", kubernetes.client.EventsV1Api: "events.k8s.io",
              kubernetes.client.CoordinationV1Api: "coordination.k8s.io",
              kubernetes.client.CustomObjectsApi: None}
METHOD = re.compile(r"^(read|get|list|create|patch|replace|delete)_(namespaced_)?(\w+?)(_for_all_namespaces)?$")
SUBRESOURCES = ("status", "scale")


def _permission(method: str, api_class: type | None = None) -> tuple[str, str, str]:
    """A kubernetes client method name (of api_class, if known) -> the (apiGroup, resource, verb) it needs."""
    owners = [api_class] if api_class else [cls for cls in API_GROUPS if hasattr(cls, method)]
    assert len(owners) == 1 and hasattr(owners[0], method), f"{method}: which API class? ({owners})"
    verb, _, name, _ = METHOD.match(method).groups()
    sub = next((s for s in SUBRESOURCES if name.endswith(f"_{s}")), None)
    name = name.removesuffix(f"_{sub}") if sub else name
    if owners[0] is kubernetes.client.CustomObjectsApi:  # the only custom objects the operator reads
        group, resource = api.GROUP, api.PLURAL
    else:
        group, resource = API_GROUPS[owners[0]], name.replace("_", "") + "s"
    return group, f"{resource}/{sub}" if sub else resource, CLIENT_VERBS[verb]


def api_calls_of(path: Path) -> set[tuple[str, str, str]]:
    """The (apiGroup, resource, verb) of the client methods a module calls on its API objects."""
    tree = ast.parse(path.read_text())
    calls = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute) and METHOD.match(node.attr)
             and any(hasattr(cls, node.attr) for cls in API_GROUPS)}
    return {_permission(method) for method in calls}


def operator_api_calls() -> set[tuple[str, str, str]]:
    """Every API call in cluster/kube.py: the direct client methods and the `_KINDS` table."""
    from ebbtide.cluster import kube

    tree = ast.parse((PACKAGE / "cluster" / "kube.py").read_text())
    # Receivers: `self.core = kubernetes.client.CoreV1Api(...)`, `apps = kubernetes.client.AppsV1Api(...)`.
    receivers = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Attribute)
                and hasattr(kubernetes.client, node.value.func.attr)):
            for target in node.targets:
                name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", None)
                receivers[name] = getattr(kubernetes.client, node.value.func.attr)
    needed = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and METHOD.match(node.attr) and any(
                hasattr(cls, node.attr) for cls in API_GROUPS):
            receiver = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", None)
            needed.add(_permission(node.attr, receivers.get(receiver)))
        # self._mirror(what, list_all, list_namespaced, ...): those lists, watched (cluster/mirror.py)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "_mirror":
            for method in node.args[1:3]:
                assert isinstance(method, ast.Attribute), "kube._mirror must be given the client's list methods"
                receiver = method.value.attr if isinstance(method.value, ast.Attribute) else method.value.id
                group, resource, _ = _permission(method.attr, receivers.get(receiver))
                needed.add((group, resource, "watch"))
        # self._method(kind, "verb") -> f"{verb}_namespaced_{snake}" for any kind in _KINDS
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "_method"):
            verb = node.args[1]
            assert isinstance(verb, ast.Constant), "kube._method must be called with a literal verb"
            for api_class, snake in kube._KINDS.values():
                method = f"{verb.value}_namespaced_{snake}"
                assert hasattr(api_class, method), method
                needed.add(_permission(method, api_class))
    return needed


def test_only_kube_py_talks_to_the_api():
    """The scan above sees every call only if no other module uses the client's API classes
    (but the leader election's Lease calls, which the chart grants in a Role of their own, and
    cluster/reachable.py's GET /version, which RBAC grants everyone: system:public-info-viewer)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        # The activator is a process of its own with its own Role: tests/test_activator_chart.py checks it.
        if path in (PACKAGE / "cluster" / "kube.py", PACKAGE / "control" / "leader.py",
                    PACKAGE / "cluster" / "reachable.py") \
                or path.parent == PACKAGE / "activator":
            continue
        for line in path.read_text().splitlines():
            if re.search(r"kubernetes\.client\.(?!rest\b)|from kubernetes(\.client)? import (?!.*rest)", line):
                offenders.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert not offenders, "API calls outside cluster/kube.py (add them there, then to the chart's RBAC):\n" + \
        "\n".join(offenders)


def kopf_needs(namespaces: list[str]) -> set[tuple[str, str, str]]:
    """What kopf itself calls for the handlers registered in ebbtide.control.handlers, run with
    these `--namespace`s (none: cluster-wide)."""
    import kopf

    import ebbtide.control.handlers  # noqa: F401  (registers the handlers)

    registry = kopf.get_default_registry() if hasattr(kopf, "get_default_registry") else kopf.OperatorRegistry
    needed = set()
    for attr, stateful in (("_watching", False), ("_changing", True), ("_spawning", True), ("_indexing", False)):
        for handler in getattr(registry, attr).get_all_handlers():
            if getattr(handler.fn, "__module__", None) != "ebbtide.control.handlers":
                continue  # other tests in this process (the kopf test bed check) register their own
            selector = handler.selector
            resource = selector.plural or selector.any_name
            assert resource and resource == resource.lower() and resource.endswith("s"), selector
            verbs = {"list", "watch"} | ({"patch"} if stateful else set())  # progress annotations, finalizer
            needed |= {(selector.group or "", resource, verb) for verb in verbs}
    needed.add(("", "events", "create"))  # kopf posts its warnings as core v1 Events
    if not namespaces:  # with --namespace, control/handlers.py turns kopf's CRD scanning off
        needed |= {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")}
    return needed


def granted(cluster_role: dict) -> set[tuple[str, str, str]]:
    out = set()
    for rule in cluster_role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, f"unexpected rule fields: {rule}"
        for field in rule.values():
            assert "*" not in field, f"wildcard in {rule}"
        out |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return out


def cluster_scoped(group: str, resource: str) -> bool:
    """From the client: a resource is cluster-scoped when its API class lists it, but never in a namespace."""
    for cls, cls_group in {**API_GROUPS, kubernetes.client.ApiextensionsV1Api: "apiextensions.k8s.io"}.items():
        for method in dir(cls) if cls_group == group else ():
            m = re.match(r"^list_(?!namespaced_)(\w+)$", method)
            if (m and not method.endswith("_for_all_namespaces") and not hasattr(cls, f"list_namespaced_{m[1]}")
                    and m[1].replace("_", "") + "s" == resource):
                return True
    return False


def assert_grants(role: dict, needed: set[tuple[str, str, str]]) -> None:
    have = granted(role)
    name = f"{role['kind']} {role['metadata'].get('namespace', '')}/{role['metadata']['name']}"
    assert not needed - have, f"the operator calls these but the {name} lacks them: {sorted(needed - have)}"
    assert not have - needed, f"{name} grants these but they are never used (least privilege): {sorted(have - needed)}"


def operator_roles(docs: list[dict]) -> dict[str, dict]:
    """The Roles holding the operator's own rules (not the Lease's), by namespace."""
    return {r["metadata"]["namespace"]: r for r in by_kind(docs, "Role")
            if not r["metadata"]["name"].endswith("-leader-election")}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_rbac_grants_exactly_what_the_operator_uses(config):
    docs = render(*CONFIGS[config])
    from ebbtide.cli import build_parser
    namespaces = build_parser().parse_args(["run", *_container(docs)["args"]]).namespace
    needed = operator_api_calls() | kopf_needs(namespaces)
    roles = operator_roles(docs)
    if config != "namespaced":
        assert not roles
        assert_grants(one(docs, "ClusterRole"), needed)
        return
    # A Role in each watched namespace, nothing namespaced left in the ClusterRole.
    cluster_wide = {need for need in needed if cluster_scoped(need[0], need[1].partition("/")[0])}
    assert cluster_wide == {("", "nodes", "list"), ("", "nodes", "watch")}, cluster_wide
    assert_grants(one(docs, "ClusterRole"), cluster_wide)
    assert set(roles) == set(namespaces) == set(WATCHED)
    for role in roles.values():
        assert_grants(role, needed - cluster_wide)
    bindings = {b["metadata"]["namespace"]: b for b in by_kind(docs, "RoleBinding")}
    for namespace, role in roles.items():
        binding = bindings[namespace]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": role["metadata"]["name"]}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "namespace": NAMESPACE,
                                        "name": one(docs, "ServiceAccount")["metadata"]["name"]}]


def test_cluster_scoped_resources_are_told_from_the_client():
    """(So that the namespaced check above cannot pass by calling everything cluster-scoped.)"""
    assert cluster_scoped("", "nodes") and cluster_scoped("apiextensions.k8s.io", "customresourcedefinitions")
    assert not cluster_scoped("", "pods") and not cluster_scoped("apps", "deployments")


@pytest.mark.parametrize("config", list(CONFIGS))
def test_no_role_grants_anything_on_secrets(config):
    docs = render(*CONFIGS[config], "--set", "highAvailability.enabled=true")
    roles = by_kind(docs, "ClusterRole") + by_kind(docs, "Role")
    assert len(roles) >= 2
    for role in roles:
        for group, resource, verb in granted(role):
            assert resource.partition("/")[0] != "secrets", (role["metadata"]["name"], group, resource, verb)


def test_a_namespaced_scope_needs_its_namespaces():
    result = helm("template", RELEASE, str(CHART), "--set", "rbac.scope=namespaced", check=False)
    assert result.returncode != 0
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert "rbac.scope=namespaced needs operator.namespaces" in line, result.stderr


def test_operator_api_calls_are_seen():
    """The scan finds the calls we know of (so an empty scan cannot pass the test above)."""
    calls = operator_api_calls()
    assert {("apps", "deployments", "patch"), ("", "pods", "list"), ("", "events", "create"),
            (api.GROUP, f"{api.PLURAL}/status", "patch"), ("policy", "poddisruptionbudgets", "create"),
            ("", "pods/status", "patch")} <= calls


def test_the_lease_role_grants_exactly_what_leader_py_calls():
    """In the release namespace only (_lease_role checks where)."""
    assert granted(_lease_role(render(*ALL_ON))) == api_calls_of(PACKAGE / "control" / "leader.py")
