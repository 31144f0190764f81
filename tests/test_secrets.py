"""Secrets stay secret: env from Secrets and ConfigMaps is referenced, not copied; literal env values
are in the pod template and in no annotation, status, Event or log; the operator never reads a Secret."""

import json
import re
import uuid
from pathlib import Path

import kopf
import kubernetes_validate
import pytest
from kubernetes.client.rest import ApiException

from ebbtide.api.manifest import InvalidSpec, parse_spec
from ebbtide.api.ref import ServiceRef
from ebbtide.cluster.diffbase import RedactedDiffBaseStorage
from ebbtide.cluster.render import (
    ANNOTATION_SPEC,
    ANNOTATION_SPEC_HASH,
    SPOT,
    applied_spec,
    render_deployment,
)
from tests.testbed.helm import (
    HELM,
    MISSING_HELM,
    AsServiceAccount,
    installed_release,
    service_account_kubeconfig,
)
from tests.testbed.kubeapi import KubeApi
from tests.testbed.operator import DEPLOYMENTS, ISVC, condition, isvc, running_operator, status
from tests.testbed.waiting import wait_for

ROOT = Path(__file__).resolve().parents[1]
REF = ServiceRef(name="chat", namespace="ml", uid="1234")
K8S_VERSION = "1.30.0"  # as tests/test_chart.py
LITERAL = "hello-literal-value"
FROM_SECRET = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
ENV = [{"name": "GREETING", "value": LITERAL}, FROM_SECRET,
       {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode", "optional": True}}}]
ENV_FROM = [{"prefix": "HF_", "secretRef": {"name": "hf"}}, {"configMapRef": {"name": "cfg", "optional": True}}]


def spec(**engine):
    return parse_spec({"model": {"name": "meta-llama/Llama-3.1-8B-Instruct"}, "engine": engine})


def engine_container(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def test_env_and_env_from_reach_the_container_as_written():
    d = render_deployment(REF, spec(env=ENV, envFrom=ENV_FROM))
    assert engine_container(d)["env"] == ENV
    assert engine_container(d)["envFrom"] == ENV_FROM
    kubernetes_validate.validate(d, K8S_VERSION, strict=True)


@pytest.mark.parametrize("engine, words", [
    ({"env": [{**FROM_SECRET, "value": "x"}]}, "spec.engine.env[0]: value and valueFrom are mutually exclusive"),
    ({"env": [{"name": "A", "valueFrom": {}}]},
     "spec.engine.env[0].valueFrom: exactly one of secretKeyRef and configMapKeyRef must be set"),
    ({"env": [{"name": "A", "valueFrom": {**FROM_SECRET["valueFrom"], "configMapKeyRef": {"name": "c", "key": "k"}}}]},
     "spec.engine.env[0].valueFrom: exactly one of secretKeyRef and configMapKeyRef must be set"),
    ({"envFrom": [{"secretRef": {"name": "s"}, "configMapRef": {"name": "c"}}]},
     "spec.engine.envFrom[0]: exactly one of secretRef and configMapRef must be set"),
    ({"modelCache": {"mountPath": "/cache"}},
     "spec.engine.modelCache: exactly one of persistentVolumeClaim and emptyDir must be set"),
    ({"modelCache": {"emptyDir": {}}}, "spec.engine.modelCache.emptyDir.sizeLimit: Field required"),
])
def test_invalid_env_and_cache_say_what_is_wrong(engine, words):
    with pytest.raises(InvalidSpec) as e:
        spec(**engine)
    assert words in str(e.value)


def test_an_empty_value_is_no_value_as_in_kubernetes():
    assert spec(env=[{**FROM_SECRET, "value": ""}]).engine.env[0].value is None
    assert engine_container(render_deployment(REF, spec(env=[{"name": "EMPTY", "value": ""}])))["env"] == [
        {"name": "EMPTY"}]  # the API server drops an empty value: rendering one would be drift forever


def test_annotations_keep_a_fingerprint_of_a_literal_value_not_the_value():
    d = render_deployment(REF, spec(env=ENV))
    del engine_container(d)["env"]
    assert LITERAL not in json.dumps(d)
    kept = json.loads(d["metadata"]["annotations"][ANNOTATION_SPEC])["engine"]["env"]
    assert kept[0]["value"].startswith("sha256:") and kept[1:] == ENV[1:]  # references are not values
    edited = render_deployment(REF, spec(env=[{"name": "GREETING", "value": "changed"}, *ENV[1:]]))
    for key in (ANNOTATION_SPEC, ANNOTATION_SPEC_HASH):  # an edited value is still an edit
        assert edited["metadata"]["annotations"][key] != render_deployment(REF, spec(env=ENV))["metadata"][
            "annotations"][key]


@pytest.mark.parametrize("raw", [
    {"env": ENV, "envFrom": ENV_FROM},
    {"env": [{"name": "SAME", "value": "a"}, {"name": "SAME", "value": "b"}]},  # Kubernetes allows it
    {},
])
def test_the_applied_spec_is_read_back_with_the_values_of_the_pod_template(raw):
    s = spec(**raw)
    assert applied_spec(render_deployment(REF, s)) == s
    asleep = parse_spec({**s.to_wire(), "sleep": {"enabled": True}})  # Ebbtide adds a variable of its own
    assert applied_spec(render_deployment(REF, asleep)) == asleep
    spot = parse_spec({**s.to_wire(), "placement": {"spot": {"enabled": True}}})
    assert applied_spec(render_deployment(REF, spot, SPOT)) == spot


@pytest.mark.parametrize("edit", [
    lambda env: env[0].update(value="edited-by-hand"),
    lambda env: env.pop(0),
    lambda env: env.clear(),
])
def test_a_value_changed_by_hand_leaves_the_applied_spec_unknown_rather_than_guessed(edit):
    d = render_deployment(REF, spec(env=ENV))
    edit(engine_container(d)["env"])
    with pytest.raises(ValueError) as e:
        applied_spec(d)
    assert "GREETING" in str(e.value) and "edited-by-hand" not in str(e.value)


@pytest.mark.parametrize("cache, volume", [
    ({"persistentVolumeClaim": {"claimName": "weights"}}, {"persistentVolumeClaim": {"claimName": "weights"}}),
    ({"emptyDir": {"sizeLimit": "40Gi"}, "mountPath": "/models"}, {"emptyDir": {"sizeLimit": "40Gi"}}),
    ({"emptyDir": {"sizeLimit": 50_000_000_000}}, {"emptyDir": {"sizeLimit": "50000000000"}}),
])
def test_a_model_cache_is_a_volume_mounted_in_the_engine(cache, volume):
    d = render_deployment(REF, spec(modelCache=cache))
    assert {"name": "model-cache", **volume} in d["spec"]["template"]["spec"]["volumes"]
    mount = {"name": "model-cache", "mountPath": cache.get("mountPath", "/root/.cache/huggingface")}
    assert mount in engine_container(d)["volumeMounts"]
    kubernetes_validate.validate(d, K8S_VERSION, strict=True)


def test_kopfs_diff_base_tells_an_edited_value_without_keeping_it():
    storage = RedactedDiffBaseStorage(prefix="ebbtide.dev", key="last-handled-configuration")

    def body(value: str, annotations: dict | None = None) -> kopf.Body:
        return kopf.Body({"apiVersion": "ebbtide.dev/v1alpha1", "kind": "InferenceService",
                          "metadata": {"name": "chat", "namespace": "ml", "annotations": annotations or {}},
                          "spec": {"model": {"name": "m"}, "engine": {"env": [{"name": "GREETING", "value": value},
                                                                                FROM_SECRET]}}})

    essence = storage.build(body=body(LITERAL))
    patch = kopf.Patch()
    storage.store(body=body(LITERAL), patch=patch, essence=essence)
    kept = dict(patch["metadata"]["annotations"])
    assert LITERAL not in json.dumps(kept)
    assert storage.fetch(body=body(LITERAL, kept)) == storage.build(body=body(LITERAL, kept)), "no edit"
    assert storage.fetch(body=body("changed", kept)) != storage.build(body=body("changed", kept)), "an edit"


def test_kopfs_diff_base_is_the_same_built_without_status_and_system_metadata():
    storage = RedactedDiffBaseStorage(prefix="ebbtide.dev", key="last-handled-configuration")
    lean = {"apiVersion": "ebbtide.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": "chat", "namespace": "ml", "labels": {"team": "a"}, "annotations": {"note": "x"}},
            "spec": {"model": {"name": "m"}, "engine": {"env": [{"name": "GREETING", "value": LITERAL}]}}}
    full = {**lean, "metadata": {**lean["metadata"], "uid": "u", "resourceVersion": "7", "generation": 2,
                                 "managedFields": [{"manager": "ebbtide", "fieldsV1": {"f:status": {}}}]},
            "status": {"phase": "Ready", "scaler": {"since": 1.0}}}
    assert storage.build(body=kopf.Body(full)) == storage.build(body=kopf.Body(lean)) == {
        "spec": storage.build(body=kopf.Body(lean))["spec"], "metadata": {"labels": {"team": "a"},
                                                                         "annotations": {"note": "x"}}}


def test_the_charts_cluster_role_grants_nothing_on_secrets():
    """The operator needs no Secret: the kubelet resolves secretKeyRef and secretRef."""
    rbac = (ROOT / "charts/ebbtide/templates/rbac.yaml").read_text()
    resources = {r.strip() for line in re.findall(r"resources:\s*\[(.*)\]", rbac) for r in line.split(",")}
    assert resources and not {"secrets", "*"} & resources, resources


# --- on the real API server ------------------------------------------------------------------------

@pytest.fixture()
def as_operator(apiserver, tmp_path):
    """The chart's ServiceAccount, which the operator runs as: it may not read Secrets."""
    with installed_release(apiserver, name="secrets", namespace="ebbtide-secrets") as release:
        identity = AsServiceAccount(apiserver.plane, service_account_kubeconfig(apiserver, release, tmp_path / "kc"))
        yield identity
        identity.close()


def everywhere_a_value_must_not_be(server, log: str) -> dict[str, str]:
    """Annotations of what the service owns (ReplicaSets copy the Deployment's) and its own, its
    status, every Event in the namespace, the operator's log."""
    places = {"status": json.dumps(server.get_object(ISVC, "default", "chat").get("status")),
              "events": json.dumps(server.list_objects("v1/events", "default")), "operator log": log}
    for resource in (ISVC, DEPLOYMENTS, "apps/v1/replicasets", "v1/services", "policy/v1/poddisruptionbudgets"):
        for obj in server.list_objects(resource, "default"):
            places[f"{resource} {obj['metadata']['name']}"] = json.dumps(obj["metadata"].get("annotations"))
    return places


def deployed_env(server) -> list[dict] | None:
    deployment = server.get_object(DEPLOYMENTS, "default", "chat")
    return deployment and engine_container(deployment).get("env")


@pytest.mark.skipif(not HELM.is_file(), reason=MISSING_HELM)
def test_a_planted_secret_and_a_literal_value_stay_in_their_places(apiserver, as_operator, caplog):
    server = apiserver.server
    secret, first, literal = (f"{what}-{uuid.uuid4().hex}" for what in ("secret", "first", "literal"))
    server.create_object({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf", "namespace": "default"},
                          "stringData": {"token": secret}})
    env = lambda value: [FROM_SECRET, {"name": "GREETING", "value": value}]  # noqa: E731
    try:
        for verb in (lambda api: api.get_object("v1/secrets", "default", "hf"),
                     lambda api: api.list_objects("v1/secrets", "default")):
            with pytest.raises(ApiException) as refused:
                verb(KubeApi(as_operator.api_client()))
            assert refused.value.status == 403
        with running_operator(as_operator) as operator:
            server.create_object(isvc("chat", engine={"env": env(first)}))
            wait_for(lambda: deployed_env(server) == env(first), what="the env in the Deployment")
            # An edit of a literal value alone is an edit (kopf's diff base keeps fingerprints).
            server.patch_object(ISVC, "default", "chat", {"spec": {"engine": {"env": env(literal)}}})
            wait_for(lambda: deployed_env(server) == env(literal), what="the edited value in the Deployment")
            wait_for(lambda: status(server).get("lastDecision"), what="a scaling decision in status")
        log = operator.output

        # Restarted, facing an invalid edit, the operator knows the last valid spec again: drift
        # correction puts back the env it read back from the pod template (not fingerprints).
        server.patch_object(ISVC, "default", "chat", {"spec": {"schedules": [
            {"name": "peak", "cron": "at eight", "durationMinutes": 60}]}})
        with running_operator(as_operator) as operator:
            wait_for(lambda: "keeping the last valid spec" in (condition(server, "SpecValid") or {}).get("message", ""),
                     what="the last valid spec kept")
            server.patch_object(DEPLOYMENTS, "default", "chat", {"spec": {"template": {"spec": {"containers": [
                {"name": "vllm", "image": "someone/else:latest"}]}}}})
            wait_for(lambda: deployed_env(server) == env(literal), what="the env put back by drift correction")
        log += operator.output + caplog.text
        assert "forbidden" not in log.lower(), "the operator was refused something"

        values = {"secret": secret, "first literal": first, "literal": literal}
        leaks = [f"{kind} value in {where}" for where, text in everywhere_a_value_must_not_be(server, log).items()
                 for kind, value in values.items() if value in text]
        assert not leaks, leaks
        deployment = server.get_object(DEPLOYMENTS, "default", "chat")
        del engine_container(deployment)["env"]
        assert literal not in json.dumps(deployment), "the literal value is in the Deployment beyond its env"
    finally:
        server.delete_object("v1/secrets", "default", "hf")
