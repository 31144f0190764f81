"""The scaling loop: once per tick, for every service that is due,

    observe  every read, batched for the fleet (control/observe.py)
    decide   the pure tick per service, and the actions it asks for (control/decide.py)
    act      the warm pool's moves (cluster/warm_pool.py), then the Deployments' counts (never
             in Advisory mode)
    explain  Events, status and metrics (control/explain.py); the demand profile's ConfigMap

The policy lives in policy/tick.py; this module only moves values between it and the cluster.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from kubernetes.client.rest import ApiException

from ebbtide.api.ref import ServiceRef
from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.cluster.engine import EngineClient
from ebbtide.cluster.kube import Conflict, Forbidden, Kube
from ebbtide.cluster.mirror import Unavailable
from ebbtide.cluster.pods import essentials
from ebbtide.cluster.profile_store import render_profile
from ebbtide.cluster.render import LABEL_SERVICE
from ebbtide.cluster.warm_pool import carry_out
from ebbtide.cluster.warmup import warm_up
from ebbtide.control import cadence
from ebbtide.control.cadence import slot
from ebbtide.control.decide import Step, decide
from ebbtide.control.explain import tell
from ebbtide.control.metrics import OperatorMetrics
from ebbtide.control.observe import Due, Snapshot, observe
from ebbtide.control.reconcile import Registry
from ebbtide.control.state import ServiceState
from ebbtide.memory import release_freed_memory
from ebbtide.policy.profile import BIN_SECONDS
from ebbtide.signals.prometheus import PrometheusSource

log = logging.getLogger(__name__)
FLUSH_SECONDS = 15  # within the pod's 30 s grace period, with room for kopf's own stop


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
        self.kube.loop_lane()
        while not stopped.is_set():
            started = time.perf_counter()
            try:
                await self.tick(self.clock())
            except Forbidden:
                pass  # Kube logged the missing permission once; a traceback every tick would add nothing
            except Unavailable as e:  # the API server is away: nothing is decided on what it may no longer hold
                log.warning("scaling tick skipped: %s", e)
            except Exception:  # a failed tick must not stop the loop; the next one retries
                log.exception("scaling tick failed")
            release_freed_memory()  # counted in the tick: it is the tick's own clean-up
            took = time.perf_counter() - started
            self.metrics.ticks.inc()
            self.metrics.tick_seconds.observe(took)
            # A tick every tick_seconds, start to start: each tick evaluates the services whose
            # phase its period covers, and with a pause of tick_seconds after each tick a long
            # tick made the next one longer still (bench/operator_scale.py).
            try:
                await asyncio.wait_for(stopped.wait(), timeout=max(0.0, self.tick_seconds - took))
            except TimeoutError:
                pass
        if self._warming is not None:
            self._warming.cancel()
        await self.flush()
        self.kube.stop_watching()
        await self.engines.close()

    async def flush(self) -> None:
        """On a graceful stop (an upgrade's rolling restart, `helm uninstall`), write what the
        periodic writes' budget held back: each status not written since its last evaluation,
        each profile learned since its last save. The next leader then resumes from this tick,
        not from up to a period ago (80 min of cost totals at 1,000 services). Bounded: a stop
        must not wait on an API server that is away. A lost Lease exits at once (control/leader.py):
        no flush then, since another leader may be writing."""
        async def one(ref: ServiceRef, state: ServiceState) -> None:
            if state.unwritten is not None:
                await self.kube.update_status(ref, state.unwritten)
            profile = state.tick.profile
            if profile is not None and profile.updated is not None and profile.updated > state.profile_saved:
                await self.kube.apply(render_profile(ref, profile), ref)

        held = [(ref, self.states[key]) for key, (ref, _) in self.registry.services.items() if key in self.states]
        try:
            done = await asyncio.wait_for(asyncio.gather(*(one(ref, state) for ref, state in held),
                                                         return_exceptions=True), FLUSH_SECONDS)
        except TimeoutError:
            log.warning("stopping: the held-back statuses and profiles were not all written within %d s", FLUSH_SECONDS)
            return
        failed = sum(isinstance(outcome, Exception) for outcome in done)
        if failed:
            log.warning("stopping: %d of %d held-back statuses and profiles not written", failed, len(done))

    def _due(self, now: float) -> list[Due]:
        due = []
        for key, (ref, spec) in list(self.registry.services.items()):
            state = self.states.get(key)
            if state is None:
                state = self.states[key] = ServiceState.restore(self.registry.stored.pop(key, None), now)
            # A new service, one restored after a restart, or one whose spec changed is evaluated
            # at once; then once per interval at its own phase: a fleet created together spreads.
            if state.evaluated_spec is not spec or cadence.due(
                    now, spec.scaling.behavior.interval_seconds, key, state.last_evaluated, state.evaluated_slot):
                due.append((ref, spec, state))
        for key in set(self.states) - set(self.registry.services):
            del self.states[key]
            self.metrics.forget(*key)
            self.kube.forget_status(*key)
        return due

    async def tick(self, now: float) -> None:
        started = time.perf_counter()
        due = self._due(now)
        # Pods are read every tick, due or not (from their watch: cluster/mirror.py): a new replica
        # waits at most one tick for its warm-up (its readiness gate), whatever the services' intervals.
        listed = await self.kube.watched_pods(LABEL_SERVICE, essentials)
        self._warm_up(listed)
        if not due:
            return
        ends = [time.perf_counter()]
        snapshot = await observe(self.kube, self.source, due, listed, now)
        ends.append(time.perf_counter())
        # Side by side: each service's writes are round trips to the API server, and one after
        # the other they made the tick grow by ~0.1 s per service (bench/operator_scale.py).
        # One service's failure is its own; the others are still evaluated.
        fleet = len(self.registry.services)
        done = await asyncio.gather(*(self._evaluate(snapshot, ref, spec, state, now, fleet)
                                      for ref, spec, state in due), return_exceptions=True)
        for (ref, _, _), outcome in zip(due, done, strict=True):
            if isinstance(outcome, Exception) and not isinstance(outcome, Forbidden):  # Kube logged a 403 once
                log.error("%s/%s: evaluation failed", ref.namespace, ref.name, exc_info=outcome)
        ends.append(time.perf_counter())
        if ends[-1] - started > self.tick_seconds:  # a late tick says where its time went
            log.info("a tick of %d services due took %.1f s: pods listed in %.1f s, observed in %.1f s, "
                     "evaluated in %.1f s", len(due), ends[-1] - started,
                     *(b - a for a, b in zip([started, *ends], ends, strict=False)))

    async def _evaluate(self, snapshot: Snapshot, ref: ServiceRef, spec: InferenceServiceSpec, state: ServiceState,
                        now: float, fleet: int) -> None:
        """Decide, act and explain for one service of a `fleet` of services."""
        step = decide(snapshot, ref, spec, state.tick)
        if step is None:
            return  # the workload is not there (yet): the reconciler will create it
        key = (ref.namespace, ref.name)
        state.last_evaluated, state.evaluated_spec = now, spec
        state.evaluated_slot = slot(now, spec.scaling.behavior.interval_seconds, key)
        if key in snapshot.profiles:  # read from its ConfigMap (or none there): as good as saved now
            state.profile_saved = now
        applied = spec.mode == "Active" and await self._act(ref, spec.sleep.level, step)
        # A scale that failed is no news (no ScaledUp/Down, no history entry every tick it
        # fails): the failure is what gets reported (ScaleFailed, or Forbidden once).
        turn = step.turn if applied or spec.mode != "Active" else step.turn.unapplied()
        state.tick = turn.state
        await tell(self.kube, self.metrics, ref, state, step, turn, applied, spec.scaling.behavior.interval_seconds,
                   fleet)
        await self._save_profile(ref, state, now, fleet)

    async def _act(self, ref: ServiceRef, level: int, step: Step) -> bool:
        """The pool moves, then the counts; False (with an Event) if a count could not be set."""
        for capacity, moves in step.actions.pools.items():
            for said in await carry_out(self.kube, self.engines, ref, level, step.pods.of(capacity), moves, step.now):
                await self.kube.post_event(ref, said.type, said.reason, said.message)
        for name, replicas in step.actions.scale:
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

    async def _save_profile(self, ref: ServiceRef, state: ServiceState, now: float, fleet: int) -> None:
        """Write the profile to its ConfigMap once per bin's length (or longer in a large `fleet`),
        each service at its own phase (see cluster/profile_store.py): a fleet's saves spread
        over the period."""
        profile = state.tick.profile
        if profile is None or profile.updated is None or not cadence.crossed(
                now, BIN_SECONDS, fleet, (ref.namespace, ref.name), state.profile_saved,
                cadence.PROFILE_SAVES_PER_SECOND):
            return
        try:
            await self.kube.apply(render_profile(ref, profile), ref)
            state.profile_saved = now
        except (ApiException, Conflict) as e:
            log.warning("%s/%s: demand profile not saved (%s); retrying next tick", ref.namespace, ref.name, e)

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
