"""The tick of a service with several variants (spec.variants): the demand in tokens/s, each
variant's capacity learned from its own replicas, the mix from policy/variants.py.

    variant_turn(spec, seen, state, now) -> Turn  (policy/tick.py calls it when spec.has_variants)

The pods of a variant are the Observation's pods whose `capacity` is the variant's name (its
Deployment); `seen.variant_signals` holds each variant's own signals (its pods, its tokens/s,
its latency quantiles where the shell has them), from which its limit is learned as the single
fleet's is (signal_rules.learn_capacity). The service's signals size the demand:
- the token rate over the throughput share (scaling.targets.throughput) is the capacity wanted;
- a queue on every replica, or a TTFT/TPOT quantile beyond its SLO, asks for the ready capacity
  times the breach ratio (at most doubling, once per metrics window, as the single fleet does);
- the highest demand of the scale-down stabilization window wins, so the mix shrinks slowly;
- nothing awake and requests waiting (activation, a queue) or replicas.min above zero: one
  replica of the cheapest suitable variant.
Not applied per variant in this version: schedules, predictive pre-warming and the sleep pool
(docs/variants.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.api.variants import Variant
from ebbtide.policy.behavior import prune, push_highest
from ebbtide.policy.cost import Rate, hours_left_in_month
from ebbtide.policy.decision import ConditionReport, Decision, Memory
from ebbtide.policy.observation import FleetState, Observation, Pod, Signals
from ebbtide.policy.signal_rules import LATENCY_MAX_STEP, aggregate, learn_capacity, saturated, slo_breached
from ebbtide.policy.variants import (
    ON_DEMAND,
    RESERVED,
    SPOT,
    Demand,
    MixPlan,
    VariantView,
    capacity_of,
    choose_mix,
    projected_usd_per_hour,
    within_budget,
)

BUDGET_LIMITED = "BudgetLimited"
VARIANT_MIX = "VariantMix"
# Tokens/s (prompt + generated) one replica of Llama-3.1-8B serves at its limit on each
# accelerator, for a chat mix (Azure's conversation hour: 1,155 prompt and 211 output tokens on
# average) within a 0.1 s TPOT: the simulator's presets (sim/capacity.py; a test keeps them
# equal). Only a seed: each variant's own replicas teach it their real limit.
SEED_TOKENS_PER_S: dict[str, float] = {"H100": 16_800.0, "A100-80G": 7_100.0, "L40S": 6_300.0, "L4": 800.0}
# An accelerator not listed: the lowest seed, so the first mix has too many replicas, not too few.
UNKNOWN_SEED = min(SEED_TOKENS_PER_S.values())
# Spot reclaims expected per replica-hour: the simulator's default market (0.05 events per hour,
# docs/simulator.md); counting the reclaims a variant actually meets is not done yet.
SPOT_RECLAIMS_PER_HOUR = 0.05


@dataclass(frozen=True, slots=True)
class VariantMemory:
    """What one variant's ticks hand on: its learned limit and when its nodes last ran out."""

    capacity: float | None = None  # tokens/s one replica serves at its limit, once learned
    breached_at: float | None = None
    last_ready: int | None = None
    ready_changed_at: float | None = None
    stuck_at: float | None = None  # last seen with replicas Pending past the pending timeout


@dataclass(frozen=True)
class MixMemory:
    since: float
    variants: Mapping[str, VariantMemory] = field(default_factory=dict)
    demand: tuple[tuple[float, float], ...] = ()  # (time, capacity wanted): the scale-down window's highest first
    targets: Mapping[str, int] | None = None  # the mix last asked for
    planned: float = 0.0  # its capacity at the limit
    budget_limited: bool = False  # the last mix was cut by the budget (told once, when it starts)

    def to_json(self) -> dict:
        """What the shell keeps in the cluster, so a restart keeps each variant's learned limit."""
        return {"since": self.since, "planned": self.planned, "budgetLimited": self.budget_limited,
                "demand": [list(e) for e in self.demand], "targets": None if self.targets is None else dict(self.targets),
                "variants": {name: {"capacityTokensPerSecond": m.capacity, "breachedAt": m.breached_at,
                                    "lastReady": m.last_ready, "readyChangedAt": m.ready_changed_at,
                                    "stuckAt": m.stuck_at} for name, m in self.variants.items()}}

    @classmethod
    def load(cls, data: object, now: float) -> MixMemory:
        """The inverse of to_json; anything unreadable is lost history: a fresh memory from `now`."""
        try:
            def number(value: object) -> float | None:
                return None if value is None else float(value)  # type: ignore[arg-type]
            variants = {str(name): VariantMemory(number(m["capacityTokensPerSecond"]), number(m["breachedAt"]),
                                                 None if m["lastReady"] is None else int(m["lastReady"]),
                                                 number(m["readyChangedAt"]), number(m["stuckAt"]))
                        for name, m in data["variants"].items()}  # type: ignore[index]
            targets = data["targets"]  # type: ignore[index]
            return cls(since=float(data["since"]), variants=variants,  # type: ignore[index]
                       demand=tuple((float(t), float(d)) for t, d in data["demand"]),  # type: ignore[index]
                       targets=None if targets is None else {str(k): int(v) for k, v in targets.items()},
                       planned=float(data["planned"]), budget_limited=bool(data["budgetLimited"]))  # type: ignore[index]
        except (KeyError, TypeError, ValueError, AttributeError):
            return cls(since=now)


