"""What the decision core sees of a service at one tick: plain values, no I/O.

The shell (signals/ for metrics, the Kubernetes API for pods) fills these in; the core only
reads them. The simulator fills in the same types from its fleet model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from ebbtide.policy.capacity_types import ON_DEMAND
from ebbtide.policy.cost import Held
from ebbtide.policy.profile import Profile
from ebbtide.policy.startup import Startup

PodState = Literal["awake", "asleep", "starting"]


@dataclass(frozen=True)
class PodSignals:
    """One replica's engine metrics at the newest sample."""

    pod: str
    sampled_at: float  # unix seconds of the sample (not of the query)
    waiting: float = 0.0
    running: float = 0.0
    kv_cache_usage: float = 0.0  # 0..1
    asleep: bool = False
    gpu_memory_used_bytes: float | None = None  # DCGM, where the cluster has it
    gpu_memory_free_bytes: float | None = None
    gpu_utilization: float | None = None  # 0..1


@dataclass(frozen=True)
class Signals:
    """A service's load at one instant, aggregated over its reporting pods.

    None means "not observed" (missing series, or no pod reporting); the core must never
    read None as zero load.
    """

    source: str  # "prometheus", "scrape" or "none": said in every decision
    sampled_at: float | None  # newest sample time across pods; None if nothing was seen
    pods: tuple[PodSignals, ...] = ()
    ttft_seconds: float | None = None  # at the spec's TTFT quantile, over the metrics window
    tpot_seconds: float | None = None  # at the spec's TPOT quantile, over the metrics window
    tokens_per_second: float | None = None  # prompt + generated, over the metrics window
    prompt_tokens_per_second: float | None = None  # of those, the prompt (prefill) tokens
    requests_per_second: float | None = None  # requests finished, over the metrics window
    error: str | None = None  # why nothing could be observed (e.g. "Prometheus unreachable: ...")

    @property
    def pods_reporting(self) -> int:
        return len(self.pods)

    @property
    def waiting(self) -> float | None:
        return sum(p.waiting for p in self.pods) if self.pods else None

    @property
    def running(self) -> float | None:
        return sum(p.running for p in self.pods) if self.pods else None

    @property
    def kv_cache_usage(self) -> float | None:
        """Mean over awake pods: a sleeping replica holds no KV cache and takes no load."""
        awake = [p.kv_cache_usage for p in self.pods if not p.asleep]
        return sum(awake) / len(awake) if awake else None

    @classmethod
    def missing(cls, error: str, source: str = "none") -> Signals:
        return cls(source=source, sampled_at=None, error=error)


@dataclass(frozen=True)
class FleetState:
    """The replicas of a service as the Kubernetes API reports them."""

    current: int  # the Deployment's spec.replicas: what was last asked for
    ready: int  # pods Ready and awake
    starting: int = 0  # pods created but not Ready yet: capacity that is on its way
    asleep: int = 0  # pods in vLLM sleep (warm pool)
    pod_names: tuple[str, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class Pod:
    """One live replica (not being deleted, not finished), as the tick sees its pod."""

    name: str
    capacity: str = ON_DEMAND  # which Deployment it belongs to
    state: PodState = "awake"  # starting: not Ready yet (or, in the simulator, waking)
    serving: bool = True  # in the Service's endpoints
    asleep_since: float | None = None  # unix seconds, while asleep
    created: float = 0.0  # unix seconds
    node: str | None = None  # None: Pending on no node
    phase: str = "Running"
    ready: bool = True  # its Ready condition: a sleeper's stays True (so does, in the simulator, a waking one's)
    left_service_at: float | None = None  # unix seconds it left the Service (drain or sleep), while out of it


@dataclass(frozen=True, slots=True)
class Deployments:
    """The replicas the service's Deployments hold now (their spec.replicas)."""

    on_demand: int
    spot: int | None = None  # None: there is no spot Deployment


@dataclass(frozen=True)
class Observation:
    """Everything one tick reads about one service; the shells fill it in before deciding."""

    signals: Signals
    pods: tuple[Pod, ...]
    deployments: Deployments
    held: Held = Held()  # replicas holding a GPU (pods on their way out included), for the cost ledger
    startups: tuple[Startup, ...] = ()  # replicas Ready now (or since the last tick): the lead time
    idle: Mapping[str, float] = field(default_factory=dict)  # pods seen idle -> since (policy/idle.py)
    # Awake pods out of the Service seen with nothing in flight since they left (policy/idle.py):
    # they may go without losing a request.
    drained: frozenset[str] = frozenset()
    reclaimed_nodes: frozenset[str] = frozenset()  # nodes announcing their end (policy/spot.py)
    activation: float | None = None  # scaling.activation's query, read while nothing is awake
    stored_profile: Profile | None = None  # the demand profile as stored, read when the state has none
    # With spec.variants (policy/variant_tick.py): each variant's own signals (its pods, its token
    # rate, its latency quantiles where known), by variant name; and the shares of the token rate
    # by the context its requests need, (max prompt + output tokens, share), where the shell knows them.
    variant_signals: Mapping[str, Signals] = field(default_factory=dict)
    context_mix: tuple[tuple[int, float], ...] = ()
