"""Render the Kubernetes objects an InferenceService owns: Deployment(s), Service, PodDisruptionBudget.

Pure functions from (identity, spec) to plain dicts. `ebbtide render` prints exactly what the
operator applies, because both call `render_workload`.

With spot placement there are two Deployments, `<name>` on demand and `<name>-spot`, each
selecting its pods by the capacity-type label so that neither adopts the other's pods; the
Service and the PodDisruptionBudget select both. The provider preset (cluster/placement.py) pins each
Deployment to its kind of node: spot pods to spot nodes (with the tolerations those need), and
on-demand pods away from them, or the on-demand base could quietly land on spot.
"""

from __future__ import annotations

import hashlib
import json

from ebbtide.api.engine import EngineSpec
from ebbtide.api.manifest import parse_spec
from ebbtide.api.redaction import redacted, restored
from ebbtide.api.ref import ServiceRef
from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.cluster.placement import LABEL_CAPACITY, LABEL_SERVICE, Shape, grace_period, pod_placement
from ebbtide.cluster.variants import first_counts, single_variant_shape, variant_shape
from ebbtide.policy.capacity_types import ON_DEMAND, SPOT
from ebbtide.policy.spot import SpotPods, split

# The Service selects only pods labelled serving=true: a sleeping or still-warming replica is
# taken out of the endpoints by flipping this label, since vLLM's /health stays 200 while asleep.
LABEL_SERVING = "ebbtide.dev/serving"
MANAGED_BY = {"app.kubernetes.io/managed-by": "ebbtide"}
MANAGED_SELECTOR = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())  # as a label selector
ANNOTATION_SPEC = "ebbtide.dev/applied-spec"
ANNOTATION_SPEC_HASH = "ebbtide.dev/spec-hash"
CONTAINER = "vllm"
# The pod readiness gate a new replica passes once it has served its warm-up requests
# (cluster/warmup.py sets it): the pod is not Ready, and so not in the Service's endpoints,
# until its first real requests (CUDA graphs, caches) are behind it.
CONDITION_WARMED_UP = "ebbtide.dev/warmed-up"


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


def capacity_of(deployment: dict) -> str:
    """ON_DEMAND or SPOT: which of the service's Deployments this is (from its capacity-type label)."""
    return deployment.get("metadata", {}).get("labels", {}).get(LABEL_CAPACITY, ON_DEMAND)


def engine_args(spec: InferenceServiceSpec, engine: EngineSpec | None = None,
                tensor_parallel: int | None = None) -> list[str]:
    """`vllm serve`'s arguments; a variant passes its own engine and tensor-parallel size."""
    engine = engine or spec.engine
    tensor_parallel = engine.gpus if tensor_parallel is None else tensor_parallel
    args = [spec.model.name, "--port", str(engine.port), "--served-model-name", spec.served_model_name]
    if tensor_parallel > 1:
        args += ["--tensor-parallel-size", str(tensor_parallel)]
    if spec.sleep.enabled:
        args.append("--enable-sleep-mode")
    return args + list(engine.args)


def _resources(spec: InferenceServiceSpec, engine: EngineSpec) -> dict:
    requests = dict(engine.resources.requests)
    limits = dict(engine.resources.limits)
    if spec.sleep.enabled:
        # Level-1 sleep moves the weights to host RAM; without room for them the pod is OOM-killed.
        requests.setdefault("memory", spec.sleep.host_memory)
    if engine.gpus:
        requests[engine.gpu_resource] = engine.gpus
        limits[engine.gpu_resource] = engine.gpus
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
    selector = {LABEL_SERVICE: ref.name, LABEL_CAPACITY: capacity}
    shape = Shape(deployment_name(ref, capacity), {LABEL_CAPACITY: capacity}, {LABEL_CAPACITY: capacity},
                  pod_placement(spec, capacity, selector), grace_period(spec, capacity), spec.engine, spec.engine.gpus)
    return deployment(ref, spec, shape, replicas)


def deployment(ref: ServiceRef, spec: InferenceServiceSpec, shape: Shape, replicas: int | None = None) -> dict:
    engine = shape.engine
    selector = {LABEL_SERVICE: ref.name, **shape.selector}
    pod_labels = _labels(ref) | shape.labels | {LABEL_SERVING: "true"}
    env = [e.to_wire() for e in engine.env]
    if spec.sleep.enabled:
        env.append({"name": "VLLM_SERVER_DEV_MODE", "value": "1"})  # the sleep routes exist only with it
    startup_period = 10
    volumes, mounts = _volumes(engine)
    container = {
        "name": CONTAINER,
        "image": engine.image,
        "command": ["vllm", "serve"],
        "args": engine_args(spec, engine, shape.tensor_parallel),
        "ports": [{"name": "http", "containerPort": engine.port, "protocol": "TCP"}],
        "resources": _resources(spec, engine),
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
        "terminationGracePeriodSeconds": shape.grace_seconds,
        "containers": [container],
        "volumes": volumes,
        **shape.placement,
    }
    if spec.warmup.requests > 0:
        pod_spec["readinessGates"] = [{"conditionType": CONDITION_WARMED_UP}]
    metadata = _metadata(ref, shape.name, _labels(ref) | shape.labels)
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
    replicas.min (no spot pod exists yet, so nothing is covered). With variants, one
    Deployment each (cluster/variants.py). The counts only matter when a Deployment is created:
    from then on the scaling loop sets them.
    """
    if len(spec.variants) > 1:  # one Deployment per variant (cluster/variants.py)
        counts = first_counts(spec)
        deployments = [deployment(ref, spec, variant_shape(ref, spec, v), counts[v.name]) for v in spec.variants]
    elif spec.variants:
        deployments = [deployment(ref, spec, single_variant_shape(ref, spec, spec.variants[0]))]
    elif not spec.placement.spot.enabled:
        deployments = [render_deployment(ref, spec)]
    else:
        first = split(spec.replicas.min, spec.placement.spot, SpotPods(), (), 0.0, 0.0)
        deployments = [render_deployment(ref, spec, ON_DEMAND, first.on_demand),
                       render_deployment(ref, spec, SPOT, first.spot)]
    return [*deployments, render_service(ref, spec), render_pdb(ref, spec)]
