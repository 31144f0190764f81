"""The InferenceService models: defaults, bounds, cross-field rules, clear errors."""

import pytest

from ebbtide.api.manifest import InvalidSpec, parse_spec

MINIMAL = {"model": {"name": "meta-llama/Llama-3.1-8B-Instruct"}}


def test_minimal_spec_gets_reasoned_defaults():
    spec = parse_spec(MINIMAL)
    assert spec.mode == "Active"
    assert (spec.replicas.min, spec.replicas.max) == (1, 4)
    assert spec.engine.port == 8000 and spec.engine.gpus == 1
    assert spec.scaling.targets.ttft.quantile == 0.9
    assert spec.scaling.behavior.scale_down.stabilization_seconds == 300
    assert spec.served_model_name == "meta-llama/Llama-3.1-8B-Instruct"


def test_camel_case_on_the_wire_round_trips():
    raw = {**MINIMAL, "replicas": {"min": 2, "max": 9, "allowScaleToZero": True},
           "scaling": {"targets": {"ttft": {"quantile": 0.99, "targetSeconds": 0.5}}}}
    spec = parse_spec(raw)
    assert spec.replicas.allow_scale_to_zero is True
    assert parse_spec(spec.to_wire()) == spec
    assert spec.to_wire()["scaling"]["targets"]["ttft"] == {"quantile": 0.99, "targetSeconds": 0.5}


@pytest.mark.parametrize("raw, words", [
    ({**MINIMAL, "replicas": {"min": 5, "max": 2}}, "replicas.min (5) must not be greater than replicas.max (2)"),
    ({**MINIMAL, "schedules": [{"name": "x", "cron": "every morning", "durationMinutes": 60}]},
     "spec.schedules[0].cron: 'every morning' is not a 5-field cron expression"),
    ({**MINIMAL, "schedules": [{"name": "x", "cron": "0 8 * * *", "durationMinutes": 60, "timezone": "Mars/Base"}]},
     "'Mars/Base' is not an IANA time zone"),
    ({**MINIMAL, "engine": {"args": ["--port=9000"]}}, "engine.args must not set --port"),
    ({**MINIMAL, "placement": {"spot": {"enabled": True, "onDemandBase": 9}}},
     "placement.spot.onDemandBase (9) must not be greater than replicas.max (4)"),
    ({**MINIMAL, "replicaz": {"min": 1}}, "spec.replicaz: Extra inputs are not permitted"),
    ({"model": {}}, "spec.model.name: Field required"),
    ({**MINIMAL, "scaling": {"targets": {"kvCacheUsage": 1.5}}}, "spec.scaling.targets.kvCacheUsage"),
])
def test_invalid_specs_say_what_is_wrong_in_manifest_terms(raw, words):
    with pytest.raises(InvalidSpec) as e:
        parse_spec(raw)
    assert words in str(e.value)


def test_schedule_min_above_max_is_rejected():
    raw = {**MINIMAL, "schedules": [{"name": "peak", "cron": "0 8 * * 1-5", "durationMinutes": 60, "minReplicas": 7}]}
    with pytest.raises(InvalidSpec, match="minReplicas \\(7\\) is greater than replicas.max \\(4\\)"):
        parse_spec(raw)
