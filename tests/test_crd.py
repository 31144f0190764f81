"""The generated CRD: the committed copy is current and documented (offline), and the real API
server accepts it, serves it (`kubectl explain`), defaults as the models do, and refuses what
its schema and CEL rules refuse."""

import json
from pathlib import Path

import pytest
import yaml
from kubernetes.client.rest import ApiException

from ebbtide.api.crd import CRD_FILENAME, crd, crd_yaml
from ebbtide.api.manifest import parse_spec
from tests.testbed.kubeapi import path_of
from tests.testbed.kubectl import KUBECTL, kubectl, run_kubectl
from tests.testbed.operator import ISVC, isvc
from tests.testbed.waiting import wait_for

ROOT = Path(__file__).resolve().parents[1]
CRD_NAME = crd()["metadata"]["name"]
needs_kubectl = pytest.mark.skipif(not KUBECTL.exists(), reason=f"needs the real kubectl at {KUBECTL}: `make tools`")


def schema() -> dict:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def walk(node: dict, path: str = ""):
    yield path, node
    for key, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


# --- offline: what the generator writes ----------------------------------------------------------

def test_committed_crd_matches_the_models():
    committed = (ROOT / "crds" / CRD_FILENAME).read_text()
    assert committed == crd_yaml(), "crds/ is stale: run `make crds` (ebbtide crd) and commit the result"


def test_every_property_has_a_description():
    missing = [path for path, node in walk(schema()) if path and "properties" in path.rsplit(".", 1)[0] + "x"
               and not node.get("description") and not path.endswith(("[]", "{}"))]
    assert not missing, f"properties without description: {missing}"


def test_schema_is_structural():
    for path, node in walk(schema()):
        assert "$ref" not in node and "anyOf" not in node and "allOf" not in node, path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"


def test_status_subresource_and_printer_columns():
    version = crd()["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Ready"] == ".status.replicas.ready"
    assert columns["Desired"] == ".status.replicas.desired"
    assert {"Mode", "Phase", "USD/h", "USD/1M-tok", "Last-Decision", "Age"} <= set(columns)
    assert crd()["spec"]["names"]["shortNames"] == ["isvc", "ebb"]


# --- the real API server --------------------------------------------------------------------------

@pytest.fixture()
def without_the_crd(apiserver):
    """The session's InferenceService CRD deleted for the test, and put back (from the models) after."""
    apiserver.server.delete_crd(CRD_NAME)
    try:
        yield apiserver
    finally:
        apiserver.register_crd(crd())


@needs_kubectl
@pytest.mark.parametrize("source", ["crds/" + CRD_FILENAME, "charts/ebbtide/crds"])
def test_crd_files_are_established_and_explained(without_the_crd, source):
    apiserver = without_the_crd
    kubectl(apiserver, "apply", "-f", str(ROOT / source))
    files = [ROOT / source] if source.endswith(".yaml") else sorted((ROOT / source).glob("*.yaml"))
    names = {doc["metadata"]["name"] for path in files for doc in yaml.safe_load_all(path.read_text()) if doc}
    assert CRD_NAME in names
    for name in names:
        held = apiserver.server.wait_established(name)
        accepted = {c["type"]: c["status"] for c in held["status"]["conditions"]}
        assert accepted["NamesAccepted"] == "True", held["status"]
    served = apiserver.server.get_object("apiextensions.k8s.io/v1/customresourcedefinitions", None, CRD_NAME)
    assert served["spec"]["versions"][0]["schema"] == crd()["spec"]["versions"][0]["schema"]
    # Established is not yet published: the OpenAPI document kubectl explain reads follows.
    explained = wait_for(lambda: (done := run_kubectl(apiserver, "explain", "inferenceservice.spec", "--recursive"))
                         .returncode == 0 and done.stdout, timeout=30, what="kubectl explain to know the CRD")
    spec = schema()["properties"]["spec"]
    for field in spec["properties"]:
        assert f"\n  {field}\t<" in explained, f"{field} missing from kubectl explain:\n{explained}"
    assert "stabilizationSeconds\t<integer>" in explained and "enum: Active, Advisory" in explained
    # By its short name: kubectl's discovery cache may not have it yet either.
    described = wait_for(lambda: (done := run_kubectl(apiserver, "explain", "isvc.spec.replicas.min"))
                         .returncode == 0 and done.stdout, timeout=30, what="kubectl explain to know the short name")
    assert spec["properties"]["replicas"]["properties"]["min"]["description"] in " ".join(described.split())