def seed_capacity(accelerator: str) -> float:
    wanted = accelerator.upper().replace(" ", "-").replace("80GB", "80G")
    return next((v for k, v in SEED_TOKENS_PER_S.items() if k.upper() == wanted), UNKNOWN_SEED)


def int_flag(args: list[str], flag: str) -> int | None:
    """An integer flag as `vllm serve` reads it (the last one wins), or None."""
    found = None
    for i, arg in enumerate(args):
        if arg.startswith(f"{flag}="):
            found = arg.split("=", 1)[1]
        elif arg == flag and i + 1 < len(args):
            found = args[i + 1]
    try:
        return int(found) if found is not None else None
    except ValueError:
        return None


def max_model_len(args: list[str]) -> int | None:
    return int_flag(args, "--max-model-len")


def variant_flag(spec: InferenceServiceSpec, variant: Variant, flag: str) -> int | None:
    """The flag the variant's engine runs with: its own engineArgs, else the service's."""
    own = int_flag(variant.engine_args, flag)
    return own if own is not None else int_flag(spec.engine.args, flag)


def max_context(spec: InferenceServiceSpec, variant: Variant) -> int | None:
    return variant_flag(spec, variant, "--max-model-len")


def observe_variant(spec: InferenceServiceSpec, variant: Variant, pods: list[Pod], signals: Signals | None,
                    memory: VariantMemory, since: float, now: float, startup_seconds: float) -> tuple[VariantView,
                                                                                                     VariantMemory]:
    """One variant's view for the mix, and its memory for the next tick."""
    behavior = spec.scaling.behavior
    timeout = spec.placement.spot.pending_timeout_seconds
    ready = sum(1 for p in pods if p.state == "awake" and p.serving)
    unschedulable = sum(1 for p in pods if p.node is None and p.phase == "Pending" and now - p.created >= timeout)
    starting = sum(1 for p in pods if p.state == "starting") - unschedulable
    stuck_at = now if unschedulable else memory.stuck_at
    # Held for one scale-down window: asking again at once would only meet the same full nodes.
    stuck = stuck_at is not None and now - stuck_at < behavior.scale_down.stabilization_seconds
    changed = memory.ready_changed_at
    if memory.last_ready is not None and ready != memory.last_ready:
        changed = now
    steady = changed is None or now - changed >= behavior.metrics_window_seconds
    capacity, breached_at = memory.capacity, memory.breached_at
    if signals is not None:
        fleet = FleetState(current=ready + starting, ready=ready, starting=starting)
        learned = Memory(since=since, capacity=capacity, breached_at=breached_at)
        capacity, breached_at, _ = learn_capacity(spec, signals, fleet,
                                                  aggregate(signals, now - behavior.stale_after_seconds), learned, now,
                                                  steady)
    view = VariantView(
        name=variant.name, capacity_type=variant.capacity_type, usd_per_replica_hour=variant.usd_per_replica_hour,
        capacity_tokens_per_s=capacity if capacity is not None else seed_capacity(variant.accelerator),
        min=variant.replicas.min, max=variant.replicas.max, ready=ready, starting=max(0, starting),
        pending_unschedulable=unschedulable, stuck=stuck, learned=capacity is not None,
        max_context_tokens=max_context(spec, variant),
        reclaims_per_hour=SPOT_RECLAIMS_PER_HOUR if variant.capacity_type == SPOT else 0.0,
        startup_seconds=startup_seconds, accelerator=variant.accelerator)
    return view, VariantMemory(capacity=capacity, breached_at=breached_at, last_ready=ready,
                               ready_changed_at=changed, stuck_at=stuck_at if stuck else None)


