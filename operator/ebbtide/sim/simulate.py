"""`ebbtide simulate`: what a spec would cost on a trace, and how often it would miss its SLO,
next to the autoscalers users would otherwise pick: the policies and how they are sized. The
command line is sim/command.py."""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field, replace
from importlib import resources

from ebbtide.api.manifest import load_manifests
from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.policy.activation import activate
from ebbtide.policy.decision import Entries, Memory
from ebbtide.policy.lifecycle import plan
from ebbtide.policy.observation import FleetState, Signals
from ebbtide.policy.profile import WEEK_SECONDS, Profile
from ebbtide.policy.schedules import consolidated
from ebbtide.policy.spot import PodView, Split, SpotPods, classify, split
from ebbtide.policy.startup import Startup, StartupEstimate, lead_time_samples, observe_startups
from ebbtide.policy.warm_pool import PoolPlan, Replica, plan_pool
from ebbtide.sim import baselines, report, traces
from ebbtide.sim.capacity import CapacityModel
from ebbtide.sim.fleet import PolicyRun, SimSettings, SpotReplica, simulate

DEFAULT_SPEC = "chat-llama-8b.yaml"
DEFAULT_TRACE = "conv-week"
ALL_POLICIES = ("ebbtide", "static-peak", "hpa-kv", "keda-queue", "aibrix-apa", "oracle")  # as the table names them
SHORT_NAMES = {"static": "static-peak", "hpa": "hpa-kv", "keda": "keda-queue", "aibrix": "aibrix-apa"}  # still taken
# Not in the default set: Ebbtide starting with the per-replica limit a previous replay of the
# same trace taught it (see EbbtidePolicy.learned_capacity), and Ebbtide placing replicas on spot
# capacity (EbbtideSpotPolicy), which meets the spot market below.
# The lifecycle variants (issue #5): the spec with pre-warming (warmup.predictive) and the
# sleep pool (sleep) switched off or on, whatever it says: (pre-warming, sleep).
LIFECYCLE = {"ebbtide-reactive": (False, False), "ebbtide-prewarm": (True, False),
             "ebbtide-sleep": (False, True), "ebbtide-lifecycle": (True, True)}
# static-max: every replica the spec allows, all the time. Not a contender (it pays for the
# peak all week): the lowest latency any policy bounded by replicas.max can reach, the floor a
# latency target is measured against.
EXTRA_POLICIES = ("ebbtide-warm", "ebbtide-spot", "spot-only", *LIFECYCLE, "static-max")
ORACLE_SLO = 0.99

# The spot market's defaults (docs/simulator.md, "Spot capacity"). No public figure gives
# reclaims per hour for a GPU pool; AWS's Spot Instance Advisor puts instance types in bands
# of the share of instances interrupted over the trailing month (<5 %, 5-10 %, 10-15 %,
# 15-20 %, >20 %), and GPU types commonly sit in the top one, an open-ended band whose floor,
# 0.2 per instance-month, would give a 12-replica fleet one reclaim a fortnight: a week would
# often see none. The default is far more pessimistic, so that a week exercises the fallback:
# a reclaim event every 20 hours on average (8 a week), each taking 3 replicas on average
# (capacity is reclaimed by pool, and SkyServe's traces show preemptions correlated within a
# zone), about 20 times a month per spot replica of a 6-replica spot fleet. The notice is AWS's
# two minutes (Karpenter and EKS relay it; GKE gives 30 s, AKS at least 30 s).
SPOT_PREEMPTIONS_PER_HOUR = 0.05
SPOT_BURST = 3.0
SPOT_NOTICE_S = 120.0


