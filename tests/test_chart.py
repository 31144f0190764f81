"""The Helm chart, offline: helm lint and template, Kubernetes schemas, the CRD, RBAC against the code.

Needs the real helm binary in tools/bin/ (`tools/install-helm.sh`, or `make tools`); without it
these tests skip. The rendered built-in objects are validated with kubernetes-validate (strict,
Kubernetes 1.30), and the ClusterRole is compared with the API calls the operator's code makes.
"""

from __future__ import annotations

import ast
import json
import re
import runpy
from pathlib import Path

import kubernetes
import kubernetes_validate
import pytest
import yaml

from ebbtide import api
from tests.testbed.helm import CHART, HELM, MISSING_HELM, helm

ROOT = Path(__file__).resolve().parents[1]
CRD_FILE = ROOT / "crds" / "inferenceservices.ebbtide.dev.yaml"
PACKAGE = ROOT / "operator" / "ebbtide"
K8S_VERSION = "1.30.0"
RELEASE, NAMESPACE = "rel", "ebbtide-system"

pytestmark = pytest.mark.skipif(not HELM.is_file(), reason=MISSING_HELM)

ALL_ON = [
    "--set", "highAvailability.enabled=true",
    "--set", "highAvailability.replicas=3",
    "--set", "serviceMonitor.force=true",
    "--set", "podMonitor.force=true",
    "--set", "operator.verbose=true",
    "--set", "prometheus.url=http://prometheus.monitoring.svc:9090",
    "--set", "podAnnotations.team=ml",
    "--set", "grafanaDashboard.labels.release=kube-prometheus-stack",
]
WATCHED = ("team-a", "team-b")
NAMESPACED = ["--set", "rbac.scope=namespaced", "--set", f"operator.namespaces={{{','.join(WATCHED)}}}"]
CONFIGS = {"default": [], "all-on": ALL_ON, "namespaced": NAMESPACED}


def render(*args: str) -> list[dict]:
    out = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--include-crds", *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


@pytest.fixture(scope="module", params=list(CONFIGS))
def rendered(request) -> list[dict]:
    return render(*CONFIGS[request.param])


# --- helm itself -------------------------------------------------------------------------------

@pytest.mark.parametrize("config", list(CONFIGS))
def test_helm_lint_strict(config):
    helm("lint", "--strict", str(CHART), *CONFIGS[config])


@pytest.mark.parametrize("bad", [
    "replicaCount=-1",
    "highAvailability.replicas=1",
    "prometheus.url=prometheus:9090",
    "operator.metricsPort=70000",
    "image.pullPolicy=Sometimes",
    "no.such.value=1",
    "rbac.scope=everywhere",
])
def test_values_schema_rejects_bad_values(bad):
    result = helm("template", RELEASE, str(CHART), "--set", bad, check=False)
    assert result.returncode != 0, f"--set {bad} was accepted"
    assert "schema" in result.stderr.lower(), result.stderr


# --- what the cluster would receive ------------------------------------------------------------

BUILT_IN_GROUPS = {"", "apps", "policy", "rbac.authorization.k8s.io", "apiextensions.k8s.io"}


def _group(doc: dict) -> str:
    return doc["apiVersion"].rpartition("/")[0]


def test_built_in_objects_pass_kubernetes_validate_strict(rendered):
    built_in = [d for d in rendered if _group(d) in BUILT_IN_GROUPS]
    assert {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service", "ConfigMap",
            "CustomResourceDefinition"} <= {d["kind"] for d in built_in}
    for doc in built_in:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {e.message} at {list(e.path)}")
    others = {d["kind"] for d in rendered if _group(d) not in BUILT_IN_GROUPS}
    assert others <= {"ServiceMonitor", "PodMonitor"}


def test_rendered_crd_is_the_repositorys_crd():
    assert (CHART / "crds" / CRD_FILE.name).read_bytes() == CRD_FILE.read_bytes(), (
        "charts/ebbtide/crds/ must hold crds/ unchanged (it is a symlink to it)")
    crds = {d["metadata"]["name"]: d for d in by_kind(render(), "CustomResourceDefinition")}
    assert crds[f"{api.PLURAL}.{api.GROUP}"] == yaml.safe_load(CRD_FILE.read_text())
    assert set(crds) == {f"{api.PLURAL}.{api.GROUP}"}


