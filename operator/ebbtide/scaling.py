"""The scaling loop: observe the whole fleet once per tick, decide per service, act, explain.

One tick:
    observe  one list of pods, one list of Deployments, one batched Prometheus observation
    decide   ebbtide.policy.autoscaling.decide(...) for each service that is due
    act      with sleep mode, wake, drain and put to sleep per the warm pool (sleep_pool.py);
             patch the Deployments' replicas when they change (never in Advisory)
    explain  an Event per change, status (last decision, history, conditions, memory), metrics

The policy lives in the pure core; this module only moves values between it and the cluster.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kubernetes.client.rest import ApiException

from ebbtide.api.conditions import set_authorized, set_condition
from ebbtide.api.ref import ServiceRef
from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.cluster.engine import EngineClient
from ebbtide.cluster.kube import Conflict, Forbidden, Kube
from ebbtide.cluster.pods import ServicePods, reclaimed_nodes, summarize
from ebbtide.cluster.profile_store import configmap_name, read_profile, render_profile
from ebbtide.cluster.render import LABEL_SERVICE, MANAGED_BY, ON_DEMAND, SPOT, deployment_name
from ebbtide.cluster.warmup import warm_up
from ebbtide.operator_metrics import TIERS, OperatorMetrics
from ebbtide.policy.activation import activate
from ebbtide.policy.cost import Ledger, accrue, usd_per_hour, usd_per_million_tokens
from ebbtide.policy.decision import ConditionReport, Decision, Entries, Memory
from ebbtide.policy.lifecycle import plan
from ebbtide.policy.observation import FleetState, Signals
from ebbtide.policy.profile import Profile, bin_of
from ebbtide.policy.schedules import consolidated
from ebbtide.policy.spot import RECLAIM_TAINTS, Split, SpotPods, classify, split
from ebbtide.policy.startup import StartupEstimate, lead_time_samples, observe_startups
from ebbtide.policy.warm_pool import PoolPlan
from ebbtide.reconcile import Registry
from ebbtide.signals.prometheus import PrometheusSource, PrometheusUnavailable, ServiceQuery
from ebbtide.sleep_pool import act, idle_since, plan_for

log = logging.getLogger(__name__)

SPOT_AVAILABLE = "SpotAvailable"
HISTORY = 10  # decisions kept in status: enough to read the last hour's story, small enough for etcd


@dataclass
class ServiceState:
    """Per-service state between ticks, mirrored into status.scaler so a restart loses nothing."""

    memory: Memory
    ledger: Ledger
    # The awake size last asked for. With spot or sleep the Deployments hold more than that
    # (spot over-provisioning, on-demand cover, sleepers). And spot's cover give-back history.
    target: int | None = None
    spot_cover: Entries = ()
    covering: int = 0  # on-demand replicas covering spot at the last applied split (for the Events)
    # Measured startup time (pod created to ready): the lead time for floors started early.
    startup: StartupEstimate = StartupEstimate()
    last_evaluated: float = float("-inf")
    # Advisory mode never changes the Deployment, so the same advice would repeat every tick;
    # it is reported when it changes, not on every tick.
    last_advice: int | None = None
    # Pod -> since when it has served nothing (warm pool). Not persisted: after a restart the
    # idle time starts over, which only delays a sleep.
    idle: dict[str, float] = field(default_factory=dict)
    # The learned demand profile (pre-warming), read from its ConfigMap on the first tick, and
    # the profile bin it was last saved in (it is saved once per bin).
    profile: Profile | None = None
    profile_saved_bin: tuple[int, int] | None = None
    # The API server's refusals (403) this service has been told of: each gets one Event.
    refusals: frozenset[str] = frozenset()

    @classmethod
    def restore(cls, status: dict | None, now: float) -> ServiceState:
        """From the status a restarted operator found, or fresh; unreadable parts start over."""
        stored = (status or {}).get("scaler")
        stored = stored if isinstance(stored, dict) else {}
        spot = stored.get("spot") if isinstance(stored.get("spot"), dict) else {}
        try:
            target = None if spot.get("target") is None else max(0, int(spot["target"]))
            cover = tuple((float(t), int(r)) for t, r in spot.get("cover", []))
        except (TypeError, ValueError):
            target, cover = None, ()
        startup = (status or {}).get("startup")
        return cls(memory=Memory.load(stored or None, now), ledger=Ledger.load(stored.get("cost"), now),
                   target=target, spot_cover=cover,
                   startup=StartupEstimate.load(startup if isinstance(startup, dict) else None))

    def to_json(self) -> dict:
        """status.scaler (the startup estimate has a status field of its own)."""
        return {**self.memory.to_json(), "cost": self.ledger.to_json(),
                "spot": {"target": self.target, "cover": [list(e) for e in self.spot_cover]}}


def rfc3339(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ScalingLoop:
    def __init__(self, kube: Kube, registry: Registry, source: PrometheusSource, metrics: OperatorMetrics,
                 tick_seconds: float, clock: Callable[[], float] = time.time, engine_timeout_seconds: float = 120.0):
        self.kube = kube
        self.registry = registry
        self.source = source
        self.metrics = metrics
        self.tick_seconds = tick_seconds
        self.clock = clock
        self.states: dict[tuple[str, str], ServiceState] = {}
        self.engines = EngineClient(engine_timeout_seconds)
        self._warming: asyncio.Task | None = None

    async def run(self, stopped: asyncio.Event) -> None:
        while not stopped.is_set():
            started = time.perf_counter()
            try:
                await self.tick(self.clock())
            except Forbidden:
                pass  # Kube logged the missing permission once; a traceback every tick would add nothing
            except Exception:  # a failed tick must not stop the loop; the next one retries
                log.exception("scaling tick failed")
            self.metrics.ticks.inc()
            self.metrics.tick_seconds.observe(time.perf_counter() - started)
            try:
                await asyncio.wait_for(stopped.wait(), timeout=self.tick_seconds)
            except TimeoutError:
                pass
        if self._warming is not None:
            self._warming.cancel()
        await self.engines.close()

    def _due(self, now: float) -> list[tuple[ServiceRef, InferenceServiceSpec, ServiceState]]:
        due = []
        for key, (ref, spec) in list(self.registry.services.items()):
            state = self.states.get(key)
            if state is None:
                state = self.states[key] = ServiceState.restore(self.registry.stored.pop(key, None), now)
            if now - state.last_evaluated >= spec.scaling.behavior.interval_seconds - 0.5:
                due.append((ref, spec, state))
        for key in set(self.states) - set(self.registry.services):
            del self.states[key]
            self.metrics.forget(*key)
        return due

    async def tick(self, now: float) -> None:
        due = self._due(now)
        # Pods are listed every tick, due or not: a new replica waits at most one tick for its
        # warm-up (its readiness gate), whatever the services' intervals.
        listed = await self.kube.list_pods(LABEL_SERVICE)
        self._warm_up(listed)
        if not due:
            return
        pods = summarize(listed)
        replicas = {(d["metadata"]["namespace"], d["metadata"]["name"]): d["spec"].get("replicas", 0)
                    for d in await self.kube.list_deployments(_selector(MANAGED_BY))}
        # Nodes are read only when some service runs on spot: their taints announce reclaims.
        reclaimed = (reclaimed_nodes(await self.kube.list_nodes(), RECLAIM_TAINTS)
                     if any(spec.placement.spot.enabled for _, spec, _ in due) else set())
        queries = [ServiceQuery.for_spec((ref.namespace, ref.name), ref.namespace,
                                         tuple(pods.get((ref.namespace, ref.name), ServicePods()).names), spec)
                   for ref, spec, _ in due]
        observed = await asyncio.to_thread(self.source.observe, queries, now)
        for ref, spec, state in due:
            key = (ref.namespace, ref.name)
            on_demand = replicas.get((ref.namespace, deployment_name(ref)))
            if on_demand is None:
                continue  # the workload is not there (yet): the reconciler will create it
            workload = Workload(on_demand, replicas.get((ref.namespace, deployment_name(ref, SPOT))))
            mine = pods.get(key, ServicePods())
            fleet = FleetState(current=_current(spec, state, workload, mine), ready=mine.ready, starting=mine.starting,
                               asleep=mine.asleep, pod_names=tuple(mine.names))
            signals = observed.get(key) or Signals.missing("no observation")
            state.startup = observe_startups(state.startup, lead_time_samples(mine.startups, spec), now=now)
            profile = await self._profile(ref, spec, state)
            decision = plan(spec, signals, fleet, state.memory, now, startup_seconds=state.startup.seconds,
                            profile=profile)
            decision = activate(decision, spec, fleet, await self._activation(ref, spec, fleet, now), now)
            state.memory = decision.memory
            if profile is not None:
                state.profile = decision.profile
                await self._save_profile(ref, state, now)
            state.last_evaluated = now
            spot_pods = classify(mine.spot, reclaimed, spec.placement.spot.pending_timeout_seconds, now)
            # Off-peak, the fleet is also placed and pooled as consolidation says (more spot, sleep sooner).
            acting = consolidated(spec) if decision.off_peak else spec
            placed = split(decision.desired, acting.placement.spot, spot_pods, state.spot_cover, now,
                           spec.scaling.behavior.scale_down.stabilization_seconds)
            pools = self._pools(acting, state, mine, signals, placed, now)
            state.ledger = accrue(state.ledger, now, mine.held, spec.engine.gpus, spec.pricing, spec.sleep)
            news = decision.changed and (spec.mode == "Active" or decision.desired != state.last_advice)
            state.last_advice = decision.desired if decision.changed else None
            per_hour = usd_per_hour(state.ledger.held, spec.engine.gpus, spec.pricing, spec.sleep)
            spend = (per_hour, usd_per_million_tokens(per_hour, signals.tokens_per_second))
            await self._act_and_explain(ref, spec, state,
                                        Tick(fleet, signals, decision, placed, spot_pods, workload, news, now, spend,
                                             pools, mine))

    async def _activation(self, ref: ServiceRef, spec: InferenceServiceSpec, fleet: FleetState,
                          now: float) -> float | None:
        """The activation query's value while no replica is awake (policy/activation.py), else None."""
        if spec.scaling.activation is None or fleet.ready + fleet.starting > 0:
            return None
        try:
            return await asyncio.to_thread(self.source.read_value, spec.scaling.activation.query, now)
        except PrometheusUnavailable as e:
            log.warning("%s/%s: %s; staying at zero", ref.namespace, ref.name, e)
            return None

    async def _profile(self, ref: ServiceRef, spec: InferenceServiceSpec, state: ServiceState) -> Profile | None:
        """The service's demand profile with pre-warming on, read from its ConfigMap the first
        time; None with it off, or while the ConfigMap cannot be read (starting an empty one then
        would overwrite what was learned at the next save)."""
        predictive = spec.warmup.predictive
        if not predictive.enabled:
            state.profile = None
            return None
        if state.profile is None or state.profile.timezone != predictive.timezone:
            try:
                stored = await self.kube.read("ConfigMap", ref.namespace, configmap_name(ref))
            except ApiException as e:
                log.warning("%s/%s: demand profile not read (%s); pre-warming waits", ref.namespace, ref.name,
                            e.reason)
                return None
            state.profile = Profile.load(read_profile(stored), predictive.lookback_weeks, predictive.timezone)
            state.profile_saved_bin = bin_of(state.profile.updated or 0.0, predictive.timezone)
        return state.profile

    async def _save_profile(self, ref: ServiceRef, state: ServiceState, now: float) -> None:
        """Write the profile to its ConfigMap once per bin (see cluster/profile_store.py)."""
        profile = state.profile
        if profile is None or profile.updated is None:
            return
        current = bin_of(now, profile.timezone)
        if current == state.profile_saved_bin:
            return
        try:
            await self.kube.apply(render_profile(ref, profile), ref)
            state.profile_saved_bin = current
        except (ApiException, Conflict) as e:
            log.warning("%s/%s: demand profile not saved (%s); retrying next tick", ref.namespace, ref.name, e)

    @staticmethod
    def _pools(spec: InferenceServiceSpec, state: ServiceState, mine: ServicePods, signals: Signals, placed: Split,
               now: float) -> dict[str, PoolPlan]:
        """Warm pool plans by capacity type: with sleep mode on, or while sleepers or draining
        replicas are left from when it was (they are woken or released)."""
        if not (spec.sleep.enabled or mine.asleep or mine.draining):
            state.idle = {}
            return {}
        state.idle = idle_since(state.idle, signals, now)
        targets = {ON_DEMAND: placed.on_demand, SPOT: placed.spot} if spec.placement.spot.enabled else {
            ON_DEMAND: placed.on_demand}
        return {capacity: plan_for(spec, mine.of(capacity), target, state.idle, now)
                for capacity, target in targets.items()}

    async def _act_and_explain(self, ref: ServiceRef, spec: InferenceServiceSpec, state: ServiceState,
                               tick: Tick) -> None:
        """Carry out a decision and its placement, and report them."""
        decision, placed, workload = tick.decision, tick.placed, tick.workload
        active = spec.mode == "Active"
        applied = False
        if active:
            wanted = [(deployment_name(ref), workload.on_demand, self._count(tick, ON_DEMAND, placed.on_demand))]
            if workload.spot is not None:  # absent: the reconciler is creating it, with its own count
                wanted.append((deployment_name(ref, SPOT), workload.spot, self._count(tick, SPOT, placed.spot)))
            for capacity, pool in tick.pools.items():
                done = await act(self.kube, self.engines, ref, spec, tick.pods.of(capacity), pool, tick.now)
                for kind, reason, message in done.events:
                    await self.kube.post_event(ref, kind, reason, message)
            applied = await self._scale(ref, [(name, want) for name, have, want in wanted if want != have])
            if applied:
                state.target, state.spot_cover = decision.desired, placed.cover
            # A scale that failed is no news (no ScaledUp/Down, no history entry every tick it
            # fails): the failure is what gets reported (ScaleFailed, or Forbidden once).
            tick = dataclasses.replace(tick, news=tick.news and applied)
        spot_note = f"; {placed.message}" if spec.placement.spot.enabled else ""
        if tick.news:
            if active:
                kind = "ScaledUp" if decision.desired > decision.current else "ScaledDown"
            else:
                kind = "AdvisoryScaleUp" if decision.desired > decision.current else "AdvisoryScaleDown"
            prefix = "" if active else "advisory, not applied: "
            await self.kube.post_event(ref, "Normal", kind,
                                       f"{prefix}{decision.message} [{decision.source}]{spot_note}")
            self.metrics.decisions.labels(ref.namespace, ref.name, decision.reason, str(applied).lower()).inc()
        elif active and applied and spec.placement.spot.enabled and placed.covering != state.covering:
            # Same size, other capacity: on-demand covers spot replicas that are not there, or
            # gives the cover back once they are. (Compared with the cover last applied, not the
            # Deployment's count, which also holds sleepers.)
            if placed.covering > state.covering:
                await self.kube.post_event(ref, "Warning", "SpotFallback", placed.message)
            else:
                await self.kube.post_event(ref, "Normal", "SpotRecovered", placed.message)
        if applied:
            state.covering = placed.covering
        refusals = frozenset(self.kube.refusals(ref.namespace))
        for message in sorted(refusals - state.refusals):
            await self.kube.post_event(ref, "Warning", "Forbidden", f"permission denied: {message}")
        state.refusals = refusals
        self._export(ref, spec, tick, state.ledger)
        await self.kube.update_status(ref, lambda status: self._status(status, spec, state, tick, applied))

    def _warm_up(self, pods: list[dict]) -> None:
        """Warm new replicas (cluster/warmup.py) in the background: an engine that does not
        answer must not hold the tick. One round at a time; the next tick starts the next."""
        if self._warming is not None and not self._warming.done():
            return
        specs = {key: spec for key, (_, spec) in self.registry.services.items()}
        self._warming = asyncio.get_running_loop().create_task(self._warm_up_round(pods, specs))

    async def _warm_up_round(self, pods: list[dict], specs: dict) -> None:
        try:
            await warm_up(self.kube, pods, specs)
        except Exception:  # the next tick tries again; the failure must not go unseen
            log.exception("warm-up round failed")

    @staticmethod
    def _count(tick: Tick, capacity: str, awake: int) -> int:
        """A Deployment's replicas: its awake share, plus its sleepers when there is a warm pool."""
        pool = tick.pools.get(capacity)
        return awake if pool is None else pool.replicas

    async def _scale(self, ref: ServiceRef, changes: list[tuple[str, int]]) -> bool:
        """Patch each Deployment's replicas; False (with an Event) if any patch failed."""
        for name, replicas in changes:
            try:
                await self.kube.scale(ref.namespace, name, replicas)
            except Forbidden:
                return False  # reported once: a log line, an Event and the Authorized condition
            except ApiException as e:
                log.warning("%s/%s: scaling %s to %d failed: %s", ref.namespace, ref.name, name, replicas, e.reason)
                await self.kube.post_event(ref, "Warning", "ScaleFailed",
                                           f"could not scale {name} to {replicas}: {e.status} {e.reason}")
                return False
        return True

    def _export(self, ref: ServiceRef, spec: InferenceServiceSpec, tick: Tick, ledger: Ledger) -> None:
        labels = (ref.namespace, ref.name)
        m = self.metrics
        m.desired.labels(*labels).set(tick.decision.desired)
        m.ready.labels(*labels).set(tick.fleet.ready)
        m.asleep.labels(*labels).set(tick.fleet.asleep)
        tiers = dict.fromkeys(TIERS, 0)
        for pod in tick.pods.members:
            tiers[pod.capacity if pod.state == "awake" and pod.serving else
                  "draining" if pod.state == "awake" else pod.state] += 1
        for tier, count in tiers.items():
            m.replicas.labels(*labels, tier).set(count)
        m.metrics_unavailable.labels(*labels).set(0 if tick.signals.sampled_at and not tick.signals.error else 1)
        for name, value in tick.decision.signals.items():
            m.signal.labels(*labels, name).set(value)
        per_hour, per_million = tick.spend
        m.usd_per_hour.labels(*labels).set(per_hour)
        m.usd_per_million_tokens.labels(*labels).set(math.nan if per_million is None else per_million)
        for capacity, hours in (("on-demand", ledger.gpu_hours_on_demand), ("spot", ledger.gpu_hours_spot),
                                ("asleep", ledger.gpu_hours_asleep)):
            m.gpu_hours.labels(*labels, capacity).set(hours)

    @staticmethod
    def _status(status: dict, spec: InferenceServiceSpec, state: ServiceState, tick: Tick, applied: bool) -> dict:
        decision, fleet = tick.decision, tick.fleet
        stamp = rfc3339(tick.now)
        record = {
            "time": stamp,
            "fromReplicas": decision.current,
            "toReplicas": decision.desired,
            "reason": decision.reason,
            "message": decision.message,
            "source": decision.source,
            "signals": {k: round(v, 4) for k, v in decision.signals.items()},
            "applied": applied,
        }
        status["lastDecision"] = record
        if tick.news:
            status["decisions"] = ((status.get("decisions") or []) + [record])[-HISTORY:]
            status["lastDecisionSummary"] = f"{decision.current}->{decision.desired} {decision.reason}"
        else:
            status.setdefault("lastDecisionSummary", f"{decision.current} {decision.reason}")
        conditions = status.get("conditions") or []
        reports = list(decision.conditions)
        if spec.placement.spot.enabled:
            reports.append(_spot_condition(tick.spot_pods, tick.placed))
        for c in reports:
            conditions = set_condition(conditions, c.type, c.status, c.reason, c.message, stamp)
        if not spec.placement.spot.enabled:
            conditions = [c for c in conditions if c.get("type") != SPOT_AVAILABLE]
        status["conditions"] = set_authorized(conditions, state.refusals, stamp)
        status["replicas"] = {**(status.get("replicas") or {}), "desired": decision.desired, "ready": fleet.ready,
                              "starting": fleet.starting, "asleep": fleet.asleep, "draining": tick.pods.draining,
                              "onDemand": tick.placed.on_demand, "spot": tick.placed.spot}
        status["phase"] = _phase(fleet, decision)
        ledger = state.ledger
        per_hour, per_million = tick.spend
        status["cost"] = {
            "since": rfc3339(ledger.since),
            "gpuHours": {"onDemand": round(ledger.gpu_hours_on_demand, 4), "spot": round(ledger.gpu_hours_spot, 4),
                         "asleep": round(ledger.gpu_hours_asleep, 4)},
            "usdTotal": round(ledger.usd, 4),
            "usdPerHour": round(per_hour, 4),
            "usdPerMillionTokens": None if per_million is None else round(per_million, 4),
        }
        status["startup"] = state.startup.to_json()
        if state.profile is not None:
            status["demandProfile"] = _profile_status(state.profile)
        else:
            status["demandProfile"] = None  # a merge patch removes it
        status["scaler"] = state.to_json()
        return status


