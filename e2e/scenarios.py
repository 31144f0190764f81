"""The counted scenarios of issue #17: each a spec, the load, a disruption and what it explains.

The runner (e2e/runner.py) counts every request and checks what all scenarios owe. Moves are driven
by spec edits where the scenario is about what happens around a move (a scale-down, a sleep, a
restart in the middle of one), by load where the load is the point (the ramp, scale from zero).
"""

from __future__ import annotations

import datetime
import math
import time

from e2e.backend import RECLAIM_TAINT
from e2e.observe import ANNOTATION_ASLEEP_SINCE, LABEL_SERVING, condition
from e2e.runner import Run, Scenario, holding_gateway

TICK = 1
SHORT_WINDOW = 3  # seconds of scale-down stabilization where a scale-down is the point
# Longer than any scenario: a scale-down seen in one is not the window running out but a lost history.
LONG_WINDOW = 600
SLEEP = {"enabled": True, "idleSeconds": 1, "maxPool": 2, "ttlSeconds": 600}
# Where scale-from-zero's requests wait (`ebbtide activator`), and what the activation query reads there.
ACTIVATOR, PENDING_METRIC = holding_gateway, "ebbtide_activator_pending_requests"
DRAIN = ("a replica removed leaves the Service first and goes once nothing is in flight "
         "(scaling.behavior.scaleDown.drainSeconds); without that, its preStop sleep and grace period "
         "(5 s + 5 s here) would cover only the shortest requests")


def spec(low: int, high: int, window: int = SHORT_WINDOW, **more) -> dict:
    return {"model": {"name": "tiny-model"}, "replicas": {"min": low, "max": high},
            "scaling": {"targets": {"waitingPerReplica": 2, "ttft": {"quantile": 0.9, "targetSeconds": 0.5},
                                    "tpot": None},
                        "behavior": {"intervalSeconds": TICK, "metricsWindowSeconds": 10, "staleAfterSeconds": 10,
                                     "scaleDown": {"stabilizationSeconds": window, "periodSeconds": 1}}},
            **more}


def spot_spec(low: int, high: int, window: int = SHORT_WINDOW) -> dict:
    placement = {"spot": {"enabled": True, "onDemandBase": 1, "provider": "karpenter", "pendingTimeoutSeconds": 3}}
    return spec(low, high, window, placement=placement, pricing={"onDemandPerGpuHour": 4.0, "spotPerGpuHour": 1.6})


def zero_spec(namespace: str) -> dict:
    """min 0, the last replica deleted (not kept asleep), woken by the requests held at the gateway."""
    zero = spec(0, 1)
    zero["replicas"]["allowScaleToZero"] = True
    zero["scaling"]["activation"] = {"query": f'sum({PENDING_METRIC}{{service_namespace="{namespace}"}})'}
    return zero


# ---------------------------------------------------------------------------------------- helpers

def above_min(run: Run) -> None:
    """2 replicas up, then min lowered to 1 under a long window: a correct operator keeps both for
    the whole scenario, so a pod removed after the disruption is a scale-down on empty history."""
    run.edit({"replicas": {"min": 1}})
    run.ticks(3)
    assert run.watch.replicas() == 2, "scaled down right after the edit, before any disruption"


def asleep(run: Run, count: int) -> None:
    run.wait(lambda: run.watch.counts().get("status.asleep", 0) == count, f"{count} replica(s) asleep", timeout=60)


def same_pods(run: Run, before: set[str]) -> None:
    now = {p["metadata"]["name"] for p in run.watch.live_pods()}
    assert now == before, f"woken, not created: pods {sorted(before)} became {sorted(now)}"


def names(run: Run) -> set[str]:
    return {p["metadata"]["name"] for p in run.watch.live_pods()}


def node_ready(run: Run, node: str) -> str | None:
    return condition(((run.backend.get("v1", "Node", node, "") or {}).get("status") or {}).get("conditions"),
                     "Ready").get("status")


