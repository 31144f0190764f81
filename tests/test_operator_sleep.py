"""Sleep mode as a warm pool, on the real control plane: the real operator, engine simulators as
pods (their /ebbtide/stats count every /sleep, /wake_up and refused request), a real
Prometheus discovering them through the API server, and the load balancer on the Service's EndpointSlices.

The story: three replicas, the floor drops to one, the two surplus replicas leave the Service
and go to sleep; a load wakes them (no new pod); the load ends, they sleep again, and the
pool's TTL removes them.
"""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from tests.testbed.loadgen import steady_load
from tests.testbed.operator import ISVC, events, isvc, replicas, running_operator, status
from tests.testbed.waiting import wait_for

pytestmark = [pytest.mark.prometheus, pytest.mark.slow]

TICK = 1
DOWN_WINDOW = 6
IDLE = 2
TTL = 20

SPEC = {
    "replicas": {"min": 3, "max": 3},
    "scaling": {
        "targets": {"waitingPerReplica": 2, "ttft": None, "tpot": None},
        "behavior": {"intervalSeconds": TICK, "metricsWindowSeconds": 10, "staleAfterSeconds": 10,
                     "scaleDown": {"stabilizationSeconds": DOWN_WINDOW, "periodSeconds": 2}},
    },
    "sleep": {"enabled": True, "idleSeconds": IDLE, "maxPool": 2, "ttlSeconds": TTL},
    "warmup": {"requests": 0},
}


def engine_stats(pod) -> dict:
    with urllib.request.urlopen(f"{pod.url}/ebbtide/stats", timeout=5) as response:
        return json.loads(response.read())


def live_pods(cluster):
    return [p for p in cluster.pods.pods("default", "chat") if not p.terminating]


def annotations(cluster, name):
    pod = cluster.server.get_object("v1/pods", "default", name) or {}
    return pod.get("metadata", {}).get("annotations") or {}


def asleep(cluster):
    return sorted(p.name for p in live_pods(cluster) if engine_stats(p)["is_sleeping"])


def test_idle_replicas_sleep_wake_on_load_and_expire(cluster):
    server = cluster.server
    with cluster.operator():
        server.create_object(isvc("chat", **SPEC))
        wait_for(lambda: len([p for p in live_pods(cluster) if p.ready]) == 3, timeout=40, what="3 replicas ready")
        balancer = cluster.balancer()
        balancer.wait_for_endpoints(3)
        cluster.prometheus.wait_for_targets_up(3)
        pods = {p.name: p for p in live_pods(cluster)}

        # The floor drops: after the scale-down window two replicas are surplus. They leave the
        # Service first, then sleep (drained, idle), and the Deployment keeps them.
        server.patch_object(ISVC, "default", "chat", {"spec": {"replicas": {"min": 1, "max": 3}}})
        sleepers = wait_for(lambda: len(asleep(cluster)) == 2 and asleep(cluster), timeout=DOWN_WINDOW + 20,
                            what="two replicas asleep")
        awake = next(name for name in pods if name not in sleepers)
        assert balancer.wait_for_endpoints(1) == [awake], "sleepers are out of the Service"
        assert replicas(server) == 3, "sleepers stay in the Deployment (the warm pool)"
        for name in sleepers:
            assert engine_stats(pods[name])["sleep_calls"] == 1
            assert "ebbtide.dev/asleep-since" in annotations(cluster, name)
        wait_for(lambda: status(server).get("replicas", {}).get("asleep") == 2, what="status.replicas.asleep 2")
        assert {e["reason"] for e in events(server)} >= {"Draining", "Sleeping"}
        # Deletion costs rank the sleepers below the awake replica: they go first on a scale-down.
        costs = {name: int(annotations(cluster, name)["controller.kubernetes.io/pod-deletion-cost"])
                 for name in pods}
        assert max(costs[s] for s in sleepers) < costs[awake], costs

        # A load that needs three replicas: the sleepers wake (no pod is created) and serve.
        balancer.reset_stats()
        generator = steady_load(balancer.url, rate=40, duration=25)
        wait_for(lambda: all(engine_stats(pods[s])["wake_up_calls"] == 1 for s in sleepers),
                 timeout=30, interval=0.2, what="/wake_up on both sleepers")
        balancer.wait_for_endpoints(3, timeout=30)  # back in the EndpointSlice
        wait_for(lambda: all(balancer.stats()["per_pod"].get(s, 0) > 0 for s in sleepers),
                 timeout=30, interval=0.1, what="woken replicas serving")
        assert {p.name for p in live_pods(cluster)} == set(pods), "woken, not created"
        wait_for(lambda: any(e["reason"] == "Woken" for e in events(server)), what="a Woken event")
        generator.wait(timeout=40)

        # No request ever reached a sleeping engine, and no /sleep found requests in flight.
        for pod in pods.values():
            stats = engine_stats(pod)
            assert stats["requests_refused_asleep"] == 0 and stats["sleeps_refused"] == 0, (pod.name, stats)
        assert balancer.stats()["no_endpoint"] == 0

        # The load is gone: two replicas sleep again, and after the TTL the pool lets them go.
        again = wait_for(lambda: len(asleep(cluster)) == 2 and asleep(cluster), timeout=DOWN_WINDOW + 30,
                         what="two replicas asleep again")  # not necessarily the same two
        slept = time.monotonic()
        wait_for(lambda: replicas(server) == 1, timeout=TTL + 20, what="the TTL removes the sleepers")
        assert time.monotonic() - slept >= TTL - 3, "sleepers kept until their TTL"
        wait_for(lambda: len(live_pods(cluster)) == 1, timeout=20, what="one pod left")
        (last,) = live_pods(cluster)
        # The ReplicaSet controller removed exactly the pods ranked cheapest to delete.
        assert last.name not in again and not engine_stats(last)["is_sleeping"], "the sleepers went"
        wait_for(lambda: any(e["reason"] == "Released" and "ttl" in e["message"] for e in events(server)),
                 what="a Released event naming the TTL")
        assert not [e for e in events(server) if e["reason"].startswith("Spot")], "spot is off: no spot Events"


