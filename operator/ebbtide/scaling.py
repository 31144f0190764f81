"""The scaling loop: observe the whole fleet once per tick, decide per service, act, explain.

One tick:
    observe  one list of pods, one list of Deployments, one batched Prometheus observation
    decide   ebbtide.policy.autoscaling.decide(...) for each service that is due
    act      patch the Deployment's replicas when the decision changes them (never in Advisory)
    explain  an Event per change, status (last decision, history, conditions, memory), metrics

The policy lives in the pure core; this module only moves values between it and the cluster.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kubernetes.client.rest import ApiException

from ebbtide.api.conditions import set_condition
from ebbtide.api.ref import ServiceRef
from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.cluster.kube import Kube
from ebbtide.cluster.render import LABEL_SERVICE, LABEL_SERVING, MANAGED_BY, deployment_name
from ebbtide.operator_metrics import OperatorMetrics
from ebbtide.policy.decision import Decision, Memory
from ebbtide.policy.lifecycle import plan
from ebbtide.policy.observation import FleetState, Signals
from ebbtide.reconcile import Registry
from ebbtide.signals.prometheus import PrometheusSource, ServiceQuery

log = logging.getLogger(__name__)

HISTORY = 10  # decisions kept in status: enough to read the last hour's story, small enough for etcd


@dataclass
class ServiceState:
    """Per-service state between ticks, mirrored into status so a restart loses nothing."""

    memory: Memory | None = None
    last_evaluated: float = float("-inf")
    # Advisory mode never changes the Deployment, so the same advice would repeat every tick;
    # it is reported when it changes, not on every tick.
    last_advice: int | None = None


@dataclass
class PodCounts:
    ready: int = 0
    starting: int = 0
    names: list[str] = field(default_factory=list)


def _is_ready(pod: dict) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def count_pods(pods: list[dict]) -> dict[tuple[str, str], PodCounts]:
    """Pods by (namespace, service): ready and serving, or on their way."""
    out: dict[tuple[str, str], PodCounts] = {}
    for pod in pods:
        meta = pod.get("metadata", {})
        service = (meta.get("labels") or {}).get(LABEL_SERVICE)
        if not service or meta.get("deletionTimestamp") or pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            continue
        counts = out.setdefault((meta.get("namespace", "default"), service), PodCounts())
        counts.names.append(meta["name"])
        serving = (meta.get("labels") or {}).get(LABEL_SERVING, "true") == "true"
        if _is_ready(pod) and serving:
            counts.ready += 1
        elif not _is_ready(pod):
            counts.starting += 1
    return out


def rfc3339(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ScalingLoop:
    def __init__(self, kube: Kube, registry: Registry, source: PrometheusSource, metrics: OperatorMetrics,
                 tick_seconds: float, clock: Callable[[], float] = time.time):
        self.kube = kube
        self.registry = registry
        self.source = source
        self.metrics = metrics
        self.tick_seconds = tick_seconds
        self.clock = clock
        self.states: dict[tuple[str, str], ServiceState] = {}

    async def run(self, stopped: asyncio.Event) -> None:
        while not stopped.is_set():
            started = time.perf_counter()
            try:
                await self.tick(self.clock())
            except Exception:  # a failed tick must not stop the loop; the next one retries
                log.exception("scaling tick failed")
            self.metrics.ticks.inc()
            self.metrics.tick_seconds.observe(time.perf_counter() - started)
            try:
                await asyncio.wait_for(stopped.wait(), timeout=self.tick_seconds)
            except TimeoutError:
                pass

    def _due(self, now: float) -> list[tuple[ServiceRef, InferenceServiceSpec, ServiceState]]:
        due = []
        for key, (ref, spec) in list(self.registry.services.items()):
            state = self.states.setdefault(key, ServiceState(memory=self.registry.memories.pop(key, None)))
            if now - state.last_evaluated >= spec.scaling.behavior.interval_seconds - 0.5:
                due.append((ref, spec, state))
        for key in set(self.states) - set(self.registry.services):
            del self.states[key]
            self.metrics.forget(*key)
        return due

    async def tick(self, now: float) -> None:
        due = self._due(now)
        if not due:
            return
        pods = count_pods(await self.kube.list_pods(LABEL_SERVICE))
        replicas = {(d["metadata"]["namespace"], d["metadata"]["name"]): d["spec"].get("replicas", 0)
                    for d in await self.kube.list_deployments(_selector(MANAGED_BY))}
        queries = [ServiceQuery.for_spec((ref.namespace, ref.name), ref.namespace,
                                         tuple(pods.get((ref.namespace, ref.name), PodCounts()).names), spec)
                   for ref, spec, _ in due]
        observed = await asyncio.to_thread(self.source.observe, queries, now)
        for ref, spec, state in due:
            key = (ref.namespace, ref.name)
            current = replicas.get((ref.namespace, deployment_name(ref)))
            if current is None:
                continue  # the workload is not there (yet): the reconciler will create it
            counts = pods.get(key, PodCounts())
            fleet = FleetState(current=current, ready=counts.ready, starting=counts.starting,
                               pod_names=tuple(counts.names))
            signals = observed.get(key) or Signals.missing("no observation")
            memory = state.memory or Memory.empty(now)
            decision = plan(spec, signals, fleet, memory, now)
            state.memory = decision.memory
            state.last_evaluated = now
            news = decision.changed and (spec.mode == "Active" or decision.desired != state.last_advice)
            state.last_advice = decision.desired if decision.changed else None
            await self._act_and_explain(ref, spec, fleet, signals, decision, news, now)

    async def _act_and_explain(self, ref: ServiceRef, spec: InferenceServiceSpec, fleet: FleetState,
                               signals: Signals, decision: Decision, news: bool, now: float) -> None:
        """Carry out a decision and report it; `news` is False for advice already given."""
        active = spec.mode == "Active"
        applied = False
        if decision.changed and active:
            try:
                await self.kube.scale(ref.namespace, deployment_name(ref), decision.desired)
                applied = True
            except ApiException as e:
                log.warning("%s/%s: scaling to %d failed: %s", ref.namespace, ref.name, decision.desired, e.reason)
                await self.kube.post_event(ref, "Warning", "ScaleFailed",
                                           f"could not scale to {decision.desired}: {e.status} {e.reason}")
        if news:
            if active:
                kind = "ScaledUp" if decision.desired > decision.current else "ScaledDown"
            else:
                kind = "AdvisoryScaleUp" if decision.desired > decision.current else "AdvisoryScaleDown"
            prefix = "" if active else "advisory, not applied: "
            await self.kube.post_event(ref, "Normal", kind, f"{prefix}{decision.message} [{decision.source}]")
            self.metrics.decisions.labels(ref.namespace, ref.name, decision.reason, str(applied).lower()).inc()
        self._export(ref, fleet, signals, decision)
        await self.kube.update_status(ref, lambda status: self._status(status, fleet, decision, applied, news, now))

    def _export(self, ref: ServiceRef, fleet: FleetState, signals: Signals, decision: Decision) -> None:
        labels = (ref.namespace, ref.name)
        self.metrics.desired.labels(*labels).set(decision.desired)
        self.metrics.ready.labels(*labels).set(fleet.ready)
        self.metrics.metrics_unavailable.labels(*labels).set(0 if signals.sampled_at and not signals.error else 1)
        for name, value in decision.signals.items():
            self.metrics.signal.labels(*labels, name).set(value)

    @staticmethod
    def _status(status: dict, fleet: FleetState, decision: Decision, applied: bool, news: bool, now: float) -> dict:
        stamp = rfc3339(now)
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
        if news:
            status["decisions"] = ((status.get("decisions") or []) + [record])[-HISTORY:]
            status["lastDecisionSummary"] = f"{decision.current}->{decision.desired} {decision.reason}"
        else:
            status.setdefault("lastDecisionSummary", f"{decision.current} {decision.reason}")
        conditions = status.get("conditions") or []
        for c in decision.conditions:
            conditions = set_condition(conditions, c.type, c.status, c.reason, c.message, stamp)
        status["conditions"] = conditions
        status["replicas"] = {**(status.get("replicas") or {}), "desired": decision.desired, "ready": fleet.ready,
                              "starting": fleet.starting}
        status["phase"] = _phase(fleet, decision)
        status["scaler"] = decision.memory.to_json()
        return status


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
