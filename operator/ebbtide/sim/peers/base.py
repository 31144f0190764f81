"""What every autoscaling peer shares: replica bounds, and the spec's schedule floors.

Same conditions for all: a spec whose schedules raise the floor (spec.schedules[].minReplicas)
raises it for the peers too, as a user would with a KEDA cron trigger or a CronJob patching
minReplicas, started one cold start early (the spec's warmup.defaultStartupSeconds) so the
replicas are ready when the window opens: the floor Ebbtide holds (policy.schedules.floor_ahead).
Schedule targets (an off-peak window's kvCacheUsage) are Ebbtide's own settings, not floors,
and are not given to the peers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.policy.observation import FleetState, Signals
from ebbtide.policy.schedules import floor_ahead, next_change
from ebbtide.sim.policy import SizingPolicy


class ScheduleFloors:
    """The floor the spec's schedule windows set at an instant, `lead_s` ahead of each window.

    Cached until the next window change: croniter is slow, and a week's replay asks 40 000 times."""

    def __init__(self, spec: InferenceServiceSpec, lead_s: float | None = None):
        self.spec = spec
        self.lead_s = float(spec.warmup.default_startup_seconds if lead_s is None else lead_s)
        self._floor = spec.replicas.min
        self._valid_until = -math.inf

    def at(self, now: float) -> int:
        if now >= self._valid_until:
            self._floor = floor_ahead(self.spec, now, self.lead_s)
            here = next_change(self.spec.schedules, now)
            there = next_change(self.spec.schedules, now + self.lead_s)
            ends = [c[0] for c in (here,) if c] + [c[0] - self.lead_s for c in (there,) if c]
            self._valid_until = min(ends, default=math.inf)
        return self._floor

    @classmethod
    def of(cls, spec: InferenceServiceSpec) -> ScheduleFloors | None:
        """None when no window sets a floor (nothing to hold)."""
        return cls(spec) if any(w.min_replicas is not None for w in spec.schedules or ()) else None


@dataclass
class Peer(SizingPolicy):
    """An autoscaler between min_replicas and max_replicas, under the schedule floors if given.

    Subclasses size the fleet in `size`; `knob` names the field a hindsight sweep turns."""

    min_replicas: int
    max_replicas: int
    floors: ScheduleFloors | None = None

    knob = "target"

    def size(self, signals: Signals, fleet: FleetState, now: float) -> int:
        raise NotImplementedError

    def floor(self, now: float) -> int:
        return self.min_replicas if self.floors is None else max(self.min_replicas, self.floors.at(now))

    def decide(self, signals: Signals, fleet: FleetState, now: float) -> int:
        return max(self.floor(now), min(self.max_replicas, self.size(signals, fleet, now)))
