"""The life of one InferenceService, end to end, on any backend (see e2e/backend.py).

Apply it, watch its Deployment appear, drive a load ramp and see it scale up, drop the load
and see it scale down after the stabilization window, edit the spec and see the bounds
followed, delete it and see everything go. Timings are scaled down as in
tests/test_closed_loop.py. Every step goes to ``artifacts/e2e-<backend>.log`` with a
timestamp and the replica counts, and the log ends with ``kubectl describe`` of the service.
"""

from __future__ import annotations

import time

import pytest
from tests.testbed.loadgen import LoadGenerator
from tests.testbed.waiting import wait_for

from e2e.backend import Backend, StoryLog

pytestmark = pytest.mark.slow

NAME, NAMESPACE = "chat", "default"
ISVC = ("ebbtide.dev/v1alpha1", "InferenceService")
DEPLOYMENT = ("apps/v1", "Deployment")
SERVICE = ("v1", "Service")
POD = ("v1", "Pod")
TICK = 2
DOWN_WINDOW = 20

SCALING = {
    "targets": {"waitingPerReplica": 2, "ttft": {"quantile": 0.9, "targetSeconds": 0.5}, "tpot": None},
    "behavior": {"intervalSeconds": TICK, "metricsWindowSeconds": 10, "staleAfterSeconds": 10,
                 "scaleDown": {"stabilizationSeconds": DOWN_WINDOW, "periodSeconds": 5}},
}


def manifest(backend: Backend) -> dict:
    spec = {"model": {"name": "tiny-model"}, "replicas": {"min": 1, "max": 4}, "scaling": SCALING}
    if backend.engine:
        spec["engine"] = backend.engine
    return {"apiVersion": ISVC[0], "kind": ISVC[1], "metadata": {"name": NAME, "namespace": NAMESPACE},
            "spec": spec}


class Observer:
    """Reads the cluster for the scenario and logs every change of the replica counts."""

    def __init__(self, backend: Backend, story: StoryLog) -> None:
        self.backend, self.story = backend, story
        self.last: tuple | None = None
        self.last_pods: list[str] | None = None

    def isvc(self) -> dict | None:
        return self.backend.get(*ISVC, NAME, NAMESPACE)

    def deployment(self) -> dict | None:
        return self.backend.get(*DEPLOYMENT, NAME, NAMESPACE)

    def counts(self) -> dict:
        """Deployment spec.replicas and readyReplicas, the service's status.replicas and last decision."""
        deployment, isvc = self.deployment() or {}, self.isvc() or {}
        status = isvc.get("status") or {}
        counts = {"deployment": (deployment.get("spec") or {}).get("replicas"),
                  "deploymentReady": (deployment.get("status") or {}).get("readyReplicas", 0) if deployment else None,
                  "desired": (status.get("replicas") or {}).get("desired"),
                  "ready": (status.get("replicas") or {}).get("ready"),
                  "phase": status.get("phase"),
                  "lastDecision": status.get("lastDecisionSummary")}
        key = tuple(counts.values())
        if key != self.last:
            self.last = key
            self.story.step("  replicas " + " ".join(f"{k}={v}" for k, v in counts.items()))
        return counts

    def pods(self) -> list[str]:
        """The service's pods, logged when they change: name, phase, Terminating."""
        pods = self.backend.list(*POD, NAMESPACE, label_selector=f"ebbtide.dev/service={NAME}")
        seen = sorted(f"{p['metadata']['name']}:{(p.get('status') or {}).get('phase')}"
                      f"{':Terminating' if p['metadata'].get('deletionTimestamp') else ''}" for p in pods)
        if seen != self.last_pods:
            self.last_pods = seen
            self.story.step(f"  pods {' '.join(seen) or '(none)'}")
        return seen

    def replicas(self) -> int:
        return self.counts()["deployment"] or 0

    def wait(self, probe, what: str, timeout: float = 60, interval: float = 0.5):
        self.story.step(f"waiting for {what}")
        found = wait_for(probe, timeout=timeout, interval=interval, what=what)
        self.story.step(f"seen: {what}")
        return found


def dangling(backend: Backend, obj: dict) -> bool:
    """Every owner of `obj` is gone (no object with that name and uid): a real garbage collector deletes it."""
    refs = obj["metadata"].get("ownerReferences") or []
    return bool(refs) and all((backend.get(r["apiVersion"], r["kind"], r["name"], NAMESPACE) or {}).get(
        "metadata", {}).get("uid") != r["uid"] for r in refs)


