"""Rendering the owned workload: what the operator applies is what `ebbtide render` prints."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from ebbtide.api.manifest import parse_spec
from ebbtide.api.ref import ServiceRef
from ebbtide.cluster.render import (
    ANNOTATION_SPEC,
    CONDITION_WARMED_UP,
    LABEL_CAPACITY,
    LABEL_SERVICE,
    LABEL_SERVING,
    ON_DEMAND,
    SPOT,
    capacity_of,
    render_deployment,
    render_workload,
)
from tests.testbed.fixtures import Cluster
from tests.testbed.nodes import FakeNode
from tests.testbed.scheduling import Scheduling, Verdict

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
    assert "VLLM_SERVER_DEV_MODE" not in json.dumps(plain.get("env", []))


def test_service_selects_only_serving_pods():
    svc = render_workload(REF, spec())[1]
    assert svc["spec"]["selector"] == {LABEL_SERVICE: "chat", LABEL_SERVING: "true"}
    d = render_workload(REF, spec())[0]
    assert d["spec"]["template"]["metadata"]["labels"][LABEL_SERVING] == "true"


def test_warm_up_gates_readiness_of_every_deployments_pods():
    """New replicas serve their warm-up requests before they are Ready (cluster/warmup.py)."""
    gate = [{"conditionType": CONDITION_WARMED_UP}]
    assert render_deployment(REF, spec())["spec"]["template"]["spec"]["readinessGates"] == gate  # default: 3
    for d in render_workload(REF, spec(placement={"spot": {"enabled": True}}, replicas={"min": 3, "max": 4})):
        if d["kind"] == "Deployment":
            assert d["spec"]["template"]["spec"]["readinessGates"] == gate, capacity_of(d)
    off = render_deployment(REF, spec(warmup={"requests": 0}))["spec"]["template"]["spec"]
    assert "readinessGates" not in off


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


# --- spot placement: two Deployments, each on its own kind of node, as the real scheduler says ---

K8S_VERSION = "1.30.0"  # as tests/test_chart.py
ZONE = "topology.kubernetes.io/zone"


def node(name: str, labels: dict[str, str], taints: tuple[dict, ...] = ()) -> FakeNode:
    return FakeNode(name, "spot" if "spot" in name else "on-demand",
                    {"kubernetes.io/hostname": name, ZONE: "zone-a", **labels}, list(taints))


# Per provider: (spot node, on-demand node, reclaim notice), labelled and tainted as the cloud
# does it (anchors.md, "Spot facts by cloud"), and a node without any capacity label. Names are
# unique: every cloud's nodes are in the one cluster at once.
GKE_TAINT = {"key": "cloud.google.com/gke-spot", "value": "true", "effect": "NoSchedule"}
AKS_TAINT = {"key": "kubernetes.azure.com/scalesetpriority", "value": "spot", "effect": "NoSchedule"}
CLOUDS = {
    "karpenter": (node("karpenter-spot", {"karpenter.sh/capacity-type": "spot"}),
                  node("karpenter-on-demand", {"karpenter.sh/capacity-type": "on-demand"}), 120),
    "eks": (node("eks-spot", {"eks.amazonaws.com/capacityType": "SPOT"}),
            node("eks-on-demand", {"eks.amazonaws.com/capacityType": "ON_DEMAND"}), 120),
    "gke": (node("gke-spot", {"cloud.google.com/gke-spot": "true"}, (GKE_TAINT,)), node("gke-on-demand", {}), 15),
    "aks": (node("aks-spot", {"kubernetes.azure.com/scalesetpriority": "spot"}, (AKS_TAINT,)),
            node("aks-on-demand", {"kubernetes.azure.com/scalesetpriority": "regular"}), 30),
}
GKE_PREEMPTIBLE = node("gke-spot-preemptible", {"cloud.google.com/gke-preemptible": "true"})
# The custom provider's nodes: spot is told by its selector's labels (pool and gpu), not the cloud's.
CUSTOM_SPOT = node("custom-spot", {"pool": "spot", "gpu": "l4"}, ({"key": "spot", "effect": "NoSchedule"},))
CUSTOM_ON_DEMAND = node("custom-on-demand", {"pool": "regular", "gpu": "l4"})
CUSTOM_OTHER_GPU = node("custom-spot-a100", {"pool": "spot", "gpu": "a100"})
ALL_NODES = [n for spot, on_demand, _ in CLOUDS.values() for n in (spot, on_demand)] + [
    GKE_PREEMPTIBLE, CUSTOM_SPOT, CUSTOM_ON_DEMAND, CUSTOM_OTHER_GPU]


@pytest.fixture(scope="module")
def scheduling(control_plane):
    """The real scheduler, with every cloud's nodes registered by our kubelet for this module."""
    cluster = Cluster(control_plane)
    try:
        with Scheduling(cluster.api_client(), ALL_NODES) as answers:
            yield answers
    finally:
        cluster.close()


