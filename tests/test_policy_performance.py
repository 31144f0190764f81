"""The per-replica performance model with separate prompt and generated token costs
(policy/performance.py), checked against the simulator's capacity model as the engine."""

import dataclasses

import pytest

from ebbtide.api.manifest import parse_spec
from ebbtide.policy.autoscaling import decide
from ebbtide.policy.decision import Memory
from ebbtide.policy.observation import FleetState, PodSignals, Signals
from ebbtide.policy.performance import Mix, Model, observe_limit, observe_mix, read_mix, rescale
from ebbtide.sim.capacity import LLAMA_3_1_8B_H100

# An engine unlike the prior's: slower prefill, costlier attention, cheaper batch growth.
OTHER_ENGINE = LLAMA_3_1_8B_H100.with_overrides(prefill_tokens_per_s=8000.0, step_per_context_token_s=120e-9,
                                                step_per_seq_s=10e-6)
# (prompt, output) mean tokens: chat, short-prompt chat, summarisation, long answers, code completion.
SEEN = [(1000, 300), (600, 300), (1500, 250), (300, 400), (2000, 150)]
UNSEEN = [(800, 800), (400, 800), (3000, 300), (2000, 20), (7000, 50)]


def mix(prompt, output):
    return Mix(prompt / (prompt + output), prompt + output / 2)


def limit(engine, prompt, output):
    """Tokens/s one replica serves at saturation for this mix (the capacity model's answer)."""
    return engine.saturation_rate(prompt, output) * (prompt + output)


def fitted(engine, mixes, readings=20):
    m = Model()
    for prompt, output in mixes:
        for _ in range(readings):
            m = observe_limit(m, mix(prompt, output), limit(engine, prompt, output))
    return m


def test_a_mix_is_read_from_the_token_and_request_rates():
    assert read_mix(1300.0, 1600.0, 1.0) == Mix(1300 / 1600, 1300 + 300 / 2)
    for unreadable in ((None, 1600.0, 1.0), (1300.0, None, 1.0), (1300.0, 1600.0, None), (1300.0, 0.0, 1.0),
                       (1700.0, 1600.0, 1.0), (1300.0, 1600.0, 0.0), (-1.0, 1600.0, 1.0)):
        assert read_mix(*unreadable) is None


@pytest.mark.parametrize(("prompt", "output"), SEEN + UNSEEN)
def test_limits_fitted_on_a_few_mixes_predict_an_unseen_engine_s_limit_at_any_mix(prompt, output):
    """Fitted on five mixes of an engine whose costs differ from the prior, the limit learned at
    one mix is carried to another within 4 %; a limit in plain tokens/s is off by up to 21 %."""
    model = fitted(OTHER_ENGINE, SEEN)
    base = limit(OTHER_ENGINE, 1000, 300)
    predicted = rescale(model, base, mix(1000, 300), mix(prompt, output))
    assert predicted == pytest.approx(limit(OTHER_ENGINE, prompt, output), rel=0.04)


def test_plain_tokens_per_second_would_be_far_off_on_the_same_mixes():
    errors = [abs(limit(OTHER_ENGINE, 1000, 300) / limit(OTHER_ENGINE, p, o) - 1) for p, o in SEEN + UNSEEN]
    assert max(errors) > 0.2


def test_with_one_mix_the_model_keeps_the_prior_s_shape():
    one = fitted(OTHER_ENGINE, [(1000, 300)])
    prior = Model()
    assert rescale(one, 1000.0, mix(1000, 300), mix(800, 800)) == pytest.approx(
        rescale(prior, 1000.0, mix(1000, 300), mix(800, 800)), rel=1e-6)


def test_a_mix_that_does_not_move_changes_nothing_and_the_model_survives_json():
    m = observe_mix(fitted(OTHER_ENGINE, SEEN), 100.0, mix(1000, 300))
    assert rescale(m, 12_345.0, m.mix, m.mix) == 12_345.0
    assert Model.from_json(m.to_json()) == m
    for garbage in (None, [], {"weight": -1}, {"gram": [1, 2]}, {"mix": ["a", 1]}):
        assert Model.from_json(garbage) == Model()


def test_the_mix_is_smoothed_over_minutes():
    m = observe_mix(Model(), 0.0, mix(1000, 300))
    moved = observe_mix(m, 15.0, mix(300, 900))
    assert m.mix.prompt_share > moved.mix.prompt_share > m.mix.prompt_share - 0.05


def signals(now, prompt, output, rate, ready):
    pods = tuple(PodSignals(pod=f"p{i}", sampled_at=now, running=50, kv_cache_usage=0.3) for i in range(ready))
    return Signals(source="test", sampled_at=now, pods=pods, ttft_seconds=0.2, tpot_seconds=0.03,
                   tokens_per_second=rate * (prompt + output), prompt_tokens_per_second=rate * prompt,
                   requests_per_second=rate)


def test_decide_carries_the_learned_limit_to_the_mix_now():
    """A limit learned at 1,000 / 300 tokens is worth fewer tokens/s once outputs grow to 800:
    the same token rate then asks for more replicas."""
    spec = parse_spec({"model": {"name": "m"}, "replicas": {"min": 1, "max": 50}})
    capacity = limit(LLAMA_3_1_8B_H100, 1000, 300)
    memory = dataclasses.replace(Memory.empty(0.0), capacity=capacity)
    now, fleet = 3600.0, FleetState(current=10, ready=10)
    d = decide(spec, signals(now, 1000, 300, 50.0, 10), fleet, memory, now)
    assert d.memory.capacity == capacity  # the first reading sets the mix
    memory = d.memory
    for _ in range(400):  # 100 minutes at the new mix
        now += 15.0
        memory = decide(spec, signals(now, 800, 800, 50.0, 10), fleet, memory, now).memory
    assert memory.capacity == pytest.approx(limit(LLAMA_3_1_8B_H100, 800, 800), rel=0.02)
