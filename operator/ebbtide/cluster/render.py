"""Render the Kubernetes objects an InferenceService owns: Deployment(s), Service, PodDisruptionBudget.

Pure functions from (identity, spec) to plain dicts. `ebbtide render` prints exactly what the
operator applies, because both call `render_workload`.

With spot placement there are two Deployments, `<name>` on demand and `<name>-spot`, each
selecting its pods by the capacity-type label so that neither adopts the other's pods; the
Service and the PodDisruptionBudget select both. The provider preset (SPOT_PRESETS) pins each
Deployment to its kind of node: spot pods to spot nodes (with the tolerations those need), and
on-demand pods away from them, or the on-demand base could quietly land on spot.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ebbtide.api.engine import EngineSpec
from ebbtide.api.manifest import parse_spec
from ebbtide.api.redaction import redacted, restored
from ebbtide.api.ref import ServiceRef
from ebbtide.api.spec import InferenceServiceSpec, Toleration
from ebbtide.policy.capacity_types import ON_DEMAND, SPOT
from ebbtide.policy.spot import SpotPods, split

LABEL_SERVICE = "ebbtide.dev/service"
LABEL_CAPACITY = "ebbtide.dev/capacity-type"
# The Service selects only pods labelled serving=true: a sleeping or still-warming replica is
# taken out of the endpoints by flipping this label, since vLLM's /health stays 200 while asleep.
LABEL_SERVING = "ebbtide.dev/serving"
MANAGED_BY = {"app.kubernetes.io/managed-by": "ebbtide"}
ANNOTATION_SPEC = "ebbtide.dev/applied-spec"
ANNOTATION_SPEC_HASH = "ebbtide.dev/spec-hash"
CONTAINER = "vllm"
# The pod readiness gate a new replica passes once it has served its warm-up requests
# (cluster/warmup.py sets it): the pod is not Ready, and so not in the Service's endpoints,
# until its first real requests (CUDA graphs, caches) are behind it.
CONDITION_WARMED_UP = "ebbtide.dev/warmed-up"


ZONE = "topology.kubernetes.io/zone"


@dataclass(frozen=True)
class SpotPreset:
    """How one provider marks spot nodes (anchors.md, "Spot facts by cloud")."""

    spot_selector: dict[str, str]  # node labels of spot nodes
    spot_tolerations: tuple[dict, ...]  # taints spot nodes carry that spot pods must tolerate
    # What keeps on-demand pods off spot nodes: a label only on-demand nodes carry, or else
    # requirements (ANDed) that spot nodes fail.
    on_demand_selector: dict[str, str]
    on_demand_requirements: tuple[dict, ...]
    reclaim_notice_seconds: int | None  # the shortest warning a pod gets before its node goes


def _not_in(key: str, value: str) -> dict:
    # NotIn also matches nodes without the label, which is what plain on-demand nodes look like.
    return {"key": key, "operator": "NotIn", "values": [value]}


def _no_schedule(key: str, value: str) -> dict:
    return {"key": key, "operator": "Equal", "value": value, "effect": "NoSchedule"}


GKE_SPOT = "cloud.google.com/gke-spot"
GKE_PREEMPTIBLE = "cloud.google.com/gke-preemptible"  # the older kind of GKE spot VM
AKS_PRIORITY = "kubernetes.azure.com/scalesetpriority"

SPOT_PRESETS: dict[str, SpotPreset] = {
    # Karpenter and EKS managed node groups label on-demand nodes too: select them directly.
    "karpenter": SpotPreset({"karpenter.sh/capacity-type": "spot"}, (),
                            {"karpenter.sh/capacity-type": "on-demand"}, (), 120),
    "eks": SpotPreset({"eks.amazonaws.com/capacityType": "SPOT"}, (),
                      {"eks.amazonaws.com/capacityType": "ON_DEMAND"}, (), 120),
    # GKE and AKS label only spot nodes: keep on-demand pods away from that label. GKE gives
    # ordinary pods 15 s of the 30 s notice; Autopilot (and many node pools) taint spot nodes.
    "gke": SpotPreset({GKE_SPOT: "true"}, (_no_schedule(GKE_SPOT, "true"),), {},
                      (_not_in(GKE_SPOT, "true"), _not_in(GKE_PREEMPTIBLE, "true")), 15),
    "aks": SpotPreset({AKS_PRIORITY: "spot"}, (_no_schedule(AKS_PRIORITY, "spot"),), {},
                      (_not_in(AKS_PRIORITY, "spot"),), 30),
    # Only what the user wrote: placement.spot.nodeSelector says which nodes are spot (see _custom).
    "custom": SpotPreset({}, (), {}, (), None),
}


def _kept(spec: InferenceServiceSpec) -> str:
    """The spec as annotations keep it: env values fingerprinted (api/redaction.py)."""
    return json.dumps(redacted(spec.to_wire()), sort_keys=True, separators=(",", ":"))


def spec_hash(spec: InferenceServiceSpec) -> str:
    return hashlib.sha256(_kept(spec).encode()).hexdigest()[:16]


def deployment_name(ref: ServiceRef, capacity: str = ON_DEMAND) -> str:
    return ref.name if capacity == ON_DEMAND else f"{ref.name}-{capacity}"


def _labels(ref: ServiceRef) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "vllm",
        "app.kubernetes.io/instance": ref.name,
        "app.kubernetes.io/component": "model-server",
        **MANAGED_BY,
        LABEL_SERVICE: ref.name,
    }


def _metadata(ref: ServiceRef, name: str, labels: dict[str, str]) -> dict:
    return {
        "name": name,
        "namespace": ref.namespace,
        "labels": labels,
        "ownerReferences": [ref.owner_reference()],
    }


def _tolerations(tolerations: list[Toleration]) -> list[dict]:
    return [t.to_wire() for t in tolerations]


def capacity_of(deployment: dict) -> str:
    """ON_DEMAND or SPOT: which of the service's Deployments this is (from its capacity-type label)."""
    return deployment.get("metadata", {}).get("labels", {}).get(LABEL_CAPACITY, ON_DEMAND)


