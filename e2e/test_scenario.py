"""The end-to-end scenarios, written once for every backend (see e2e/backend.py).

1. The life of one InferenceService, sleep mode on: apply it, drive a load ramp and see it scale
   up (every new replica passes the warm-up readiness gate first); drop the load and see the
   surplus leave the Service and go to sleep after the stabilization window (the warm pool); a
   second, shorter burst wakes the sleepers (no pod is created) and is served; edit the spec
   (bounds 2..2, a short pool TTL) and see the surplus sleep and the TTL release it; delete it and
   see everything go.
2. Spot placement: an on-demand base plus spot replicas on the spot node; a reclaim notice on
   that node (Karpenter's taint) makes on-demand cover them at once (SpotFallback), and once the
   notice is gone the cover is given back after the window (SpotRecovered).

Timings are scaled down as in tests/test_closed_loop.py. Every step goes to
``artifacts/e2e-<backend>.log`` with a timestamp, the replica counts and the pods, and each
scenario ends with ``kubectl describe`` of its service.
"""

from __future__ import annotations

import time

import pytest
from tests.testbed.loadgen import LoadGenerator

from e2e.backend import RECLAIM_TAINT, Backend, StoryLog
from e2e.observe import (
    ANNOTATION_ASLEEP_SINCE,
    CONDITION_WARMED_UP,
    DEPLOYMENT,
    ISVC,
    NAMESPACE,
    SERVICE,
    Observer,
    condition,
)
from e2e.runner import drain, manifest

pytestmark = pytest.mark.slow

NAME = "chat"
TICK = 2
DOWN_WINDOW = 12
IDLE = 2  # seconds a surplus replica is idle (and out of the Service) before it sleeps
POOL_TTL = 600  # longer than the scenario: the spec edit shortens it
SHORT_TTL = 2

SPOT_NAME = "hedge"
SPOT_TICK = 1
GIVE_BACK_WINDOW = 6  # the scale-down window: how long the on-demand cover outlives the reclaim

SCALING = {
    "targets": {"waitingPerReplica": 2, "ttft": {"quantile": 0.9, "targetSeconds": 0.5}, "tpot": None},
    "behavior": {"intervalSeconds": TICK, "metricsWindowSeconds": 10, "staleAfterSeconds": 10,
                 "scaleDown": {"stabilizationSeconds": DOWN_WINDOW, "periodSeconds": 2}},
}
# spec.warmup is left out on purpose: its default (3 requests before Ready) is part of the scenario.
CHAT_SPEC = {
    "model": {"name": "tiny-model"}, "replicas": {"min": 1, "max": 4}, "scaling": SCALING,
    # Room for every replica above the floor, so that the burst only wakes (never creates).
    "sleep": {"enabled": True, "idleSeconds": IDLE, "maxPool": 3, "ttlSeconds": POOL_TTL},
}
SPOT_SPEC = {
    "model": {"name": "tiny-model"}, "replicas": {"min": 2, "max": 2},
    "placement": {"spot": {"enabled": True, "onDemandBase": 1, "provider": "karpenter"}},
    "pricing": {"onDemandPerGpuHour": 4.0, "spotPerGpuHour": 1.6},
    "scaling": {"behavior": {"intervalSeconds": SPOT_TICK,
                             "scaleDown": {"stabilizationSeconds": GIVE_BACK_WINDOW}}},
}


def describe_load(summary: dict) -> str:
    served_by = f", served by {summary['per_pod']}" if summary["per_pod"] else ""
    return (f"sent {summary['sent']}, ok {summary['ok']}, errors {summary['errors']}, "
            f"TTFT p90 {summary['ttft_p90'] or 0:.2f} s{served_by}")


def wait_gone(watch: Observer, what: str, left) -> None:
    """Wait until `left()` (the objects still there) is empty: the garbage collector deletes them."""
    watch.wait(lambda: not left(), what, timeout=120)


def describe_and_delete(backend: Backend, watch: Observer) -> None:
    """`kubectl describe` the service, delete it, wait until all it owned is gone; then log the
    kubectl output after the scenario's steps."""
    story, name = watch.story, watch.name
    story.step("kubectl describe inferenceservice (kept for the end of this scenario)")
    described = backend.kubectl("describe", "inferenceservice", name, "-n", NAMESPACE)
    listed = backend.kubectl("get", "inferenceservice", name, "-n", NAMESPACE, "-o", "wide")

    owner_uid = watch.isvc()["metadata"]["uid"]
    story.step(f"delete InferenceService {NAMESPACE}/{name} (uid {owner_uid})")
    backend.delete(*ISVC, name, NAMESPACE)
    watch.wait(lambda: watch.isvc() is None, "the InferenceService gone (finalizer released)", timeout=60)
    for kind, owned in [(DEPLOYMENT, d) for d in watch.deployments] + [(SERVICE, name)]:
        wait_gone(watch, f"the {kind[1]} {owned} gone",
                  lambda k=kind, o=owned: [obj for obj in [backend.get(*k, o, NAMESPACE)] if obj])
    wait_gone(watch, "its pods gone", watch.pods)
    story.step("done")

    story.section(f"kubectl get inferenceservice {name} -o wide (before the delete)", listed)
    story.section(f"kubectl describe inferenceservice {name} (before the delete)", described)
    assert "Events:" in described or described.startswith("(no kubectl"), described


