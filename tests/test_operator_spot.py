"""Spot placement on the real control plane: the real operator and scheduler, our kubelet's spot and
on-demand nodes (labelled as Karpenter labels them), engine simulators as pods.

No Prometheus answers here, so the autoscaler holds the size (min = max = 3) and everything
that moves is placement: on-demand covering spot that is not there, and giving the cover back.
"""

from __future__ import annotations

import time

import pytest

from tests.testbed.kubectl import KUBECTL, kubectl
from tests.testbed.operator import ISVC, isvc, running_operator
from tests.testbed.waiting import wait_for

DEPLOYMENTS = "apps/v1/deployments"
PENDING_LIMIT = 4
GIVE_BACK_WINDOW = 8
TICK = 1
SPOT_NODE = "testbed-spot-0"
PRICES = {"onDemandPerGpuHour": 4.0, "spotPerGpuHour": 1.6}

pytestmark = pytest.mark.slow


def replicas(server, name):
    deployment = server.get_object(DEPLOYMENTS, "default", name)
    return deployment["spec"]["replicas"] if deployment else None


def status(server):
    return (server.get_object(ISVC, "default", "chat") or {}).get("status", {})


def condition(server, type):
    return next((c for c in status(server).get("conditions", []) if c["type"] == type), None)


def events(server, reason):
    found = server.list_objects("v1/events", "default", field_selector="involvedObject.name=chat")
    return [e for e in found if e["reason"] == reason]


def ready_pods(kubelet, deployment):
    return [p for p in kubelet.pods("default", deployment) if p.ready]


def test_on_demand_covers_pending_and_reclaimed_spot_and_gives_it_back(apiserver, kubelet_factory):
    server = apiserver.server
    kubelet = kubelet_factory()  # one on-demand and one spot node
    kubelet.set_capacity("spot", False)  # the spot pool has no capacity at first
    with running_operator(apiserver, EBBTIDE_TICK_SECONDS="0.25"):
        server.create_object(isvc(
            "chat", replicas={"min": 3, "max": 3}, pricing=PRICES,
            placement={"spot": {"enabled": True, "onDemandBase": 1, "provider": "karpenter",
                                "pendingTimeoutSeconds": PENDING_LIMIT}},
            scaling={"behavior": {"intervalSeconds": TICK,
                                  # No Prometheus here: no drain can be seen to end, so its deadline says when.
                                  "scaleDown": {"stabilizationSeconds": GIVE_BACK_WINDOW, "drainSeconds": 1}}}))
        wait_for(lambda: replicas(server, "chat-spot") == 2, what="the spot Deployment with 2 replicas")
        assert replicas(server, "chat") == 1, "the on-demand base only, while spot pods are on their way"

        # No spot capacity: the spot pods stay Pending; once past the limit, on-demand covers them.
        created = time.monotonic()
        wait_for(lambda: replicas(server, "chat") == 3, timeout=PENDING_LIMIT + 15, what="on-demand cover")
        assert time.monotonic() - created >= PENDING_LIMIT - TICK, "no cover before the pending limit"
        fallback = wait_for(lambda: events(server, "SpotFallback"), what="a SpotFallback event")
        assert "on-demand" in fallback[0]["message"], fallback
        wait_for(lambda: (condition(server, "SpotAvailable") or {}).get("status") == "False",
                 what="SpotAvailable=False")
        wait_for(lambda: len(ready_pods(kubelet, "chat")) == 3, timeout=30, what="3 on-demand replicas ready")

        # Spot capacity returns: the spot pods start; the cover is given back one window later.
        kubelet.set_capacity("spot", True)
        wait_for(lambda: len(ready_pods(kubelet, "chat-spot")) == 2, timeout=30, what="2 spot replicas ready")
        spot_ready = time.monotonic()
        wait_for(lambda: replicas(server, "chat") == 1, timeout=GIVE_BACK_WINDOW + 20, what="the cover given back")
        assert time.monotonic() - spot_ready >= GIVE_BACK_WINDOW - 2 * TICK, "cover held for the window"
        wait_for(lambda: events(server, "SpotRecovered"), what="a SpotRecovered event")
        wait_for(lambda: (condition(server, "SpotAvailable") or {}).get("status") == "True", what="SpotAvailable")

        # A reclaim notice on the spot node: on-demand replaces its pods at once, not after a limit
        # (NoSchedule: the spot pods keep running, so nothing but the notice can cause the cover).
        kubelet.taint_node(SPOT_NODE, {"key": "karpenter.sh/disrupted", "effect": "NoSchedule"})
        wait_for(lambda: replicas(server, "chat") == 3, timeout=30, what="an on-demand replacement")
        assert len(ready_pods(kubelet, "chat-spot")) == 2, "covered while the spot pods still run"
        wait_for(lambda: (condition(server, "SpotAvailable") or {}).get("status") == "False",
                 what="SpotAvailable=False after the reclaim")

        # What it costs, as `kubectl get` shows it: the GPUs held, at their prices.
        def usd_per_hour_of_pods():
            on_demand = sum(1 for p in kubelet.pods("default", "chat") if p.node)
            spot = sum(1 for p in kubelet.pods("default", "chat-spot") if p.node)
            return on_demand * 4.0 + spot * 1.6

        wait_for(lambda: sum(1 for p in kubelet.pods("default", "chat") if p.node) == 3, timeout=20,
                 what="the replacements on a node")
        expected = usd_per_hour_of_pods()
        assert expected == pytest.approx(3 * 4.0 + 2 * 1.6)
        cost = wait_for(lambda: (c := status(server).get("cost", {})) and c.get("usdPerHour") == pytest.approx(
            expected) and c, timeout=30, what="status.cost at the pods' prices")
        assert cost["gpuHours"]["onDemand"] > 0 and cost["gpuHours"]["spot"] > 0, cost
        assert cost["usdTotal"] > 0
        counts = status(server)["replicas"]
        assert (counts["onDemand"], counts["spot"]) == (3, 2), counts
        if KUBECTL.exists():  # and `kubectl get` shows it, through the CRD's printer columns
            header, row = kubectl(apiserver, "get", "isvc", "chat", "-n", "default").splitlines()
            cells = dict(zip(header.split(), row.split(), strict=False))
            assert float(cells["USD/H"]) == pytest.approx(expected), (header, row)


def test_turning_spot_off_removes_the_spot_deployment(apiserver):
    server = apiserver.server
    with running_operator(apiserver):
        server.create_object(isvc("chat", replicas={"min": 3, "max": 4},
                                  placement={"spot": {"enabled": True, "onDemandBase": 1}}))
        wait_for(lambda: replicas(server, "chat-spot") == 2, what="the spot Deployment")
        server.patch_object(ISVC, "default", "chat", {"spec": {"placement": {"spot": {"enabled": False}}}})
        wait_for(lambda: server.get_object(DEPLOYMENTS, "default", "chat-spot") is None,
                 what="the spot Deployment gone")
        assert server.get_object(DEPLOYMENTS, "default", "chat") is not None
        assert replicas(server, "chat") == 3, "the spot replicas moved to on-demand before it went"
