"""Replay a trace over a fleet of several accelerator variants (issue 19), request by request.

The same steps as sim/fleet.py's `simulate` (scrape, tick, carry out, serve), with one
Deployment per variant: a replica is an engine of its variant's capacity model, and the gateway
routes by size (sim/variant_serving.py). Two kinds of policy run here:
- `ebbtide-variants`: the operator's tick on the spec with all its variants (policy/variant_tick.py);
- `ebbtide-<variant>`: the spec restricted to that one variant, which Ebbtide runs as a single
  fleet (the classic tick), on that variant's GPUs, at its price, starting from its seed limit.

Costs: a replica is charged from creation to the end of its drain at its variant's price;
reserved variants are charged for all their replicas (replicas.max) for the whole replay, run
or not. Requests that no variant of the run can hold (longer than every max_model_len) are
refused, as vLLM refuses them, and count as SLO misses. Spot variants meet the spot market of
sim/spot_market.py (the CLI's --spot-* options): reclaims, and outages in which their new pods
stay Pending, which the mix sees as a variant whose nodes ran out. Not replayed here: the warm
pool (docs/variants.md).
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.api.variants import Variant
from ebbtide.policy.capacity_types import ON_DEMAND
from ebbtide.policy.observation import Deployments, Observation, Signals
from ebbtide.policy.tick import TickState, tick
from ebbtide.policy.variant_tick import (
    MixMemory,
    VariantMemory,
    hourly_budget,
    max_context,
    observe_variant,
    seed_capacity,
    variant_flag,
)
from ebbtide.policy.variants import choose_mix
from ebbtide.sim.capacity import ACCELERATOR_PRESETS, CapacityModel
from ebbtide.sim.ebbtide_policy import EbbtidePolicy
from ebbtide.sim.fleet import (
    PolicyRun,
    SimSettings,
    _carry_out,
    _idle_since,
    _resize,
    _spot_events,
    _timeline,
)
from ebbtide.sim.policy import FleetView
from ebbtide.sim.replicas import Fleet
from ebbtide.sim.spot_market import SpotClock, SpotStats
from ebbtide.sim.traces import Trace
from ebbtide.sim.variant_serving import VariantServing, context_mix

VARIANTS_POLICY = "ebbtide-variants"


@dataclass(frozen=True)
class SimVariant:
    """One Deployment of the replay: its engines' capacity model and what a replica costs."""

    model: CapacityModel
    usd_per_replica_hour: float
    committed: int = 0  # reserved replicas, paid for the whole replay
    spot: bool = False  # meets the spot market: reclaims, and outages that leave new pods Pending


def sim_variant(spec: InferenceServiceSpec, variant: Variant) -> SimVariant:
    """The variant as the simulator runs it: its accelerator's preset (an unknown one runs as the
    slowest, the L4), its max_model_len from the engine arguments, capped by the preset's, and
    their --max-num-batched-tokens if they set one (else the preset's, vLLM's default there)."""
    model = ACCELERATOR_PRESETS.get(variant.accelerator, ACCELERATOR_PRESETS["L4"])
    limit = max_context(spec, variant)
    if limit:
        model = model.with_overrides(max_model_len=min(limit, model.max_model_len))
    budget = variant_flag(spec, variant, "--max-num-batched-tokens")
    if budget and budget > model.max_num_seqs:
        model = model.with_overrides(max_num_batched_tokens=budget)
    committed = variant.replicas.max if variant.capacity_type == "reserved" else 0
    return SimVariant(model, variant.usd_per_replica_hour, committed, variant.capacity_type == "spot")


def restricted(spec: InferenceServiceSpec, variant: Variant) -> InferenceServiceSpec:
    """The spec with only `variant`: its bounds and its price, as a single fleet."""
    replicas = spec.replicas.model_copy(update={"min": variant.replicas.min, "max": max(1, variant.replicas.max)})
    pricing = spec.pricing.model_copy(update={"on_demand_per_gpu_hour": variant.price_per_gpu_hour})
    engine = spec.engine.model_copy(update={"args": [*spec.engine.args, *variant.engine_args],
                                            "gpus": variant.gpus_per_replica})
    return spec.model_copy(update={"variants": [variant], "replicas": replicas, "pricing": pricing, "engine": engine})


