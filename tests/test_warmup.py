"""Warm before traffic: the operator's warm-up against the real control plane.

The real API server and controllers, our kubelet (it honours readiness gates, never sets them)
and engine simulators as pods; `warm_up` is called as the scaling tick calls it, with the pods
it listed.
"""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.request

import pytest

from ebbtide.api.manifest import parse_spec
from ebbtide.api.ref import ServiceRef
from ebbtide.cluster.engine import engine_url
from ebbtide.cluster.kube import Kube
from ebbtide.cluster.pods import essentials
from ebbtide.cluster.render import CONDITION_WARMED_UP, LABEL_SERVICE, render_deployment
from ebbtide.cluster.warmup import warm_up
from tests.testbed.kubeapi import without_owner
from tests.testbed.waiting import wait_for

NS = "default"
PODS = "v1/pods"
SERVICE = (NS, "chat")


def spec(requests: int = 3):
    return parse_spec({"model": {"name": "tiny-model", "servedName": "chat"}, "warmup": {"requests": requests}})


@pytest.fixture()
def kube(apiserver):
    client = apiserver.api_client()
    yield Kube(client)
    client.close()


def start(apiserver, replicas: int, requests: int = 3):
    ref = ServiceRef(name="chat", namespace=NS, uid="uid-chat")
    apiserver.server.create_object(without_owner(render_deployment(ref, spec(requests), replicas=replicas)))


def pods(apiserver) -> dict[str, dict]:
    return {p["metadata"]["name"]: p for p in apiserver.server.list_objects(PODS, NS)}


def condition(pod: dict, type_: str) -> dict:
    return next((c for c in pod.get("status", {}).get("conditions") or [] if c["type"] == type_), {})


def containers_ready(apiserver, count: int) -> dict[str, dict]:
    """Wait until `count` pods have their engine up; those pods, as the API shows them."""
    return wait_for(lambda: (found := pods(apiserver)) and len(found) == count
                    and all(condition(p, "ContainersReady").get("status") == "True" for p in found.values())
                    and found, what=f"{count} pods with ready containers")


def stats(pod: dict) -> dict:
    with urllib.request.urlopen(f"{engine_url(pod)}/ebbtide/stats", timeout=5) as response:
        return json.loads(response.read())


def tick(kube: Kube, requests: int = 3, **kwargs):
    """What the scaling tick does: list the pods once, warm those that wait for it."""
    async def run():
        listed = await kube.list_pods(LABEL_SERVICE, essentials)  # cut down as the tick keeps them
        return await warm_up(kube, listed, {SERVICE: spec(requests)}, **kwargs)
    return asyncio.run(run())


def test_new_replicas_serve_their_warm_up_requests_before_they_are_ready(apiserver, kubelet_factory, kube):
    kubelet = kubelet_factory(startup_delay=1.0)
    start(apiserver, replicas=2)
    wait_for(lambda: len(pods(apiserver)) == 2, what="2 pods")
    assert tick(kube) == [], "engines still starting: nothing to warm yet"

    before = containers_ready(apiserver, 2)
    kubelet.sync()
    for pod in pods(apiserver).values():  # the gate holds them back, with their engines up
        assert condition(pod, "Ready")["status"] == "False", pod["status"]
        assert stats(pod)["requests_received"] == 0

    results = tick(kube)
    assert sorted(r.pod for r in results) == sorted(before) and all(r.ok for r in results), results
    for name, pod in wait_for(lambda: (found := pods(apiserver)) and all(
            condition(p, "Ready").get("status") == "True" for p in found.values()) and found,
            what="both pods Ready after their warm-up").items():
        warmed = condition(pod, CONDITION_WARMED_UP)
        assert warmed["status"] == "True" and warmed["reason"] == "WarmedUp"
        assert warmed["message"].startswith("served 3 warm-up requests in "), warmed
        served = stats(pod)
        assert served["requests_received"] == served["requests_finished"] == 3, (name, served)

    # Warm pods are left alone: no more requests on the next ticks.
    assert tick(kube) == []
    assert all(stats(p)["requests_received"] == 3 for p in pods(apiserver).values())