def test_lifecycle_scale_up_sleep_wake_edit_delete(backend: Backend, story: StoryLog):
    story.heading(f"scenario 1: the life of InferenceService {NAMESPACE}/{NAME}, sleep mode on")
    watch = Observer(backend, story, NAME)
    story.step(f"backend {backend.name}: kubeconfig {backend.kubeconfig}, Prometheus {backend.prometheus_url}")

    story.step(f"apply InferenceService {NAMESPACE}/{NAME} (replicas 1..4, tick {TICK} s, scale-down window "
               f"{DOWN_WINDOW} s; sleep after {IDLE} s idle, pool of 3, TTL {POOL_TTL} s; warm-up: the default)")
    backend.apply(manifest(backend, NAMESPACE, CHAT_SPEC, NAME))
    watch.wait(lambda: backend.get(*DEPLOYMENT, NAME, NAMESPACE), "the Deployment")
    assert backend.get(*SERVICE, NAME, NAMESPACE), "the Service comes with the Deployment"
    watch.wait(lambda: watch.counts().get("status.ready", 0) >= 1, "the first replica ready", timeout=120)
    # The warm-up gate is on by default: the replica became Ready only once it had served its warm-up.
    (first,) = watch.live_pods()
    gates = [g["conditionType"] for g in first["spec"].get("readinessGates") or []]
    warmed = condition(first["status"].get("conditions"), CONDITION_WARMED_UP)
    story.step(f"{first['metadata']['name']} readiness gates {gates}; {CONDITION_WARMED_UP}="
               f"{warmed.get('status')}: {warmed.get('message')}")
    assert CONDITION_WARMED_UP in gates and warmed.get("status") == "True", (gates, warmed)

    url = backend.service_url(NAME, NAMESPACE)
    story.step(f"load ramp through {url}: 5 -> 20 -> 40 requests/s")
    generator = LoadGenerator(url, rate=5, duration=120, prompt_tokens=100, max_tokens=32, seed=1).start()
    try:
        for rate, after in ((20, 5.0), (40, 10.0)):  # a step every 5 s, sooner once it scales up
            watch.wait(lambda at=after: watch.replicas() > 1 or generator.elapsed() > at, f"ramp step {rate}/s",
                       timeout=15)
            generator.set_rate(rate)
            story.step(f"load at {rate} requests/s")
        watch.wait(lambda: watch.replicas() > 1, "a scale-up", timeout=60)
        watch.wait(lambda: watch.counts().get("status.ready", 0) >= 2, "2 replicas ready", timeout=60)
        peak = watch.replicas()
        story.step(f"scaled up to {peak}")
    finally:
        summary = drain(generator)
    story.step(f"load dropped; ramp {describe_load(summary)}")
    assert summary["ok"] > 0, summary

    # The warm pool: after the window the surplus leaves the Service, sleeps once idle, and stays
    # in the Deployment (deletion costs rank the sleepers first for a later scale-down).
    def pool_settled() -> bool:
        counts = watch.counts()
        asleep = counts.get("status.asleep", 0)
        return (counts.get("status.desired") == 1 and asleep >= 1 and not counts.get("status.draining")
                and counts[NAME] == 1 + asleep)

    watch.wait(pool_settled, "the surplus asleep (status.replicas.asleep) and the floor of 1 awake",
               timeout=DOWN_WINDOW + 60)
    asleep = watch.status()["replicas"]["asleep"]
    sleepers = sorted(p["metadata"]["name"] for p in watch.live_pods()
                      if ANNOTATION_ASLEEP_SINCE in (p["metadata"].get("annotations") or {}))
    engines = watch.engines_asleep()
    story.step(f"asleep: {asleep} ({', '.join(sleepers)}); engines' /is_sleeping: {engines}")
    assert len(sleepers) == asleep, (sleepers, asleep)
    if None not in engines.values():  # the backend reaches the engines: they really sleep
        assert sorted(pod for pod, sleeping in engines.items() if sleeping) == sleepers, engines
    assert watch.events("Draining") and watch.events("Sleeping"), "the pool's moves are Events"
    pool = {p["metadata"]["name"] for p in watch.live_pods()}

    story.step("a second, shorter burst at 40 requests/s: it should wake the sleepers")
    generator = LoadGenerator(url, rate=40, duration=60, prompt_tokens=100, max_tokens=32, seed=2).start()
    try:
        woken = watch.wait(lambda: watch.counts() and watch.events("Woken"), "sleepers woken (Woken events)",
                           timeout=40)
        story.step(f"woken: {'; '.join(e['message'] for e in woken)}")
        # Back in the Service, a woken replica gets its share of the burst (where the backend names
        # the pod that served a request; elsewhere, once the burst is being served at all).
        watch.wait(lambda: (s := generator.summary())["ok"]
                   and (not s["per_pod"] or set(s["per_pod"]) & set(sleepers)),
                   "a woken replica serving the burst", timeout=30, interval=0.2)
    finally:
        summary = drain(generator)
    story.step(f"burst over; {describe_load(summary)}")
    assert summary["ok"] > 0 and summary["errors"] == 0, summary
    assert {p["metadata"]["name"] for p in watch.live_pods()} == pool, "woken, not created"
    if summary["per_pod"]:  # the backend names the pod that served each request
        assert set(summary["per_pod"]) & set(sleepers), ("the woken replicas served", summary["per_pod"])

    story.step(f"edit the spec: replicas min 2, max 2, sleep.ttlSeconds {SHORT_TTL}: "
               "the surplus sleeps and the TTL releases it")
    backend.patch(*ISVC, NAME, {"spec": {"replicas": {"min": 2, "max": 2}, "sleep": {"ttlSeconds": SHORT_TTL}}},
                  NAMESPACE)
    watch.wait(lambda: watch.replicas() == 2 and len(watch.live_pods()) == 2,
               "the Deployment and its pods at the new bounds (2)", timeout=DOWN_WINDOW + 60)
    released = watch.wait(lambda: [e for e in watch.events("Released") if "ttl" in e["message"]],
                          "a Released event naming the TTL")
    story.step(f"released: {released[-1]['message']}")
    watch.wait(lambda: watch.counts().get("status.ready") == 2, "2 replicas ready", timeout=60)

    describe_and_delete(backend, watch)