def _refusal(apiserver, spec: dict, name: str = "bad") -> dict:
    """The API server's Status for a create it refuses (the test fails if it accepts)."""
    with pytest.raises(ApiException) as refused:
        apiserver.server.create_object(isvc(name, **spec))
    return json.loads(refused.value.body)


BIG_SCHEDULE = [{"name": "a", "cron": "0 8 * * *", "durationMinutes": 5, "minReplicas": 9}]
FROM_SECRET = {"secretKeyRef": {"name": "hf", "key": "token"}}
L4 = {"name": "l4", "accelerator": "L4", "pricePerGpuHour": 0.8}


@pytest.mark.parametrize("spec, field, message", [
    ({"replicas": {"min": 3, "max": 1}}, "spec.replicas", "replicas.min must not be greater than replicas.max"),
    ({"replicas": {"max": 4}, "placement": {"spot": {"enabled": True, "onDemandBase": 6}}}, "spec",
     "placement.spot.onDemandBase must not be greater than replicas.max"),
    # the rule sees the defaulted object: replicas.max defaults to 4
    ({"placement": {"spot": {"enabled": True, "onDemandBase": 5}}}, "spec",
     "placement.spot.onDemandBase must not be greater than replicas.max"),
    ({"replicas": {"max": 4}, "schedules": BIG_SCHEDULE}, "spec",
     "a schedule's minReplicas must not be greater than replicas.max"),
    ({"mode": "Aggressive"}, "spec.mode", 'Unsupported value: "Aggressive"'),
    ({"scaling": {"targets": {"kvCacheUsage": 1.2}}}, "spec.scaling.targets.kvCacheUsage",
     "should be less than or equal to 1"),
    ({"engine": {"env": [{"name": "T", "value": "x", "valueFrom": FROM_SECRET}]}}, "spec.engine.env[0]",
     "value and valueFrom are mutually exclusive"),
    ({"engine": {"envFrom": [{"secretRef": {"name": "s"}, "configMapRef": {"name": "c"}}]}}, "spec.engine.envFrom[0]",
     "exactly one of secretRef and configMapRef must be set"),
    ({"engine": {"modelCache": {}}}, "spec.engine.modelCache",
     "exactly one of persistentVolumeClaim and emptyDir must be set"),
    ({"variants": [L4, L4]}, "spec", "variant names must be unique"),
    ({"variants": [{**L4, "replicas": {"min": 2, "max": 1}}]}, "spec.variants[0].replicas",
     "a variant's replicas.min must not be greater than its replicas.max"),
    ({"variants": [{**L4, "tensorParallelSize": 2}]}, "spec.variants[0]",
     "a variant's tensorParallelSize must not be greater than its gpusPerReplica"),
    ({"variants": [{**L4, "name": "L4"}]}, "spec.variants[0].name", "should match"),
])
def test_server_refuses_what_the_schema_and_its_cel_rules_refuse(apiserver, spec, field, message):
    status = _refusal(apiserver, spec)
    assert (status["code"], status["reason"]) == (422, "Invalid"), status
    causes = status["details"]["causes"]
    assert any(c["field"] == field and message in c["message"] for c in causes), causes
    assert message in status["message"]


