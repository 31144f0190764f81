"""One tick for one service: everything the operator and the simulator decide, as values.

    tick(spec, seen, state, now) -> Turn

The shells observe (the operator reads the API server and Prometheus, the simulator its fleet
model) and fill in an Observation; the tick decides; they carry out the Turn (Deployment
counts, /sleep and /wake_up, or the simulated fleet) and report it. In order: the lifecycle
plan (schedules, pre-warming, the reactive core), the activation gate, off-peak consolidation,
the spot split, one warm pool per Deployment, cost accrual and idle tracking. Pure: no I/O,
no clock; what the next tick needs goes out in Turn.state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.policy.activation import activate
from ebbtide.policy.capacity_types import ON_DEMAND, SPOT
from ebbtide.policy.cost import Ledger, accrue, accrue_rate, usd_per_hour, usd_per_million_tokens
from ebbtide.policy.current_size import fleet_state
from ebbtide.policy.decision import ConditionReport, Decision, Entries, Memory
from ebbtide.policy.idle import track_idle
from ebbtide.policy.lifecycle import plan, window_off_peak
from ebbtide.policy.observation import Deployments, FleetState, Observation, Pod
from ebbtide.policy.profile import Profile
from ebbtide.policy.schedules import consolidated
from ebbtide.policy.spot import PodView, Split, SpotPods, classify, shares, split
from ebbtide.policy.startup import StartupEstimate, lead_time_samples, observe_startups
from ebbtide.policy.telling import SPOT_AVAILABLE, Said, decision_events, phase, spot_condition
from ebbtide.policy.variant_tick import MixMemory, hourly_budget, mix_decision, plan_mix, variant_rate
from ebbtide.policy.warm_pool import PoolPlan, Replica, plan_pool


@dataclass(frozen=True)
class TickState:
    """What one service's ticks hand on to the next. The operator keeps it in the cluster (see
    control/state.py: the profile in its ConfigMap, idle time and advice in memory only)."""

    memory: Memory
    ledger: Ledger
    # The awake size last asked for (Active mode, once applied): with spot or sleep the
    # Deployments hold more than that (spot over-provisioning, on-demand cover, sleepers).
    target: int | None = None
    spot_cover: Entries = ()  # the on-demand cover's give-back history (policy/spot.py)
    covering: int = 0  # on-demand replicas covering spot at the last applied split (for the Events)
    startup: StartupEstimate = StartupEstimate()  # the lead time for floors and ramps started early
    # Advisory mode never changes the Deployment, so the same advice would repeat every tick;
    # it is told when it changes.
    last_advice: int | None = None
    idle: Mapping[str, float] = field(default_factory=dict)  # pod -> idle since (warm pool)
    profile: Profile | None = None  # the learned demand profile (pre-warming)
    mix: MixMemory | None = None  # with spec.variants: each variant's learned limit, the mix asked for

    @classmethod
    def start(cls, now: float, capacity: float | None = None, startup: StartupEstimate | None = None,
              profile: Profile | None = None, target: int | None = None,
              known: Memory | None = None) -> TickState:
        """A service's first tick (or one with its history lost): what it knows is passed in
        (`known`: an earlier run's memory, of which what does not depend on its clock is kept)."""
        memory = Memory(since=now, capacity=capacity)
        if known is not None:
            memory = Memory(since=now, capacity=capacity, variability=known.variability.carried(),
                            performance=known.performance)
        return cls(memory=memory, ledger=Ledger.start(now),
                   startup=startup or StartupEstimate(), profile=profile, target=target)


@dataclass(frozen=True, slots=True)
class Spend:
    usd_per_hour: float  # what the GPUs the service holds cost now
    usd_per_million_tokens: float | None  # the same over the token rate of the metrics window


@dataclass(frozen=True)
class Turn:
    """Everything one tick decided for one service."""

    decision: Decision  # the awake size, why, and the core's conditions
    fleet: FleetState  # the replicas as the core counted them
    placed: Split  # the awake size by capacity type
    spot_pods: SpotPods
    replicas: Mapping[str, int]  # capacity type -> its Deployment's spec.replicas (sleepers included)
    pools: Mapping[str, PoolPlan]  # capacity type -> pods to wake, drain, sleep, delete, and their ranking
    conditions: tuple[ConditionReport, ...]
    dropped_conditions: tuple[str, ...]  # condition types that no longer apply
    phase: str
    spend: Spend
    news: bool  # a size change to tell (or new advice)
    events: tuple[Said, ...]
    state: TickState  # for the next tick, once the replicas are set
    kept: TickState  # for the next tick if they could not be set

    def unapplied(self) -> Turn:
        """This turn when the replicas could not be set: nothing to tell but the failure (the
        shell's), and the size and cover last applied still stand."""
        return replace(self, news=False, events=(), state=self.kept)


def tick(spec: InferenceServiceSpec, seen: Observation, state: TickState, now: float) -> Turn:
    if spec.has_variants:
        return variant_turn(spec, seen, state, now)
    fleet = fleet_state(spec, seen.pods, seen.deployments, state.target)
    startup = observe_startups(state.startup, lead_time_samples(seen.startups, spec), now=now)
    known = known_profile(spec, state)
    profile = known if known is not None else seen.stored_profile if spec.warmup.predictive.enabled else None
    decision = plan(spec, seen.signals, fleet, state.memory, now, startup_seconds=startup.seconds, profile=profile)
    decision = activate(decision, spec, fleet, seen.activation if wants_activation(spec, seen.pods) else None, now)
    spot, pooled = spec.placement.spot.enabled, _pooled(spec, seen.pods)
    # Off-peak, the fleet is also placed and pooled as consolidation says (more spot, sleep sooner).
    acting = consolidated(spec) if decision.off_peak and (spot or pooled) else spec
    spot_pods = classify(_spot_views(seen.pods), seen.reclaimed_nodes, spec.placement.spot.pending_timeout_seconds,
                         now)
    placed = split(decision.desired, acting.placement.spot, spot_pods, state.spot_cover, now,
                   spec.scaling.behavior.scale_down.stabilization_seconds)
    # Planned pod by pod when removals drain first, too: the pool plan is what drains them.
    planned = pooled or spec.scaling.behavior.scale_down.drain_seconds > 0
    idle, pools = _pools(acting, seen, placed, state.idle, now, decision.desired) if planned else ({}, {})
    replicas = {ON_DEMAND: placed.on_demand, SPOT: placed.spot}
    replicas.update({capacity: pool.replicas for capacity, pool in pools.items()})

    ledger = accrue(state.ledger, now, seen.held, spec.engine.gpus, spec.pricing, spec.sleep)
    per_hour = usd_per_hour(ledger.held, spec.engine.gpus, spec.pricing, spec.sleep)
    active = spec.mode == "Active"
    news = decision.changed and (active or decision.desired != state.last_advice)
    memory, advice = decision.memory, decision.desired if decision.changed else None
    profile = decision.profile if profile is not None else state.profile if spec.warmup.predictive.enabled else None
    # Built whole rather than with replace(): the simulator runs this 40 000 times a week.
    kept = TickState(memory=memory, ledger=ledger, target=state.target, spot_cover=state.spot_cover,
                     covering=state.covering, startup=startup, last_advice=advice, idle=idle, profile=profile)
    applied = TickState(memory=memory, ledger=ledger, target=decision.desired, spot_cover=placed.cover,
                        covering=placed.covering, startup=startup, last_advice=advice, idle=idle,
                        profile=profile) if active else kept
    return Turn(decision=decision, fleet=fleet, placed=placed, spot_pods=spot_pods, replicas=replicas, pools=pools,
                conditions=decision.conditions + ((spot_condition(spot_pods, placed),) if spot else ()),
                dropped_conditions=() if spot else (SPOT_AVAILABLE,), phase=phase(fleet, decision),
                spend=Spend(per_hour, usd_per_million_tokens(per_hour, seen.signals.tokens_per_second)),
                news=news, events=decision_events(decision, placed, active, spot, news, state.covering),
                state=applied, kept=kept)


def variant_turn(spec: InferenceServiceSpec, seen: Observation, state: TickState, now: float) -> Turn:
    """A tick with several variants: one Deployment each, `replicas` keyed by variant name."""
    startup = observe_startups(state.startup, lead_time_samples(seen.startups, spec), now=now)
    before = state.mix.targets if state.mix is not None else None
    current = sum(before.values()) if before is not None else sum(1 for p in seen.pods if p.state != "asleep")
    lead = startup.seconds if startup.seconds is not None else spec.warmup.default_startup_seconds
    # Charged first, so the monthly cap's share is what is left after everything until now.
    rate = variant_rate(spec, seen.pods)
    ledger = accrue_rate(state.ledger, now, rate)
    budget = hourly_budget(spec, ledger.usd_month, now)
    plan, mix, why = plan_mix(spec, seen, state.mix, now, lead, budget)
    decision = mix_decision(spec, plan, why, current, seen.signals.source, state.memory)
    fleet = fleet_state(spec, seen.pods, Deployments(current), current)
    active = spec.mode == "Active"
    changed = before is None or dict(before) != dict(plan.targets)
    news = changed and (active or plan.total != state.last_advice)
    events: tuple[Said, ...] = ()
    if news:
        kind = "VariantMix" if active else "AdvisoryVariantMix"
        events += (Said("Normal", kind, decision.message if active else f"advisory, not applied: {decision.message}"),)
    if plan.budget_limited and not (state.mix is not None and state.mix.budget_limited):
        events += (Said("Warning", "BudgetLimited", plan.reasons[-1]),)
    per_hour = rate.usd
    kept_mix = replace(mix, targets=before)
    kept = replace(state, ledger=ledger, startup=startup, mix=kept_mix,
                   last_advice=plan.total if news else state.last_advice)
    applied = replace(state, ledger=ledger, startup=startup, mix=mix, target=plan.total) if active else kept
    return Turn(decision=decision, fleet=fleet, placed=Split(plan.total, 0, (), plan.message), spot_pods=SpotPods(),
                replicas=dict(plan.targets), pools={}, conditions=decision.conditions,
                dropped_conditions=(SPOT_AVAILABLE,), phase=phase(fleet, decision),
                spend=Spend(per_hour, usd_per_million_tokens(per_hour, seen.signals.tokens_per_second)),
                news=news, events=events, state=applied, kept=kept)


def known_profile(spec: InferenceServiceSpec, state: TickState) -> Profile | None:
    """The demand profile the state holds, when pre-warming is on and it is kept in the spec's
    zone; otherwise the stored one is to be read (the operator reads its ConfigMap then)."""
    predictive = spec.warmup.predictive
    if predictive.enabled and state.profile is not None and state.profile.timezone == predictive.timezone:
        return state.profile
    return None


def wants_activation(spec: InferenceServiceSpec, pods: Iterable[Pod]) -> bool:
    """Whether the activation query counts this tick: it is configured, and no replica is awake
    in the Service or starting (then no engine metric can show demand)."""
    return spec.scaling.activation is not None and not any(
        p.state == "starting" or (p.state == "awake" and p.serving) for p in pods)


def warm_start(spec: InferenceServiceSpec, awake: int, now: float) -> dict[str, int]:
    """The Deployments of a service that has run at `awake` replicas for a while: its spot
    share ready, nothing covering (placed as consolidation says in an off-peak window)."""
    if not spec.placement.spot.enabled:
        return {ON_DEMAND: awake, SPOT: 0}
    acting = consolidated(spec) if window_off_peak(spec, now) else spec
    share = shares(awake, acting.placement.spot)
    return {ON_DEMAND: share.base, SPOT: share.spot}


def _spot_views(pods: Iterable[Pod]) -> list[PodView]:
    """The spot pods as placement classifies them (a sleeper's pod is Ready)."""
    return [PodView(p.name, ready=p.ready, phase=p.phase, created_at=p.created, node=p.node)
            for p in pods if p.capacity == SPOT]


def _pooled(spec: InferenceServiceSpec, pods: Iterable[Pod]) -> bool:
    """Whether the warm pool plans the pods: with sleep mode on, or while sleepers or draining
    replicas are left from when it was (they are woken or released)."""
    return spec.sleep.enabled or any(p.state == "asleep" or (p.state == "awake" and not p.serving) for p in pods)


def _pools(spec: InferenceServiceSpec, seen: Observation, placed: Split, idle: Mapping[str, float],
           now: float, awake: int) -> tuple[dict[str, float], dict[str, PoolPlan]]:
    """Idle times and warm pool plans by capacity type."""
    idle = track_idle(idle, seen.idle)
    targets = {ON_DEMAND: placed.on_demand, SPOT: placed.spot} if spec.placement.spot.enabled else {
        ON_DEMAND: placed.on_demand}
    sound = [p for p in seen.pods if p.state == "awake" and p.serving and p.node not in seen.reclaimed_nodes]
    return idle, {capacity: plan_pool(target, [Replica(p.name, p.state, idle.get(p.name), p.asleep_since, p.capacity,
                                                       p.left_service_at, p.name in seen.drained,
                                                       p.node in seen.reclaimed_nodes)
                                               for p in seen.pods if p.capacity == capacity],
                                      spec.sleep, now, spec.replicas.allow_scale_to_zero,
                                      spec.scaling.behavior.scale_down.drain_seconds,
                                      serving_elsewhere=sum(p.capacity != capacity for p in sound), service_target=awake)
                  for capacity, target in targets.items()}
