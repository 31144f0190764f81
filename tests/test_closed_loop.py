"""The whole loop, for real: engine simulators serve load, Prometheus scrapes them, the kopf
operator reads Prometheus, decides, scales the Deployment, the real controllers make the pods
and our kubelet starts engines; Prometheus finds them through the API server.

Timings are scaled down (ticks of 2 s, a 10 s window, a 20 s scale-down window, 1 s cold
start) so that a story that takes minutes in a cluster takes seconds here.
"""

from __future__ import annotations

import re
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.testbed.loadgen import steady_load
from tests.testbed.operator import condition, events, isvc, replicas, seconds, status
from tests.testbed.waiting import wait_for

pytestmark = [pytest.mark.prometheus, pytest.mark.slow]

DEPLOYMENTS = "apps/v1/deployments"
TICK = 2
DOWN_WINDOW = 20
TTFT_TARGET = 0.5

SCALING = {
    "targets": {"waitingPerReplica": 2, "ttft": {"quantile": 0.9, "targetSeconds": TTFT_TARGET}, "tpot": None},
    "behavior": {"intervalSeconds": TICK, "metricsWindowSeconds": 10, "staleAfterSeconds": 10,
                 "scaleDown": {"stabilizationSeconds": DOWN_WINDOW, "periodSeconds": 5}},
}


def start_service(cluster, **spec):
    """Create the InferenceService, wait for its first replica to serve and be scraped."""
    cluster.server.create_object(isvc("chat", replicas={"min": 1, "max": 4}, scaling=SCALING, **spec))
    wait_for(lambda: cluster.pods.pods("default") and all(p.ready for p in cluster.pods.pods("default")),
             timeout=30, what="the first replica ready")
    balancer = cluster.balancer()
    balancer.wait_for_endpoints(1)
    cluster.prometheus.wait_for_targets_up(1)
    return balancer


def waiting_in_prometheus(prometheus, namespace="default") -> float:
    result = prometheus.query(f'sum(vllm:num_requests_waiting{{namespace="{namespace}"}})')
    return float(result[0]["value"][1]) if result else 0.0


def test_scales_up_on_backlog_recovers_ttft_and_scales_down_after_the_window(cluster):
    server = cluster.server
    with cluster.operator():
        balancer = start_service(cluster)

        # A load step well above one tiny replica's capacity.
        generator = steady_load(balancer.url, rate=40, duration=45)
        wait_for(lambda: waiting_in_prometheus(cluster.prometheus) > 0, timeout=30, interval=0.2,
                 what="backlog in Prometheus")
        wait_for(lambda: (replicas(server) or 0) > 1, timeout=30, interval=0.2, what="a scale-up")
        overloaded = generator.summary()["ttft_p90"]  # one replica, a growing queue

        # TTFT recovers once the new replicas serve: measured against the overload in the same
        # run (a ratio, not seconds: a loaded machine slows both alike).
        wait_for(lambda: status(server).get("replicas", {}).get("ready", 0) >= 2, timeout=30, what="2 ready")

        def recovered():
            recent = generator.summary(since=generator.elapsed() - 5)
            return recent["ok"] > 20 and recent["ttft_p90"] < overloaded / 2 and recent
        wait_for(recovered, timeout=40, interval=0.5, what=f"TTFT p90 under half the overload's {overloaded:.2f} s")
        summary = generator.wait()
        assert summary["errors"] == 0 or summary["errors"] < 0.01 * summary["sent"], summary

        # Load gone: the idle fleet shrinks to its floor (one replica at a time, since no
        # replica's limit was seen: the queue cleared as soon as the new replicas served).
        wait_for(lambda: replicas(server) == 1, timeout=120, interval=0.5, what="the scale-down to min")
        # The fleet may start shrinking while the load is still on (four tiny replicas carry
        # 40 requests/s at half their batch), so the window is measured from what the core
        # saw, not from the end of the load: the first scale-down comes a whole scale-down
        # window after the last scale-up, whose recommendation the window holds.
        decisions = status(server)["decisions"]
        first_down = next(i for i, d in enumerate(decisions) if d["toReplicas"] < d["fromReplicas"])
        last_up = max(i for i, d in enumerate(decisions[:first_down]) if d["toReplicas"] > d["fromReplicas"])
        held = seconds(decisions[first_down]["time"]) - seconds(decisions[last_up]["time"])
        assert held >= DOWN_WINDOW - 1, (held, decisions)  # times are whole seconds

        # The story, as `kubectl describe` shows it.
        wait_for(lambda: any(e["reason"] == "ScaledDown" for e in events(server)), what="the ScaledDown event")
        story = [(e["reason"], e["message"]) for e in events(server)]
        ups = [m for r, m in story if r == "ScaledUp"]
        downs = [m for r, m in story if r == "ScaledDown"]
        assert ups and downs, story
        assert any("waiting" in m or "TTFT" in m or "in flight" in m for m in ups), ups
        assert all("->" in m and "[prometheus]" in m for m in ups + downs), story
        assert decisions[0]["toReplicas"] > decisions[0]["fromReplicas"]
        assert decisions[0]["source"] == "prometheus" and decisions[0]["signals"]
        assert condition(server, "MetricsAvailable")["status"] == "True"

        # The operator's own metrics tell the same story.
        exposition = urllib.request.urlopen(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=5).read()
        families = {f.name: f for f in text_string_to_metric_families(exposition.decode())}
        desired = [s for s in families["ebbtide_desired_replicas"].samples if s.labels["service"] == "chat"]
        assert desired and desired[0].value == replicas(server)
        ups = [s for s in families["ebbtide_scaling_decisions"].samples
               if s.name.endswith("_total") and s.labels["applied"] == "true"]
        assert sum(s.value for s in ups) >= 2, "at least one scale-up and one scale-down counted"
        assert {s.labels["signal"] for s in families["ebbtide_signal_requests"].samples} >= {"waiting", "running"}


