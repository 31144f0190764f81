"""Rendering accelerator variants: one Deployment per variant, each on its own kind of node.

Where the pods really land is the real scheduler's word, in tests/test_operator_variants.py;
here, what is rendered."""

import kubernetes_validate

from ebbtide.api.manifest import parse_spec
from ebbtide.api.ref import ServiceRef
from ebbtide.cluster.render import LABEL_CAPACITY, LABEL_SERVICE, render_deployment, render_workload
from ebbtide.cluster.variants import LABEL_VARIANT, merged_args, variant_of

REF = ServiceRef(name="chat", namespace="ml", uid="1234")
GPU = "nvidia.com/gpu.product"
K8S_VERSION = "1.30.0"  # as tests/test_render.py


def variant(name, accelerator, capacity="on-demand", price=1.0, provider="karpenter", **fields):
    return {"name": name, "accelerator": accelerator, "capacityType": capacity, "pricePerGpuHour": price,
            "placement": {"provider": provider, "nodeSelector": {GPU: accelerator}}, **fields}


def spec(*variants, **overrides):
    return parse_spec({"model": {"name": "m"}, "engine": {"args": ["--max-model-len", "8192", "--enforce-eager"]},
                       "variants": list(variants), **overrides})


def deployments(s):
    return {d["metadata"]["name"]: d for d in render_workload(REF, s) if d["kind"] == "Deployment"}


def pod(d):
    return d["spec"]["template"]["spec"]


THREE = (variant("h100", "H100", "reserved", 2.2, replicas={"min": 0, "max": 2}),
         variant("a100", "A100", "on-demand", 3.4, gpusPerReplica=2, tensorParallelSize=2,
                 engineArgs=["--max-model-len=16384"]),
         variant("l4", "L4", "spot", 0.8, replicas={"min": 1, "max": 8}))


def test_one_deployment_per_variant_each_selecting_only_its_own_pods():
    objs = render_workload(REF, spec(*THREE))
    assert [o["kind"] for o in objs] == ["Deployment"] * 3 + ["Service", "PodDisruptionBudget"]
    by_name = deployments(spec(*THREE))
    assert sorted(by_name) == ["chat-a100", "chat-h100", "chat-l4"]
    service, pdb = objs[3], objs[4]
    for name, d in by_name.items():
        selector = d["spec"]["selector"]["matchLabels"]
        # The variant label alone tells the pods apart: a capacity type can be edited, a selector cannot.
        assert selector == {LABEL_SERVICE: "chat", LABEL_VARIANT: name.removeprefix("chat-")}
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items() and variant_of(d) == variant_of(d["spec"]["template"])
        for other, o in by_name.items():
            if other != name:
                assert not selector.items() <= o["spec"]["template"]["metadata"]["labels"].items()
        assert service["spec"]["selector"].items() <= labels.items()
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    capacity = {n: d["spec"]["template"]["metadata"]["labels"][LABEL_CAPACITY] for n, d in by_name.items()}
    assert capacity == {"chat-h100": "reserved", "chat-a100": "on-demand", "chat-l4": "spot"}


def test_each_variant_runs_its_gpus_tensor_parallel_size_and_arguments():
    by_name = deployments(spec(*THREE))
    (a100,) = pod(by_name["chat-a100"])["containers"]
    assert a100["resources"]["limits"]["nvidia.com/gpu"] == "2"
    # The variant's flag replaces the service's (value and all); the others stay.
    assert a100["args"][-4:] == ["--tensor-parallel-size", "2", "--enforce-eager", "--max-model-len=16384"]
    (h100,) = pod(by_name["chat-h100"])["containers"]
    assert h100["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "--tensor-parallel-size" not in h100["args"] and h100["args"][-3:] == ["--max-model-len", "8192",
                                                                                   "--enforce-eager"]


