"""The chart's activator (activator.enabled), offline: helm template, Kubernetes schemas, the
arguments `ebbtide activator` must accept, the scrape annotations, and RBAC against the code."""

from __future__ import annotations

import re

import kubernetes
import kubernetes_validate
import pytest

from tests.test_chart import K8S_VERSION, NAMESPACE, PACKAGE, by_kind, render
from tests.test_chart_rbac import granted
from tests.testbed.helm import CHART, HELM, MISSING_HELM, helm

pytestmark = pytest.mark.skipif(not HELM.is_file(), reason=MISSING_HELM)

ON = ["--set", "activator.enabled=true", "--set", "activator.target.name=chat",
      "--set", "activator.target.namespace=models", "--set", "activator.holdSeconds=120"]
COMPONENT = "app.kubernetes.io/component"
VERB = re.compile(r"^(read|get|list|create|patch|replace|delete|connect)_")


def activator_objects(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["metadata"].get("labels", {}).get(COMPONENT) == "activator"]


def the(docs: list[dict], kind: str) -> dict:
    (found,) = [d for d in activator_objects(docs) if d["kind"] == kind]
    return found


def test_off_by_default():
    assert not activator_objects(render())


def test_enabled_without_a_target_is_refused_with_the_value_to_set():
    result = helm("template", "rel", str(CHART), "--set", "activator.enabled=true", check=False)
    assert result.returncode != 0
    assert "activator.target.name" in result.stderr, result.stderr


@pytest.mark.parametrize("bad", ["activator.holdSeconds=0", "activator.maxPending=0",
                                 "activator.target.name=Chat", "activator.port=0", "activator.nosuch=1"])
def test_values_schema_rejects_bad_activator_values(bad):
    result = helm("template", "rel", str(CHART), *ON, "--set", bad, check=False)
    assert result.returncode != 0, f"--set {bad} was accepted"
    assert "schema" in result.stderr.lower(), result.stderr


def test_objects_pass_kubernetes_validate_strict():
    objects = activator_objects(render(*ON))
    assert sorted(d["kind"] for d in objects) == ["Deployment", "Role", "RoleBinding", "Service", "ServiceAccount"]
    for doc in objects:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {e.message} at {list(e.path)}")
    helm("lint", "--strict", str(CHART), *ON)


def test_the_deployment_runs_ebbtide_activator_with_arguments_it_accepts():
    from ebbtide.cli import build_parser

    docs = render(*ON)
    pod = the(docs, "Deployment")["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["ebbtide", "activator"]
    args = build_parser().parse_args(container["command"][1:] + container["args"])
    assert (args.service, args.namespace, args.hold_seconds, args.max_pending) == ("chat", "models", 120, 1000)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": args.port, "metrics": args.metrics_port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # What docs/prometheus-scrape.yaml keeps and where it scrapes.
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(args.metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_the_service_reaches_the_activator_and_not_the_operator():
    docs = render(*ON)
    service, deployment = the(docs, "Service"), the(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    operator = next(d for d in by_kind(docs, "Deployment") if d is not deployment)
    operator_labels = operator["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= operator_labels.items()
    assert not operator["spec"]["selector"]["matchLabels"].items() <= labels.items(), "the operator's " \
        "Deployment would adopt the activator's pods"


def test_rbac_reads_endpointslices_of_the_target_namespace_only():
    docs = render(*ON)
    role, binding = the(docs, "Role"), the(docs, "RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "models"
    assert granted(role) == {("discovery.k8s.io", "endpointslices", verb) for verb in ("get", "list", "watch")}
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    account = the(docs, "ServiceAccount")
    assert account["metadata"]["namespace"] == NAMESPACE
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": NAMESPACE}]
    assert the(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    # The namespace defaults to the release's.
    role = the(render("--set", "activator.enabled=true", "--set", "activator.target.name=chat"), "Role")
    assert role["metadata"]["namespace"] == NAMESPACE


def test_the_activator_calls_nothing_its_role_does_not_grant():
    """Every API call in the activator's code is on EndpointSlices (list, and list with watch)."""
    api_methods = {m for name in dir(kubernetes.client) if name.endswith("Api")
                   for m in dir(getattr(kubernetes.client, name)) if VERB.match(m)}
    calls = {m for path in (PACKAGE / "activator").glob("*.py")
             for m in re.findall(r"\.(\w+)\(", path.read_text()) if m in api_methods}
    assert calls == {"list_namespaced_endpoint_slice"}, calls
