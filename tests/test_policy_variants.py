"""Accelerator variants (policy/variants.py, policy/variant_tick.py): the cheapest mix that carries
the demand, reserved first, spot priced with its reclaims, stuck variants left behind, budgets."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from ebbtide.api.manifest import parse_spec
from ebbtide.policy.cost import Ledger
from ebbtide.policy.observation import Deployments, Observation, Pod, PodSignals, Signals
from ebbtide.policy.tick import TickState, tick
from ebbtide.policy.variant_tick import (
    SEED_TOKENS_PER_S,
    MixMemory,
    hourly_budget,
    hours_left_in_month,
    max_model_len,
    seed_capacity,
)
from ebbtide.policy.variants import Demand, VariantView, choose_mix, size_routes
from ebbtide.sim.capacity import ACCELERATOR_PRESETS

NOW = 1_715_594_400.0
ROOT = Path(__file__).resolve().parents[1]


def view(name: str, kind: str = "on-demand", usd: float = 1.0, cap: float = 1000.0, **more) -> VariantView:
    return VariantView(name=name, capacity_type=kind, usd_per_replica_hour=usd, capacity_tokens_per_s=cap,
                       **{"max": 10, **more})


H100_RESERVED = view("h100", "reserved", usd=2.2, cap=16_000, max=2)
A100 = view("a100", usd=3.4, cap=8_000)
L40S_SPOT = view("l40s", "spot", usd=0.9, cap=6_000, reclaims_per_hour=0.05, startup_seconds=180)
L4 = view("l4", usd=0.8, cap=800, max_context_tokens=16_384)


def test_reserved_capacity_runs_first_because_it_is_paid_for_anyway():
    plan = choose_mix(10_000, [A100, H100_RESERVED], share=1.0)
    assert plan.targets == {"a100": 0, "h100": 2}
    assert plan.usd_per_hour == pytest.approx(4.4)  # both reserved replicas count, running or not
    assert any("sunk" in r for r in plan.reasons)


def test_beyond_reserved_the_cheapest_dollars_per_token_fill_the_rest():
    plan = choose_mix(32_000 + 24_000, [A100, L40S_SPOT, H100_RESERVED], share=1.0)
    assert plan.targets == {"a100": 0, "l40s": 4, "h100": 2}  # spot L40S: 0.04 USD/M tokens, A100: 0.12


def test_spot_is_priced_with_its_reclaim_and_retry_cost():
    cheap_but_reclaimed = view("spot", "spot", usd=1.0, cap=1000, reclaims_per_hour=2.0, startup_seconds=1800)
    steady = view("od", usd=1.5, cap=1000)
    assert cheap_but_reclaimed.effective_usd_per_hour == pytest.approx(2.0)  # 2 reclaims/h x 0.5 h lost
    assert choose_mix(3000, [cheap_but_reclaimed, steady], share=1.0).targets == {"spot": 0, "od": 3}


def test_a_small_remainder_goes_to_the_cheapest_replica_that_covers_it():
    plan = choose_mix(8_000 + 500, [A100, L4], share=1.0)
    assert plan.targets == {"a100": 1, "l4": 1}  # not a second A100 for 500 tokens/s


def test_remainders_do_not_pile_up_on_a_variant_dearer_per_token():
    """Kept, each tick's small remainder went to one more L4 (0.80 USD/h against 0.90), and the
    trim never swaps them back: a dearer-per-token variant takes one remainder, the next goes to
    the cheapest per token, and the L4 it leaves surplus is trimmed."""
    plan = choose_mix(13_300, [L40S_SPOT, L4], share=1.0, keep={"l40s": 2, "l4": 1})
    assert plan.targets == {"l40s": 3, "l4": 0}
    assert choose_mix(12_500, [L40S_SPOT, L4], share=1.0).targets == {"l40s": 2, "l4": 1}  # one remainder: the L4


def test_from_zero_only_the_cheapest_suitable_variant_starts():
    plan = choose_mix(1e-6, [A100, L40S_SPOT, L4], share=1.0)
    assert plan.targets == {"a100": 0, "l40s": 0, "l4": 1}
    long_only = choose_mix([Demand(1e-6, 60_000)], [A100, L40S_SPOT, L4], share=1.0)
    assert long_only.targets == {"a100": 0, "l40s": 1, "l4": 0}  # the L4 cannot hold the prompt


def test_long_prompts_are_carried_by_variants_that_hold_them_and_the_plan_says_so():
    demand = [Demand(3_000, 16_000), Demand(6_000, 100_000)]  # the A100's spare 2,000 carries some
    plan = choose_mix(demand, [L4, A100], share=1.0)
    assert plan.targets == {"l4": 2, "a100": 1}
    assert any("only fit a100" in r and "gateway" in r for r in plan.reasons)
    assert "requests needing 16000 tokens of context are cheapest per token on a100 (0.118 USD/M" in plan.message


def test_the_plan_routes_each_size_to_variants_a_longer_size_does_not_use_where_the_mix_allows():
    long, short = Demand(30_000, 131_072), Demand(4_000, 16_384)
    plan = choose_mix([long, short], [H100_RESERVED, L40S_SPOT, L4], share=1.0)
    # The long prompts fill the reserved H100s first; the short ones go where the long ones are not.
    assert plan.routes == ((131_072, ("h100",)), (16_384, ("l40s",)))
    assert "route requests needing 16384 tokens of context to l40s" in plan.message
    # More long prompts than the H100s carry: they spill onto the L40S, which the short ones then share.
    assert size_routes([H100_RESERVED, L40S_SPOT], {"h100": 2, "l40s": 3}, [Demand(40_000, 131_072), short], 1.0) == (
        (131_072, ("h100", "l40s")), (16_384, ("l40s",)))
    assert size_routes([H100_RESERVED, L40S_SPOT], {"h100": 2, "l40s": 3}, [Demand(9_000)]) == ()
    # An L4 added for a remainder is no longer size's, yet it carries little of the short ones:
    # the gateway's first choice for them (named first) is the variant that carries most of them.
    mixed = size_routes([H100_RESERVED, L40S_SPOT, L4], {"h100": 2, "l40s": 4, "l4": 1},
                        [Demand(40_000, 131_072), Demand(12_000, 16_384)], 1.0)
    assert mixed == ((131_072, ("h100", "l40s")), (16_384, ("l40s", "l4")))


def test_a_variant_whose_replicas_find_no_node_is_capped_and_the_next_cheapest_takes_over():
    stuck = view("l40s", "spot", usd=0.9, cap=6_000, ready=1, pending_unschedulable=2, stuck=True)
    plan = choose_mix(20_000, [stuck, A100], share=1.0)
    assert plan.targets == {"l40s": 1, "a100": 2}
    assert any("capped at 1: 2 replicas found no node" in r for r in plan.reasons)


def test_with_running_replicas_a_tick_adds_the_cheapest_and_removes_the_dearest_never_swaps():
    plan = choose_mix(5_000, [A100, L40S_SPOT], share=1.0, keep={"a100": 2, "l40s": 1})
    assert plan.targets == {"a100": 0, "l40s": 1}  # the dearest per token went first
    plan = choose_mix(9_000, [A100, L40S_SPOT], share=1.0, keep={"a100": 2, "l40s": 0})
    assert plan.targets == {"a100": 2, "l40s": 0}  # no cold start to swap what runs
    plan = choose_mix(30_000, [A100, L40S_SPOT], share=1.0, keep={"a100": 2, "l40s": 0})
    assert plan.targets == {"a100": 2, "l40s": 3}  # the A100s kept, the rest on spot


def test_a_binding_budget_moves_to_cheaper_variants_then_cuts_capacity_and_says_so():
    fast, cheap = view("fast", usd=4.0, cap=10_000, max=10), view("cheap", usd=1.0, cap=2_000, max=3)
    plan = choose_mix(20_000, [fast, cheap], share=1.0)
    assert plan.targets == {"fast": 2, "cheap": 0} and not plan.budget_limited
    limited = choose_mix(20_000, [fast, cheap], share=1.0, budget_usd_per_hour=6.0)
    assert limited.targets == {"fast": 0, "cheap": 3} or limited.targets == {"fast": 1, "cheap": 2}
    assert limited.usd_per_hour <= 6.0 and limited.budget_limited
    assert any(r.startswith("BudgetLimited: 6.00 USD/h cap") for r in limited.reasons)


def test_seeds_are_the_simulator_presets_at_the_chat_mix():
    for accelerator, model in ACCELERATOR_PRESETS.items():
        at_limit = model.max_request_rate(1155, 211, 0.1) * (1155 + 211)
        assert SEED_TOKENS_PER_S[accelerator] == pytest.approx(at_limit, rel=0.05), accelerator
    assert seed_capacity("a100-80gb") == SEED_TOKENS_PER_S["A100-80G"]
    assert max_model_len(["--max-model-len", "8192", "--max-model-len=4096"]) == 4096


# --- the tick ----------------------------------------------------------------------------------

def example():
    (doc,) = [d for d in yaml.safe_load_all((ROOT / "examples/variants.yaml").read_text()) if d]
    return parse_spec({**doc["spec"], "budget": None})


def signals(pods, tokens: float, **more) -> Signals:
    return Signals(source="prometheus", sampled_at=NOW - 5, tokens_per_second=tokens,
                   pods=tuple(PodSignals(p.name, NOW - 5, running=3.0, kv_cache_usage=0.3) for p in pods), **more)


def observe(pods, tokens: float, **more) -> Observation:
    return Observation(signals=signals(pods, tokens, **more.pop("signal_fields", {})), pods=tuple(pods),
                       deployments=Deployments(len(pods)), **more)


def test_the_tick_starts_from_zero_with_the_cheapest_variant_only():
    spec = example().model_copy(update={"replicas": parse_spec({"model": {"name": "m"}}).replicas})
    turn = tick(spec, observe([], 0.0, activation=3.0), TickState.start(NOW), NOW)
    assert turn.replicas == {"h100": 2, "a100": 0, "l40s": 0, "l4": 0}  # reserved: already paid for


def test_the_tick_fills_reserved_then_spot_and_tells_why():
    spec = example()
    pods = [Pod("h1", "h100", node="n1"), Pod("h2", "h100", node="n2")]
    turn = tick(spec, observe(pods, 40_000.0), TickState.start(NOW), NOW)
    mix = turn.decision.variants
    assert turn.replicas == mix.targets and mix.targets["h100"] == 2
    assert mix.planned_tokens_per_s >= 40_000 / 0.8 and mix.targets["l40s"] >= 3 and mix.targets["a100"] == 0
    assert [e.reason for e in turn.events] == ["VariantMix"] and "USD/h" in turn.events[0].message
    assert turn.decision.condition("BudgetLimited").status == "False"
    assert turn.spend.usd_per_hour == pytest.approx(4.4)  # the two reserved H100s


def test_the_tick_under_a_budget_reports_budget_limited_once():
    spec = example().model_copy(update={"budget": parse_spec({"model": {"name": "m"}, "budget": {
        "maxUsdPerHour": 6.0}}).budget})
    pods = [Pod("h1", "h100", node="n1"), Pod("h2", "h100", node="n2")]
    turn = tick(spec, observe(pods, 40_000.0), TickState.start(NOW), NOW)
    assert turn.decision.variants.budget_limited and turn.decision.reason == "BudgetLimited"
    assert turn.decision.variants.usd_per_hour <= 6.0
    assert [e.reason for e in turn.events] == ["VariantMix", "BudgetLimited"]
    again = tick(spec, observe(pods, 40_000.0), turn.state, NOW + 15)
    assert "BudgetLimited" not in [e.reason for e in again.events]


def test_each_variant_learns_its_own_limit_from_its_own_replicas():
    spec = example()
    pods = [Pod("l1", "l40s", node="n1"), Pod("l2", "l40s", node="n2")]
    queued = Signals(source="prometheus", sampled_at=NOW - 5, tokens_per_second=7_000.0,
                     pods=tuple(PodSignals(p.name, NOW - 5, waiting=10.0, running=40.0, kv_cache_usage=0.9)
                                for p in pods))
    state = TickState.start(NOW - 600)
    for t in (NOW - 300, NOW - 200, NOW - 100, NOW):
        state = tick(spec, observe(pods, 7_000.0, variant_signals={"l40s": queued}), state, t).state
    assert state.mix.variants["l40s"].capacity == pytest.approx(3_500.0)  # 7,000 tokens/s over 2 at a queue
    assert state.mix.variants["a100"].capacity is None  # no replicas: still its seed


def test_the_mix_memory_survives_a_restart_and_bad_history_is_forgotten():
    spec = example()
    pods = [Pod("l1", "l40s", node="n1")]
    state = tick(spec, observe(pods, 5_000.0), TickState.start(NOW), NOW).state
    kept = state.mix.to_json()
    assert MixMemory.load(kept, NOW + 1) == state.mix
    assert MixMemory.load({"since": "soon"}, NOW + 1) == MixMemory(since=NOW + 1)


def test_a_monthly_cap_spreads_what_is_left_over_the_hours_left():
    spec = parse_spec({"model": {"name": "m"}, "budget": {"maxUsdPerHour": 50, "maxUsdPerMonth": 7200}})
    assert hourly_budget(spec) == pytest.approx(10.0)  # 7,200 over a 30-day month
    end_of_may = 1_717_113_600.0  # 2024-05-31 00:00 UTC: 24 hours left
    assert hours_left_in_month(end_of_may) == pytest.approx(24.0)
    assert hourly_budget(spec, spent_this_month=6960.0, now=end_of_may) == pytest.approx(10.0)
    assert hourly_budget(spec, spent_this_month=7200.0, now=end_of_may) == 0.0


def test_without_a_token_rate_the_mix_is_held_and_advisory_mode_only_advises():
    spec = example()
    pods = [Pod("h1", "h100", node="n1"), Pod("h2", "h100", node="n2"), Pod("l1", "l40s", node="n3")]
    first = tick(spec, observe(pods, 40_000.0), TickState.start(NOW), NOW)
    blind = Observation(signals=Signals.missing("Prometheus unreachable"), pods=tuple(pods),
                        deployments=Deployments(3))
    held = tick(spec, blind, first.state, NOW + 15)
    assert held.replicas == first.replicas and not held.news
    assert "no token rate (Prometheus unreachable)" in held.decision.message
    advisory = spec.model_copy(update={"mode": "Advisory"})
    advised = tick(advisory, observe(pods, 40_000.0), TickState.start(NOW), NOW)
    assert [e.reason for e in advised.events] == ["AdvisoryVariantMix"]
    assert advised.state.mix.targets is None  # nothing was applied: the next tick keeps from what runs


def budget(**caps):
    return parse_spec({"model": {"name": "m"}, "budget": caps}).budget


def test_the_variant_tick_accrues_the_cost_ledger_each_variant_at_its_own_price():
    spec = example()
    # Reserved H100s are paid for in full (2 of 2); of the spot L40S, only the pod on a node.
    pods = [Pod("h1", "h100", node="n1"), Pod("l1", "l40s", node="n3"), Pod("l2", "l40s", node=None)]
    turn = tick(spec, observe(pods, 9_000.0), TickState.start(NOW), NOW)
    later = tick(spec, observe(pods, 9_000.0), turn.state, NOW + 3600)
    ledger = later.state.ledger
    assert (ledger.gpu_hours_reserved, ledger.gpu_hours_spot, ledger.gpu_hours_on_demand) == pytest.approx((2, 1, 0))
    assert ledger.usd == pytest.approx(2 * 2.2 + 0.9) == later.spend.usd_per_hour
    assert ledger.usd_month == ledger.usd
    unapplied = tick(spec.model_copy(update={"mode": "Advisory"}), observe(pods, 9_000.0), later.state, NOW + 7200)
    assert unapplied.state.ledger.usd == pytest.approx(2 * 5.3), "charged whether the mix is applied or not"


def test_the_monthly_cap_counts_what_the_ledger_says_was_spent_this_month():
    spec = example().model_copy(update={"budget": budget(maxUsdPerHour=50, maxUsdPerMonth=7200)})
    pods = [Pod("h1", "h100", node="n1"), Pod("h2", "h100", node="n2")]
    fresh = tick(spec, observe(pods, 40_000.0), TickState.start(NOW), NOW)
    assert not fresh.decision.variants.budget_limited  # 7,200 over the 446 hours left of May: 16.1 USD/h
    assert fresh.decision.variants.budget_usd_per_hour == pytest.approx(7200 / hours_left_in_month(NOW))
    # 5 USD/h left for the rest of the month: the reserved H100s (4.40) leave room for no other replica.
    spent = replace(Ledger.start(NOW), usd_month=7200 - 5 * hours_left_in_month(NOW))
    turn = tick(spec, observe(pods, 40_000.0), replace(TickState.start(NOW), ledger=spent), NOW)
    plan = turn.decision.variants
    assert plan.budget_usd_per_hour == pytest.approx(5.0) and plan.budget_limited
    assert plan.targets == {"h100": 2, "a100": 0, "l40s": 0, "l4": 0}
    assert turn.decision.condition("BudgetLimited").message == "projected 4.40 USD/h of 5.00"


def test_a_held_mix_is_still_cut_to_a_budget_lowered_meanwhile():
    spec = example()
    pods = [Pod("h1", "h100", node="n1"), Pod("h2", "h100", node="n2"), Pod("l1", "l40s", node="n3")]
    first = tick(spec, observe(pods, 40_000.0), TickState.start(NOW), NOW)
    assert first.replicas["l40s"] >= 3 and not first.decision.variants.budget_limited
    blind = Observation(signals=Signals.missing("Prometheus unreachable"), pods=tuple(pods), deployments=Deployments(3))
    capped = spec.model_copy(update={"budget": budget(maxUsdPerHour=6.0)})
    held = tick(capped, blind, first.state, NOW + 15)
    # The dearest per token go first: 4.40 for the reserved H100s and one spot L40S (0.90) fit 6.00.
    assert held.replicas == {"h100": 2, "a100": 0, "l40s": 1, "l4": 0}
    assert held.decision.variants.usd_per_hour <= 6.0 and held.decision.reason == "BudgetLimited"
    assert held.decision.condition("BudgetLimited").status == "True"
    warning = [e for e in held.events if e.reason == "BudgetLimited"]
    assert warning and "the mix held would cost more" in warning[0].message
    # Still blind: the mix stays as cut and still says so, without telling it again.
    again = tick(capped, blind, held.state, NOW + 30)
    assert again.replicas == held.replicas and again.decision.variants.budget_limited and not again.events