def test_arguments_merge_by_flag():
    assert merged_args(["--a", "1", "--b", "--c=3"], ["--a", "2", "--c=4"]) == ["--b", "--a", "2", "--c=4"]
    assert merged_args(["--a", "1"], []) == ["--a", "1"]


def test_placement_is_the_capacity_presets_then_the_variants_own():
    everywhere = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    s = spec(*THREE, placement={"nodeSelector": {"team": "ml"}, "tolerations": [everywhere]})
    by_name = deployments(s)
    h100, a100, l4 = (pod(by_name[f"chat-{n}"]) for n in ("h100", "a100", "l4"))
    # Karpenter labels the nodes of capacity reservations "reserved"; the default preset is Karpenter's.
    assert h100["nodeSelector"] == {"team": "ml", "karpenter.sh/capacity-type": "reserved", GPU: "H100"}
    assert a100["nodeSelector"] == {"team": "ml", "karpenter.sh/capacity-type": "on-demand", GPU: "A100"}
    assert l4["nodeSelector"] == {"team": "ml", "karpenter.sh/capacity-type": "spot", GPU: "L4"}
    assert all(p["tolerations"] == [everywhere] for p in (h100, a100, l4))
    # Spot keeps what spot placement does: spread over zones, grace fitted in the reclaim notice.
    (spread,) = l4["topologySpreadConstraints"]
    assert spread["labelSelector"]["matchLabels"] == by_name["chat-l4"]["spec"]["selector"]["matchLabels"]
    assert "topologySpreadConstraints" not in a100
    # The custom provider (the default) adds no capacity-type label: only the variant's own selector.
    custom = deployments(spec(variant("a", "A100", provider="custom"), variant("b", "L4", "spot", provider="custom")))
    assert [pod(d)["nodeSelector"] for d in custom.values()] == [{GPU: "A100"}, {GPU: "L4"}]


def test_gke_variants_tolerate_spot_taints_or_keep_off_spot_nodes_and_the_users_affinity_is_kept():
    users = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": GPU, "operator": "In", "values": ["L4", "L40S"]}]}]}}}
    s = spec(variant("od", "L4", placement={"provider": "gke", "affinity": users}),
             variant("spot", "L4", "spot", 0.3, placement={"provider": "gke"}), engine={"terminationGracePeriodSeconds": 60})
    by_name = deployments(s)
    on_demand, spot = pod(by_name["chat-od"]), pod(by_name["chat-spot"])
    (term,) = on_demand["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    keys = [e["key"] for e in term["matchExpressions"]]
    assert keys == [GPU, "cloud.google.com/gke-spot", "cloud.google.com/gke-preemptible"], "ANDed with the user's"
    assert spot["nodeSelector"] == {"cloud.google.com/gke-spot": "true"}
    assert spot["tolerations"][0]["key"] == "cloud.google.com/gke-spot"
    assert spot["terminationGracePeriodSeconds"] == 15 and on_demand["terminationGracePeriodSeconds"] == 60


def test_new_deployments_start_at_each_variants_floor():
    counts = {n: d["spec"]["replicas"] for n, d in deployments(spec(*THREE, replicas={"min": 4, "max": 9})).items()}
    # What replicas.min asks beyond the floors, the tick places (the cheapest suitable, within the budget).
    assert counts == {"chat-h100": 0, "chat-a100": 0, "chat-l4": 1}


def test_a_single_variant_renders_as_a_service_without_variants_on_that_variants_nodes():
    (only,) = deployments(spec(THREE[1])).values()
    plain = render_deployment(REF, parse_spec({"model": {"name": "m"}, "engine": {"gpus": 2}}))
    assert only["metadata"]["name"] == plain["metadata"]["name"] == "chat"
    assert only["spec"]["selector"] == plain["spec"]["selector"]
    assert pod(only)["nodeSelector"] == {"karpenter.sh/capacity-type": "on-demand", GPU: "A100"}
    assert pod(only)["containers"][0]["resources"] == pod(plain)["containers"][0]["resources"]