def test_a_wake_up_that_keeps_failing_gets_the_replica_replaced(apiserver, cluster_prometheus, kubelet_factory):
    """Engines whose wake-up outlasts the operator's timeout (6 s against 1 s): /wake_up fails
    three times, the operator says so (Warning WakeFailed) and deletes the pod, and its
    ReplicaSet starts a fresh replica in its place."""
    server = apiserver.server
    kubelet = kubelet_factory(capacity_overrides={"wake_level1_s": 6.0})
    spec = {**SPEC, "replicas": {"min": 2, "max": 2}, "sleep": {"enabled": True, "idleSeconds": IDLE, "maxPool": 1}}
    with running_operator(apiserver, EBBTIDE_PROMETHEUS_URL=cluster_prometheus.url, EBBTIDE_TICK_SECONDS="0.5",
                          EBBTIDE_ENGINE_TIMEOUT_SECONDS="1"):
        server.create_object(isvc("chat", **spec))
        wait_for(lambda: len([p for p in kubelet.pods("default", "chat") if p.ready]) == 2, timeout=40,
                 what="2 replicas ready")
        cluster_prometheus.wait_for_targets_up(2)
        server.patch_object(ISVC, "default", "chat", {"spec": {"replicas": {"min": 1, "max": 1}}})
        (sleeper,) = wait_for(lambda: [p for p in kubelet.pods("default", "chat") if engine_stats(p)["is_sleeping"]],
                              timeout=30, what="one replica asleep")

        server.patch_object(ISVC, "default", "chat", {"spec": {"replicas": {"min": 2, "max": 2}}})
        failed = wait_for(lambda: [e for e in events(server) if e["reason"] == "WakeFailed"], timeout=30,
                          what="a WakeFailed event")
        assert failed[0]["type"] == "Warning" and sleeper.name in failed[0]["message"], failed
        assert "POST /wake_up failed 3 times" in failed[0]["message"]
        wait_for(lambda: sleeper.name not in {p.name for p in kubelet.pods("default", "chat") if not p.terminating},
                 timeout=20, what="the sleeper replaced")
        wait_for(lambda: len([p for p in kubelet.pods("default", "chat") if p.ready and not p.terminating]) == 2,
                 timeout=40, what="2 replicas serving again")
