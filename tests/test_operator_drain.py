"""Drain before removal, on the real control plane: a replica the operator removes leaves the
Service first, finishes its requests in flight, and only then goes; `kubectl describe` tells it. The engines here stop at
once on SIGTERM (vLLM's `--shutdown-timeout 0`) and the kubelet runs no preStop wait, so any
request still in flight when its pod is deleted fails: the drain is all that saves it."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest

from tests.testbed.kubectl import kubectl
from tests.testbed.loadgen import LoadGenerator
from tests.testbed.operator import ISVC, events, isvc, replicas
from tests.testbed.waiting import wait_for

pytestmark = [pytest.mark.prometheus, pytest.mark.slow]

SPEC = {
    "replicas": {"min": 2, "max": 2},
    "engine": {"args": ["--shutdown-timeout", "0"]},
    # Only a deep queue would scale up: the size is the floor's to say.
    "scaling": {"targets": {"waitingPerReplica": 100, "ttft": None, "tpot": None},
                "behavior": {"intervalSeconds": 1, "metricsWindowSeconds": 10, "staleAfterSeconds": 10,
                             "scaleDown": {"stabilizationSeconds": 0, "periodSeconds": 1, "drainSeconds": 120}}},
    "sleep": {"enabled": False},
    "warmup": {"requests": 0},
}


def running(pod) -> int:
    with urllib.request.urlopen(f"{pod.url}/ebbtide/stats", timeout=5) as response:
        stats = json.loads(response.read())
    return stats["num_running"] + stats["num_waiting"]


def serving_label(cluster, name: str) -> str | None:
    pod = cluster.server.get_object("v1/pods", "default", name) or {}
    return (pod.get("metadata", {}).get("labels") or {}).get("ebbtide.dev/serving")


def test_a_scale_down_drains_the_replica_before_deleting_it(cluster):
    server = cluster.server
    with cluster.operator():
        server.create_object(isvc("chat", **SPEC))
        wait_for(lambda: len([p for p in cluster.pods.pods("default", "chat") if p.ready]) == 2, timeout=40,
                 what="2 replicas ready")
        balancer = cluster.balancer()
        balancer.wait_for_endpoints(2)
        cluster.prometheus.wait_for_targets_up(2)
        pods = {p.name: p for p in cluster.pods.pods("default", "chat")}

        # Long requests (a few seconds each) keep both replicas busy.
        generator = LoadGenerator(balancer.url, rate=1.0, duration=40, prompt_tokens=50, max_tokens=600, seed=1).start()
        wait_for(lambda: all(running(p) > 0 for p in pods.values()), timeout=30, interval=0.2,
                 what="requests in flight on both replicas")

        # The floor drops: one replica is surplus. It leaves the Service while it still works.
        server.patch_object(ISVC, "default", "chat", {"spec": {"replicas": {"min": 1, "max": 2}}})
        leaving = wait_for(lambda: next((n for n in pods if serving_label(cluster, n) == "false"), None),
                           timeout=30, interval=0.2, what="a replica out of the Service")
        assert balancer.wait_for_endpoints(1) == [next(n for n in pods if n != leaving)]
        # Out of the Service but not gone while it has work: the Deployment still holds it.
        busy = running(pods[leaving])
        if busy:
            assert replicas(server) == 2 and not pods[leaving].terminating

        # Drained, it goes; the other one serves on.
        wait_for(lambda: replicas(server) == 1, timeout=60, what="the drained replica removed")
        wait_for(lambda: leaving not in {p.name for p in cluster.pods.pods("default", "chat")}, timeout=30,
                 what="its pod gone")
        summary = generator.wait()
        assert summary["sent"] > 10 and summary["errors"] == 0, summary

        story = [(e["reason"], e["message"]) for e in events(server)]
        assert any(r == "Draining" and leaving in m for r, m in story), story
        assert any(r == "Released" and leaving in m and "drained" in m for r, m in story), story
        told_by_kubectl(kubectl(cluster.api, "describe", "inferenceservice", "chat"), leaving)


def told_by_kubectl(out: str, leaving: str) -> None:
    """`kubectl describe` tells the run: the decision with its numbers, once, then the drain and
    the release in order (events of the same second may come either way round)."""
    assert re.search(r"Last Decision Summary:\s+2->1 ", out), out
    decisions = out.split("\n  Decisions:", 1)[1].split("\n  Demand Profile:", 1)[0]
    assert decisions.count("From Replicas:") == 1 and "2 -> 1" in decisions, decisions
    lines = out.split("\nEvents:", 1)[1].splitlines()
    said = [(line.split()[1], line) for line in lines if line.startswith("  Normal") or line.startswith("  Warning")]
    reasons = [reason for reason, _ in said]
    assert reasons.count("ScaledDown") == 1 and reasons.count("Draining") == 1, lines
    assert reasons.index("Released") > max(reasons.index("ScaledDown"), reasons.index("Draining")), lines
    scaled, draining, released = (dict(said)[r] for r in ("ScaledDown", "Draining", "Released"))
    assert "2 -> 1" in scaled and "[prometheus]" in scaled, scaled
    assert leaving in draining and leaving in released, lines
    assert re.search(r"drained \(out of the Service \d+ s, nothing in flight\)", released), released
