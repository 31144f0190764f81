"""Ebbtide in the simulator: the operator's own tick (policy/tick.py), shown the simulated
fleet as the operator would observe it.

`learned_capacity` (tokens/s a replica serves at the service's limit), `profile` (the demand
profile) and `startup` (the measured startup time) start it as an operator that has run the
service before: all are kept in the cluster, so a restart keeps them; everything else starts
empty, as after a restart. Without a profile it starts an empty one (with warmup.predictive
enabled), which predicts nothing until it has seen a week. The startup time a floor or a
predicted ramp is started ahead by is measured on its own replicas, the spec's
warmup.defaultStartupSeconds until one is ready; `startup_seconds` fixes it instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.policy.capacity_types import SPOT
from ebbtide.policy.decision import Memory
from ebbtide.policy.observation import Observation
from ebbtide.policy.profile import Profile
from ebbtide.policy.startup import StartupEstimate
from ebbtide.policy.tick import TickState, Turn, tick, warm_start
from ebbtide.sim.policy import FleetView, Orders, SimulatedPolicy


@dataclass
class EbbtidePolicy(SimulatedPolicy):
    """Ebbtide on on-demand capacity: a spec that enables placement.spot is run with it off
    (EbbtideSpotPolicy runs it on)."""

    spec: InferenceServiceSpec
    name: str = "ebbtide"
    learned_capacity: float | None = None
    learned: Memory | None = None  # an earlier run's memory: its rises and costs, not its clock
    startup_seconds: float | None = None  # a fixed lead time; None: measured
    profile: Profile | None = None  # what it knows of the demand, updated as it learns
    startup: StartupEstimate = field(default_factory=StartupEstimate)  # likewise, the startup time

    def __post_init__(self) -> None:
        self.spot_enabled_here = not self.spec.placement.spot.enabled
        self.spec = self.placed(self.spec)
        self.state: TickState | None = None  # from its first tick on
        self.last: Turn | None = None  # its last tick's
        self._started_at: int | None = None
        self.interval_s = float(self.spec.scaling.behavior.interval_seconds)
        self.wake_level = self.spec.sleep.level
        self.uses_spot = self.spec.placement.spot.enabled
        predictive = self.spec.warmup.predictive
        if self.profile is None and predictive.enabled:
            self.profile = Profile.empty(predictive.lookback_weeks, predictive.timezone)

    def placed(self, spec: InferenceServiceSpec) -> InferenceServiceSpec:
        """The spec with the placement this variant runs."""
        return with_spot(spec, enabled=False)

    def start(self, guess: int, now: float) -> Mapping[str, int]:
        """Warm: `guess` awake, as the last size it asked for, its spot share ready."""
        self._started_at = guess
        return warm_start(self.spec, guess, now)

    def orders(self, view: FleetView) -> Orders:
        if self.state is None:
            fixed = None if self.startup_seconds is None else StartupEstimate(seconds=self.startup_seconds)
            self.state = TickState.start(view.now, self.learned_capacity, fixed or self.startup, self.profile,
                                         target=self._started_at, known=self.learned)
        turn = tick(self.spec, self.observation(view), self.state, view.now)
        self.state, self.last = turn.state, turn
        self.profile, self.startup = turn.state.profile, turn.state.startup
        return Orders(turn.replicas, turn.pools)

    def observation(self, view: FleetView) -> Observation:
        """What the operator would read: its pods, Deployments and nodes, the signals, the
        activation query (the requests held at the gateway). Not the GPUs held: the simulator
        charges GPU time itself, so the tick's cost ledger is not read here."""
        return Observation(signals=view.signals, pods=view.pods, deployments=view.deployments,
                           startups=() if self.startup_seconds is not None else view.startups, idle=view.idle,
                           drained=view.drained, reclaimed_nodes=view.reclaimed_nodes, activation=view.pending)

    @property
    def lead_time(self) -> float | None:
        """The startup time it plans with; None: not measured yet (the spec's default then)."""
        return self.startup_seconds if self.startup_seconds is not None else self.startup.seconds

    @property
    def memory(self) -> Memory | None:
        """What it remembers after its last tick."""
        return None if self.state is None else self.state.memory

    @property
    def capacity(self) -> float | None:
        """The per-replica limit it has learned so far."""
        return None if self.state is None else self.state.memory.capacity


def with_lifecycle(spec: InferenceServiceSpec, prewarm: bool, sleep: bool) -> InferenceServiceSpec:
    """The spec with pre-warming and the sleep pool on or off (their other settings as they are)."""
    predictive = spec.warmup.predictive.model_copy(update={"enabled": prewarm})
    return spec.model_copy(update={
        "warmup": spec.warmup.model_copy(update={"predictive": predictive}),
        "sleep": spec.sleep.model_copy(update={"enabled": sleep}),
    })


def with_spot(spec: InferenceServiceSpec, enabled: bool, **settings: object) -> InferenceServiceSpec:
    """The spec with placement.spot enabled or not (its other spot settings as they are, or as given)."""
    spot = spec.placement.spot.model_copy(update={"enabled": enabled, **settings})
    return spec.model_copy(update={"placement": spec.placement.model_copy(update={"spot": spot})})


@dataclass
class EbbtideSpotPolicy(EbbtidePolicy):
    """Ebbtide on spot capacity: a spec that does not enable placement.spot is run with it
    enabled (`spot_enabled_here`)."""

    name: str = "ebbtide-spot"

    def placed(self, spec: InferenceServiceSpec) -> InferenceServiceSpec:
        return with_spot(spec, enabled=True)


@dataclass
class SpotOnlyPolicy(EbbtideSpotPolicy):
    """The same core with every replica on spot and nothing covering: what a spot node pool
    behind a plain autoscaler gives. It shows what the fallback buys during reclaims and outages.

    Nothing watches for reclaims or for spot pods that find no capacity: its observation has no
    reclaimed nodes, and a Pending spot pod looks just created, so the split never covers."""

    name: str = "spot-only"

    def placed(self, spec: InferenceServiceSpec) -> InferenceServiceSpec:
        return with_spot(spec, enabled=True, on_demand_base=0, max_spot_fraction=1.0)

    def observation(self, view: FleetView) -> Observation:
        seen = super().observation(view)
        blind = tuple(replace(p, created=view.now) if p.capacity == SPOT and p.node is None else p for p in seen.pods)
        return replace(seen, pods=blind, reclaimed_nodes=frozenset())