def wanted_capacity(spec: InferenceServiceSpec, seen: Observation, views: list[VariantView], mix: MixMemory,
                    rose: bool, now: float) -> tuple[float | None, str]:
    """Tokens/s of capacity (at the limit) the service wants now, before stabilization, and
    why; None when the signals say nothing (the mix is then held)."""
    targets, behavior = spec.scaling.targets, spec.scaling.behavior
    signals = seen.signals
    tokens = signals.tokens_per_second
    awake = sum(v.ready + v.starting for v in views)
    load = aggregate(signals, now - behavior.stale_after_seconds)
    waiting_outside = (seen.activation or 0.0) > (spec.scaling.activation.threshold if spec.scaling.activation else 0.0)
    known = tokens is not None and math.isfinite(tokens) and tokens >= 0
    if awake == 0 and (waiting_outside or (load.waiting or 0) > 0 or spec.replicas.min > 0):
        rate = tokens / targets.throughput if known else 0.0
        return max(1e-6, rate), "nothing awake and demand waiting (or replicas.min > 0): the cheapest suitable mix"
    if not known:
        return None, f"no token rate ({signals.error or 'not observed'}): the mix is held"
    wanted, why = tokens / targets.throughput, (f"{tokens:.0f} tokens/s at {targets.throughput:.0%} of the "
                                                  f"limit = {tokens / targets.throughput:.0f} tokens/s of capacity")
    ratio = 1.0
    if saturated(load, targets.waiting_per_replica, behavior.tolerance) and load.queued == load.pods:
        ratio = max(ratio, (load.running + load.waiting) / max(load.running, 1.0))
    for slo, value in ((targets.ttft, signals.ttft_seconds), (targets.tpot, signals.tpot_seconds)):
        if slo_breached(slo, value, behavior.tolerance):
            ratio = max(ratio, value / slo.target_seconds)
    if ratio > 1.0:
        ready = sum(v.ready * v.capacity_tokens_per_s for v in views)
        stepped = mix.planned if rose else ready * min(ratio, LATENCY_MAX_STEP)
        if stepped > wanted:
            wanted, why = stepped, (f"targets breached (x{ratio:.2g}): {ready:.0f} tokens/s ready -> {stepped:.0f}"
                                    + (" (held: replicas became ready inside the metrics window)" if rose else ""))
    return wanted, why


def demand_classes(wanted: float, share: float, context_mix: tuple[tuple[int, float], ...]) -> list[Demand]:
    """The wanted capacity as tokens/s per context class (the shell's shares of tokens by the
    context their requests need); one class when it gives none."""
    tokens = wanted * share
    if not context_mix:
        return [Demand(tokens)]
    total = sum(s for _, s in context_mix) or 1.0
    return [Demand(tokens * s / total, context) for context, s in context_mix]


def plan_mix(spec: InferenceServiceSpec, seen: Observation, mix: MixMemory | None, now: float,
             startup_seconds: float, budget: float | None = None) -> tuple[MixPlan, MixMemory, str]:
    """The mix for this tick, the memory for the next, and the demand's reason; `budget` is the
    hourly cap in force (hourly_budget)."""
    mix = mix or MixMemory(since=now)
    views, memories = [], {}
    for variant in spec.variants:
        pods = [p for p in seen.pods if p.capacity == variant.name]
        view, memory = observe_variant(spec, variant, pods, seen.variant_signals.get(variant.name),
                                       mix.variants.get(variant.name, VariantMemory()), mix.since, now,
                                       startup_seconds)
        views.append(view)
        memories[variant.name] = memory
    window = spec.scaling.behavior.metrics_window_seconds
    # A latency quantile covers a window: while it still holds the minutes before a variant's
    # ready count changed, it describes another fleet, and stepping on it again would step twice.
    rose = any(m.ready_changed_at is not None and now - m.ready_changed_at < window for m in memories.values())
    wanted, why = wanted_capacity(spec, seen, views, mix, rose, now)
    stabilization = spec.scaling.behavior.scale_down.stabilization_seconds
    history = prune(mix.demand, now - stabilization)
    if wanted is None:
        held = dict(mix.targets) if mix.targets is not None else {v.name: v.ready + v.starting for v in views}
        # A held mix still keeps each variant's floor (a new service's first tick may see no pods yet).
        targets = {v.name: min(max(held.get(v.name, 0), v.min), v.ceiling) for v in views}
        # Held or not, the cap is hard: a budget lowered meanwhile trims the held mix (dearest per
        # token first, its capacity moved to cheaper variants where the cap leaves room).
        trimmed = within_budget(views, targets, budget, capacity_of(views, targets), "the mix held")
        # Still the mix a budget cut, if the last one was: held, it says so until the signals return.
        limited = trimmed is not None or (mix.budget_limited and budget is not None)
        plan = MixPlan(targets=targets, usd_per_hour=projected_usd_per_hour(views, targets),
                       required_tokens_per_s=mix.planned, planned_tokens_per_s=capacity_of(views, targets),
                       budget_limited=limited, reasons=(trimmed,) if trimmed else (), budget_usd_per_hour=budget)
        return plan, MixMemory(mix.since, memories, history, targets, plan.planned_tokens_per_s, limited), why
    history = push_highest(history, now, wanted)  # type: ignore[arg-type]  (floats, same rule)
    kept_demand = history[0][1]
    if kept_demand > wanted:
        why += f"; the scale-down window keeps {kept_demand:.0f} tokens/s"
    share = spec.scaling.targets.throughput
    plan = choose_mix(demand_classes(kept_demand, share, seen.context_mix), views, share, budget, keep=mix.targets)
    return plan, MixMemory(mix.since, memories, history, plan.targets, plan.planned_tokens_per_s,
                           plan.budget_limited), why


