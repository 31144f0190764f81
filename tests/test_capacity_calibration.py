"""The capacity presets against vLLM's published measurements of Llama-3.1-8B (docs/sources.md,
"Published performance"): saturation throughput and inter-token latency against load.

ShareGPT's mean request is about 230 prompt and 203 output tokens (SGLang's benchmark reports
4,132 output tokens/s at 21.3 requests/s: 194 per request; vLLM's PR 18566 uses ~230 / ~203)."""

import pytest

from ebbtide.sim.capacity import LLAMA_3_1_8B_A100 as A100
from ebbtide.sim.capacity import LLAMA_3_1_8B_H100 as H100
from ebbtide.sim.engine_core import EngineCore
from ebbtide.sim.engine_types import Finished

SHAREGPT = (230, 203)
# SGLang's benchmark of vLLM 0.6.0, Llama-3.1-8B on one A100-80G, ShareGPT.
A100_OFFLINE_REQUESTS_PER_S = 21.3
A100_MEDIAN_TPOT_S = {4.0: 0.0141, 8.0: 0.0171}  # request rate -> median TPOT
# Lambda's vLLM benchmarks: an H100 serves about twice what an A100 does on this model.
H100_OVER_A100 = 2.0
# vLLM PR 18566: a burst of 1,000 ShareGPT requests at 32.4 requests/s, drain included, so a
# steady state at saturation is at least that.
H100_BURST_REQUESTS_PER_S = 32.4


def test_a100_saturates_where_vllm_was_measured():
    assert A100.saturation_rate(*SHAREGPT) == pytest.approx(A100_OFFLINE_REQUESTS_PER_S, rel=0.05)


@pytest.mark.parametrize("rate", sorted(A100_MEDIAN_TPOT_S))
def test_a100_inter_token_latency_at_the_measured_loads(rate):
    running = A100.concurrency_at_rate(rate, *SHAREGPT)
    assert A100.itl_at(running, *SHAREGPT) == pytest.approx(A100_MEDIAN_TPOT_S[rate], rel=0.05)


def test_h100_serves_about_twice_the_a100_and_more_than_a_burst_with_its_drain():
    saturation = H100.saturation_rate(*SHAREGPT)
    assert saturation == pytest.approx(H100_OVER_A100 * A100_OFFLINE_REQUESTS_PER_S, rel=0.10)
    assert saturation > H100_BURST_REQUESTS_PER_S


def test_itl_grows_with_the_batch_as_the_measurements_do():
    """From one sequence to a full batch of ShareGPT requests ITL rises 4-5x on both (A100:
    12 ms to 59 ms, through the measured 14.1 ms at ~11 running), the H100 at half the A100's."""
    for model in (A100, H100):
        low, full = (model.itl_at(n, *SHAREGPT) for n in (1, model.max_num_seqs))
        assert 2.0 < full / low < 6.0
    assert H100.itl_at(256, *SHAREGPT) == pytest.approx(A100.itl_at(256, *SHAREGPT) / H100_OVER_A100, rel=0.15)


def test_the_engine_scheduler_runs_an_offline_burst_at_the_measured_rate():
    """SGLang's offline run, replayed: 1,000 ShareGPT-sized requests submitted at once to the
    step-level engine on the A100 preset finish at the measured request rate, within 15 % (the
    burst's ramp-down, with the batch emptying, is in both)."""
    engine = EngineCore(A100)
    for i in range(1000):
        engine.submit(f"r{i}", *SHAREGPT, 0.0)
    done = [e for e in engine.advance(float("inf")) if isinstance(e, Finished)]
    assert len(done) == 1000
    assert 1000 / max(e.finished_at for e in done) == pytest.approx(A100_OFFLINE_REQUESTS_PER_S, rel=0.15)
