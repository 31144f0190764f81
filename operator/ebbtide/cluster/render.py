"""Render the Kubernetes objects an InferenceService owns: Deployment(s), Service, PodDisruptionBudget.

Pure functions from (identity, spec) to plain dicts. `ebbtide render` prints exactly what the
operator applies, because both call `render_workload`.
"""

from __future__ import annotations

import hashlib
import json

from ebbtide.api.ref import ServiceRef
from ebbtide.api.spec import InferenceServiceSpec, Toleration

LABEL_SERVICE = "ebbtide.dev/service"
LABEL_CAPACITY = "ebbtide.dev/capacity-type"
# The Service selects only pods labelled serving=true: a sleeping or still-warming replica is
# taken out of the endpoints by flipping this label, since vLLM's /health stays 200 while asleep.
LABEL_SERVING = "ebbtide.dev/serving"
MANAGED_BY = {"app.kubernetes.io/managed-by": "ebbtide"}
ANNOTATION_SPEC = "ebbtide.dev/applied-spec"
ANNOTATION_SPEC_HASH = "ebbtide.dev/spec-hash"

ON_DEMAND = "on-demand"
SPOT = "spot"


def spec_hash(spec: InferenceServiceSpec) -> str:
    return hashlib.sha256(json.dumps(spec.to_wire(), sort_keys=True).encode()).hexdigest()[:16]


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


def render_deployment(ref: ServiceRef, spec: InferenceServiceSpec, capacity: str = ON_DEMAND,
                      replicas: int | None = None) -> dict:
    engine = spec.engine
    selector = {LABEL_SERVICE: ref.name, LABEL_CAPACITY: capacity}
    pod_labels = _labels(ref) | {LABEL_CAPACITY: capacity, LABEL_SERVING: "true"}
    env = [e.to_wire() for e in engine.env]
    if spec.sleep.enabled:
        env.append({"name": "VLLM_SERVER_DEV_MODE", "value": "1"})  # the sleep routes exist only with it
    startup_period = 10
    container = {
        "name": "vllm",
        "image": engine.image,
        "command": ["vllm", "serve"],
        "args": engine_args(spec),
        "env": env,
        "ports": [{"name": "http", "containerPort": engine.port, "protocol": "TCP"}],
        "resources": _resources(spec),
        # vLLM binds its port only once the model is loaded: the startup probe carries the long
        # budget so that liveness can stay strict once the engine is up.
        "startupProbe": _probe(startup_period, max(1, engine.startup_budget_seconds // startup_period)),
        "readinessProbe": _probe(5, 3),
        "livenessProbe": _probe(10, 6),
        # Give endpoints time to drop the pod before vLLM stops accepting requests.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", "5"]}}},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    pod_spec: dict = {
        "terminationGracePeriodSeconds": engine.termination_grace_period_seconds,
        "containers": [container],
        # NCCL and vLLM's workers share tensors through /dev/shm; the container default is 64 MiB.
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }
    if spec.placement.node_selector:
        pod_spec["nodeSelector"] = dict(spec.placement.node_selector)
    if spec.placement.tolerations:
        pod_spec["tolerations"] = _tolerations(spec.placement.tolerations)
    metadata = _metadata(ref, deployment_name(ref, capacity), _labels(ref) | {LABEL_CAPACITY: capacity})
    metadata["annotations"] = {
        ANNOTATION_SPEC_HASH: spec_hash(spec),
        # The spec this Deployment was rendered from: the last valid spec, kept in the cluster so
        # a restarted operator facing an invalid edit still knows what it was running.
        ANNOTATION_SPEC: json.dumps(spec.to_wire(), sort_keys=True, separators=(",", ":")),
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
    """Every object the service owns, in apply order."""
    return [render_deployment(ref, spec), render_service(ref, spec), render_pdb(ref, spec)]