def deployment_ready(run: Run, deployment: str, replicas: int) -> bool:
    counts = run.watch.counts()
    return counts.get(deployment) == replicas and counts.get(f"{deployment}.ready") == replicas


# ---------------------------------------------------------------------------------------- disruptions

def ramp_up(run: Run) -> None:
    run.load.set_rate(30)
    run.step("load at 30 requests/s (a replica serves about 13)")
    run.wait(lambda: run.watch.replicas() > 1, "a scale-up", timeout=60)
    run.wait(lambda: run.watch.counts().get("status.ready", 0) >= 2, "2 replicas ready", timeout=60)


def scale_down(run: Run) -> None:
    terminating: dict[str, float] = {}  # pod -> when it was first seen Terminating (wall clock)

    def down() -> bool:
        pods = run.watch.pods()
        for pod in pods:
            if pod["metadata"].get("deletionTimestamp"):
                terminating.setdefault(pod["metadata"]["name"], time.time())
        return len(pods) == 1

    run.wait(lambda: run.load.in_flight >= 6, "6 requests in flight", timeout=60, interval=0.2)
    run.edit({"replicas": {"min": 1, "max": 1}})  # max too: the load cannot bring them back
    run.wait(down, "down to 1 replica, the others gone", timeout=60, interval=0.2)
    run.load.set_rate(0)  # the removal is over: no queue to build on the one replica left
    begun = list(run.load.records)  # a request names its pod once answered (the balancer's header)
    run.wait(lambda: all(r.latency is not None or r.cause for r in begun), "the requests begun so far answered",
             timeout=90)
    origin = time.time() - run.load.elapsed()  # the load's clock (seconds since it began) on the wall clock
    caught = [r for r in begun if r.pod in terminating
              and origin + r.start < terminating[r.pod] < origin + r.start + (r.latency or math.inf)]
    run.note(f"{len(caught)} request(s) in flight on a replica while it was Terminating, "
             f"{sum(not r.ok for r in caught)} of them failed")


def sleep_and_wake(run: Run) -> None:
    pods = names(run)
    run.edit({"replicas": {"min": 1}})
    asleep(run, 2)
    run.edit({"replicas": {"min": 3}})
    run.ready(3)
    same_pods(run, pods)


def scale_to_zero_and_back(run: Run) -> None:
    for attempt in ("from nothing", "after a scale to zero"):
        served = run.load.summary()["ok"]
        run.load.set_rate(2)
        run.wait(lambda s=served: run.load.summary()["ok"] >= s + 5, f"requests held, then served ({attempt})",
                 timeout=90)
        run.load.set_rate(0)
        run.wait(lambda: run.load.in_flight == 0 and not run.watch.pods(), "scaled to zero, no pod left", timeout=90)


def spot_reclaim(run: Run) -> None:
    node = run.backend.spot_node()
    run.step(f"reclaim notice: taint {node} {RECLAIM_TAINT['key']}:{RECLAIM_TAINT['effect']}")
    run.backend.reclaim_spot_node()
    try:
        run.wait(lambda: deployment_ready(run, run.watch.name, 2), "on-demand covering the spot replica, ready")
    finally:
        run.backend.end_spot_reclaim(node)
    run.step("the notice withdrawn")
    run.wait(lambda: deployment_ready(run, run.watch.name, 1), "the cover given back", timeout=60)


def spot_outage(run: Run) -> None:
    node = run.backend.spot_node()
    run.step(f"no spot capacity: cordon {node} (as Karpenter finding none, new spot pods stay Pending)")
    run.backend.patch("v1", "Node", node, {"spec": {"unschedulable": True}}, "")
    try:
        run.edit({"replicas": {"min": 3}})
        run.wait(lambda: run.watch.counts().get("status.ready", 0) >= 3 and pending(run),
                 "3 replicas ready while a spot pod is Pending (on-demand covering it)", timeout=60)
    finally:
        run.backend.patch("v1", "Node", node, {"spec": {"unschedulable": None}}, "")
    run.step("spot capacity back: uncordoned")
    spot = f"{run.watch.name}-spot"
    run.wait(lambda: deployment_ready(run, spot, 2) and deployment_ready(run, run.watch.name, 1) and not pending(run),
             "2 spot replicas ready and the cover given back to the on-demand base", timeout=90)