def wait_gone(backend: Backend, watch: Observer, what: str, left) -> None:
    """Wait until `left()` (the objects still there) is empty: the garbage collector deletes them.

    Known issue, on the emulated backend only: an object can come back after its owner was
    deleted, still owned by the deleted uid (the operator's ``owned_changed`` handler restores
    an owned object before it sees its owner's deletion; the pod runner creates pods for a
    Deployment it has not yet seen go). A real garbage collector deletes such dependents; the
    emulated API collects only at the moment an owner is deleted. Then the scenario does what
    the collector would, and says so in the log.
    """
    try:
        watch.wait(lambda: not left(), what, timeout=20)
        return
    except AssertionError:
        remaining = left()
        if not remaining:
            return
        if backend.name != "emulated" or not all(dangling(backend, obj) for obj in remaining):
            raise AssertionError(f"{what}: still there: {[o['metadata'] for o in remaining]}") from None
        for obj in remaining:
            meta = obj["metadata"]
            watch.story.step(f"KNOWN ISSUE (emulated GC): {obj.get('kind', 'Pod')} {meta['name']} created at "
                             f"{meta.get('creationTimestamp')} is owned only by deleted objects; deleting it as "
                             "a garbage collector would")
            backend.delete(obj.get("apiVersion", "v1"), obj.get("kind", "Pod"), meta["name"], NAMESPACE)
    watch.wait(lambda: not left(), what, timeout=60)


def test_lifecycle_apply_scale_up_scale_down_edit_delete(backend: Backend, story: StoryLog):
    watch = Observer(backend, story)
    story.step(f"backend {backend.name}: kubeconfig {backend.kubeconfig}, Prometheus {backend.prometheus_url}")

    story.step(f"apply InferenceService {NAMESPACE}/{NAME} (replicas 1..4, tick {TICK} s, "
               f"scale-down window {DOWN_WINDOW} s)")
    backend.apply(manifest(backend))
    watch.wait(lambda: watch.deployment(), "the Deployment")
    assert backend.get(*SERVICE, NAME, NAMESPACE), "the Service comes with the Deployment"
    watch.wait(lambda: (watch.counts()["ready"] or 0) >= 1, "the first replica ready", timeout=120)

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
        watch.wait(lambda: (watch.counts()["ready"] or 0) >= 2, "2 replicas ready", timeout=60)
        peak = watch.replicas()
        story.step(f"scaled up to {peak}")
    finally:
        generator.set_rate(0)  # no new arrivals; let the requests in flight finish rather than cancel them
        drained = time.monotonic() + 30
        while generator.in_flight and time.monotonic() < drained:
            time.sleep(0.2)
        summary = generator.stop()
    story.step(f"load dropped; it sent {summary['sent']}, ok {summary['ok']}, errors {summary['errors']}, "
               f"TTFT p90 {summary['ttft_p90']}")
    assert summary["ok"] > 0, summary

    watch.wait(lambda: watch.replicas() < peak, "a scale-down after the window", timeout=DOWN_WINDOW + 60)
    decisions = (watch.isvc().get("status") or {}).get("decisions") or []
    story.step("decisions: " + "; ".join(f"{d['fromReplicas']}->{d['toReplicas']} {d['reason']}" for d in decisions))
    assert any(d["toReplicas"] > d["fromReplicas"] for d in decisions), decisions

    story.step("edit the spec: replicas min 2, max 2")
    backend.patch(*ISVC, NAME, {"spec": {"replicas": {"min": 2, "max": 2}}}, NAMESPACE)
    watch.wait(lambda: watch.replicas() == 2, "the Deployment at the new bounds (2)", timeout=60)
    watch.wait(lambda: (watch.counts()["ready"] or 0) == 2, "2 replicas ready", timeout=60)

    story.step("kubectl describe inferenceservice (kept for the end of the log)")
    described = backend.kubectl("describe", "inferenceservice", NAME, "-n", NAMESPACE)
    listed = backend.kubectl("get", "inferenceservice", "-n", NAMESPACE, "-o", "wide")

    owner_uid = watch.isvc()["metadata"]["uid"]
    story.step(f"delete InferenceService {NAMESPACE}/{NAME} (uid {owner_uid})")
    backend.delete(*ISVC, NAME, NAMESPACE)
    watch.wait(lambda: watch.isvc() is None, "the InferenceService gone (finalizer released)", timeout=60)
    for kind in (DEPLOYMENT, SERVICE):
        wait_gone(backend, watch, f"the {kind[1]} gone",
                  lambda k=kind: [o for o in [backend.get(*k, NAME, NAMESPACE)] if o])
    wait_gone(backend, watch, "its pods gone",
              lambda: watch.pods() and backend.list(*POD, NAMESPACE, label_selector=f"ebbtide.dev/service={NAME}"))
    story.step("done")

    story.section("kubectl get inferenceservice -o wide (before the delete)", listed)
    story.section(f"kubectl describe inferenceservice {NAME} (before the delete)", described)
    assert "Events:" in described or described.startswith("(no kubectl"), described