def test_prometheus_outage_holds_the_size_and_says_why(cluster):
    server = cluster.server
    with cluster.operator():
        balancer = start_service(cluster)
        generator = steady_load(balancer.url, rate=40, duration=20)
        wait_for(lambda: (replicas(server) or 0) > 1, timeout=40, what="a scale-up")
        generator.stop()

        # Prometheus goes away while the fleet is large and idle: nothing may shrink. The last
        # samples are decided on until they are staleAfterSeconds (10 s) old, then it is told.
        cluster.prometheus.stop()
        unavailable = wait_for(lambda: (c := condition(server, "MetricsAvailable")) and c["status"] == "False" and c,
                               timeout=30, what="MetricsAvailable=False")
        held = replicas(server)
        assert "Prometheus" in unavailable["message"], unavailable
        deadline = time.monotonic() + DOWN_WINDOW + 3 * TICK
        while time.monotonic() < deadline:
            assert replicas(server) == held, "the size must hold while metrics are unavailable"
            time.sleep(0.5)
        assert status(server)["lastDecision"]["reason"] == "MetricsUnavailable"

        # Prometheus is back: scaling resumes (the idle fleet shrinks after a fresh window).
        cluster.prometheus.start()
        wait_for(lambda: (condition(server, "MetricsAvailable") or {}).get("status") == "True", timeout=40,
                 what="MetricsAvailable=True again")
        wait_for(lambda: replicas(server) < held, timeout=90, what="scaling resumed")


def test_advisory_mode_reports_and_never_patches(cluster):
    server = cluster.server
    with cluster.operator():
        balancer = start_service(cluster, mode="Advisory")
        generation = server.get_object(DEPLOYMENTS, "default", "chat")["metadata"]["generation"]
        generator = steady_load(balancer.url, rate=40, duration=15)
        advice = wait_for(lambda: [e for e in events(server) if e["reason"] == "AdvisoryScaleUp"], timeout=30,
                          what="an advisory scale-up event")
        assert advice[0]["message"].startswith("advisory, not applied: ")
        generator.wait()
        # Advice is news once, not every tick: no more events than changes of advice.
        advised = [re.findall(r"-> (\d+)", e["message"])[-1] for e in events(server)
                   if e["reason"].startswith("Advisory")]
        assert all(a != b for a, b in zip(advised, advised[1:], strict=False)), advised
        last = status(server)["lastDecision"]
        assert status(server)["decisions"][0]["applied"] is False
        assert last["source"] == "prometheus"
        deployment = server.get_object(DEPLOYMENTS, "default", "chat")
        assert deployment["spec"]["replicas"] == 1
        assert deployment["metadata"]["generation"] == generation, "Advisory never patches the Deployment"