@dataclass
class VariantsPolicy:
    """Ebbtide's tick over all the spec's variants, shown each variant's own signals."""

    spec: InferenceServiceSpec
    name: str = VARIANTS_POLICY
    state: TickState | None = None
    turns: list = field(default_factory=list)  # (time, targets, projected USD/h) whenever the mix changed
    learned: Mapping[str, float] = field(default_factory=dict)  # each variant's limit from an earlier replay
    size_routing: bool = True  # the gateway follows the plan's size routes (else it routes by fit only)
    routes: tuple = ()  # the routes of the last plan that gave any

    def __post_init__(self) -> None:
        self.interval_s = float(self.spec.scaling.behavior.interval_seconds)

    def start(self, first_tokens_per_s: float, now: float) -> dict[str, int]:
        """Warm, as the other policies start: the mix for the opening load, from each variant's
        limit learned in an earlier replay (`learned`; the seeds without one), as if it had been
        running at it (its Deployments and its memory say so)."""
        spec = self.spec
        memories = {v.name: VariantMemory(capacity=self.learned.get(v.name)) for v in spec.variants}
        views = [observe_variant(spec, v, [], None, memories[v.name], now, now,
                                 spec.warmup.default_startup_seconds)[0] for v in spec.variants]
        # Nothing spent yet this month, as the tick's new ledger says.
        plan = choose_mix(first_tokens_per_s, views, spec.scaling.targets.throughput, hourly_budget(spec, 0.0, now))
        mix = MixMemory(since=now, variants=memories, demand=((now, plan.required_tokens_per_s),),
                        targets=dict(plan.targets), planned=plan.planned_tokens_per_s)
        self.state = replace(TickState.start(now, target=plan.total), mix=mix)
        return dict(plan.targets)

    def limits(self) -> dict[str, float]:
        """Each variant's limit as learned so far (tokens/s a replica serves), for a later replay."""
        mix = self.state.mix if self.state is not None else None
        return {name: m.capacity for name, m in (mix.variants.items() if mix else ()) if m.capacity is not None}

    def observation(self, view: FleetView, variant_signals: Mapping[str, Signals], mix: tuple) -> Observation:
        return Observation(signals=view.signals, pods=view.pods, deployments=view.deployments,
                           startups=view.startups, variant_signals=variant_signals, context_mix=mix,
                           activation=view.pending)

    def orders(self, view: FleetView, variant_signals: Mapping[str, Signals], mix: tuple) -> dict[str, int]:
        turn = tick(self.spec, self.observation(view, variant_signals, mix), self.state, view.now)
        if self.size_routing and turn.decision.variants is not None and turn.decision.variants.routes:
            self.routes = turn.decision.variants.routes  # a held mix gives none: the last ones stand
        if not self.turns or self.turns[-1][1] != dict(turn.replicas):
            self.turns.append((view.now, dict(turn.replicas), turn.decision.variants.usd_per_hour))
        self.state = turn.state
        return dict(turn.replicas)


def single_policy(spec: InferenceServiceSpec, variant: Variant, learned: float | None = None) -> EbbtidePolicy:
    """`ebbtide-<variant>`: the classic tick on the restricted spec, starting from the limit
    learned in an earlier replay, else from the seed (as ebbtide-variants does), not from nothing."""
    return EbbtidePolicy(restricted(spec, variant), name=f"ebbtide-{variant.name}",
                         learned_capacity=learned if learned is not None else seed_capacity(variant.accelerator))


