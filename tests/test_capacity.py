"""The replica capacity model: calibration of the H100 preset and the steady-state (fluid) formulas."""

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ebbtide.sim.capacity import LLAMA_3_1_8B_H100 as H100
from ebbtide.sim.capacity import PRESETS, TINY, get_preset
from ebbtide.sim.engine_core import EngineCore
from ebbtide.sim.engine_types import Finished

GiB = 2**30


def test_presets_are_registered():
    assert get_preset("llama-3.1-8b-h100") is H100
    assert get_preset("tiny") is TINY
    assert set(PRESETS) >= {"llama-3.1-8b-h100", "tiny"}
    with pytest.raises(ValueError, match="unknown capacity preset"):
        get_preset("nope")


def test_h100_kv_cache_follows_from_memory_budget():
    kv_bytes_per_token = 32 * 8 * 128 * 2 * 2  # layers x KV heads x head dim x (K, V) x bf16
    assert kv_bytes_per_token == 128 * 1024
    budget = 0.9 * 79.6 * GiB - 8.03e9 * 2 - 3.5 * GiB  # gpu_memory_utilization x HBM - weights - activations
    assert H100.kv_cache_tokens == pytest.approx(budget / kv_bytes_per_token, rel=0.01)
    assert H100.kv_cache_tokens % H100.block_size == 0


def test_h100_latencies_match_public_figures():
    # ITL ~7-10 ms at small batch, ~25-40 ms at batch 256 with 1-2k tokens of context each.
    assert 0.006 <= H100.decode_step_seconds(1, 1000) <= 0.010
    assert 0.006 <= H100.decode_step_seconds(16, 16 * 1000) <= 0.010
    assert 0.020 <= H100.decode_step_seconds(256, 256 * 1000) <= 0.030
    assert 0.030 <= H100.decode_step_seconds(256, 256 * 2000) <= 0.045
    assert 0.04 <= H100.prefill_seconds(1000) <= 0.08  # a 1k prompt alone
    # Long prompts take one step per 8192-token chunk.
    assert H100.prefill_seconds(3 * 8192) == pytest.approx(3 * H100.step_base_s + 3 * 8192 / 20_000)


def test_validation_and_overrides():
    with pytest.raises(ValueError, match="max_num_seqs"):
        TINY.with_overrides(max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        TINY.with_overrides(max_num_batched_tokens=TINY.max_num_seqs)
    bigger = TINY.with_overrides(max_num_seqs=8)
    assert bigger.max_num_seqs == 8 and TINY.max_num_seqs == 4
    assert TINY.wake_seconds(1) == TINY.wake_level1_s and TINY.wake_seconds(2) == TINY.wake_level2_s
    with pytest.raises(ValueError):
        TINY.wake_seconds(3)
    with pytest.raises(ValueError, match="mean_output"):
        H100.max_request_rate(100, 0)


def test_concurrency_is_capped_by_seqs_or_kv():
    assert H100.max_concurrency(200, 200) == 256
    long_context = H100.max_concurrency(8000, 2000)  # 9k tokens each: the KV cache binds first
    assert long_context == pytest.approx(H100.kv_cache_tokens * 0.99 / (8000 + 1000 + 8))
    assert H100.itl_at(10_000, 200, 200) == H100.itl_at(256, 200, 200)


@given(prompt=st.floats(1, 8000), output=st.floats(1, 2000), concurrency=st.floats(0, 300))
def test_littles_law_round_trip(prompt, output, concurrency):
    model = H100
    n = min(concurrency, model.max_concurrency(prompt, output))
    rate = model.throughput_at(n, prompt, output)
    assert rate <= model.saturation_rate(prompt, output) * (1 + 1e-12)
    if n < model.max_concurrency(prompt, output) * 0.999:
        assert model.concurrency_at_rate(rate, prompt, output) == pytest.approx(n, rel=1e-6, abs=1e-9)
    assert model.concurrency_at_rate(model.saturation_rate(prompt, output) * 1.01, prompt, output) == math.inf


@given(prompt=st.floats(1, 8000), output=st.floats(1, 2000), slo=st.floats(0.001, 0.2))
def test_max_request_rate_holds_the_itl_target(prompt, output, slo):
    rate = H100.max_request_rate(prompt, output, slo)
    assert rate <= H100.max_request_rate(prompt, output, slo * 1.5) + 1e-12  # monotone in the target
    assert rate <= H100.max_request_rate(prompt, output) + 1e-12
    if slo <= H100.step_base_s:
        assert rate == 0.0
    else:
        n = H100.concurrency_at_rate(rate * 0.999, prompt, output)
        assert H100.itl_at(n, prompt, output) <= slo * (1 + 1e-9)


def test_a_chat_mix_on_h100():
    # ShareGPT-like: 220 prompt and 200 output tokens on average.
    saturation = H100.saturation_rate(220, 200)
    assert 30 <= saturation <= 60  # requests/s, i.e. ~6-12k output tokens/s
    assert H100.max_request_rate(220, 200, itl_slo=0.020) < saturation


def test_fluid_model_agrees_with_the_engine():
    """The steady state predicted in closed form is what the step-level engine produces."""
    model, prompt, output = H100, 500, 200
    rate = 0.6 * model.saturation_rate(prompt, output)
    engine, rng, t, finished = EngineCore(model), random.Random(7), 0.0, []
    while t < 60:
        t += rng.expovariate(rate)
        finished += engine.advance(t)
        engine.submit(f"r{len(finished)}-{t}", prompt, output, t)
    finished += engine.advance(t + 60)
    done = [e for e in finished if isinstance(e, Finished) and e.arrival > 10]  # skip the warm-up
    measured_itl = sum(e.mean_itl for e in done) / len(done)
    predicted_itl = model.itl_at(model.concurrency_at_rate(rate, prompt, output), prompt, output)
    assert measured_itl == pytest.approx(predicted_itl, rel=0.15)