def test_spot_reclaim_falls_back_to_on_demand_and_recovers(backend: Backend, story: StoryLog):
    story.heading(f"scenario 2: spot placement of InferenceService {NAMESPACE}/{SPOT_NAME}, a reclaim and back")
    watch = Observer(backend, story, SPOT_NAME, spot=True)
    on_demand, spot = watch.deployments
    spot_node = backend.spot_node()
    story.step(f"apply InferenceService {NAMESPACE}/{SPOT_NAME} (replicas 2, spot via karpenter with an on-demand "
               f"base of 1, give-back window {GIVE_BACK_WINDOW} s); the spot node is {spot_node}")
    backend.apply(manifest(backend, NAMESPACE, SPOT_SPEC, SPOT_NAME))

    def ready(counts: dict, deployment: str, replicas: int) -> bool:
        return counts.get(deployment) == replicas and counts.get(f"{deployment}.ready") == replicas

    watch.wait(lambda: (c := watch.counts()) and ready(c, on_demand, 1) and ready(c, spot, 1),
               "1 on-demand and 1 spot replica ready", timeout=120)
    nodes = {p["metadata"]["name"]: p["spec"].get("nodeName") for p in watch.live_pods()}
    assert all((node == spot_node) == pod.startswith(f"{spot}-") for pod, node in nodes.items()), nodes

    story.step(f"reclaim notice: taint {spot_node} {RECLAIM_TAINT['key']}:{RECLAIM_TAINT['effect']}")
    noticed = time.monotonic()
    backend.reclaim_spot_node()
    taints = watch.wait(lambda: (backend.get("v1", "Node", spot_node, "") or {}).get("spec", {}).get("taints"),
                        f"the taint on Node {spot_node} in the API (what the operator reads)", timeout=30)
    story.step(f"node {spot_node} taints: {taints}")
    watch.wait(lambda: watch.replicas(on_demand) == 2, "on-demand covering the spot replica", timeout=30)
    story.step(f"covered {time.monotonic() - noticed:.1f} s after the notice (no pending limit to wait for)")
    fallback = watch.wait(lambda: watch.events("SpotFallback"), "a SpotFallback event")
    story.step(f"SpotFallback: {fallback[-1]['message']}")
    watch.wait(lambda: condition(watch.status().get("conditions"), "SpotAvailable").get("status") == "False",
               "SpotAvailable=False")

    story.step(f"the notice is withdrawn: untaint {spot_node}")
    backend.end_spot_reclaim(spot_node)
    withdrawn = time.monotonic()
    watch.wait(lambda: watch.replicas(on_demand) == 1, "the cover given back after the window",
               timeout=GIVE_BACK_WINDOW + 40)
    held = time.monotonic() - withdrawn
    story.step(f"cover held {held:.1f} s after the notice was withdrawn (window {GIVE_BACK_WINDOW} s)")
    assert held >= GIVE_BACK_WINDOW - 2 * SPOT_TICK, "the cover is held for the window"
    recovered = watch.wait(lambda: watch.events("SpotRecovered"), "a SpotRecovered event")
    story.step(f"SpotRecovered: {recovered[-1]['message']}")
    watch.wait(lambda: condition(watch.status().get("conditions"), "SpotAvailable").get("status") == "True",
               "SpotAvailable=True")

    describe_and_delete(backend, watch)
