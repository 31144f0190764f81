"""Rendering the owned workload: what the operator applies is what `ebbtide render` prints."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from ebbtide.api.manifest import parse_spec
from ebbtide.api.ref import ServiceRef
from ebbtide.cluster.render import (
    ANNOTATION_SPEC,
    LABEL_SERVICE,
    LABEL_SERVING,
    render_deployment,
    render_workload,
)

ROOT = Path(__file__).resolve().parents[1]
REF = ServiceRef(name="chat", namespace="ml", uid="1234")


def spec(**overrides):
    return parse_spec({"model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "servedName": "llama"}, **overrides})


def test_workload_is_deployment_service_pdb_all_owned():
    objs = render_workload(REF, spec())
    assert [o["kind"] for o in objs] == ["Deployment", "Service", "PodDisruptionBudget"]
    for o in objs:
        (owner,) = o["metadata"]["ownerReferences"]
        assert owner == {"apiVersion": "ebbtide.dev/v1alpha1", "kind": "InferenceService", "name": "chat",
                         "uid": "1234", "controller": True, "blockOwnerDeletion": True}
        assert o["metadata"]["namespace"] == "ml"
        assert o["metadata"]["labels"][LABEL_SERVICE] == "chat"


def test_deployment_runs_vllm_serve_with_probes_and_gpus():
    d = render_deployment(REF, spec(engine={"args": ["--max-model-len", "8192"], "gpus": 2}))
    pod = d["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["vllm", "serve"]
    assert c["args"] == ["meta-llama/Llama-3.1-8B-Instruct", "--port", "8000", "--served-model-name", "llama",
                         "--tensor-parallel-size", "2", "--max-model-len", "8192"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    startup = c["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "a cold start needs minutes"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert d["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
    assert d["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "8000"


def test_sleep_mode_sets_flag_env_and_host_memory():
    d = render_deployment(REF, spec(sleep={"enabled": True, "hostMemory": "24Gi"}))
    (c,) = d["spec"]["template"]["spec"]["containers"]
    assert "--enable-sleep-mode" in c["args"]
    assert {"name": "VLLM_SERVER_DEV_MODE", "value": "1"} in c["env"]
    assert c["resources"]["requests"]["memory"] == "24Gi"
    plain = render_deployment(REF, spec())["spec"]["template"]["spec"]["containers"][0]
    assert "--enable-sleep-mode" not in plain["args"]
    assert "VLLM_SERVER_DEV_MODE" not in json.dumps(plain["env"])


def test_service_selects_only_serving_pods():
    svc = render_workload(REF, spec())[1]
    assert svc["spec"]["selector"] == {LABEL_SERVICE: "chat", LABEL_SERVING: "true"}
    d = render_workload(REF, spec())[0]
    assert d["spec"]["template"]["metadata"]["labels"][LABEL_SERVING] == "true"


def test_deployment_remembers_the_spec_it_was_rendered_from():
    s = spec(replicas={"min": 2, "max": 6})
    d = render_deployment(REF, s)
    assert parse_spec(json.loads(d["metadata"]["annotations"][ANNOTATION_SPEC])) == s
    assert d["spec"]["replicas"] == 2


def test_cli_render_prints_the_same_objects():
    out = subprocess.run([sys.executable, "-m", "ebbtide.cli", "render", str(ROOT / "examples/chat-llama-8b.yaml")],
                         capture_output=True, text=True, check=True).stdout
    printed = [d for d in yaml.safe_load_all(out) if d]
    from ebbtide.api.manifest import load_manifests
    ((ref, s),) = list(load_manifests(ROOT / "examples/chat-llama-8b.yaml"))
    assert printed == render_workload(ref, s)


def test_cli_render_reports_an_invalid_manifest(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: ebbtide.dev/v1alpha1\nkind: InferenceService\nmetadata: {name: x}\n"
                   "spec: {model: {name: m}, replicas: {min: 3, max: 1}}\n")
    result = subprocess.run([sys.executable, "-m", "ebbtide.cli", "render", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "replicas.min (3) must not be greater than replicas.max (1)" in result.stderr


def test_cli_help_crd_and_stdlib_operator_untouched(tmp_path):
    usage = subprocess.run(["ebbtide", "--help"], capture_output=True, text=True, check=True).stdout
    assert all(command in usage for command in ("run", "crd", "render", "engine-sim"))
    subprocess.run(["ebbtide", "crd", "--output-dir", str(tmp_path)], check=True, capture_output=True)
    assert (tmp_path / "inferenceservices.ebbtide.dev.yaml").read_text() == (
        ROOT / "crds/inferenceservices.ebbtide.dev.yaml").read_text()
    probe = subprocess.run([sys.executable, "-c", "import operator, ebbtide; print(operator.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert "site-packages" not in probe and probe.strip().endswith("/operator.py")
