"""`ebbtide simulate` with a spec that lists variants: which policies that means, and their runs.

- `ebbtide-variants`: the operator's tick choosing the mix over all the spec's variants;
- `ebbtide-<variant>`: the spec restricted to that one variant (a fleet of one GPU type).
Without --policies, a spec with variants runs these (the others size one fleet of one GPU type
and price, which such a spec does not have). Each run's dollars are also given per variant.
"""

from __future__ import annotations

from dataclasses import replace

from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.api.variants import Budget
from ebbtide.policy.capacity_types import ON_DEMAND, SPOT
from ebbtide.sim import report
from ebbtide.sim.ebbtide_policy import EbbtidePolicy
from ebbtide.sim.fleet import SimSettings
from ebbtide.sim.replicas import ASLEEP
from ebbtide.sim.traces import Trace
from ebbtide.sim.variant_fleet import (
    VARIANTS_POLICY,
    VariantsPolicy,
    out_of_reach,
    refused,
    sim_variant,
    simulate_variants,
    single_policy,
)

PREFIX = "ebbtide-"
BUDGET_POLICY = f"{VARIANTS_POLICY}-budget"


def variant_policy_names(spec: InferenceServiceSpec) -> list[str]:
    return [VARIANTS_POLICY, *(f"{PREFIX}{v.name}" for v in spec.variants)]


def split_policies(names: list[str], spec: InferenceServiceSpec, defaulted: bool) -> tuple[list[str], list[str]]:
    """(the variant policies asked for, the others); ValueError, in one line, for a variant
    policy the spec cannot run or another policy a spec with variants cannot."""
    mine = set(variant_policy_names(spec)) if spec.variants else {VARIANTS_POLICY}
    if spec.has_variants and defaulted:
        return variant_policy_names(spec), []
    asked = [n for n in names if n in mine]
    others = [n for n in names if n not in mine]
    if VARIANTS_POLICY in asked and not spec.has_variants:
        raise ValueError(f"{VARIANTS_POLICY} needs a spec with at least two variants (spec.variants)")
    if spec.has_variants and others:
        raise ValueError(f"the spec lists variants: its policies are {', '.join(variant_policy_names(spec))}, "
                         f"not {', '.join(others)}")
    return asked, others


def run_variant_policies(names: list[str], spec: InferenceServiceSpec, trace: Trace, settings: SimSettings,
                         budget: float | None = None) -> tuple[list[report.PolicyResult], dict[str, dict]]:
    """Each policy's result (its cost: what its variants cost) and its dollars per variant; with
    `budget`, also ebbtide-variants under that hourly cap (spec.budget.maxUsdPerHour)."""
    results, by_variant = [], {}
    ramps = report.ramp_hours(trace)
    ttft_target = spec.scaling.targets.ttft.target_seconds if spec.scaling.targets.ttft else None
    if budget is not None and VARIANTS_POLICY in names:
        names = [*names, BUDGET_POLICY]
    for name in names:
        kinds, policy = run_setup(name, spec, budget)
        # Every run starts as an operator that has served this service before: its limits are
        # those its own replicas taught it in a first replay of the trace, not reported.
        simulate_variants(trace, policy, kinds, settings)
        kinds, policy = run_setup(name, spec, budget, learned=policy)
        run, usd = simulate_variants(trace, policy, kinds, settings)
        if name not in (VARIANTS_POLICY, BUDGET_POLICY):
            usd = {name.removeprefix(PREFIX): usd[ON_DEMAND]}
        result = report.summarize(run, spec, ramps)
        cost = sum(usd.values())
        hours = {kind if kind != ON_DEMAND else name.removeprefix(PREFIX): s / 3600.0
                 for kind, s in run.gpu_seconds.items() if s}
        spot = sum(h for kind, h in hours.items() if _capacity_type(spec, kind) == "spot")
        by_type = {ON_DEMAND: round(sum(hours.values()) - spot, 3), SPOT: round(spot, 3), ASLEEP: 0.0}
        results.append(replace(result, cost_usd=round(cost, 2), gpu_hours=round(sum(hours.values()), 3),
                               gpu_hours_by_type=by_type,
                               usd_per_million_tokens=round(cost / run.tokens_served * 1e6, 4)
                               if run.tokens_served else float("nan")))
        by_variant[name] = {"usd": {k: round(v, 2) for k, v in usd.items()},
                            "usd_per_hour_max": round(max_usd_per_hour(policy), 2),
                            "gpu_hours": {k: round(h, 3) for k, h in hours.items()},
                            "refused_requests": refused(trace, kinds),
                            "out_of_reach_requests": out_of_reach(trace, kinds, ttft_target)}
    return results, by_variant


def run_setup(name: str, spec: InferenceServiceSpec, budget: float | None,
              learned: VariantsPolicy | EbbtidePolicy | None = None) -> tuple[dict, VariantsPolicy | EbbtidePolicy]:
    """The Deployments and the policy of run `name`; with `learned`, a policy that ran before,
    starting from the limits it learned."""
    if name in (VARIANTS_POLICY, BUDGET_POLICY):
        capped = spec if name == VARIANTS_POLICY else spec.model_copy(update={"budget": Budget(
            max_usd_per_hour=budget, max_usd_per_month=None)})
        limits = learned.limits() if isinstance(learned, VariantsPolicy) else {}
        return ({v.name: sim_variant(spec, v) for v in spec.variants},
                VariantsPolicy(capped, name=name, learned=limits))
    variant = next(v for v in spec.variants if f"{PREFIX}{v.name}" == name)
    limit = learned.capacity if isinstance(learned, EbbtidePolicy) else None
    return {ON_DEMAND: sim_variant(spec, variant)}, single_policy(spec, variant, limit)


def describe(by_variant: dict[str, dict]) -> list[str]:
    """One line per run: dollars per variant, and the requests no variant of it could hold."""
    lines = []
    for name, run in by_variant.items():
        spent = ", ".join(f"{k} {v:,.2f}" for k, v in run["usd"].items())
        refused_note = (f"; {run['refused_requests']:,} requests longer than any of its variants holds, refused"
                        if run["refused_requests"] else "")
        if run.get("out_of_reach_requests"):
            refused_note += (f"; {run['out_of_reach_requests']:,} requests whose prompt no variant of it prefills "
                             "within the TTFT target even alone (misses whatever the scaling)")
        peak = f"; the mix projected at most {run['usd_per_hour_max']:,.2f} USD/h" if run["usd_per_hour_max"] else ""
        lines.append(f"{name}: USD by variant {spent}{peak}{refused_note}")
    return lines


def max_usd_per_hour(policy: object) -> float:
    """The highest USD/h a mix projected during the replay (0 for a single-variant run)."""
    return max((usd for _, _, usd in getattr(policy, "turns", [])), default=0.0)


def _capacity_type(spec: InferenceServiceSpec, name: str) -> str:
    return next((v.capacity_type for v in spec.variants if v.name == name), ON_DEMAND)