def _unique(items: list[dict]) -> list[dict]:
    out: list[dict] = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


def _on_demand_terms(spec: InferenceServiceSpec, preset: SpotPreset) -> list[dict]:
    """Required node-affinity terms (ORed) that spot nodes fail; [] when the preset selects by label.

    Custom: spot nodes are the ones matching all of placement.spot.nodeSelector, so an
    on-demand node is one that misses any of those labels: one NotIn term per label. With no
    spot selector there is nothing to tell spot nodes by, and nothing is added.
    """
    if preset.on_demand_requirements:
        return [{"matchExpressions": list(preset.on_demand_requirements)}]
    if spec.placement.spot.provider == "custom":
        return [{"matchExpressions": [_not_in(k, v)]} for k, v in sorted(spec.placement.spot.node_selector.items())]
    return []


def _placement(spec: InferenceServiceSpec, capacity: str, selector: dict[str, str]) -> dict:
    """The pod-spec fields that decide where a replica of this capacity type may run."""
    placement = spec.placement
    node_selector = dict(placement.node_selector)
    tolerations = _tolerations(placement.tolerations)
    out: dict = {}
    if placement.spot.enabled:
        preset = SPOT_PRESETS[placement.spot.provider]
        if capacity == SPOT:
            # The preset wins over the service-wide selector (a capacity label there would make
            # the spot pods unschedulable); the user's spot selector wins over the preset.
            node_selector |= preset.spot_selector | placement.spot.node_selector
            tolerations += [*preset.spot_tolerations, *_tolerations(placement.spot.tolerations)]
            # Reclaims take capacity pools, often one zone at a time: spread spot replicas so one
            # reclaim takes as few of them as it can (SkyServe spreads over zones the same way).
            # ScheduleAnyway: a replica in a crowded zone beats a replica Pending.
            out["topologySpreadConstraints"] = [{
                "maxSkew": 1, "topologyKey": ZONE, "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": dict(selector)},
            }]
        else:
            node_selector |= preset.on_demand_selector
            terms = _on_demand_terms(spec, preset)
            if terms:
                out["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": terms}}}
    if node_selector:
        out["nodeSelector"] = node_selector
    if tolerations:
        out["tolerations"] = _unique(tolerations)
    return out