def fits(scheduling: Scheduling, deployment: dict, on: FakeNode) -> Verdict:
    """Does the scheduler put this Deployment's pods on that node (labels, affinity, taints, resources)?"""
    return scheduling.fits(deployment["spec"]["template"], on.name)


def render_cli(path: Path) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "ebbtide.cli", "render", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def example_with(tmp_path: Path, **spot) -> Path:
    """examples/spot-sleep.yaml with placement.spot fields changed (and min 4, so spot runs)."""
    manifest = yaml.safe_load((ROOT / "examples/spot-sleep.yaml").read_text())
    manifest["spec"]["replicas"]["min"] = 4
    manifest["spec"]["placement"]["spot"].update(spot)
    path = tmp_path / "spot.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def deployments(objs: list[dict]) -> dict[str, dict]:
    return {capacity_of(o): o for o in objs if o["kind"] == "Deployment"}


@pytest.mark.parametrize("provider", sorted(CLOUDS))
def test_cli_renders_spot_and_on_demand_deployments_each_on_its_own_nodes(tmp_path, provider, scheduling):
    objs = render_cli(example_with(tmp_path, provider=provider))
    assert [o["kind"] for o in objs] == ["Deployment", "Deployment", "Service", "PodDisruptionBudget"]
    by_capacity = deployments(objs)
    on_demand, spot = by_capacity[ON_DEMAND], by_capacity[SPOT]
    assert (on_demand["metadata"]["name"], spot["metadata"]["name"]) == ("code", "code-spot")
    # min 4, base 1, one spare: 1 on demand, 3 + 1 on spot.
    assert (on_demand["spec"]["replicas"], spot["spec"]["replicas"]) == (1, 4)

    spot_node, on_demand_node, notice = CLOUDS[provider]
    assert fits(scheduling, spot, spot_node) and not fits(scheduling, spot, on_demand_node)
    assert fits(scheduling, on_demand, on_demand_node) and not fits(scheduling, on_demand, spot_node), \
        "on-demand never lands on spot"
    if provider == "gke":
        assert not fits(scheduling, on_demand, GKE_PREEMPTIBLE), "nor on the older preemptible VMs"
    if provider in ("gke", "aks"):
        # The spot taint alone keeps on-demand pods off: without their node selection they still
        # do not fit. (The scheduler's message counts tainted nodes; it no longer names the taint.)
        template = copy.deepcopy(on_demand["spec"]["template"])
        template["spec"].pop("nodeSelector", None)
        template["spec"].pop("affinity", None)
        refused = scheduling.fits(template, spot_node.name)
        assert not refused and "untolerated taint" in refused.message, refused.message

    spot_pod = spot["spec"]["template"]["spec"]
    assert spot_pod["terminationGracePeriodSeconds"] == min(120, notice)
    assert on_demand["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 120
    (spread,) = spot_pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == ZONE and spread["whenUnsatisfiable"] == "ScheduleAnyway"
    assert spread["labelSelector"]["matchLabels"] == spot["spec"]["selector"]["matchLabels"]
    for obj in objs:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_the_two_deployments_never_adopt_each_others_pods_and_the_service_selects_both():
    s = spec(replicas={"min": 3, "max": 6}, placement={"spot": {"enabled": True, "provider": "gke"}})
    objs = render_workload(REF, s)
    by_capacity = deployments(objs)
    pod_labels = {c: d["spec"]["template"]["metadata"]["labels"] for c, d in by_capacity.items()}
    for capacity, d in by_capacity.items():
        selector = d["spec"]["selector"]["matchLabels"]
        assert selector[LABEL_CAPACITY] == capacity
        assert selector.items() <= pod_labels[capacity].items()
        other = ON_DEMAND if capacity == SPOT else SPOT
        assert not selector.items() <= pod_labels[other].items()
        assert d["metadata"]["labels"][LABEL_CAPACITY] == capacity
    service, pdb = objs[2], objs[3]
    for labels in pod_labels.values():
        assert service["spec"]["selector"].items() <= labels.items()
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_spot_disabled_renders_one_deployment_with_no_capacity_constraints():
    s = spec(placement={"nodeSelector": {"gpu": "h100"}, "spot": {"enabled": False, "provider": "gke"}})
    objs = render_workload(REF, s)
    assert [o["kind"] for o in objs] == ["Deployment", "Service", "PodDisruptionBudget"]
    pod = objs[0]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert "affinity" not in pod and "tolerations" not in pod and "topologySpreadConstraints" not in pod
    assert capacity_of(objs[0]) == ON_DEMAND


def test_service_wide_placement_applies_to_both_and_spot_placement_only_to_spot():
    everywhere = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    spot_only = {"key": "team", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
    s = spec(placement={"nodeSelector": {"gpu": "h100"}, "tolerations": [everywhere],
                        "spot": {"enabled": True, "provider": "aks", "nodeSelector": {"pool": "cheap"},
                                 "tolerations": [spot_only]}})
    by_capacity = deployments(render_workload(REF, s))
    spot_pod = by_capacity[SPOT]["spec"]["template"]["spec"]
    on_demand_pod = by_capacity[ON_DEMAND]["spec"]["template"]["spec"]
    assert spot_pod["nodeSelector"] == {"gpu": "h100", "kubernetes.azure.com/scalesetpriority": "spot",
                                        "pool": "cheap"}
    assert spot_pod["tolerations"] == [everywhere, {"key": "kubernetes.azure.com/scalesetpriority",
                                                    "operator": "Equal", "value": "spot",
                                                    "effect": "NoSchedule"}, spot_only]
    assert on_demand_pod["nodeSelector"] == {"gpu": "h100"}
    assert on_demand_pod["tolerations"] == [everywhere]


def test_a_capacity_label_in_the_service_wide_selector_does_not_strand_the_spot_pods():
    s = spec(placement={"nodeSelector": {"karpenter.sh/capacity-type": "on-demand"},
                        "spot": {"enabled": True, "provider": "karpenter"}})
    spot_pod = deployments(render_workload(REF, s))[SPOT]["spec"]["template"]["spec"]
    assert spot_pod["nodeSelector"] == {"karpenter.sh/capacity-type": "spot"}


def test_custom_provider_tells_spot_nodes_by_the_spot_selector(scheduling):
    s = spec(replicas={"min": 3, "max": 6}, engine={"terminationGracePeriodSeconds": 90},
             placement={"spot": {"enabled": True, "provider": "custom",
                                 "nodeSelector": {"pool": "spot", "gpu": "l4"},
                                 "tolerations": [{"key": "spot", "operator": "Exists"}]}})
    by_capacity = deployments(render_workload(REF, s))
    spot, on_demand = by_capacity[SPOT], by_capacity[ON_DEMAND]
    assert fits(scheduling, spot, CUSTOM_SPOT) and not fits(scheduling, spot, CUSTOM_ON_DEMAND)
    assert fits(scheduling, on_demand, CUSTOM_ON_DEMAND) and not fits(scheduling, on_demand, CUSTOM_SPOT)
    assert fits(scheduling, on_demand, CUSTOM_OTHER_GPU), "only nodes with all the spot labels are spot"
    assert by_capacity[SPOT]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 90
    for obj in render_workload(REF, s):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_spot_grace_period_is_the_specs_when_shorter_than_the_notice():
    s = spec(engine={"terminationGracePeriodSeconds": 10}, placement={"spot": {"enabled": True, "provider": "aks"}})
    spot_pod = deployments(render_workload(REF, s))[SPOT]["spec"]["template"]["spec"]
    assert spot_pod["terminationGracePeriodSeconds"] == 10


def test_first_replica_counts_follow_the_split_of_min():
    s = spec(replicas={"min": 5, "max": 8},
             placement={"spot": {"enabled": True, "onDemandBase": 2, "maxSpotFraction": 0.5}})
    by_capacity = deployments(render_workload(REF, s))
    assert (by_capacity[ON_DEMAND]["spec"]["replicas"], by_capacity[SPOT]["spec"]["replicas"]) == (3, 2)
    # The shell scales each Deployment itself; render_deployment keeps taking a count.
    assert render_deployment(REF, s, SPOT, replicas=7)["spec"]["replicas"] == 7