def pending(run: Run) -> list[str]:
    return [p["metadata"]["name"] for p in run.watch.live_pods() if (p.get("status") or {}).get("phase") == "Pending"]


def restarted_operator(run: Run, moment: str) -> None:
    run.step(f"kill -9 the operator {moment}")
    run.backend.kill_operator()
    run.backend.start_operator()
    run.step("the operator started again")


def kill_mid_scale_up(run: Run) -> None:
    run.edit({"replicas": {"min": 3}})
    run.wait(lambda: run.watch.replicas() == 3, "the Deployment scaled to 3", interval=0.1)
    restarted_operator(run, "mid-scale-up (new replicas starting)")
    run.ready(3)
    run.ticks(3)


def kill_mid_sleep(run: Run) -> None:
    run.edit({"replicas": {"min": 1}})
    run.wait(lambda: any((p["metadata"].get("labels") or {}).get(LABEL_SERVING) == "false"
                         and ANNOTATION_ASLEEP_SINCE not in (p["metadata"].get("annotations") or {})
                         for p in run.watch.live_pods()), "a replica out of the Service, not asleep yet",
             interval=0.1)
    restarted_operator(run, "mid-sleep (a replica drained, not asleep)")
    asleep(run, 2)
    run.ticks(3)


def kill_steady(run: Run) -> None:
    restarted_operator(run, "with 2 replicas over a min of 1 (its history lost)")
    run.ticks(3)


def restart(component: str):
    def disrupt(run: Run) -> None:
        run.step(f"restart {component}")
        began = time.time()
        run.backend.restart_component(component)
        run.step(f"{component} back after {time.time() - began:.0f} s")
        run.ticks(3)
        run.ready(2)
        # Nodes whose Lease the restart made them miss: marked NotReady, then Ready again.
        if marked := [name for name, since in ready_since(run).items() if since >= began - 1]:
            run.excuse("http_503_no_endpoint", f"the restart outlasted the node-monitor grace period (20 s "
                       f"here, 50 s by default): the node controller marked {', '.join(marked)} NotReady and "
                       "their pods not ready, so the Service had no endpoint until the kubelet posted Ready")
    return disrupt


def ready_since(run: Run) -> dict[str, float]:
    """Node -> when its Ready condition last changed (wall clock)."""
    since = {}
    for node in run.backend.list("v1", "Node", ""):
        stamp = condition((node.get("status") or {}).get("conditions"), "Ready").get("lastTransitionTime")
        if stamp:
            since[node["metadata"]["name"]] = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    return since


def prometheus_outage(run: Run) -> None:
    def metrics() -> str | None:
        return condition(run.watch.status().get("conditions"), "MetricsAvailable").get("status")

    run.step("Prometheus stops answering (SIGSTOP)")
    run.backend.pause_prometheus(True)
    try:
        run.wait(lambda: metrics() == "False", "MetricsAvailable=False", timeout=60)
        run.ticks(2)  # nothing changes while it is down: each is a refresh (Run.ticks)
    finally:
        run.backend.pause_prometheus(False)
    run.step("Prometheus answers again (SIGCONT)")
    run.wait(lambda: metrics() == "True", "MetricsAvailable=True", timeout=60)


def engine_stops_answering(run: Run) -> None:
    run.edit({"replicas": {"min": 1, "max": 1}})
    asleep(run, 1)
    (sleeper,) = [p for p in run.watch.live_pods() if ANNOTATION_ASLEEP_SINCE in p["metadata"].get("annotations", {})]
    name = sleeper["metadata"]["name"]
    run.step(f"the engine of {name} stops answering (SIGSTOP), then the service needs it back")
    run.backend.pause_engine(sleeper, True)
    try:
        run.edit({"replicas": {"min": 2, "max": 2}})
        failed = run.wait(lambda: [e for e in run.watch.events("WakeFailed") if name in e["message"]],
                          "a WakeFailed event", timeout=60)
        run.note(f"WakeFailed: {failed[-1]['message']}")
        run.wait(lambda: name not in names(run), f"{name} replaced", timeout=60)
        run.ready(2)
    finally:
        if name in names(run):
            run.backend.pause_engine(sleeper, False)


