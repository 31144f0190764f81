"""Starting Ebbtide as an operator that served the same traffic the week before."""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, replace

from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.policy.decision import Memory
from ebbtide.policy.profile import WEEK_SECONDS, Profile
from ebbtide.policy.startup import StartupEstimate
from ebbtide.sim import traces
from ebbtide.sim.ebbtide_policy import EbbtidePolicy, with_lifecycle
from ebbtide.sim.fleet import SimSettings, simulate


@dataclass(frozen=True)
class Training:
    """What an operator that served a service's traffic the week before knows of it."""

    profile: Profile
    capacity: float | None  # the per-replica limit, tokens/s
    startup: StartupEstimate  # the measured startup time
    # The rest of its memory that does not depend on its clock: the mix the limit is at, the
    # token costs, how far its forecasts fell short (kept in status, as the limit is).
    memory: Memory | None = None

    def teach(self, policy: EbbtidePolicy) -> None:
        """Start `policy` knowing it (its profile only if it pre-warms)."""
        policy.learned_capacity = self.capacity
        policy.learned = self.memory
        policy.startup = self.startup
        if policy.spec.warmup.predictive.enabled:
            policy.profile = self.profile


def train(spec: InferenceServiceSpec, trace: traces.Trace, settings: SimSettings, rotate_s: float = 0.0) -> Training:
    """What an operator that served the trace's traffic the week before would know: the demand
    profile, the per-replica limit and the startup time (kept in the cluster).

    The trace is replayed once, ending where the measured replay starts (shifted back by whole
    weeks: the time-of-week bins line up and the profile has a week behind it), by Ebbtide with
    pre-warming on (it learns; a profile predicts nothing in its first week) and no sleep pool.
    `rotate_s` shifts the training week's load that much later first: with one day, each day is
    predicted from the day before, not from itself.
    """
    weeks = max(1, math.ceil(trace.duration_s / WEEK_SECONDS))
    start = (trace.start_utc or datetime.datetime(2024, 1, 1)) - datetime.timedelta(weeks=weeks)
    earlier = replace(traces.rotate(trace, rotate_s) if rotate_s else trace, start_utc=start)
    learner = EbbtidePolicy(with_lifecycle(spec, prewarm=True, sleep=False), name="training")
    simulate(earlier, learner, settings)
    assert learner.profile is not None
    return Training(learner.profile, learner.capacity, learner.startup, learner.memory)