@pytest.mark.parametrize("spec", [
    {"replicas": {"max": 4}, "placement": {"spot": {"enabled": True, "onDemandBase": 2}}},
    {"replicas": {"max": 4}, "placement": {"spot": {"enabled": False, "onDemandBase": 6}}},
    {"replicas": {"min": 3, "max": 3}, "schedules": [{**BIG_SCHEDULE[0], "minReplicas": 3}]},
    {"engine": {"env": [{"name": "T", "value": "", "valueFrom": FROM_SECRET}],  # an empty value is none
                "modelCache": {"emptyDir": {"sizeLimit": "40Gi"}}}},
    {"variants": [L4, {**L4, "name": "h100", "accelerator": "H100", "capacityType": "reserved"}],
     "budget": {"maxUsdPerHour": 12.5}},
])
def test_server_accepts_specs_within_the_rules(apiserver, spec):
    created = apiserver.server.create_object(isvc("good", **spec))
    assert created["metadata"]["uid"]


def test_an_edit_is_held_to_the_rules_too(apiserver):
    apiserver.server.create_object(isvc("chat", replicas={"min": 1, "max": 4}))
    with pytest.raises(ApiException) as refused:
        apiserver.server.patch_object(ISVC, "default", "chat", {"spec": {"replicas": {"min": 6}}})
    assert refused.value.status == 422
    assert "replicas.min must not be greater than replicas.max" in json.loads(refused.value.body)["message"]
    assert apiserver.server.get_object(ISVC, "default", "chat")["spec"]["replicas"]["min"] == 1


def test_unknown_fields_are_dropped_with_a_warning_or_refused_when_strict(apiserver):
    """Without fieldValidation the server prunes unknown spec fields and says so in a Warning
    header (what kopf and the official client get); kubectl asks for Strict and is refused."""
    server = apiserver.server
    body = isvc("unknown", replicas={"max": 4}, bogusTop="x")
    body["spec"]["model"]["bogus"] = 1
    created = server.create_object(body)
    assert "bogusTop" not in created["spec"] and created["spec"]["model"] == {"name": "tiny-model"}
    assert 'unknown field \\"spec.bogusTop\\"' in server.last_warning, server.last_warning
    with pytest.raises(ApiException) as strict:
        server.request("POST", path_of(ISVC, "default"), {**body, "metadata": {"name": "strict"}},
                       query={"fieldValidation": "Strict"})
    assert strict.value.status == 400
    assert 'unknown field "spec.bogusTop"' in json.loads(strict.value.body)["message"]
    if KUBECTL.exists():
        done = run_kubectl(apiserver, "apply", "-f", "-", stdin=json.dumps({**body, "metadata": {"name": "cli"}}))
        assert done.returncode != 0 and 'unknown field "spec.bogusTop"' in done.stderr, done.stderr
    assert server.get_object(ISVC, "default", "cli") is None


def test_server_defaults_mean_what_the_models_defaults_mean(apiserver):
    """A minimal spec and each example, as the server stores them (schema defaults applied, strict
    fields), parse to the same spec as their manifests: the CRD's defaults are the models'."""
    server = apiserver.server
    minimal = isvc("minimal")
    stored = server.create_object(minimal)["spec"]
    assert stored["scaling"]["behavior"]["scaleDown"]["stabilizationSeconds"] == 300
    assert stored["replicas"] == {"min": 1, "max": 4, "allowScaleToZero": False}
    assert parse_spec(stored) == parse_spec(minimal["spec"])
    examples = [doc for path in sorted((ROOT / "examples").glob("*.yaml"))
                for doc in yaml.safe_load_all(path.read_text()) if doc and doc.get("kind") == "InferenceService"]
    assert len(examples) >= 3
    for doc in examples:  # a dry run in `default` (their namespaces need not exist here)
        answer = server.request("POST", path_of(ISVC, "default"), {**doc, "metadata": {"name": doc["metadata"]["name"]}},
                                query={"dryRun": "All", "fieldValidation": "Strict"})
        assert parse_spec(answer["spec"]) == parse_spec(doc["spec"]), doc["metadata"]["name"]
