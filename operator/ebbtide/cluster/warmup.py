"""Warm new replicas before they take traffic: the `ebbtide.dev/warmed-up` readiness gate.

A pod rendered with `spec.warmup.requests > 0` carries a readiness gate (render.py), so the
kubelet keeps it out of Ready, and out of the Service's endpoints, until the operator sets that
condition. Once per tick, `warm_up` finds the pods whose engine is up (containers ready) but
that have not passed the gate, sends each `requests` small completions straight to the pod
(status.podIP and its container port, as the sleep calls do: cluster/engine.py; the test bed's
pod runner writes each engine's loopback port as its containerPort), and then sets the
condition on the pod's status: True when all were answered, False with the error otherwise
(retried on the next tick).

A warm-up belongs to one run of the engine container: when the container restarts (a crash,
an OOM kill), the new engine is as cold as a new replica, yet the condition would still say
True and the kubelet would route traffic to it the moment it is up. So a True condition older
than the running container's start (or with no container running) is set back to False at
once, while the engine is still down, and the pod is warmed again once it is up.

The first real requests are the slow ones (lazy initialisation, cold caches), and they are
paid by the operator instead of a user. Startup times (cluster/pods.py, pod created to Ready)
include the warm-up, as they should: it is part of the time a replica takes to be useful.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from kubernetes.client.rest import ApiException

from ebbtide.api.conditions import get_condition, set_condition
from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.cluster.engine import engine_container, engine_started_at, engine_status, engine_url
from ebbtide.cluster.kube import Forbidden, Kube
from ebbtide.cluster.objects import now_rfc3339
from ebbtide.cluster.pods import parse_time
from ebbtide.cluster.render import CONDITION_WARMED_UP, LABEL_SERVICE

log = logging.getLogger(__name__)

# Small on purpose: a warm-up request exercises the whole path (tokenizer, scheduler, a
# forward pass, detokenizer) without holding a new replica's GPU for long.
PROMPT = "Hello, how are you today?"
MAX_TOKENS = 4


@dataclass(frozen=True)
class WarmUpResult:
    namespace: str
    pod: str
    ok: bool
    message: str  # what the condition's message says


class WarmUpFailed(Exception):
    pass


def _containers_ready(pod: dict) -> bool:
    status = pod.get("status") or {}
    condition = get_condition(status.get("conditions"), "ContainersReady")
    if condition is not None:
        return condition.get("status") == "True"
    statuses = status.get("containerStatuses") or []
    return bool(statuses) and all(s.get("ready") for s in statuses)


def needs_warm_up(pod: dict) -> bool:
    """Gated on warm-up, not on its way out, and either engine up and not passed yet, or
    passed by an earlier run of its engine container (see the module docstring)."""
    gates = {g.get("conditionType") for g in (pod.get("spec") or {}).get("readinessGates") or []}
    if CONDITION_WARMED_UP not in gates or pod.get("metadata", {}).get("deletionTimestamp"):
        return False
    warmed = _passed(pod)
    return warmed_an_earlier_run(pod, warmed) if warmed is not None else _containers_ready(pod)


def _passed(pod: dict) -> dict | None:
    """The pod's WarmedUp condition if it is True."""
    warmed = get_condition((pod.get("status") or {}).get("conditions"), CONDITION_WARMED_UP)
    return warmed if warmed is not None and warmed.get("status") == "True" else None


def warmed_an_earlier_run(pod: dict, warmed: dict) -> bool:
    """The True condition predates the engine container now running (or none runs).

    Times are whole seconds: a container that restarts within the second its warm-up ended
    goes unnoticed (an engine takes far longer than that to load a model).
    """
    if not engine_status(pod):  # the kubelet has reported no container yet: nothing to compare
        return False
    started = parse_time(engine_started_at(pod))
    passed = parse_time(warmed.get("lastTransitionTime"))
    return started is None or (passed is not None and started > passed)


def served_model(pod: dict, spec: InferenceServiceSpec) -> str:
    """The name the engine answers to: the pod's own --served-model-name (it may predate a spec
    change), else the spec's."""
    args = [str(a) for a in engine_container(pod).get("args") or []]
    for i, arg in enumerate(args):
        if arg.startswith("--served-model-name="):
            return arg.partition("=")[2]
        if arg == "--served-model-name" and i + 1 < len(args):
            return args[i + 1]
    return spec.served_model_name


