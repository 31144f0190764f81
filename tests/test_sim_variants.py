"""Variants in the simulator (sim/variant_*.py): requests go where they fit, each variant is charged
at its price (reserved ones in full), and the CLI says in one line what it cannot run."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ebbtide.api.manifest import load_manifests
from ebbtide.policy.capacity_types import ON_DEMAND
from ebbtide.sim.capacity import LLAMA_3_1_8B_H100
from ebbtide.sim.combined_traces import load_combined
from ebbtide.sim.fleet import SimSettings
from ebbtide.sim.spot_market import SpotMarket
from ebbtide.sim.traces import log_trace as _trace
from ebbtide.sim.variant_fleet import (
    VariantsPolicy,
    opening_tokens_per_s,
    out_of_reach,
    sim_variant,
    simulate_variants,
    single_policy,
)
from ebbtide.sim.variant_runs import run_variant_policies
from ebbtide.sim.variant_serving import VariantServing, context_mix, route_for

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
    node and adds A100s (the reserved H100s carry what they can all along), for one scale-down
    window: then it asks for the L40S again."""
    s, trace = spec(), small_trace(600, per_second=30)
    settings = replace(SETTINGS, spot=SpotMarket(notice_s=30, outages=((60.0, 600.0),)))
    policy = VariantsPolicy(s)
    run, usd = simulate_variants(trace, policy, {v.name: sim_variant(s, v) for v in s.variants}, settings)
    turns = [(t - policy.turns[0][0], m) for t, m, _ in policy.turns]
    before = [m for t, m in turns if t < 60]
    assert any(m["l40s"] > 0 for m in before) and max(m["a100"] for m in before) == 0
    capped = next(t for t, m in turns if t > 60 and m["l40s"] == 0)
    window = s.scaling.behavior.scale_down.stabilization_seconds
    held = [m for t, m in turns if capped <= t < capped + window]
    assert all(m["l40s"] == 0 and m["a100"] > 0 for m in held)
    assert run.spot.replicas_reclaimed > 0 and usd["a100"] > 0


ROUTES = ((131_072, ("h100", "l40s")), (16_384, ("l40s",)))


def test_the_gateway_follows_the_plans_size_routes_and_spills_only_past_a_queue():
    s = spec()
    models = {v.name: sim_variant(s, v).model for v in s.variants}
    kinds = {0: "h100", 1: "l40s", 2: "l40s"}
    none = np.array([])
    serving = VariantServing(models, kinds.__getitem__, none, none.astype(int), none.astype(int))
    for rid in kinds:
        serving.add_replica(rid, 0.0)
    assert sorted(serving.admitting(1000, 200)) == [0, 1, 2]  # no routes: wherever it fits
    serving.routes = ROUTES
    assert sorted(serving.admitting(1000, 200)) == [1, 2]  # short: never behind an 85k-token prefill
    assert serving.admitting(40_000, 300) == [0]  # long: its own variant while it has no queue
    for n in range(3):  # the H100 busy with one long prefill, two more waiting behind it
        serving.engines[0].submit(f"long-{n}", 100_000, 300, 0.0)
    assert sorted(serving.admitting(40_000, 300)) == [0, 1, 2]  # then the shared variant takes some
    assert route_for(ROUTES, 20_000) == ("h100", "l40s") and route_for(ROUTES, 200_000) == ()


def test_every_run_starts_warm_for_the_opening_minutes_from_what_it_learned_before():
    trace = small_trace(300, per_second=2)
    minutes = [(trace.prompt_sum[m * 60:(m + 1) * 60].sum() + trace.output_sum[m * 60:(m + 1) * 60].sum()) / 60
               for m in range(5)]
    assert opening_tokens_per_s(trace, 300) == pytest.approx(max(minutes))
    s = spec()
    # 50,000 tokens/s at 80 %: 62,500 of capacity; the reserved H100s' seed 33,600, the rest on L40S.
    seeded = VariantsPolicy(s).start(50_000.0, 0.0)
    taught = VariantsPolicy(s, learned={"l40s": 4_000.0})
    assert seeded["l40s"] == 5 and taught.start(50_000.0, 0.0)["l40s"] == 8  # 28,900 over 6,300, over 4,000
    assert taught.limits() == {"l40s": 4_000.0}  # what its next replay starts from
    l40s = next(v for v in s.variants if v.name == "l40s")
    single = single_policy(s, l40s, learned=4_000.0)
    run, _ = simulate_variants(trace, single, {ON_DEMAND: sim_variant(s, l40s)}, SETTINGS)
    assert run.timeline.replicas[0] == math.ceil(opening_tokens_per_s(trace, 300) / 0.8 / 4_000.0)


def test_prompts_no_variant_prefills_within_the_ttft_target_are_counted_apart():
    s = spec()
    trace = _trace("long", np.array([1.0, 2.0, 3.0]), np.array([1_000, 60_000, 120_000]), np.array([100, 100, 100]))
    kinds = {v.name: sim_variant(s, v) for v in s.variants}
    assert out_of_reach(trace, {"l40s": kinds["l40s"]}, 10.0) == 1  # 120k tokens at 11.3k/s: 10.7 s alone
    assert out_of_reach(trace, kinds, 10.0) == 0  # an H100 prefills it in 6 s
    assert out_of_reach(trace, {"l4": kinds["l4"]}, 10.0) == 0  # too long for it: refused, not counted twice


def test_each_variant_is_shown_its_own_latency_as_the_operator_reads_it():
    """The operator's per-variant signals sum that variant's pods' histogram buckets
    (signals/prometheus.py); the simulator shows the tick the same: each variant's own TTFT and
    TPOT quantiles, next to the service's over all of them."""
    s = spec()
    models = {v.name: sim_variant(s, v).model for v in s.variants}
    kinds = {0: "h100", 1: "l40s"}
    arrivals = np.arange(0.0, 50.0, 0.1)
    serving = VariantServing(models, kinds.__getitem__, arrivals, np.full(len(arrivals), 1000),
                             np.full(len(arrivals), 100))
    for rid in kinds:
        serving.add_replica(rid, 0.0)
    serving.advance(0, 60)
    service = serving.scrape(60.0, 0.0, 60.0, 0.9, 0.9)
    mine = serving.variant_signals(60.0, 60.0, service, 0.9, 0.9)
    h100, l40s = mine["h100"], mine["l40s"]
    assert h100.tpot_seconds < service.tpot_seconds < l40s.tpot_seconds  # a 6.5 ms step against 25 ms
    assert 0 < h100.ttft_seconds < l40s.ttft_seconds  # a 1k prompt at 20k tokens/s against 11.3k
    assert serving.variant_signals(60.0, 60.0, service)["l40s"].tpot_seconds is None  # no target: none read


def test_each_variant_runs_the_step_budget_vllm_serve_picks_for_its_gpu_unless_its_args_set_one():
    """`vllm serve` steps 8192 tokens at most on GPUs of 70 GiB or more other than the A100, else 2048
    (a decode step that carries a prefill chunk is that much shorter); --max-num-batched-tokens wins."""
    s = spec()
    budgets = {v.name: sim_variant(s, v).model.max_num_batched_tokens for v in s.variants}
    assert budgets == {"h100": 8192, "a100": 2048, "l40s": 2048, "l4": 2048}
    l40s = next(v for v in s.variants if v.name == "l40s")
    wide = l40s.model_copy(update={"engine_args": ["--max-num-batched-tokens=8192"]})
    assert sim_variant(s, wide).model.max_num_batched_tokens == 8192