def hourly_budget(spec: InferenceServiceSpec, spent_this_month: float | None = None,
                  now: float | None = None) -> float | None:
    """The hourly cap in force: maxUsdPerHour, or the monthly cap's share, whichever is lower.
    The monthly share is what is left of it (with the spend so far this calendar month, UTC)
    over the hours left in the month; without the spend, the cap over a 30-day month."""
    budget = spec.budget
    if budget is None:
        return None
    monthly = math.inf
    if budget.max_usd_per_month is not None:
        if spent_this_month is not None and now is not None:
            left = max(0.0, budget.max_usd_per_month - spent_this_month)
            monthly = left / max(hours_left_in_month(now), 1.0 / 60)
        else:
            monthly = budget.max_usd_per_month / (30 * 24)
    return min(budget.max_usd_per_hour, monthly)



def mix_decision(spec: InferenceServiceSpec, plan: MixPlan, why: str, current: int, source: str,
                 memory: Memory) -> Decision:
    """The mix as the Decision the shells report (desired: the replicas over all variants)."""
    cap = plan.budget_usd_per_hour
    conditions = (ConditionReport(BUDGET_LIMITED, "True" if plan.budget_limited else "False",
                                  BUDGET_LIMITED if plan.budget_limited else "WithinBudget",
                                  f"projected {plan.usd_per_hour:.2f} USD/h" + (f" of {cap:.2f}" if cap is not None else "")),)
    mix = ", ".join(f"{name} {n}" for name, n in plan.targets.items())
    message = f"{current} -> {plan.total} ({mix}; {plan.usd_per_hour:.2f} USD/h): {why}; {plan.message}"
    return Decision(desired=plan.total, current=current, reason=BUDGET_LIMITED if plan.budget_limited else VARIANT_MIX,
                    message=message, signals={"requiredTokensPerSecond": plan.required_tokens_per_s,
                                              "plannedTokensPerSecond": plan.planned_tokens_per_s,
                                              "projectedUsdPerHour": plan.usd_per_hour},
                    source=source, conditions=conditions, memory=memory, variants=plan)


def billed_replicas(variant: Variant, on_a_node: int) -> int:
    """The replicas of a variant charged now: a reserved variant all of them (paid whether they
    run or not), another those of its pods that hold a node."""
    return variant.replicas.max if variant.capacity_type == RESERVED else on_a_node


def variant_rate(spec: InferenceServiceSpec, pods: tuple[Pod, ...]) -> Rate:
    """What the variants' replicas cost now, per hour: GPUs by capacity type and dollars, each
    variant at its own price and GPUs per replica (the cost ledger charges the next interval at it)."""
    gpus = {RESERVED: 0.0, ON_DEMAND: 0.0, SPOT: 0.0}
    usd = 0.0
    for v in spec.variants:
        n = billed_replicas(v, sum(1 for p in pods if p.capacity == v.name and p.node is not None))
        gpus[v.capacity_type] += n * v.gpus_per_replica
        usd += n * v.usd_per_replica_hour
    return Rate(on_demand=gpus[ON_DEMAND], spot=gpus[SPOT], reserved=gpus[RESERVED], usd=usd)