@dataclass
class EbbtidePolicy:
    """The operator's own decision, called exactly as the operator calls it:
    `policy.lifecycle.plan` (schedule windows, pre-warming from the learned demand profile,
    then the reactive core). The startup time a schedule's floor or a predicted ramp is started
    ahead by is measured on its own replicas (`observe_startups`, policy.startup, as the
    operator measures its pods), the spec's warmup.defaultStartupSeconds until one is ready;
    `startup_seconds` fixes it instead. With spec.sleep enabled, its decision is the
    awake target and `pool` (policy.warm_pool.plan_pool) keeps the warm pool (sim/fleet.py).
    With scaling.activation, it reads the requests pending at the gateway while nothing is
    awake, as the operator reads the activation query (`policy.activation.activate`).

    `learned_capacity` (tokens/s a replica serves at the service's limit), `profile` (the
    demand profile) and `startup` (the measured startup time) start it as an operator that has
    run the service before: all are kept in the cluster, so a restart keeps them; everything else starts empty, as
    after a restart. Without a profile it starts an empty one (with warmup.predictive enabled),
    which predicts nothing until it has seen a week.
    """

    spec: InferenceServiceSpec
    name: str = "ebbtide"
    learned_capacity: float | None = None
    startup_seconds: float | None = None  # fixed lead time; None: measured (see above)
    profile: Profile | None = None
    startup: StartupEstimate = field(default_factory=StartupEstimate)

    def __post_init__(self) -> None:
        self._memory: Memory | None = None
        self._off_peak = False  # the last decision's: the warm pool consolidates with it
        self.interval_s = float(self.spec.scaling.behavior.interval_seconds)
        predictive = self.spec.warmup.predictive
        if self.profile is None and predictive.enabled:
            self.profile = Profile.empty(predictive.lookback_weeks, profile_timezone(self.spec))
        self.wake_level = self.spec.sleep.level
        if not self.spec.sleep.enabled:
            self.pool = None  # no warm pool: the fleet resizes as a Deployment would (fleet.Policy)

    @property
    def reads_gateway(self) -> bool:
        """The fleet passes it the gateway's pending requests (sim/fleet.py) for its activation query."""
        return self.spec.scaling.activation is not None

    def decide(self, signals: Signals, fleet: FleetState, now: float, pending: float | None = None) -> int:
        if self._memory is None:
            self._memory = Memory(since=now, capacity=self.learned_capacity)
        predictive = self.profile if self.spec.warmup.predictive.enabled else None
        decision = plan(self.spec, signals, fleet, self._memory, now, self.lead_time, predictive)
        # As the operator shell: the activation query is read only while nothing is awake.
        decision = activate(decision, self.spec, fleet, pending if fleet.ready + fleet.starting == 0 else None, now)
        self._memory = decision.memory
        self._off_peak = decision.off_peak
        if predictive is not None:
            self.profile = decision.profile
        return decision.desired

    @property
    def lead_time(self) -> float | None:
        """The startup time it plans with; None: not measured yet (plan takes the spec's default)."""
        return self.startup_seconds if self.startup_seconds is not None else self.startup.seconds

    def observe_startups(self, startups: list[Startup], now: float) -> None:
        self.startup = observe_startups(self.startup, lead_time_samples(startups, self.spec), now=now)

    def pool(self, desired: int, replicas: list[Replica], now: float) -> PoolPlan:
        """The warm pool's moves for the awake target `desired`, as the operator plans them
        (off-peak, in a window or a valley of the profile, with the consolidated spec: surplus
        sleeps once drained)."""
        spec = self.spec
        acting = consolidated(spec) if self._off_peak else spec
        return plan_pool(desired, replicas, acting.sleep, now, spec.replicas.allow_scale_to_zero)

    @property
    def capacity(self) -> float | None:
        """The per-replica limit it has learned so far."""
        return None if self._memory is None else self._memory.capacity


def profile_timezone(spec: InferenceServiceSpec) -> str:
    """The zone the demand profile's time-of-week bins are kept in, as the operator keeps them:
    warmup.predictive.timezone (a field added with the operator's pre-warming; UTC before it)."""
    return getattr(spec.warmup.predictive, "timezone", "UTC")


