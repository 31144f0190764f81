"""The generated CRD: committed copy is current, structural, documented, validating."""

import copy
from pathlib import Path

import celpy
import jsonschema
import pytest
import yaml

from ebbtide.api.crd import CRD_FILENAME, crd, crd_yaml

ROOT = Path(__file__).resolve().parents[1]


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


def as_json_schema(node):
    """OpenAPI 3.0 (draft 4 with `nullable` and Kubernetes extensions) to plain draft 4."""
    if isinstance(node, list):
        return [as_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: as_json_schema(v) for k, v in node.items()
           if k not in ("nullable", "x-kubernetes-validations", "x-kubernetes-int-or-string")}
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("nullable"):
        out["type"] = [out["type"], "null"]
    return out


def validate(value, node):
    jsonschema.Draft4Validator(as_json_schema(node)).validate(value)


def cel_rules(node: dict) -> list[dict]:
    return node.get("x-kubernetes-validations", [])


def evaluate(rule: str, value: dict) -> bool:
    env = celpy.Environment()
    return bool(env.program(env.compile(rule)).evaluate({"self": celpy.json_to_cel(value)}))


def test_cel_rule_rejects_min_above_max():
    replicas = schema()["properties"]["spec"]["properties"]["replicas"]
    (rule,) = cel_rules(replicas)
    assert evaluate(rule["rule"], {"min": 1, "max": 3})
    assert evaluate(rule["rule"], {"min": 3, "max": 3})
    assert not evaluate(rule["rule"], {"min": 5, "max": 2})
    assert "min must not be greater" in rule["message"]


def defaulted(node: dict, value):
    """Apply the schema's defaults as the API server does (objects first, then their fields)."""
    if node.get("type") == "object" and isinstance(value, dict):
        for key, child in node.get("properties", {}).items():
            if key not in value and "default" in child:
                value[key] = copy.deepcopy(child["default"])
            if key in value:
                value[key] = defaulted(child, value[key])
    return value


@pytest.mark.parametrize("spec, ok", [
    ({"model": {"name": "m"}, "replicas": {"max": 4}, "placement": {"spot": {"enabled": True, "onDemandBase": 2}}}, True),
    ({"model": {"name": "m"}, "replicas": {"max": 4}, "placement": {"spot": {"enabled": True, "onDemandBase": 6}}}, False),
    ({"model": {"name": "m"}, "replicas": {"max": 4}, "placement": {"spot": {"enabled": False, "onDemandBase": 6}}}, True),
    ({"model": {"name": "m"}, "schedules": [{"name": "a", "cron": "0 8 * * *", "durationMinutes": 5, "minReplicas": 9}]}, False),
])
def test_spec_level_cel_rules_on_defaulted_objects(spec, ok):
    node = schema()["properties"]["spec"]
    value = defaulted(node, copy.deepcopy(spec))
    assert all(evaluate(r["rule"], value) for r in cel_rules(node)) is ok


def test_defaults_in_schema_validate_against_it():
    node = schema()["properties"]["spec"]
    value = defaulted(node, {"model": {"name": "m"}})
    validate(value, node)
    assert value["scaling"]["behavior"]["scaleDown"]["stabilizationSeconds"] == 300


def test_examples_validate_against_the_crd_schema():
    examples = sorted((ROOT / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "InferenceService":
                validate(doc, schema())
                spec = defaulted(schema()["properties"]["spec"], copy.deepcopy(doc["spec"]))
                assert all(evaluate(r["rule"], spec) for r in cel_rules(schema()["properties"]["spec"])), path


def test_schema_rejects_out_of_bounds_and_unknown_enums():
    node = schema()["properties"]["spec"]
    with pytest.raises(jsonschema.ValidationError):
        validate({"model": {"name": "m"}, "mode": "Aggressive"}, node)
    with pytest.raises(jsonschema.ValidationError):
        validate({"model": {"name": "m"}, "scaling": {"targets": {"kvCacheUsage": 1.2}}}, node)
