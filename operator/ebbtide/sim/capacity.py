"""Performance of one vLLM replica: the single model every simulator in Ebbtide uses.

The engine simulator (engine_core.py) steps this model one scheduler iteration at a time;
the fleet simulator uses the closed-form steady state below for week-long replays. Both read
the same numbers, so a policy tuned on one is judged on the same replica by the other.

One scheduler step of continuous batching (vLLM V1, chunked prefill) takes

    step(n, C, p) = step_base_s + step_per_seq_s * n + step_per_context_token_s * C
                    + p / prefill_tokens_per_s

where n is the number of decoding sequences, C their total context (tokens whose KV cache is
read by attention) and p the prompt tokens prefilled in that step (at most
max_num_batched_tokens - n). Decode of a small model is memory-bound: every step streams the
weights once (step_base_s) and the KV cache of every sequence (the context term); the per-seq
term stands for the GEMM work that grows with the batch plus sampling overhead.

Steady state (fluid approximation). With N requests running, prompt P and output O tokens each,
every step emits N tokens and, to keep N constant, admits N/O new requests whose P prompt tokens
ride in the same steps (chunked prefill), so the time between two tokens of a request is

    itl(N) = step_base_s + N * (step_per_seq_s + step_per_context_token_s * (P + O/2) + P / (O * R))

(P + O/2 is the mean context of a running request, R the prefill rate) and Little's law gives the
completion rate X(N) = N / (O * itl(N)). N is bounded by max_num_seqs and by the KV cache:
N * (P + O/2 + block_size/2) <= kv_cache_tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class CapacityModel:
    """One GPU replica of one model. Times in seconds, sizes in tokens."""

    name: str
    max_num_seqs: int
    kv_cache_tokens: int  # num_gpu_blocks * block_size
    block_size: int
    max_num_batched_tokens: int  # per-step token budget (decode tokens + prefill chunks)
    max_model_len: int  # prompt + max_tokens must fit, as vLLM validates on arrival
    prefill_tokens_per_s: float
    step_base_s: float
    step_per_seq_s: float
    step_per_context_token_s: float
    startup_s: float  # process start to port bound: weight load, compile, CUDA graphs
    wake_level1_s: float
    wake_level2_s: float
    # Free KV fraction kept back when admitting while others run (vLLM V0's `watermark`), so a
    # fresh admission is not preempted again by the next decode step's block growth.
    admission_watermark: float = 0.01

    def __post_init__(self) -> None:
        positive = ("max_num_seqs", "kv_cache_tokens", "block_size", "max_num_batched_tokens",
                    "max_model_len", "prefill_tokens_per_s", "step_base_s")
        for field_name in positive:
            if not getattr(self, field_name) > 0:
                raise ValueError(f"{field_name} must be > 0, got {getattr(self, field_name)!r}")
        for field_name in ("step_per_seq_s", "step_per_context_token_s", "startup_s",
                           "wake_level1_s", "wake_level2_s", "admission_watermark"):
            if getattr(self, field_name) < 0:
                raise ValueError(f"{field_name} must be >= 0, got {getattr(self, field_name)!r}")
        if self.kv_cache_tokens < self.block_size:
            raise ValueError("kv_cache_tokens must hold at least one block")
        if self.max_num_batched_tokens <= self.max_num_seqs:
            # Every running sequence takes one token of the budget; prefill needs the rest.
            raise ValueError("max_num_batched_tokens must exceed max_num_seqs")

    # -- one step -------------------------------------------------------------------------

    @property
    def num_gpu_blocks(self) -> int:
        return self.kv_cache_tokens // self.block_size

    def step_seconds(self, batch: int, context_tokens: float, prefill_tokens: float = 0) -> float:
        """Duration of one scheduler step with `batch` decoding sequences holding
        `context_tokens` in total, plus `prefill_tokens` prompt tokens prefilled alongside."""
        return (self.step_base_s + self.step_per_seq_s * batch
                + self.step_per_context_token_s * context_tokens
                + prefill_tokens / self.prefill_tokens_per_s)

    def decode_step_seconds(self, batch: int, context_tokens: float) -> float:
        """One pure decode step: the inter-token latency every running request sees."""
        return self.step_seconds(batch, context_tokens)

    def prefill_seconds(self, tokens: float) -> float:
        """Time an idle replica takes to prefill `tokens` prompt tokens (in chunks of the step
        budget): the lowest TTFT a request of that size can get."""
        steps = max(1, math.ceil(tokens / self.max_num_batched_tokens))
        return steps * self.step_base_s + tokens / self.prefill_tokens_per_s

    def wake_seconds(self, level: int) -> float:
        """POST /wake_up duration after POST /sleep?level=`level`."""
        if level == 1:
            return self.wake_level1_s
        if level == 2:
            return self.wake_level2_s
        raise ValueError(f"sleep level must be 1 or 2, got {level!r}")

    # -- steady state (fluid) -------------------------------------------------------------

    def max_concurrency(self, mean_prompt: float, mean_output: float) -> float:
        """Largest number of requests the replica runs at once for this mix: max_num_seqs,
        or fewer when their mean KV footprint fills the cache first."""
        _check_mix(mean_prompt, mean_output)
        per_request = mean_prompt + mean_output / 2 + self.block_size / 2  # half a block lost to rounding
        kv_bound = self.kv_cache_tokens * (1 - self.admission_watermark) / per_request
        return min(float(self.max_num_seqs), kv_bound)

    def itl_at(self, concurrency: float, mean_prompt: float, mean_output: float) -> float:
        """Mean inter-token latency (s) with `concurrency` requests running (clipped to
        max_concurrency: the rest wait and do not slow the batch)."""
        n = min(max(concurrency, 0.0), self.max_concurrency(mean_prompt, mean_output))
        return self.step_base_s + n * self._itl_slope(mean_prompt, mean_output)

    def throughput_at(self, concurrency: float, mean_prompt: float, mean_output: float) -> float:
        """Completed requests per second with `concurrency` requests in the replica."""
        n = min(max(concurrency, 0.0), self.max_concurrency(mean_prompt, mean_output))
        return n / (mean_output * self.itl_at(n, mean_prompt, mean_output))

    def saturation_rate(self, mean_prompt: float, mean_output: float) -> float:
        """Request rate (1/s) at full concurrency: beyond it the waiting queue grows without bound."""
        return self.throughput_at(math.inf, mean_prompt, mean_output)

    def max_request_rate(self, mean_prompt: float, mean_output: float,
                         itl_slo: float | None = None) -> float:
        """Highest sustainable request rate (1/s) of one replica for this mix whose mean
        inter-token latency stays within `itl_slo` seconds (no target: the saturation rate).
        0.0 when even a lone request misses the target."""
        n_max = self.max_concurrency(mean_prompt, mean_output)
        if itl_slo is not None:
            if itl_slo <= self.step_base_s:
                return 0.0
            n_max = min(n_max, (itl_slo - self.step_base_s) / self._itl_slope(mean_prompt, mean_output))
        # X(N) = N / (O * (c0 + c1 N)) increases with N, so the largest allowed N is the answer.
        return self.throughput_at(n_max, mean_prompt, mean_output)

    def concurrency_at_rate(self, rate: float, mean_prompt: float, mean_output: float) -> float:
        """Mean number of requests running at a steady arrival `rate` (1/s); math.inf when the
        rate is at or above saturation (the queue grows)."""
        if rate <= 0:
            return 0.0
        c0, c1 = self.step_base_s, self._itl_slope(mean_prompt, mean_output)
        # N = rate * O * itl(N) = rate * O * (c0 + c1 N), solved for N.
        denominator = 1.0 - rate * mean_output * c1
        if denominator <= 0:
            return math.inf
        n = rate * mean_output * c0 / denominator
        return n if n < self.max_concurrency(mean_prompt, mean_output) else math.inf

    def _itl_slope(self, mean_prompt: float, mean_output: float) -> float:
        _check_mix(mean_prompt, mean_output)
        return (self.step_per_seq_s
                + self.step_per_context_token_s * (mean_prompt + mean_output / 2)
                + mean_prompt / (mean_output * self.prefill_tokens_per_s))

    def with_overrides(self, **changes: object) -> CapacityModel:
        """A copy with some knobs changed (validated again)."""
        return replace(self, **changes)


def _check_mix(mean_prompt: float, mean_output: float) -> None:
    if mean_prompt < 0 or mean_output < 1:
        raise ValueError(f"need mean_prompt >= 0 and mean_output >= 1, got {mean_prompt}, {mean_output}")


# Llama-3.1-8B-Instruct, bf16, one H100 80GB SXM, vLLM V1 defaults (gpu_memory_utilization 0.9,
# block_size 16, max_num_seqs 256, max_num_batched_tokens 8192). Derivations, with sources, in
# docs/engine-simulator.md:
# - weights: 8.03e9 params x 2 B = 16.1 GB (15.0 GiB).
# - KV cache per token: 32 layers x 8 KV heads x 128 dim x 2 (K, V) x 2 B = 128 KiB. Budget
#   0.9 x 79.6 GiB - 15.0 GiB weights - ~3.5 GiB activations, CUDA graphs and non-torch memory
#   = ~53.2 GiB = ~436k tokens (27,250 blocks of 16).
# - step_base_s 6.5 ms: streaming 16.1 GB at 3.35 TB/s takes 4.8 ms; decode reaches ~75 % of
#   the bandwidth roofline (a measured single-stream 75 tok/s for this model on an A100-40GB is
#   77 % of its roofline), plus scheduler and sampling overhead.
# - step_per_context_token_s 52 ns: 128 KiB of KV read per context token at ~75 % of 3.35 TB/s.
# - step_per_seq_s 20 us: batch-proportional GEMM and sampling work (2 x 8e9 FLOP per token at
#   ~60 % of 989 dense bf16 TFLOPS is ~27 us, partly hidden under the weight streaming).
#   Together: ~7-8 ms ITL at batch 1-16, ~25 ms at batch 256 with 1k context, ~38 ms with 2k.
# - prefill 20k tok/s: 16 GFLOP per prompt token at ~35 % MFU including attention; a 1k-token
#   prompt alone gets ~56 ms TTFT.
# - startup 40 s: engine init with torch.compile and CUDA-graph capture, weights on local disk
#   (14 s eager to 40 s compiled, reference/vllm.md); image pull and download come on top.
# - wake: level 1 copies 16 GB back from pinned host memory over PCIe Gen5 (~25 GB/s practical)
#   and re-allocates the KV cache, ~1 s; level 2 reloads the weights from the page cache, ~5 s.
LLAMA_3_1_8B_H100 = CapacityModel(
    name="llama-3.1-8b-h100",
    max_num_seqs=256,
    kv_cache_tokens=27_250 * 16,
    block_size=16,
    max_num_batched_tokens=8192,
    max_model_len=131_072,
    prefill_tokens_per_s=20_000.0,
    step_base_s=0.0065,
    step_per_seq_s=20e-6,
    step_per_context_token_s=52e-9,
    startup_s=40.0,
    wake_level1_s=1.0,
    wake_level2_s=5.0,
)

# Llama-3.1-8B-Instruct, bf16, one A100 80GB SXM, the same vLLM defaults. Fitted to SGLang's
# published benchmark of vLLM 0.6.0 on this GPU and model (ShareGPT, ~230 prompt / ~200 output
# tokens; docs/sources.md): median TPOT 14.1 ms at 4 requests/s and 17.1 ms at 8 requests/s,
# which put itl(n) = c0 + c1 n through (11.4, 14.1 ms) and (27.8, 17.1 ms), c0 = 12.0 ms and
# c1 = 183 us per sequence for that mix; at max_num_seqs 256 this gives 21.4 requests/s, where
# the same benchmark measured 21.3 offline (tests/test_capacity.py checks all three).
# - step_base_s 12.0 ms: 16.1 GB of weights at 2.04 TB/s take 7.9 ms; vLLM 0.6.0 reached ~66 %
#   of that roofline plus its scheduling overhead.
# - step_per_context_token_s 86 ns: 128 KiB of KV per context token at ~75 % of 2.04 TB/s.
# - prefill 8k tok/s: 16 GFLOP per prompt token at ~40 % of 312 dense bf16 TFLOPS.
# - step_per_seq_s 13 us: what is left of the fitted 183 us slope after the context (28 us)
#   and prefill (142 us) terms for the ShareGPT mix.
# - KV cache: the H100's budget less its 0.3 GiB more memory: 27,100 blocks of 16.
# - wake: level 1 over PCIe Gen4 (~20 GB/s practical), ~1.2 s.
LLAMA_3_1_8B_A100 = CapacityModel(
    name="llama-3.1-8b-a100",
    max_num_seqs=256,
    kv_cache_tokens=27_100 * 16,
    block_size=16,
    max_num_batched_tokens=8192,
    max_model_len=131_072,
    prefill_tokens_per_s=8_000.0,
    step_base_s=0.012,
    step_per_seq_s=13e-6,
    step_per_context_token_s=86e-9,
    startup_s=40.0,
    wake_level1_s=1.2,
    wake_level2_s=5.0,
)

# Small and slow enough that a test saturates it with a few dozen requests in about a second.
TINY = CapacityModel(
    name="tiny",
    max_num_seqs=4,
    kv_cache_tokens=256 * 16,
    block_size=16,
    max_num_batched_tokens=512,
    max_model_len=2048,
    prefill_tokens_per_s=50_000.0,
    step_base_s=0.005,
    step_per_seq_s=0.001,
    step_per_context_token_s=1e-6,
    startup_s=1.0,
    wake_level1_s=0.2,
    wake_level2_s=0.5,
)

# The same model on two smaller accelerators (issue 19, accelerator variants), derived from each
# GPU's datasheet, the way the H100's is: the bandwidth-bound terms (step_base_s, the context
# term) scale with 1 / memory bandwidth (75 % of it reached), the compute-bound ones (per-seq,
# prefill) with 1 / dense bf16 TFLOPS from an A100 derivation checked on its published offline
# rate (40 us per sequence, prefill at 50 % MFU), and the KV cache is what 0.9 of the memory
# leaves after 15.0 GiB of weights and the runtime's share. Sources in docs/simulator.md:
# - L40S: 0.864 TB/s, 362 TFLOPS, 48 GB: base 25 ms, 202 ns, 34 us, prefill 11.3k tok/s,
#   0.9 x 44.5 GiB - 15.0 - 3.0 = ~22 GiB of KV (180k tokens).
# - L4: 0.300 TB/s, 121 TFLOPS, 24 GB: base 71.6 ms (about 14 tokens/s for a lone request),
#   583 ns, 103 us, prefill 3.8k tok/s; 0.9 x 22.0 GiB - 15.0 - 1.5 = ~3.3 GiB of KV (27k
#   tokens), so vLLM refuses the model's 131k context: max_model_len 16384 (examples/variants.yaml).
# The A100-80G variant runs the A100 preset above, fitted to the published figures.
# - The step's token budget is what `vllm serve` (V1) picks for the GPU: 8192 only on GPUs with
#   70 GiB or more that are not A100s (the H100), else 2048 (EngineArgs.get_batch_defaults; the
#   A100 is left out since larger budgets cost it throughput, vLLM PR #17885). A decode step that
#   carries a full chunk takes 0.73 s on an L40S at 8192 tokens, 0.18 s at 2048.
LLAMA_3_1_8B_A100_80G = LLAMA_3_1_8B_A100.with_overrides(name="llama-3.1-8b-a100-80g", max_num_batched_tokens=2048)
LLAMA_3_1_8B_L40S = LLAMA_3_1_8B_H100.with_overrides(
    name="llama-3.1-8b-l40s", kv_cache_tokens=11_250 * 16, max_num_batched_tokens=2048, prefill_tokens_per_s=11_300.0,
    step_base_s=0.0250, step_per_seq_s=34e-6, step_per_context_token_s=202e-9, startup_s=50.0,
    wake_level1_s=1.5, wake_level2_s=6.0)
LLAMA_3_1_8B_L4 = LLAMA_3_1_8B_H100.with_overrides(
    name="llama-3.1-8b-l4", kv_cache_tokens=1_700 * 16, max_model_len=16_384, max_num_batched_tokens=2048,
    prefill_tokens_per_s=3_800.0,
    step_base_s=0.0716, step_per_seq_s=103e-6, step_per_context_token_s=583e-9, startup_s=60.0,
    wake_level1_s=2.0, wake_level2_s=8.0)

PRESETS: dict[str, CapacityModel] = {m.name: m for m in (
    LLAMA_3_1_8B_H100, LLAMA_3_1_8B_A100, LLAMA_3_1_8B_L40S, LLAMA_3_1_8B_L4, TINY)}
# The preset of each accelerator a variant names (spec.variants[].accelerator), for the model above.
ACCELERATOR_PRESETS: dict[str, CapacityModel] = {
    "H100": LLAMA_3_1_8B_H100, "A100-80G": LLAMA_3_1_8B_A100_80G, "L40S": LLAMA_3_1_8B_L40S, "L4": LLAMA_3_1_8B_L4}


def get_preset(name: str) -> CapacityModel:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown capacity preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
