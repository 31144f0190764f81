"""Observe: every read of one tick, for all the services due, before anything is decided.

The pods and Deployments, and the nodes once some service uses spot (their taints announce
reclaims), as their watches keep them (cluster/mirror.py); one batched Prometheus observation,
the activation queries of services with nothing awake, and the demand profiles not held in
memory yet.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field, replace

from kubernetes.client.rest import ApiException

from ebbtide.api.ref import ServiceRef
from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.cluster.kube import Kube
from ebbtide.cluster.pods import ServicePods, node_essentials, reclaimed_nodes, summarize
from ebbtide.cluster.profile_store import configmap_name, read_profile
from ebbtide.control.state import ServiceState
from ebbtide.policy.observation import Signals
from ebbtide.policy.profile import Profile
from ebbtide.policy.spot import RECLAIM_TAINTS
from ebbtide.policy.tick import known_profile, wants_activation
from ebbtide.signals.prometheus import PrometheusSource, PrometheusUnavailable, ServiceQuery

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name)
Due = tuple[ServiceRef, InferenceServiceSpec, ServiceState]


@dataclass(frozen=True)
class Snapshot:
    """What one tick read, for the services due at `now`."""

    now: float
    pods: Mapping[Key, ServicePods]  # by service
    deployments: Mapping[Key, int]  # (namespace, Deployment name) -> spec.replicas
    reclaimed_nodes: frozenset[str]
    signals: Mapping[Key, Signals]  # by service
    activation: Mapping[Key, float]  # by service, for those read (nothing awake, and the read worked)
    profiles: Mapping[Key, Profile]  # by service, the stored demand profiles read this tick
    # By service with spec.variants: each variant's own signals (its pods' series), by variant name.
    variant_signals: Mapping[Key, Mapping[str, Signals]] = field(default_factory=dict)

    @classmethod
    def of(cls, now: float, pods: list[dict], deployments: list[dict], nodes: list[dict],
           signals: Mapping[Key, Signals], activation: Mapping[Key, float] | None = None,
           profiles: Mapping[Key, Profile] | None = None) -> Snapshot:
        """From the objects the API server returned and what Prometheus and the ConfigMaps said."""
        return cls(now=now, pods=summarize(pods),
                   deployments={(d["metadata"]["namespace"], d["metadata"]["name"]): d["spec"].get("replicas", 0)
                                for d in deployments},
                   reclaimed_nodes=frozenset(reclaimed_nodes(nodes, RECLAIM_TAINTS)), signals=signals,
                   activation=activation or {}, profiles=profiles or {})

    def pods_of(self, key: Key) -> ServicePods:
        return self.pods.get(key) or ServicePods()


async def observe(kube: Kube, source: PrometheusSource, due: list[Due], listed: list[dict], now: float) -> Snapshot:
    deployments = await kube.watched_deployments()
    nodes = await kube.watched_nodes(node_essentials) if any(spec.placement.spot.enabled for _, spec, _ in due) else []
    seen = Snapshot.of(now, listed, deployments, nodes, {})
    keyed = [((ref.namespace, ref.name), ref, spec, state) for ref, spec, state in due]
    observed = await asyncio.to_thread(source.observe, signal_queries(seen, due), now)
    # A one-tick stall is no news while the last samples are still fresh (ServiceState.signals_through).
    failed, held = source.failing, {key: (spec, state) for key, _, spec, state in keyed}

    def through(key: Key, observed_key: Hashable) -> Signals:
        spec, state = held[key]
        return state.signals_through(observed_key, observed[observed_key], failed, now,
                                     spec.scaling.behavior.stale_after_seconds)

    signals = {key: through(key, key) for key in held}
    variant_signals: dict[Key, dict[str, Signals]] = {}
    for key, name in _variant_keys(due):
        variant_signals.setdefault(key, {})[name] = through(key, (key, name))
    # Read only where they count: the activation query while nothing is awake, a profile not held yet.
    asleep = [(key, ref, spec) for key, ref, spec, _ in keyed if wants_activation(spec, seen.pods_of(key).views())]
    unknown = [(key, ref, spec) for key, ref, spec, state in keyed
               if spec.warmup.predictive.enabled and known_profile(spec, state.tick) is None]
    values = await asyncio.gather(*(_activation(source, ref, spec, now) for _, ref, spec in asleep))
    profiles = await asyncio.gather(*(_profile(kube, ref, spec) for _, ref, spec in unknown))
    return replace(seen, signals=signals, variant_signals=variant_signals,
                   activation={key: v for (key, _, _), v in zip(asleep, values, strict=True) if v is not None},
                   profiles={key: p for (key, _, _), p in zip(unknown, profiles, strict=True) if p is not None})


def _variant_keys(due: list[Due]) -> list[tuple[Key, str]]:
    return [((ref.namespace, ref.name), v.name) for ref, spec, _ in due if spec.has_variants for v in spec.variants]


def signal_queries(seen: Snapshot, due: list[Due]) -> list[ServiceQuery]:
    """One query per service, its pods; with spec.variants one more per variant, its pods, keyed
    (service, variant). A variant's signals are its pods' series out of the same answers: more
    keys, not more queries to Prometheus."""
    specs = {(ref.namespace, ref.name): spec for ref, spec, _ in due}
    queries = [ServiceQuery.for_spec(key, key[0], tuple(seen.pods_of(key).names), spec) for key, spec in specs.items()]
    return queries + [ServiceQuery.for_spec((key, name), key[0], tuple(
        p.name for p in seen.pods_of(key).members if p.variant == name), specs[key]) for key, name in _variant_keys(due)]


async def _activation(source: PrometheusSource, ref: ServiceRef, spec: InferenceServiceSpec,
                      now: float) -> float | None:
    """The activation query's value (policy/activation.py), or None if it could not be read."""
    assert spec.scaling.activation is not None
    try:
        return await asyncio.to_thread(source.read_value, spec.scaling.activation.query, now)
    except PrometheusUnavailable as e:
        log.warning("%s/%s: %s; staying at zero", ref.namespace, ref.name, e)
        return None


async def _profile(kube: Kube, ref: ServiceRef, spec: InferenceServiceSpec) -> Profile | None:
    """The demand profile kept in its ConfigMap (an empty one if there is none), or None while
    the ConfigMap cannot be read: starting an empty one then would overwrite what was learned
    at the next save."""
    predictive = spec.warmup.predictive
    try:
        stored = await kube.read("ConfigMap", ref.namespace, configmap_name(ref))
    except ApiException as e:
        log.warning("%s/%s: demand profile not read (%s); pre-warming waits", ref.namespace, ref.name, e.reason)
        return None
    return Profile.load(read_profile(stored), predictive.lookback_weeks, predictive.timezone)