def _container(docs: list[dict]) -> dict:
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def test_operator_deployment_default():
    docs = render()
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    container = _container(docs)
    assert container["command"] == ["ebbtide", "run"]
    assert container["args"] == ["--prometheus-url", "http://prometheus-server.monitoring.svc:80",
                                 "--metrics-port", "9090", "--health-port", "8080"]
    # The arguments must be ones `ebbtide run` accepts.
    from ebbtide.cli import build_parser
    parsed = build_parser().parse_args(container["command"][1:] + container["args"])
    assert (parsed.metrics_port, parsed.health_port, parsed.leader_election, parsed.selector) == (9090, 8080, False, "")
    assert {"name": "EBBTIDE_TICK_SECONDS", "value": "5"} in container["env"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 9090, "health": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")  # no Lease without leader election
    # Scrapeable without the Prometheus Operator (the README's install path).
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": "9090", "prometheus.io/path": "/metrics"}
    assert not by_kind(docs, "ServiceMonitor") and not by_kind(docs, "PodMonitor")


def test_operator_runs_locked_down(rendered):
    pod = one(rendered, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = _container(rendered)["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    resources = _container(rendered)["resources"]
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}
    assert pod["serviceAccountName"] == one(rendered, "ServiceAccount")["metadata"]["name"]
    binding = one(rendered, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == one(rendered, "ClusterRole")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"],
                                    "namespace": NAMESPACE}]


def _lease_role(docs: list[dict]) -> dict:
    role, binding = one(docs, "Role"), one(docs, "RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == one(docs, "ServiceAccount")["metadata"]["name"]
    return role


def test_high_availability_elects_a_leader_on_a_lease():
    docs = render(*ALL_ON)
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert "strategy" not in deployment["spec"]  # a rolling update: the new pod stands by until the old releases
    args = _container(docs)["args"]
    assert "--leader-election" in args and args[args.index("--lease-name") + 1] == "rel-ebbtide"
    assert "--verbose" in args
    env = {e["name"]: e.get("valueFrom") for e in _container(docs)["env"]}
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}  # the Lease's holderIdentity
    # The Role grants exactly the Lease calls control/leader.py makes, in the release namespace only.
    assert granted(_lease_role(docs)) == api_calls_of(PACKAGE / "control" / "leader.py")
    from ebbtide.cli import build_parser
    parsed = build_parser().parse_args(_container(docs)["command"][1:] + args)
    assert parsed.leader_election and parsed.lease_name == "rel-ebbtide"


@pytest.mark.parametrize("replicas", ["2", "3"])
def test_more_than_one_replica_always_elects_a_leader(replicas):
    """replicaCount > 1 without highAvailability cannot render two independent scaling loops."""
    docs = render("--set", f"replicaCount={replicas}")
    assert one(docs, "Deployment")["spec"]["replicas"] == int(replicas)
    assert "--leader-election" in _container(docs)["args"]
    _lease_role(docs)


def test_a_shard_runs_what_its_selector_and_namespaces_select():
    docs = render("--set", "operator.selector=ebbtide.dev/shard=a", "--set", "operator.namespaces={team-a,team-b}",
                  "--set", "highAvailability.leaseName=ebbtide-shard-a", "--set", "replicaCount=2")
    args = _container(docs)["args"]
    from ebbtide.cli import build_parser
    parsed = build_parser().parse_args(["run", *args])
    assert (parsed.selector, parsed.namespace, parsed.lease_name) == ("ebbtide.dev/shard=a", ["team-a", "team-b"],
                                                                      "ebbtide-shard-a")


def test_metrics_service_selects_the_operator(rendered):
    service = next(s for s in by_kind(rendered, "Service") if s["metadata"]["name"].endswith("-metrics"))
    labels = one(rendered, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


def test_monitors_follow_the_cluster_capabilities():
    assert not by_kind(render(), "PodMonitor")
    docs = render("--api-versions", "monitoring.coreos.com/v1")
    service_monitor, pod_monitor = one(docs, "ServiceMonitor"), one(docs, "PodMonitor")
    assert service_monitor["spec"]["endpoints"][0]["port"] == "metrics"
    from ebbtide.cluster.render import MANAGED_BY
    assert pod_monitor["spec"]["selector"] == {"matchLabels": MANAGED_BY}
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "http"
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"
    assert pod_monitor["spec"]["namespaceSelector"] == {"any": True}
    docs = render("--api-versions", "monitoring.coreos.com/v1", "--set", "podMonitor.enabled=false")
    assert not by_kind(docs, "PodMonitor") and by_kind(docs, "ServiceMonitor")


def test_grafana_dashboard_shows_the_operators_metrics():
    from ebbtide.control.metrics import OperatorMetrics

    config_map = next(c for c in by_kind(render(), "ConfigMap") if c["metadata"]["name"].endswith("-dashboard"))
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = config_map["data"].values()
    dashboard = json.loads(text)
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for name in ("ebbtide_desired_replicas", "ebbtide_ready_replicas", "ebbtide_replicas", "ebbtide_signal_requests",
                 "ebbtide_signal_seconds", "ebbtide_signal_tokens_per_second", "ebbtide_signal_ratio",
                 "ebbtide_scaling_decisions_total", "ebbtide_cost_usd_per_hour", "ebbtide_cost_usd_total",
                 "ebbtide_cost_usd_per_million_tokens", "ebbtide_gpu_seconds_total"):
        assert re.search(rf"\b{name}\b", exprs), f"no panel shows {name}"
    # ... and no panel shows a series the operator does not export (a renamed metric).
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    exported = {m.name + suffix for m in OperatorMetrics().registry.collect()
                for suffix in suffixes.get(m.type, ("",))}
    # (ebbtide_dev_service is the PodMonitor's label for a pod's service, not a metric.)
    assert set(re.findall(r"\bebbtide_(?!dev_service\b)\w+", exprs)) <= exported
    # SLO attainment comes from the engines' histograms, per service through that label.
    assert "vllm:time_to_first_token_seconds_bucket" in exprs and "ebbtide_dev_service" in exprs


def test_notes_say_what_to_do_next():
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    for step in ("kubectl apply -f examples/", "kubectl get isvc", "kubectl describe isvc NAME"):
        assert step in notes
    assert (ROOT / "examples" / "minimal.yaml").is_file()


# --- RBAC: exactly what the code calls ---------------------------------------------------------

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
    (but the leader election's Lease calls, which the chart grants in a Role of their own)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path in (PACKAGE / "cluster" / "kube.py", PACKAGE / "control" / "leader.py"):
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
    assert cluster_wide == {("", "nodes", "list")}, cluster_wide
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


# --- the engine-sim image's `vllm` shim --------------------------------------------------------

def test_vllm_shim_turns_vllm_serve_into_engine_sim(monkeypatch):
    from ebbtide.cluster.render import engine_args  # noqa: F401  (the shim must follow what is rendered)
    from ebbtide.sim.engine_server import parse_args

    monkeypatch.setenv("EBBTIDE_ENGINE_SIM_ARGS", "--preset tiny")
    translate = runpy.run_path(str(ROOT / "docker" / "vllm-shim.py"))["translate"]
    argv = translate(["serve", "meta-llama/Llama-3.1-8B-Instruct", "--port", "8000", "--served-model-name",
                      "chat", "--tensor-parallel-size", "2", "--enable-sleep-mode", "--max-model-len=4096",
                      "--enforce-eager"])
    assert argv[:2] == ["ebbtide", "engine-sim"]
    args = parse_args(argv[2:])
    assert (args.model, args.port, args.served_model_name) == ("meta-llama/Llama-3.1-8B-Instruct", 8000, ["chat"])
    assert args.enable_sleep_mode and args.max_model_len == 4096 and args.preset == "tiny"
    assert args.host == "0.0.0.0"
