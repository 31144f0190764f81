"""What the fleet simulator asks of a policy, and what it shows it.

Every policy the simulator replays is a SimulatedPolicy: at each tick it is shown a FleetView
(the service as the operator would observe it) and answers with Orders (the replicas each
Deployment should hold, and, with a warm pool, the plan for each Deployment's pods). The
baselines size one on-demand Deployment from the signals (SizingPolicy); Ebbtide runs the
operator's own tick (sim/ebbtide.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

from ebbtide.policy.capacity_types import ON_DEMAND
from ebbtide.policy.observation import Deployments, FleetState, Pod, Signals
from ebbtide.policy.startup import Startup
from ebbtide.policy.warm_pool import PoolPlan
from ebbtide.sim.serving import ALL_SIGNALS


class FleetView:
    """One tick's view of the simulated service, times as unix seconds. What most policies never
    read (the pods, idle times, startups, reclaimed nodes) is worked out when first read: a
    week's replay has forty thousand ticks per policy. The GPUs held are not shown: the
    simulator charges GPU time itself, to the second (sim/replicas.py)."""

    def __init__(self, now: float, signals: Signals, deployments: Deployments, ready: int, pending: float,
                 pods: Callable[[], tuple[Pod, ...]], idle: Callable[[], Mapping[str, float]] = dict, startups: Callable[[], tuple[Startup, ...]] = tuple,
                 reclaimed_nodes: Callable[[], frozenset[str]] = frozenset):
        self.now = now
        self.signals = signals
        self.deployments = deployments
        self.ready = ready  # replicas past their cold start and awake
        self.pending = pending  # requests held at the gateway at the last scrape
        self._read = {"pods": pods, "idle": idle, "startups": startups,
                      "reclaimed_nodes": reclaimed_nodes}

    @cached_property
    def pods(self) -> tuple[Pod, ...]:
        return self._read["pods"]()

    @cached_property
    def idle(self) -> Mapping[str, float]:
        """Pods with nothing to do, and since when."""
        return self._read["idle"]()

    @cached_property
    def drained(self) -> frozenset[str]:
        """Awake pods out of the endpoints whose drain is over: their idle time starts at its end."""
        return frozenset(p.name for p in self.pods if p.state == "awake" and not p.serving and p.name in self.idle)

    @cached_property
    def startups(self) -> tuple[Startup, ...]:
        """Replicas Ready for the first time since the last tick."""
        return self._read["startups"]()

    @cached_property
    def reclaimed_nodes(self) -> frozenset[str]:
        return self._read["reclaimed_nodes"]()


@dataclass(frozen=True)
class Orders:
    replicas: Mapping[str, int]  # capacity type -> the replicas its Deployment should hold
    # capacity type -> the warm pool's plan for its pods (then `replicas` is what the plan leaves)
    pools: Mapping[str, PoolPlan] = field(default_factory=dict)


class SimulatedPolicy:
    """The simulator's contract with a policy (the defaults are the plain autoscaler's)."""

    name: str
    interval_s: float  # seconds between ticks
    observes: frozenset[str] = ALL_SIGNALS  # the signals it reads (sim/serving.py computes only those)
    instant_start: bool = False  # its replicas need no cold start (the oracle)
    uses_spot: bool = False  # it has a spot Deployment, and meets the spot market
    wake_level: int = 1  # the sleep level of its warm pool, which sets how long a wake takes

    def start(self, guess: int, now: float) -> Mapping[str, int]:
        """The replicas each Deployment holds at the start, all ready; `guess` is the simulator's
        size for the first minute's load."""
        raise NotImplementedError

    def orders(self, view: FleetView) -> Orders:
        raise NotImplementedError


class SizingPolicy(SimulatedPolicy):
    """A rule that sizes one on-demand Deployment from the signals: the autoscalers users would
    otherwise pick (sim/baselines.py)."""

    def initial(self, guess: int) -> int:
        """Its starting size (static and oracle policies know their own)."""
        return guess

    def decide(self, signals: Signals, fleet: FleetState, now: float) -> int:
        raise NotImplementedError

    def start(self, guess: int, now: float) -> Mapping[str, int]:
        return {ON_DEMAND: self.initial(guess)}

    def orders(self, view: FleetView) -> Orders:
        current = view.deployments.on_demand
        fleet = FleetState(current=current, ready=view.ready, starting=current - view.ready)
        return Orders({ON_DEMAND: max(0, self.decide(view.signals, fleet, view.now))})
