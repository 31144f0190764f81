"""The Helm chart, offline: helm lint and template, Kubernetes schemas, the CRD, RBAC against the code.

Needs the real helm binary in tools/bin/ (`tools/install-helm.sh`, or `make tools`); without it
these tests skip. The rendered built-in objects are validated with kubernetes-validate (strict,
Kubernetes 1.30); tests/test_chart_rbac.py compares the RBAC with the API calls the operator's code makes.
"""

from __future__ import annotations

import json
import re
import runpy
from pathlib import Path

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
    _lease_role(docs)  # (its rules: tests/test_chart_rbac.py)
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