def node_not_ready(run: Run) -> None:
    node = run.backend.spot_node()
    run.step(f"{node} stops renewing its Lease")
    run.backend.partition_node(node, True)
    try:
        run.wait(lambda: node_ready(run, node) != "True", f"{node} NotReady", timeout=60)
        spot = f"{run.watch.name}-spot"
        run.wait(lambda: run.watch.counts().get(f"{spot}.ready") == 0,
                 "its replica marked not ready (out of the Service's endpoints)", timeout=30)
        run.ticks(3)
    finally:
        run.backend.partition_node(node, False)
    run.wait(lambda: node_ready(run, node) == "True", f"{node} Ready again", timeout=60)
    run.ready(2)


def edit_mid_scale_up(run: Run) -> None:
    run.edit({"replicas": {"min": 3}})
    run.wait(lambda: run.watch.replicas() == 3, "the Deployment scaled to 3", interval=0.1)
    run.edit({"replicas": {"min": 2, "max": 2}})
    run.wait(lambda: len(run.watch.pods()) == 2, "down to the new bound, 2 pods", timeout=60)
    run.ready(2)


# ---------------------------------------------------------------------------------------- the list

RESTART = dict(setup=above_min, keeps_pods=True, ready=2)
SCENARIOS = [
    Scenario("ramp-up", spec(1, 3), ramp_up, rate=3),
    # Requests of 1900 tokens (14 s or more; the tiny model's context is 2048), longer than the preStop
    # sleep and the grace period here (5 s + 5 s), 2 in flight on each replica when the bounds drop to 1.
    Scenario("scale-down", spec(3, 3), scale_down, ready=3, rate=0.5, max_tokens=1900, stream=False,
             notes=DRAIN),
    Scenario("sleep-and-wake", spec(3, 3, sleep=SLEEP), sleep_and_wake, ready=3),
    Scenario("scale-to-zero-and-back", zero_spec("e2e-scale-to-zero-and-back"), scale_to_zero_and_back, rate=2,
             ready=0, gateway=ACTIVATOR,
             notes="requests wait in the test bed's load balancer (holding while no endpoint is ready) "
                   "until `ebbtide activator` ships; their latency includes the cold start"),
    Scenario("spot-reclaim", spot_spec(2, 2), spot_reclaim, ready=2, spot=True, notes=DRAIN),
    Scenario("spot-outage", spot_spec(2, 3), spot_outage, ready=2, spot=True),
    Scenario("operator-kill-mid-scale-up", spec(1, 3, LONG_WINDOW), kill_mid_scale_up, keeps_pods=True),
    Scenario("operator-kill-mid-sleep", spec(3, 3, sleep=SLEEP), kill_mid_sleep, ready=3, keeps_pods=True),
    Scenario("operator-kill-steady", spec(2, 3, LONG_WINDOW), kill_steady, **RESTART),
    Scenario("kube-apiserver-restart", spec(2, 3, LONG_WINDOW), restart("kube-apiserver"), **RESTART),
    Scenario("etcd-restart", spec(2, 3, LONG_WINDOW), restart("etcd"), **RESTART),
    Scenario("prometheus-outage", spec(2, 3, LONG_WINDOW), prometheus_outage, **RESTART),
    Scenario("engine-stops-answering-wake-up", spec(2, 2, sleep={**SLEEP, "maxPool": 1}), engine_stops_answering,
             ready=2),
    Scenario("node-not-ready", spot_spec(2, 2), node_not_ready, ready=2, spot=True),
    Scenario("spec-edit-mid-scale-up", spec(1, 3), edit_mid_scale_up),
]