@dataclass(frozen=True)
class Workload:
    """The replicas the service's Deployments hold now (spot: None when there is no spot Deployment)."""

    on_demand: int
    spot: int | None


@dataclass(frozen=True)
class Tick:
    """One service's tick, from observation to placement: what acting and reporting read."""

    fleet: FleetState
    signals: Signals
    decision: Decision
    placed: Split
    spot_pods: SpotPods
    workload: Workload
    news: bool  # False for advice already given
    now: float
    spend: tuple[float, float | None]  # (dollars per hour now, per million tokens over the metrics window)
    pools: dict[str, PoolPlan]  # warm pool plans by capacity type; empty without sleep mode
    pods: ServicePods


def _current(spec: InferenceServiceSpec, state: ServiceState, workload: Workload, pods: ServicePods) -> int:
    """The awake size last asked for: what the core compares its recommendation with.

    Without spot or sleep that is the Deployment's count (a hand scale counts, as with the HPA).
    With them the Deployments hold more than that (over-provisioning, on-demand cover,
    sleepers), so it is the size the operator last asked for; without one (just enabled, status
    lost, or Advisory mode, which asks for nothing) it is estimated from the Deployments less
    the sleepers, high rather than low: a size too high shrinks after the scale-down window, one
    too low would shrink now.
    """
    if not (spec.placement.spot.enabled or spec.sleep.enabled or pods.asleep):
        return workload.on_demand
    if spec.mode == "Active" and state.target is not None:
        return state.target
    spot = workload.spot or 0
    held = max(workload.on_demand, workload.on_demand + spot - spec.placement.spot.overprovision)
    return max(0, held - pods.asleep)