def opening_tokens_per_s(trace: Trace, window_s: float) -> float:
    """The demand every run starts warm for: the highest one-minute token rate (prompt +
    generated) of the trace's first `window_s` seconds, which is what a running operator's
    scale-down window would hold if that load had been going on for a while."""
    tokens = trace.prompt_sum + trace.output_sum
    minutes = max(1, int(window_s // 60))
    return max(float(tokens[m * 60:(m + 1) * 60].sum()) / 60.0 for m in range(minutes))


def simulate_variants(trace: Trace, policy: VariantsPolicy | EbbtidePolicy, kinds: Mapping[str, SimVariant],
                      settings: SimSettings, serving_type: type[VariantServing] = VariantServing
                      ) -> tuple[PolicyRun, dict[str, float]]:
    """The run, and the dollars each Deployment cost (reserved ones committed in full);
    `serving_type` lets a diagnosis see each request (bench/variants_misses.py)."""
    if trace.arrivals is None:
        raise ValueError("variants are replayed request by request: give a request log, not a rate file")
    dt = 1.0
    steps = int(math.ceil(trace.duration_s / dt))
    end = steps * dt
    epoch = (trace.start_utc or datetime.datetime(2024, 1, 1)).replace(tzinfo=datetime.UTC).timestamp()
    widest = max(k.model.max_model_len for k in kinds.values())
    fits = trace.prompt_tokens + trace.output_tokens + 1 <= widest
    fleet = Fleet(1, settings.cold_start_s)
    serving = serving_type({kind: k.model for kind, k in kinds.items()}, lambda rid: fleet.get(rid).capacity_type,
                           trace.arrivals[fits], trace.prompt_tokens[fits], trace.output_tokens[fits], dt,
                           settings.seed)
    limits = [k.model.max_model_len for k in kinds.values()]
    opening = opening_tokens_per_s(trace, policy.spec.scaling.behavior.scale_down.stabilization_seconds)
    if isinstance(policy, VariantsPolicy):
        wanted = policy.start(opening, epoch)
    else:
        wanted = {ON_DEMAND: policy.start(_opening_size(policy, opening), epoch)[ON_DEMAND]}
    for kind, count in wanted.items():
        for _ in range(count):
            serving.add_replica(fleet.add(0.0, ready=True, kind=kind).rid, 0.0)
    spot_kinds = frozenset(kind for kind, k in kinds.items() if k.spot)
    market = SpotClock(settings.spot, end, settings.seed) if spot_kinds else None
    snapshot = Signals.missing("no scrape yet")
    per_variant: dict[str, Signals] = {}
    mix: tuple = ()
    next_scrape = next_tick = 0.0
    scale_actions = 0
    changes: list[tuple[int, ...]] = []
    n = 0
    while n < steps:
        t = n * dt
        if market is not None:
            _spot_events(market, fleet, serving, wanted, t, spot_kinds)
        for replica in fleet.promote(t):
            serving.add_replica(replica.rid, t)
        if t >= next_scrape:
            window = settings.metrics_window_s
            snapshot = serving.scrape(t, epoch, window, settings.ttft_quantile, settings.tpot_quantile)
            per_variant = serving.variant_signals(t, window, snapshot, settings.ttft_quantile,
                                                  settings.tpot_quantile)
            mix = context_mix(trace.arrivals, trace.prompt_tokens, trace.output_tokens, t, window, limits)
            next_scrape += settings.scrape_interval_s
        if t >= next_tick:
            deployments = Deployments(sum(wanted.values()))
            view = fleet.view(t, epoch, snapshot, serving.pending(), deployments, _idle_since(serving, t))
            if isinstance(policy, VariantsPolicy):
                asked = policy.orders(view, per_variant, mix)
                serving.routes = policy.routes
            else:  # one Deployment; its removals drain first, as the operator's pool plan says
                orders = policy.orders(view)
                plan = orders.pools.get(ON_DEMAND)
                if plan is not None:
                    mine = {r.name: r for r in fleet.replicas}
                    scale_actions += _carry_out(plan, mine, fleet, serving, t, 0.0, ON_DEMAND, True)
                asked = {ON_DEMAND: fleet.count(ON_DEMAND) if plan is not None else orders.replicas.get(ON_DEMAND, 0)}
            if asked != wanted and isinstance(policy, VariantsPolicy):
                scale_actions += 1
            wanted = asked
            obtainable = market is None or market.obtainable(t)
            for kind, count in wanted.items():
                _resize(fleet, serving, kind, count, t, obtainable, spot_kinds)
            next_tick += policy.interval_s
        spot_now = [r for r in fleet.replicas if r.capacity_type in spot_kinds]
        row = (len(fleet.replicas), fleet.ready, len(spot_now), sum(r.ready for r in spot_now), 0)
        if not changes or changes[-1][1:] != row:
            changes.append((n, *row))
        upcoming = min(next_scrape, next_tick, fleet.next_ready_at(), market.next_at(t) if market else math.inf)
        following = min(steps, max(n + 1, math.ceil(upcoming / dt - 1e-9)))
        for rid, when in serving.advance(n, following):
            fleet.drained(rid, when)
        n = following
    records = serving.finish(end)
    for arrival in trace.arrivals[~fits].tolist():  # refused: never served, a miss
        records.add_request(arrival, trace.duration_s, 0.0)
    seconds = fleet.finish(end)
    usd = {kind: k.committed * k.usd_per_replica_hour * end / 3600.0 if k.committed
           else seconds.get(kind, 0.0) / 3600.0 * k.usd_per_replica_hour for kind, k in kinds.items()}
    run = PolicyRun(name=policy.name, gpu_seconds=seconds, scale_actions=scale_actions, records=records,
                    tokens_served=serving.tokens_served, timeline=_timeline(trace, changes, dt, steps),
                    spot=market.stats if market is not None else SpotStats())
    return run, usd


def _opening_size(policy: EbbtidePolicy, tokens_per_s: float) -> int:
    """A single fleet's warm start: the opening load over the throughput share of its limit."""
    spec = policy.spec
    limit = policy.learned_capacity or seed_capacity(spec.variants[0].accelerator)
    wanted = math.ceil(tokens_per_s / spec.scaling.targets.throughput / limit)
    return max(1, spec.replicas.min, min(spec.replicas.max, wanted))


def refused(trace: Trace, kinds: Mapping[str, SimVariant]) -> int:
    widest = max(k.model.max_model_len for k in kinds.values())
    return int(np.sum(trace.prompt_tokens + trace.output_tokens + 1 > widest))


def out_of_reach(trace: Trace, kinds: Mapping[str, SimVariant], ttft_target_s: float | None) -> int:
    """Requests a variant of the run holds but none can serve within the TTFT target even alone
    on an idle replica (the prompt's prefill takes longer): no scaling meets them. They count as
    misses, as refused ones do, and are reported apart so the SLO can be read without them."""
    if ttft_target_s is None:
        return 0
    need = trace.prompt_tokens + trace.output_tokens + 1
    reachable = np.zeros(len(need), dtype=bool)
    for k in kinds.values():
        fastest = np.vectorize(k.model.prefill_seconds, otypes=[float])(trace.prompt_tokens)
        reachable |= (need <= k.model.max_model_len) & (fastest <= ttft_target_s)
    fits = need <= max(k.model.max_model_len for k in kinds.values())
    return int(np.sum(fits & ~reachable))