def with_lifecycle(spec: InferenceServiceSpec, prewarm: bool, sleep: bool) -> InferenceServiceSpec:
    """The spec with pre-warming and the sleep pool on or off (their other settings as they are)."""
    predictive = spec.warmup.predictive.model_copy(update={"enabled": prewarm})
    return spec.model_copy(update={
        "warmup": spec.warmup.model_copy(update={"predictive": predictive}),
        "sleep": spec.sleep.model_copy(update={"enabled": sleep}),
    })


@dataclass(frozen=True)
class Training:
    """What an operator that served a service's traffic the week before knows of it."""

    profile: Profile
    capacity: float | None  # the per-replica limit, tokens/s
    startup: StartupEstimate  # the measured startup time

    def teach(self, policy: EbbtidePolicy) -> None:
        """Start `policy` knowing it (its profile only if it pre-warms)."""
        policy.learned_capacity = self.capacity
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
    return Training(learner.profile, learner.capacity, learner.startup)


def with_spot(spec: InferenceServiceSpec) -> InferenceServiceSpec:
    """The spec with placement.spot enabled (its other spot settings as they are)."""
    if spec.placement.spot.enabled:
        return spec
    spot = spec.placement.spot.model_copy(update={"enabled": True})
    return spec.model_copy(update={"placement": spec.placement.model_copy(update={"spot": spot})})


@dataclass
class EbbtideSpotPolicy(EbbtidePolicy):
    """Ebbtide on spot capacity, as the operator runs it: plan() decides the awake target,
    `policy.spot.split` divides it into on-demand and spot replicas (an on-demand base, spot
    for the rest, on-demand covering spot replicas that are not there), with the spot pods
    classified by `policy.spot.classify` from what the fleet shows, as the operator classifies
    pods and nodes. The core compares its recommendation with the target it last set (not
    with the replicas the two Deployments hold, which include the cover), as the operator does.
    With spec.sleep enabled, each share is the awake target of that capacity type's own warm
    pool (`pool`, once per Deployment, as the operator plans them; sim/fleet.py).

    A spec that does not enable placement.spot is run with it enabled (`spot_enabled_here`).
    """

    name: str = "ebbtide-spot"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.spot_enabled_here = not self.spec.placement.spot.enabled
        self.spec = with_spot(self.spec)
        self._target: int | None = None
        self._cover: Entries = ()

    def initial_placement(self, size: int, now: float) -> tuple[int, int]:
        """A warm start: `size` awake, its spot share ready (no cover), as a service that has
        been running for a while would be."""
        self._target = size
        spot = self._split(size, SpotPods(), now).spot
        placed = self._split(size, SpotPods(ready=spot), now)
        self._cover = placed.cover
        return placed.on_demand, placed.spot

    def place(self, signals: Signals, fleet: FleetState, spot: tuple[SpotReplica, ...],
              now: float, pending: float | None = None) -> tuple[int, int]:
        current = self._target if self._target is not None else fleet.current
        self._target = self.decide(signals, replace(fleet, current=current), now, pending)
        pods = spot_pods(spot, self.spec.placement.spot.pending_timeout_seconds, now)
        placed = self._split(self._target, pods, now)
        self._cover = placed.cover
        return placed.on_demand, placed.spot

    def _split(self, target: int, pods: SpotPods, now: float) -> Split:
        return split(target, self.spec.placement.spot, pods, self._cover, now,
                     self.spec.scaling.behavior.scale_down.stabilization_seconds)


@dataclass
class SpotOnlyPolicy(EbbtideSpotPolicy):
    """The same core with every replica on spot and nothing covering: what a spot node pool
    behind a plain autoscaler gives. It shows what the fallback buys during reclaims and outages."""

    name: str = "spot-only"

    def _split(self, target: int, pods: SpotPods, now: float) -> Split:
        spot = target + self.spec.placement.spot.overprovision if target else 0
        return Split(on_demand=0, spot=spot, cover=(), message=f"all {spot} on spot, no on-demand fallback")


