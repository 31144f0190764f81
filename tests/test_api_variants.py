"""spec.variants and spec.budget (issue 19): what the models accept and refuse, in manifest terms."""

from pathlib import Path

import pytest
import yaml

from ebbtide.api.manifest import InvalidSpec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"model": {"name": "meta-llama/Llama-3.1-8B-Instruct"}}


def variant(name: str, **fields) -> dict:
    return {"name": name, "accelerator": "L4", "pricePerGpuHour": 0.8, **fields}


def test_a_spec_without_variants_is_what_it_was():
    spec = parse_spec(MINIMAL)
    assert spec.variants == [] and spec.budget is None and not spec.has_variants
    assert "variants" not in spec.to_wire() or spec.to_wire()["variants"] == []
    assert not parse_spec({**MINIMAL, "variants": [variant("l4")]}).has_variants


def test_the_example_parses_with_its_four_variants_and_budget():
    (doc,) = [d for d in yaml.safe_load_all((ROOT / "examples/variants.yaml").read_text()) if d]
    spec = parse_spec(doc["spec"])
    assert [(v.name, v.accelerator, v.capacity_type) for v in spec.variants] == [
        ("h100", "H100", "reserved"), ("a100", "A100-80G", "on-demand"),
        ("l40s", "L40S", "spot"), ("l4", "L4", "on-demand")]
    assert spec.has_variants and spec.budget.max_usd_per_hour == 20
    l4 = spec.variants[3]
    assert l4.placement.affinity["nodeAffinity"]  # free-form, kept as written
    assert l4.usd_per_replica_hour == pytest.approx(0.8)
    assert parse_spec(spec.to_wire()) == spec


def test_a_variant_holds_several_gpus_at_their_price():
    v = parse_spec({**MINIMAL, "variants": [variant("a", gpusPerReplica=2, tensorParallelSize=2,
                                                     pricePerGpuHour=3.0)]}).variants[0]
    assert v.usd_per_replica_hour == pytest.approx(6.0)


@pytest.mark.parametrize("raw, words", [
    ({"variants": [variant("l4"), variant("l4")]}, "variant names must be unique"),
    ({"variants": [variant("L4_big")]}, "spec.variants[0].name: String should match pattern"),
    ({"variants": [variant("l4", replicas={"min": 3, "max": 1})]},
     "a variant's replicas.min (3) must not be greater than its replicas.max (1)"),
    ({"variants": [variant("l4", tensorParallelSize=2)]},
     "tensorParallelSize (2) must not be greater than gpusPerReplica (1)"),
    ({"variants": [variant("l4", capacityType="preemptible")]}, "spec.variants[0].capacityType"),
    ({"variants": [variant("l4", pricePerGpuHour=-1)]}, "spec.variants[0].pricePerGpuHour"),
    ({"variants": [{"name": "l4", "accelerator": "L4"}]}, "spec.variants[0].pricePerGpuHour: Field required"),
    ({"variants": [variant("l4", engineArgs=["--port=1"])]}, "a variant's engineArgs must not set --port"),
    ({"budget": {"maxUsdPerHour": 0}}, "spec.budget.maxUsdPerHour"),
    ({"budget": {"maxUsdPerMonth": 100}}, "spec.budget.maxUsdPerHour: Field required"),
])
def test_invalid_variants_and_budgets_say_what_is_wrong(raw, words):
    with pytest.raises(InvalidSpec) as e:
        parse_spec({**MINIMAL, **raw})
    assert words in str(e.value)