def _profile_status(profile: Profile) -> dict:
    """What pre-warming has learned, in a few numbers (the profile itself is in its ConfigMap)."""
    learned = sum(1 for w in profile.weight if w > 0)
    return {"timezone": profile.timezone, "learningSince": None if profile.since is None else rfc3339(profile.since),
            "binsLearned": learned, "predicting": profile.since is not None and profile.updated is not None
            and profile.updated - profile.since >= 7 * 24 * 3600}


def _spot_condition(pods: SpotPods, placed: Split) -> ConditionReport:
    if pods.unavailable:
        return ConditionReport(SPOT_AVAILABLE, "False", "SpotUnavailable",
                               f"{pods.unavailable} spot replicas unavailable (Pending too long or on a reclaimed "
                               f"node); {placed.message}")
    return ConditionReport(SPOT_AVAILABLE, "True", "SpotReady", placed.message)


def _phase(fleet: FleetState, decision: Decision) -> str:
    if decision.desired == 0 and fleet.ready == 0:
        return "Idle"
    if fleet.ready == 0:
        return "Pending"
    metrics = decision.condition("MetricsAvailable")
    if metrics is not None and metrics.status == "False":
        return "Degraded"
    if decision.changed or fleet.starting or fleet.ready != decision.desired:
        return "Scaling"
    return "Ready"


def _selector(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items())