def spot_pods(replicas: tuple[SpotReplica, ...], pending_timeout: float, now: float) -> SpotPods:
    """The spot replicas as the operator classifies spot pods: each replica with a node on a
    node of its own, Pending while it has none; reclaimed ones sit on a reclaimed node."""
    views = [PodView(name=r.name, ready=r.ready, phase="Running" if r.scheduled else "Pending",
                     created_at=r.created, node=f"node-{r.name}" if r.scheduled else None) for r in replicas]
    reclaimed = {f"node-{r.name}" for r in replicas if r.reclaimed}
    return classify(views, reclaimed, pending_timeout, now)


def load_spec(path: str | None) -> tuple[str, InferenceServiceSpec]:
    if path is None:
        path = str(resources.files("ebbtide") / "examples" / DEFAULT_SPEC)
    ref, spec = load_manifests(path)[0]
    return ref.name, spec


def load_trace(name: str, capacity: CapacityModel, spec: InferenceServiceSpec, peak_replicas: int,
               scale: int, seed: int, hours: float | None) -> traces.Trace:
    if traces.is_rate_file(name):
        sizes = traces.read_request_log(traces.SIZES_FOR[traces.kind_of(name)])
        mean_p = float(sizes.prompt_tokens.mean())
        mean_o = float(sizes.output_tokens.mean())
        peak_rps = peak_replicas * per_replica_rate(capacity, spec, mean_p, mean_o)
        trace = traces.expand_rate_file(traces.read_rate_file(name), sizes, peak_rps, seed, name, hours)
        # Keep the size sample for the fluid model's TTFT distribution.
        return replace(trace, prompt_tokens=sizes.prompt_tokens)
    trace = traces.read_request_log(name, name=name)
    if scale > 1:
        trace = traces.superpose(trace, scale, seed)
    return trace


def per_replica_rate(capacity: CapacityModel, spec: InferenceServiceSpec, mean_p: float, mean_o: float) -> float:
    """Requests per second one replica serves within the ITL target, with no queue."""
    itl = spec.scaling.targets.tpot.target_seconds if spec.scaling.targets.tpot else None
    return capacity.max_request_rate(mean_p, mean_o, itl)


def build_policies(names: list[str], spec: InferenceServiceSpec, trace: traces.Trace, capacity: CapacityModel):
    """The policies by name; Ebbtide's measure their startup time on their own replicas."""
    oracle = make_oracle(spec, trace, oracle_rate_limit(spec, trace, capacity))
    lo, hi = max(1, spec.replicas.min), spec.replicas.max
    make = {
        "ebbtide": lambda: EbbtidePolicy(spec),
        "ebbtide-warm": lambda: EbbtidePolicy(spec, name="ebbtide-warm"),
        **{name: (lambda name=name, on=on: EbbtidePolicy(with_lifecycle(spec, *on), name=name))
           for name, on in LIFECYCLE.items()},
        "ebbtide-spot": lambda: EbbtideSpotPolicy(spec),
        "spot-only": lambda: SpotOnlyPolicy(spec),
        "static-peak": lambda: baselines.Static(replicas=min(hi, oracle.peak)),
        "static-max": lambda: baselines.Static(replicas=hi, name="static-max"),
        "hpa-kv": lambda: baselines.Hpa(min_replicas=lo, max_replicas=hi),
        "keda-queue": lambda: baselines.Keda(min_replicas=lo, max_replicas=hi),
        "aibrix-apa": lambda: baselines.AibrixApa(min_replicas=lo, max_replicas=hi),
        "oracle": lambda: oracle,
    }
    return [make[n]() for n in policy_names(names)]