def _grace_period(spec: InferenceServiceSpec, capacity: str) -> int:
    """Seconds a stopping replica gets to finish its requests.

    On spot, no more than the provider's shortest reclaim notice: the node goes when the
    notice ends whatever the pod asked for, so a longer grace period only hides that the
    replica's requests will be cut. Fitting it in the notice makes the drain (preStop, vLLM's
    shutdown) plan for the time it really has. Custom: the notice is unknown, the spec's
    value stands.
    """
    grace = spec.engine.termination_grace_period_seconds
    if capacity != SPOT:
        return grace
    notice = SPOT_PRESETS[spec.placement.spot.provider].reclaim_notice_seconds
    return grace if notice is None else min(grace, notice)


def engine_args(spec: InferenceServiceSpec) -> list[str]:
    args = [spec.model.name, "--port", str(spec.engine.port), "--served-model-name", spec.served_model_name]
    if spec.engine.gpus > 1:
        args += ["--tensor-parallel-size", str(spec.engine.gpus)]
    if spec.sleep.enabled:
        args.append("--enable-sleep-mode")
    return args + list(spec.engine.args)


def _resources(spec: InferenceServiceSpec) -> dict:
    requests = dict(spec.engine.resources.requests)
    limits = dict(spec.engine.resources.limits)
    if spec.sleep.enabled:
        # Level-1 sleep moves the weights to host RAM; without room for them the pod is OOM-killed.
        requests.setdefault("memory", spec.sleep.host_memory)
    if spec.engine.gpus:
        requests[spec.engine.gpu_resource] = spec.engine.gpus
        limits[spec.engine.gpu_resource] = spec.engine.gpus
    # Quantities as strings: the API server stores them so, and drift checks compare like with like.
    out = {}
    if requests:
        out["requests"] = {k: str(v) for k, v in requests.items()}
    if limits:
        out["limits"] = {k: str(v) for k, v in limits.items()}
    return out


