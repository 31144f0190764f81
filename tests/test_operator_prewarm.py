"""Predictive pre-warming in the emulated cluster: the operator finds the demand profile a
previous run learned (its ConfigMap) and starts replicas ahead of the ramp it predicts.

No Prometheus answers, so the reactive core holds the size: every replica added here is the
profile's doing. The profile is built with the same pure code the operator learns with.
"""

from __future__ import annotations

import json
import math
import time

import pytest

from ebbtide.api.crd import crd
from ebbtide.policy.profile import BIN_SECONDS, Profile, observe
from ebbtide.policy.signal_rules import THROUGHPUT_TARGET
from tests.testbed.operator import ISVC, events, isvc, replicas, running_operator, status
from tests.testbed.waiting import wait_for

DEPLOYMENTS = "apps/v1/deployments"

pytestmark = pytest.mark.slow

CAPACITY = 1000.0  # tokens/s one replica serves at its limit (as the core would have learned it)
PEAK = 2000.0  # tokens/s in the quarter-hour after the next one begins
HEADROOM = 1.1
LEAD = 1800  # the startup time assumed: any quarter-hour starting within it can be pre-warmed


def learned_week(now: float) -> Profile:
    """Eight days of history: low demand, except the quarter-hour that starts next (each day)."""
    ramp_start = math.ceil(now / BIN_SECONDS) * BIN_SECONDS
    profile = Profile.empty(lookback_weeks=2)
    t = now - 8 * 86400
    while t < now - 3600:
        in_ramp = (t - ramp_start) % 86400 < BIN_SECONDS
        profile = observe(profile, t, PEAK if in_ramp else 100.0, seconds=BIN_SECONDS)
        t += BIN_SECONDS
    return profile


def test_prewarms_ahead_of_a_learned_ramp_from_the_stored_profile(apiserver):
    server = apiserver.server
    apiserver.register_crd(crd())
    created = server.create_object(isvc(
        "chat", replicas={"min": 1, "max": 4},
        warmup={"defaultStartupSeconds": LEAD, "predictive": {"headroom": HEADROOM}},
        scaling={"behavior": {"intervalSeconds": 1}}))
    uid = created["metadata"]["uid"]
    now = time.time()
    profile = learned_week(now)
    # What an earlier run left in the cluster: the profile's ConfigMap, and the capacity of a
    # replica the core learned (status.scaler).
    server.create_object({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "chat-demand-profile", "namespace": "default",
                     "ownerReferences": [{"apiVersion": "ebbtide.dev/v1alpha1", "kind": "InferenceService",
                                          "name": "chat", "uid": uid, "controller": True}]},
        "data": {"profile.json": json.dumps(profile.to_json())}})
    server.patch_object(ISVC, "default", "chat", {"status": {"scaler": {
        "version": 1, "since": now - 86400, "upRecommendations": [], "downRecommendations": [], "scaleUps": [],
        "scaleDowns": [], "lastReady": 1, "readyRoseAt": None, "readyFellAt": None,
        "capacityTokensPerSecond": CAPACITY, "breachedAt": None}}}, subresource="status")

    expected = math.ceil(PEAK * HEADROOM / (CAPACITY * THROUGHPUT_TARGET))  # 3
    with running_operator(apiserver, EBBTIDE_TICK_SECONDS="0.25"):
        wait_for(lambda: replicas(server) == expected, timeout=20, what=f"pre-warming to {expected}")
        scaled = wait_for(lambda: [e for e in events(server) if e["reason"] == "ScaledUp"], what="a ScaledUp event")
        message = scaled[0]["message"]
        assert f"pre-warming 1 -> {expected} for the ramp expected at" in message, message
        wait_for(lambda: status(server).get("lastDecision", {}).get("reason") == "PreWarming",
                 what="status.lastDecision PreWarming")  # written just after the Event
        learned = wait_for(lambda: status(server).get("demandProfile"), what="status.demandProfile")
        assert learned["predicting"] and learned["binsLearned"] > 90, learned

        # The profile is saved back (once per quarter-hour) and still reads as what was learned.
        stored = server.get_object("v1/configmaps", "default", "chat-demand-profile")
        assert Profile.from_json(json.loads(stored["data"]["profile.json"])).since == pytest.approx(profile.since)

        # Deleting the service: the garbage collector takes the profile's ConfigMap with it.
        server.delete_object(ISVC, "default", "chat")
        wait_for(lambda: server.get_object("v1/configmaps", "default", "chat-demand-profile") is None
                 and server.get_object(DEPLOYMENTS, "default", "chat") is None, timeout=60,
                 what="the ConfigMap and the Deployment garbage-collected")


def test_no_prewarming_when_switched_off(apiserver):
    server = apiserver.server
    with running_operator(apiserver, EBBTIDE_TICK_SECONDS="0.25"):
        server.create_object(isvc("chat", replicas={"min": 1, "max": 4},
                                  warmup={"predictive": {"enabled": False}},
                                  scaling={"behavior": {"intervalSeconds": 1}}))
        wait_for(lambda: status(server).get("lastDecision"), what="a decision")
        assert status(server).get("demandProfile") is None
        assert server.get_object("v1/configmaps", "default", "chat-demand-profile") is None
        assert replicas(server) == 1