def test_an_engine_that_does_not_answer_stays_out_until_a_later_tick_warms_it(apiserver, kubelet_factory, kube,
                                                                              caplog):
    kubelet = kubelet_factory(startup_delay=0.2)
    start(apiserver, replicas=1)
    (name,) = containers_ready(apiserver, 1)
    listed = asyncio.run(kube.list_pods(LABEL_SERVICE, essentials))  # the tick's list: the engine looked fine
    pid = kubelet.kill_engine(NS, name, signal.SIGSTOP)  # frozen: accepts connections, never answers
    try:
        (result,) = asyncio.run(warm_up(kube, listed, {SERVICE: spec()}, timeout=1.0))
    finally:
        kubelet.kill_engine(NS, name, signal.SIGCONT)
    assert kubelet.pod(NS, name).pid == pid
    assert not result.ok and "no answer to 3 requests within 1 s" in result.message, result
    pod = pods(apiserver)[name]
    warmed = condition(pod, CONDITION_WARMED_UP)
    assert warmed["status"] == "False" and warmed["reason"] == "WarmUpFailed"
    assert warmed["message"] == result.message
    assert f"{NS}/{name}: {result.message}; retrying next tick" in caplog.text
    kubelet.sync()
    assert condition(pods(apiserver)[name], "Ready")["status"] == "False"

    # The next tick tries again, once the engine is up.
    containers_ready(apiserver, 1)
    (result,) = tick(kube)
    assert result.ok, result
    wait_for(lambda: condition(pods(apiserver)[name], "Ready").get("status") == "True", what="Ready after the retry")


def test_a_gated_pod_is_let_through_when_warm_up_was_switched_off(apiserver, kubelet_factory, kube):
    """requests: 0 after the pods were created: a merge patch leaves the gate, so the condition opens it."""
    kubelet_factory(startup_delay=0.2)
    start(apiserver, replicas=1, requests=3)
    (name,) = containers_ready(apiserver, 1)
    (result,) = tick(kube, requests=0)
    assert result.ok and "warm-up is off" in result.message
    wait_for(lambda: condition(pods(apiserver)[name], "Ready").get("status") == "True", what="Ready")
    assert stats(pods(apiserver)[name])["requests_received"] == 0


def test_an_engine_that_restarts_after_its_warm_up_is_warmed_again(apiserver, kubelet_factory, kube):
    """A warm-up belongs to one run of the engine: after a crash the new engine is cold, so the
    condition goes back to False (out of the endpoints before the kubelet would route to it)
    and the new engine gets its own warm-up requests."""
    kubelet = kubelet_factory(startup_delay=1.0)
    start(apiserver, replicas=1)
    (name,) = containers_ready(apiserver, 1)
    (result,) = tick(kube)
    assert result.ok, result
    wait_for(lambda: condition(pods(apiserver)[name], "Ready").get("status") == "True", what="Ready")
    assert tick(kube) == [], "a warm pod whose engine runs on is left alone"

    kubelet.kill_engine(NS, name)
    wait_for(lambda: pods(apiserver)[name]["status"]["containerStatuses"][0]["restartCount"] == 1,
             what="the kubelet noticing the crash")
    (reset,) = tick(kube)
    assert not reset.ok and "restarted after its warm-up" in reset.message, reset
    pod = pods(apiserver)[name]
    assert condition(pod, CONDITION_WARMED_UP)["reason"] == "EngineRestarted"
    kubelet.sync()
    assert condition(pods(apiserver)[name], "Ready")["status"] == "False", "out until warmed again"

    containers_ready(apiserver, 1)
    assert stats(pods(apiserver)[name])["requests_received"] == 0, "a fresh engine"
    (again,) = tick(kube)
    assert again.ok and again.message.startswith("served 3 warm-up requests"), again
    wait_for(lambda: condition(pods(apiserver)[name], "Ready").get("status") == "True", what="Ready again")
    assert stats(pods(apiserver)[name])["requests_received"] == 3
    assert tick(kube) == []