async def _send(session: aiohttp.ClientSession, url: str, model: str, requests: int) -> None:
    """`requests` completions one after another (each warms what the previous one did not)."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    for i in range(requests):
        try:
            async with session.post(f"{url}/v1/completions", json=body) as response:
                if response.status != 200:
                    text = (await response.text())[:200]
                    raise WarmUpFailed(f"request {i + 1}/{requests}: HTTP {response.status}: {text}")
                await response.read()
        except aiohttp.ClientError as e:
            raise WarmUpFailed(f"request {i + 1}/{requests} to {url}: {e}") from e


async def _set_condition(kube: Kube, pod: dict, ok: bool, message: str, reason: str | None = None) -> None:
    conditions = (pod.get("status") or {}).get("conditions") or []
    # set_condition keeps lastTransitionTime while the status stays (False after False).
    updated = set_condition(conditions, CONDITION_WARMED_UP, "True" if ok else "False",
                            reason or ("WarmedUp" if ok else "WarmUpFailed"), message[:1024], now_rfc3339())
    meta = pod["metadata"]
    await kube.patch_pod_status(meta["namespace"], meta["name"],
                                {"conditions": [get_condition(updated, CONDITION_WARMED_UP)]})


async def _warm_one(kube: Kube, session: aiohttp.ClientSession, pod: dict, spec: InferenceServiceSpec,
                    timeout: float) -> WarmUpResult:
    meta = pod["metadata"]
    requests = spec.warmup.requests
    url = engine_url(pod)
    started = time.monotonic()
    if _passed(pod) is not None:
        # Warmed by an engine that has restarted since: out of the endpoints now (the kubelet
        # would route to it the moment it is up), warmed again by a later tick.
        message = "the engine restarted after its warm-up; warming it again once it is up"
        try:
            await _set_condition(kube, pod, False, message, reason="EngineRestarted")
        except ApiException as e:
            message = f"could not reset {CONDITION_WARMED_UP}: {e.status} {e.reason}"
        log.warning("%s/%s: %s", meta["namespace"], meta["name"], message)
        return WarmUpResult(meta["namespace"], meta["name"], False, message)
    try:
        if requests == 0:
            # Gated, but warm-up was switched off since (a merge patch does not remove the gate
            # from the template): let the pod through rather than keep it out for ever.
            message = "warm-up is off (spec.warmup.requests is 0)"
        elif url is None:
            raise WarmUpFailed("the pod has no IP or container port yet")
        else:
            async with asyncio.timeout(timeout):
                await _send(session, url, served_model(pod, spec), requests)
            message = f"served {requests} warm-up requests in {time.monotonic() - started:.1f} s"
        ok = True
    except WarmUpFailed as e:
        ok, message = False, f"warm-up failed: {e}"
    except TimeoutError:
        ok, message = False, f"warm-up failed: no answer to {requests} requests within {timeout:g} s"
    try:
        await _set_condition(kube, pod, ok, message)
    except Forbidden:  # Kube said once that pods/status may not be patched; no warning per pod per tick
        return WarmUpResult(meta["namespace"], meta["name"], False, f"{CONDITION_WARMED_UP} not set: forbidden")
    except ApiException as e:  # gone, or the API blipped: the next tick sees the pod again
        ok, message = False, f"could not set {CONDITION_WARMED_UP}: {e.status} {e.reason}"
    if ok:
        log.info("%s/%s: %s", meta["namespace"], meta["name"], message)
    else:
        log.warning("%s/%s: %s; retrying next tick", meta["namespace"], meta["name"], message)
    return WarmUpResult(meta["namespace"], meta["name"], ok, message)


async def warm_up(kube: Kube, pods: list[dict], spec_by_service: Mapping[tuple[str, str], InferenceServiceSpec],
                  *, timeout: float = 20.0, concurrency: int = 8) -> list[WarmUpResult]:
    """Warm every pod that waits on its warm-up gate; one result per pod tried.

    `pods`: the tick's list of pods (plain dicts from the API); `spec_by_service`: the spec of
    each service by (namespace, name), the key of cluster/pods.summarize. Pods of services not
    in it are left alone. `timeout` bounds one pod's warm-up (all its requests), so a hung engine
    holds the tick no longer than that; `concurrency` bounds the pods warmed at once.
    """
    work = []
    for pod in pods:
        meta = pod.get("metadata", {})
        spec = spec_by_service.get((meta.get("namespace"), (meta.get("labels") or {}).get(LABEL_SERVICE)))
        if spec is not None and needs_warm_up(pod):
            work.append((pod, spec))
    if not work:
        return []
    slots = asyncio.Semaphore(concurrency)

    async def bounded(pod: dict, spec: InferenceServiceSpec) -> WarmUpResult:
        async with slots:
            return await _warm_one(kube, session, pod, spec, timeout)

    async with aiohttp.ClientSession() as session:
        return list(await asyncio.gather(*(bounded(pod, spec) for pod, spec in work)))
