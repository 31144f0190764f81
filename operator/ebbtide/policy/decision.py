"""What the autoscaling core returns (Decision) and what it remembers between ticks (Memory).

Both are plain frozen values: the operator shell turns a Decision into a patch, an Event and
status; it persists Memory in the cluster so that a restarted operator keeps the history the
stabilization windows and rate limits need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ebbtide.policy.headroom import Variability
from ebbtide.policy.performance import Model
from ebbtide.policy.profile import Profile
from ebbtide.policy.variants import MixPlan

ConditionStatus = Literal["True", "False", "Unknown"]

# (time, replicas): a recommendation, or the size before a scale change. Oldest first.
Entries = tuple[tuple[float, int], ...]

MEMORY_VERSION = 1


@dataclass(frozen=True, slots=True)
class ConditionReport:
    """One status condition as the core sees it; the shell adds the transition time."""

    type: str  # MetricsAvailable, ScalingLimited
    status: ConditionStatus
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Memory:
    """The history decide() needs between ticks, and nothing else.

    Only entries that can still decide something are kept. A recommendation that a newer,
    higher one outlives can never again be the highest of a scale-down window, so
    `down_recommendations` keeps a strictly decreasing run of values (newest last), and
    `up_recommendations` a strictly increasing one for the lowest-wins scale-up window. The
    same holds for the sizes before recent scale changes, which the rate limits read. Each
    list therefore holds at most `replicas.max + 1` entries, at any tick rate, and entries
    older than their window are dropped every tick.
    """

    since: float  # when this history began: after a restart, the restart
    up_recommendations: Entries = ()  # increasing values: the first is the lowest in the window
    down_recommendations: Entries = ()  # decreasing values: the first is the highest in the window
    scale_ups: Entries = ()  # (time, size before) of recent scale-ups; increasing sizes
    scale_downs: Entries = ()  # (time, size before) of recent scale-downs; decreasing sizes
    last_ready: int | None = None  # ready replicas at the previous tick
    ready_rose_at: float | None = None  # when the ready count last went up (kept for one metrics window)
    ready_fell_at: float | None = None  # when it last went down (kept for one metrics window)
    # Learned: tokens/s one replica serves at the service's limit (a queue on every replica, or
    # a latency SLO breached), and when a target was last breached (see signal_rules.learn_capacity).
    capacity: float | None = None
    breached_at: float | None = None  # kept for one metrics window
    # The token rate's recent rises, which size the margin below the limit (policy/headroom.py).
    variability: Variability = Variability()
    # Prompt and generated tokens' costs at the limit, and the mix `capacity` is at (policy/performance.py).
    performance: Model = Model()

    @classmethod
    def empty(cls, now: float) -> Memory:
        return cls(since=now)

    def to_json(self) -> dict:
        return {
            "version": MEMORY_VERSION,
            "since": self.since,
            "upRecommendations": [list(e) for e in self.up_recommendations],
            "downRecommendations": [list(e) for e in self.down_recommendations],
            "scaleUps": [list(e) for e in self.scale_ups],
            "scaleDowns": [list(e) for e in self.scale_downs],
            "lastReady": self.last_ready,
            "readyRoseAt": self.ready_rose_at,
            "readyFellAt": self.ready_fell_at,
            "capacityTokensPerSecond": self.capacity,
            "breachedAt": self.breached_at,
            "variability": self.variability.to_json(),
            "performance": self.performance.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict) -> Memory:
        """The inverse of to_json; ValueError on anything else (see `load` for the lenient form)."""
        if not isinstance(data, dict):
            raise ValueError(f"autoscaler memory must be an object, got {type(data).__name__}")
        if data.get("version") != MEMORY_VERSION:
            raise ValueError(f"autoscaler memory version {data.get('version')!r} is not {MEMORY_VERSION}")
        try:
            return cls(
                since=_time(data["since"]),
                up_recommendations=_entries(data.get("upRecommendations", [])),
                down_recommendations=_entries(data.get("downRecommendations", [])),
                scale_ups=_entries(data.get("scaleUps", [])),
                scale_downs=_entries(data.get("scaleDowns", [])),
                last_ready=None if data.get("lastReady") is None else int(data["lastReady"]),
                ready_rose_at=_optional_time(data.get("readyRoseAt")),
                ready_fell_at=_optional_time(data.get("readyFellAt")),
                capacity=_optional_capacity(data.get("capacityTokensPerSecond")),
                breached_at=_optional_time(data.get("breachedAt")),
                variability=Variability.from_json(data.get("variability")),
                performance=Model.from_json(data.get("performance")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"autoscaler memory is malformed: {e!r}") from None

    @classmethod
    def load(cls, data: dict | None, now: float) -> Memory:
        """What the shell calls on start: the stored memory, or an empty one starting now.

        Unreadable history counts as lost history, which decide() never scales down on.
        """
        if data is None:
            return cls.empty(now)
        try:
            return cls.from_json(data)
        except ValueError:
            return cls.empty(now)

    @property
    def size(self) -> int:
        """Entries held, for tests and the operator's own metrics."""
        return (len(self.up_recommendations) + len(self.down_recommendations)
                + len(self.scale_ups) + len(self.scale_downs))


def _time(value: object) -> float:
    t = float(value)  # type: ignore[arg-type]
    if not math.isfinite(t):
        raise ValueError(f"time {value!r} is not finite")
    return t


def _optional_time(value: object) -> float | None:
    return None if value is None else _time(value)


def _optional_capacity(value: object) -> float | None:
    if value is None:
        return None
    capacity = _time(value)
    if capacity <= 0:
        raise ValueError(f"capacity {value!r} is not positive")
    return capacity


def _entries(raw: list) -> Entries:
    return tuple((_time(t), int(r)) for t, r in raw)


@dataclass(frozen=True, slots=True)
class Decision:
    """One tick's verdict for one service."""

    desired: int  # replicas wanted, awake
    current: int  # replicas asked for before this tick (the Deployment's spec.replicas)
    reason: str  # CamelCase: QueueBacklog, KVCache, Concurrency, TTFT, TPOT, MinReplicas, ...
    message: str  # one sentence with the numbers
    signals: dict[str, float]  # the values the decision used, for status
    source: str  # where the signals came from: prometheus, scrape, none
    conditions: tuple[ConditionReport, ...]
    memory: Memory = field(repr=False)
    # The demand profile after this tick (lifecycle.plan() with a profile), for the shell to
    # persist like the memory; None when plan() was given none.
    profile: Profile | None = field(default=None, repr=False)
    # Off-peak consolidation in force (a window with offPeak, or a valley the profile knows):
    # the shell then places and pools the fleet as schedules.consolidated(spec) says.
    off_peak: bool = False
    # With spec.variants: the replicas of each variant, what they cost and why (policy/variants.py).
    variants: MixPlan | None = None

    @property
    def changed(self) -> bool:
        return self.desired != self.current

    def condition(self, type: str) -> ConditionReport | None:
        return next((c for c in self.conditions if c.type == type), None)
