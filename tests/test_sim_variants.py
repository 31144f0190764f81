"""Variants in the simulator (sim/variant_*.py): requests go where they fit, each variant is charged
at its price (reserved ones in full), and the CLI says in one line what it cannot run."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ebbtide.api.manifest import load_manifests
from ebbtide.policy.capacity_types import ON_DEMAND
from ebbtide.sim.capacity import LLAMA_3_1_8B_H100
from ebbtide.sim.combined_traces import _trace, load_combined
from ebbtide.sim.fleet import SimSettings
from ebbtide.sim.spot_market import SpotMarket
from ebbtide.sim.variant_fleet import VariantsPolicy, sim_variant, simulate_variants, single_policy
from ebbtide.sim.variant_runs import run_variant_policies
from ebbtide.sim.variant_serving import context_mix

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = SimSettings(capacity=LLAMA_3_1_8B_H100, cold_start_s=60, ttft_quantile=0.9, tpot_quantile=0.9)


def spec():
    ((_, spec),) = load_manifests(ROOT / "bench" / "variants.yaml")
    return spec


def small_trace(seconds: int = 240, per_second: int = 2):
    """`per_second` requests a second of a thousand tokens, and one of 40k every ten seconds."""
    rng = np.random.default_rng(3)
    short = np.sort(rng.uniform(0, seconds, per_second * seconds))
    long = np.arange(5.0, seconds, 10.0)
    arrivals = np.concatenate([short, long])
    prompts = np.concatenate([np.full(len(short), 1000), np.full(len(long), 40_000)])
    outputs = np.concatenate([np.full(len(short), 200), np.full(len(long), 300)])
    return _trace("small", arrivals, prompts, outputs)


def test_the_mix_serves_long_prompts_on_variants_that_hold_them_and_charges_reserved_in_full():
    s, trace = spec(), small_trace()
    kinds = {v.name: sim_variant(s, v) for v in s.variants}
    assert kinds["l4"].model.max_model_len == 16_384 and kinds["h100"].committed == 2
    run, usd = simulate_variants(trace, VariantsPolicy(s), kinds, SETTINGS)
    assert run.records.arrays()[0].size == trace.requests  # every request counted once, none refused
    assert usd["h100"] == pytest.approx(2 * 2.2 * trace.duration_s / 3600)  # run or not
    assert set(usd) == {"h100", "a100", "l40s", "l4"}


def test_a_single_variant_that_cannot_hold_long_prompts_refuses_them_as_misses():
    s, trace = spec(), small_trace(120)
    l4 = next(v for v in s.variants if v.name == "l4")
    run, usd = simulate_variants(trace, single_policy(s, l4), {ON_DEMAND: sim_variant(s, l4)}, SETTINGS)
    _, ttft, _, _ = run.records.arrays()
    assert int(np.sum(ttft >= trace.duration_s)) >= 11  # the 40k-token prompts, at the full replay's length
    assert usd[ON_DEMAND] > 0


def test_the_budget_run_stays_under_its_cap_and_says_so():
    s, trace = spec(), small_trace(120, per_second=30)  # 40k tokens/s: more than the two reserved H100s
    results, by_variant = run_variant_policies(["ebbtide-variants"], s, trace, SETTINGS, budget=6.0)
    assert [r.name for r in results] == ["ebbtide-variants", "ebbtide-variants-budget"]
    assert 0 < by_variant["ebbtide-variants-budget"]["usd_per_hour_max"] <= 6.0
    assert by_variant["ebbtide-variants"]["usd_per_hour_max"] > 6.0


def test_context_mix_shares_tokens_by_the_smallest_limit_that_holds_them():
    arrivals = np.array([1.0, 2.0, 3.0])
    prompts, outputs = np.array([1000, 20_000, 3000]), np.array([0, 0, 0])
    mix = context_mix(arrivals, prompts, outputs, 5.0, 60.0, [16_384, 131_072])
    assert mix == ((16_384, pytest.approx(4000 / 24000)), (131_072, pytest.approx(20_000 / 24000)))
    assert context_mix(arrivals, prompts, outputs, 5.0, 60.0, [16_384]) == ()


def test_the_combined_trace_overlays_both_hours():
    trace = load_combined("conv-1h+mooncake-1h", seed=1)
    assert trace.requests > 30_000 and trace.prompt_tokens.max() > 100_000
    assert np.all(np.diff(trace.arrivals) >= 0)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ebbtide.cli", "simulate", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


@pytest.mark.parametrize("args, words", [
    (["--policies", "ebbtide-variants", "--trace", "conv-1h"], "ebbtide-variants needs a spec with at least two variants"),
    (["bench/variants.yaml", "--policies", "hpa-kv"], "the spec lists variants: its policies are ebbtide-variants"),
    (["bench/variants.yaml", "--policies", "ebbtide-h200"], "not ebbtide-h200"),
])
def test_what_it_cannot_run_is_refused_in_one_line(args, words):
    done = run_cli(*args)
    assert done.returncode != 0 and words in done.stderr and "Traceback" not in done.stderr


def test_when_the_spot_variant_finds_no_nodes_the_next_cheapest_takes_over():
    """An outage of spot capacity from 60 s on: the L40S replicas are reclaimed and their
    replacements stay Pending; past the pending timeout the mix caps the L40S at what found a
    node and adds A100s (the reserved H100s carry what they can all along)."""
    s, trace = spec(), small_trace(600, per_second=30)
    settings = replace(SETTINGS, spot=SpotMarket(notice_s=30, outages=((60.0, 600.0),)))
    policy = VariantsPolicy(s)
    run, usd = simulate_variants(trace, policy, {v.name: sim_variant(s, v) for v in s.variants}, settings)
    before = [m for t, m, _ in policy.turns if t - policy.turns[0][0] < 60]
    after = [m for t, m, _ in policy.turns if t - policy.turns[0][0] > 60]
    assert any(m["l40s"] > 0 for m in before) and max(m["a100"] for m in before) == 0
    assert after and after[-1]["l40s"] == 0 and after[-1]["a100"] > 0
    assert run.spot.replicas_reclaimed > 0 and usd["a100"] > 0