def _probe(period: int, failures: int) -> dict:
    return {
        "httpGet": {"path": "/health", "port": "http"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 5,
    }


def _volumes(engine: EngineSpec) -> tuple[list[dict], list[dict]]:
    """The pod's volumes, and the engine container's mounts of them."""
    # NCCL and vLLM's workers share tensors through /dev/shm; the container default is 64 MiB.
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    cache = engine.model_cache
    if cache is not None:
        claim, scratch = cache.persistent_volume_claim, cache.empty_dir
        source = ({"persistentVolumeClaim": {"claimName": claim.claim_name}} if claim is not None
                  else {"emptyDir": {"sizeLimit": str(scratch.size_limit)}})  # as the API server stores it
        volumes.append({"name": "model-cache", **source})
        mounts.append({"name": "model-cache", "mountPath": cache.mount_path})
    return volumes, mounts


def render_deployment(ref: ServiceRef, spec: InferenceServiceSpec, capacity: str = ON_DEMAND,
                      replicas: int | None = None) -> dict:
    engine = spec.engine
    selector = {LABEL_SERVICE: ref.name, LABEL_CAPACITY: capacity}
    pod_labels = _labels(ref) | {LABEL_CAPACITY: capacity, LABEL_SERVING: "true"}
    env = [e.to_wire() for e in engine.env]
    if spec.sleep.enabled:
        env.append({"name": "VLLM_SERVER_DEV_MODE", "value": "1"})  # the sleep routes exist only with it
    startup_period = 10
    volumes, mounts = _volumes(engine)
    container = {
        "name": CONTAINER,
        "image": engine.image,
        "command": ["vllm", "serve"],
        "args": engine_args(spec),
        "ports": [{"name": "http", "containerPort": engine.port, "protocol": "TCP"}],
        "resources": _resources(spec),
        # vLLM binds its port only once the model is loaded: the startup probe carries the long
        # budget so that liveness can stay strict once the engine is up.
        "startupProbe": _probe(startup_period, max(1, engine.startup_budget_seconds // startup_period)),
        "readinessProbe": _probe(5, 3),
        "livenessProbe": _probe(10, 6),
        # Give endpoints time to drop the pod before vLLM stops accepting requests.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", "5"]}}},
        "volumeMounts": mounts,
    }
    if env:  # an API server drops an empty list: rendering one would read as drift forever
        container["env"] = env
    if engine.env_from:
        container["envFrom"] = [source.to_wire() for source in engine.env_from]
    pod_spec: dict = {
        "terminationGracePeriodSeconds": _grace_period(spec, capacity),
        "containers": [container],
        "volumes": volumes,
        **_placement(spec, capacity, selector),
    }
    if spec.warmup.requests > 0:
        pod_spec["readinessGates"] = [{"conditionType": CONDITION_WARMED_UP}]
    metadata = _metadata(ref, deployment_name(ref, capacity), _labels(ref) | {LABEL_CAPACITY: capacity})
    metadata["annotations"] = {
        ANNOTATION_SPEC_HASH: spec_hash(spec),
        # The spec this Deployment was rendered from: the last valid spec, kept in the cluster so
        # a restarted operator facing an invalid edit still knows what it was running
        # (applied_spec reads it back, with the env values from the pod template).
        ANNOTATION_SPEC: _kept(spec),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": spec.replicas.min if replicas is None else replicas,
            "selector": {"matchLabels": selector},
            # A GPU replica is expensive and slow to start: surge one at a time and never drop
            # a serving replica before its replacement is ready.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(engine.port),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def applied_spec(deployment: dict) -> InferenceServiceSpec | None:
    """The spec a Deployment was rendered from, or None if it does not say.

    Raises ValueError (InvalidSpec is one) when the annotation can no longer be read back.
    """
    kept = deployment["metadata"].get("annotations", {}).get(ANNOTATION_SPEC)
    if not kept:
        return None
    containers = deployment["spec"]["template"]["spec"]["containers"]
    env = next((c.get("env", []) for c in containers if c["name"] == CONTAINER), [])
    return parse_spec(restored(json.loads(kept), env))


def render_service(ref: ServiceRef, spec: InferenceServiceSpec) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ref, ref.name, _labels(ref)),
        "spec": {
            "type": "ClusterIP",
            "selector": {LABEL_SERVICE: ref.name, LABEL_SERVING: "true"},
            "ports": [{"name": "http", "port": spec.engine.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def render_pdb(ref: ServiceRef, spec: InferenceServiceSpec) -> dict:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(ref, ref.name, _labels(ref)),
        # Voluntary disruptions (node drains, upgrades) take one replica at a time.
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {LABEL_SERVICE: ref.name}}},
    }


def render_workload(ref: ServiceRef, spec: InferenceServiceSpec) -> list[dict]:
    """Every object the service owns, in apply order.

    With spot placement, both Deployments; their replica counts are the first split of
    replicas.min (no spot pod exists yet, so nothing is covered). They only matter when a
    Deployment is created: from then on the scaling loop sets the counts.
    """
    if not spec.placement.spot.enabled:
        deployments = [render_deployment(ref, spec)]
    else:
        first = split(spec.replicas.min, spec.placement.spot, SpotPods(), (), 0.0, 0.0)
        deployments = [render_deployment(ref, spec, ON_DEMAND, first.on_demand),
                       render_deployment(ref, spec, SPOT, first.spot)]
    return [*deployments, render_service(ref, spec), render_pdb(ref, spec)]