def policy_names(names: list[str]) -> list[str]:
    """The names as the table prints them, each once; a ValueError names any unknown one."""
    unknown = [n for n in names if SHORT_NAMES.get(n, n) not in ALL_POLICIES + EXTRA_POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {', '.join(unknown)}; known: {', '.join(ALL_POLICIES + EXTRA_POLICIES)}")
    return list(dict.fromkeys(SHORT_NAMES.get(n, n) for n in names))


def oracle_rate_limit(spec: InferenceServiceSpec, trace: traces.Trace, capacity: CapacityModel) -> float:
    """The highest request rate per replica the capacity model allows for the trace's mix."""
    mean_p = float(trace.prompt_sum.sum() / max(trace.requests, 1))
    mean_o = float(max(trace.output_sum.sum() / max(trace.requests, 1), 1.0))
    return per_replica_rate(capacity, spec, mean_p, mean_o)


def make_oracle(spec: InferenceServiceSpec, trace: traces.Trace, rate_per_replica: float) -> baselines.Oracle:
    return baselines.Oracle.for_trace(trace.counts, rate_per_replica, epoch_of(trace), interval_s=15.0,
                                      min_replicas=max(1, spec.replicas.min), max_replicas=spec.replicas.max)


def right_size_static(spec: InferenceServiceSpec, trace: traces.Trace, settings: SimSettings, start: int,
                      slo: float) -> tuple[baselines.Static, PolicyRun]:
    """The smallest fixed fleet within replicas.max that meets the SLO for `slo` of the
    requests, searched from `start` (what the peak needs at the capacity model's limit): the
    best a team provisioning for the peak could do, with hindsight. At max, whatever it gets."""
    hi = spec.replicas.max

    def attempt(size: int) -> tuple[baselines.Static, PolicyRun, bool]:
        static = baselines.Static(replicas=size)
        result = simulate(trace, static, settings)
        return static, result, report.summarize(result, spec).slo_attainment >= slo

    size = max(1, min(hi, start))
    static, result, ok = attempt(size)
    if ok:
        while size > 1:
            smaller, smaller_run, smaller_ok = attempt(size - 1)
            if not smaller_ok:
                break
            size, static, result = size - 1, smaller, smaller_run
        return static, result
    while not ok and size < hi:
        size += 1
        static, result, ok = attempt(size)
    return static, result


def calibrate_oracle(spec: InferenceServiceSpec, trace: traces.Trace, settings: SimSettings, limit: float,
                     slo: float, runs: int = 7) -> tuple[baselines.Oracle, PolicyRun, float]:
    """The oracle at the highest per-replica rate (at most `limit`) at which it still meets the
    SLO for `slo` of the requests: (oracle, its run, the rate).

    At the capacity model's limit the oracle runs every replica at saturation, which the fluid
    model allows (it sees no Poisson bursts inside a step) but request by request, with bursty
    logs and long prompts, breaks the SLO. A lower bound that misses the SLO is no bound for
    policies that meet it, so the rate is lowered (geometrically, then by bisection over
    `runs` replays in all) until the oracle meets it too.
    """
    def attempt(rate: float) -> tuple[baselines.Oracle, PolicyRun, bool]:
        oracle = make_oracle(spec, trace, rate)
        result = simulate(trace, oracle, settings)
        return oracle, result, report.summarize(result, spec).slo_attainment >= slo

    oracle, result, ok = attempt(limit)
    if ok:
        return oracle, result, limit
    best: tuple[baselines.Oracle, PolicyRun, float] | None = None
    high, low, used = limit, None, 1
    while used < runs:
        # Step down by 30 % until a rate meets the SLO, then bisect between it and the last miss.
        rate = high * 0.7 if low is None else (low + high) / 2
        candidate, candidate_run, ok = attempt(rate)
        used += 1
        if ok:
            low, best = rate, (candidate, candidate_run, rate)
        else:
            high = rate
    if best is None:  # nothing met it within the budget: report the most cautious try
        return candidate, candidate_run, rate
    return best


def epoch_of(trace: traces.Trace) -> float:
    start = trace.start_utc or datetime.datetime(2024, 1, 1)
    return start.replace(tzinfo=datetime.UTC).timestamp()
