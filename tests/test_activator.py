"""`ebbtide activator` on the real control plane: the real command as a process, watching the
Service's EndpointSlices through the real API server, in front of engine-simulator pods.

Scale from zero loses no request: requests sent while no replica exists are held, show in the
activation query, and are all answered once the replica the operator starts is ready; so are
those sent while the last replica sleeps. What cannot be helped (the hold running out, too many
held) is one 503 each, counted by cause.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import urllib.error
import urllib.request

import pytest

from ebbtide.cluster.render import LABEL_SERVING
from tests.cli import ebbtide, refused
from tests.test_kubelet import deployment, service
from tests.test_operator_sleep import DOWN_WINDOW, IDLE, SPEC, engine_stats
from tests.testbed.loadgen import LoadGenerator
from tests.testbed.operator import isvc, replicas, running_operator, status
from tests.testbed.replays import CLI_ENV
from tests.testbed.waiting import wait_for

PENDING = "ebbtide_activator_pending_requests"
OUTCOMES = "ebbtide_activator_requests_total"


def complete(url: str) -> tuple[int, dict, dict]:
    """One completion through the activator: (status, headers, body)."""
    body = json.dumps({"model": "tiny-model", "prompt": "hello", "max_tokens": 4}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_what_cannot_be_held_is_one_503_each_counted_by_cause(apiserver, activator_factory):
    """No Service at all: a request is held for --hold-seconds, then gets a 503 that says why;
    with --max-pending already held, the next one gets its 503 at once. Nothing stays pending."""
    activator = activator_factory("chat", "--hold-seconds", "3", "--max-pending", "1")
    assert activator.metrics()[f"{PENDING}"] == 0

    answers = []
    held = threading.Thread(target=lambda: answers.append(complete(activator.url)))
    held.start()
    wait_for(lambda: activator.metrics()[PENDING] == 1, timeout=10, what="one request held")
    overflow, headers, body = complete(activator.url)
    assert overflow == 503 and headers.get("Retry-After") == "10"
    assert "1 requests are already held for default/chat" in body["error"]["message"]
    held.join(timeout=30)

    ((code, headers, body),) = answers
    assert code == 503 and headers.get("Retry-After") == "10"
    assert body["error"]["message"] == "no replica of default/chat became ready within 3 s"
    metrics = activator.metrics()
    assert metrics[PENDING] == 0
    assert metrics[f'{OUTCOMES}{{outcome="hold_timeout"}}'] == 1
    assert metrics[f'{OUTCOMES}{{outcome="overflow"}}'] == 1
    assert metrics["ebbtide_activator_hold_seconds_count"] == 1


def burst(url: str) -> dict:
    """Twenty-odd streamed completions over two seconds, all answered or failed by the end."""
    return LoadGenerator(url, rate=10, duration=2, prompt_tokens=20, max_tokens=8, seed=1,
                         request_timeout=120).start().wait()


def activated(server, what: str) -> dict:
    """The decision that woke the service (status is written just after the tick's moves)."""
    return wait_for(lambda: next((d for d in status(server).get("decisions", [])
                                  if d["reason"] == "Activated" and what in d["message"]), None),
                    timeout=5, what=f"an Activated decision: {what}")


@pytest.mark.prometheus
@pytest.mark.slow
def test_scale_from_zero_and_from_sleep_loses_no_request(apiserver, cluster_prometheus, kubelet_factory,
                                                          activator_factory):
    """replicas.min 0 without allowScaleToZero, the activator in front, its pending count the
    activation query. A burst with no replica at all is held while the operator starts one
    (a cold start) and every request is answered; once idle, the last replica sleeps rather
    than disappears, leaves the activator's endpoints, and the next burst wakes it (seconds),
    again with every request answered and none sent to the sleeping engine."""
    server = apiserver.server
    activator = activator_factory("chat")
    cluster_prometheus.set_targets([{"targets": [f"127.0.0.1:{activator.metrics_port}"],
                                     "labels": {"job": "activator"}}])
    kubelet = kubelet_factory()
    # max 1: the held burst, released at once, queues on the one replica and could ask for a
    # second (waitingPerReplica 2), which is not what this test is about.
    spec = {**SPEC, "replicas": {"min": 0, "max": 1},
            "sleep": {"enabled": True, "idleSeconds": IDLE, "maxPool": 1, "ttlSeconds": 600}}
    spec["scaling"] = {**spec["scaling"], "activation": {
        "query": f'sum({PENDING}{{service_namespace="default",service="chat"}})'}}
    with running_operator(apiserver, EBBTIDE_PROMETHEUS_URL=cluster_prometheus.url, EBBTIDE_TICK_SECONDS="0.5"):
        server.create_object(isvc("chat", **spec))
        wait_for(lambda: status(server).get("lastDecision"), what="a first decision")
        assert replicas(server) == 0

        from_none = burst(activator.url)
        assert from_none["sent"] > 0 and from_none["ok"] == from_none["sent"], from_none
        (pod,) = kubelet.pods("default", "chat")
        assert "the activation query reads" in activated(server, "starting a replica")["message"]

        wait_for(lambda: engine_stats(pod)["is_sleeping"], timeout=DOWN_WINDOW + 20, what="the last replica asleep")
        assert replicas(server) == 1, "it sleeps rather than disappears"
        wait_for(lambda: activator.metrics()["ebbtide_activator_ready_endpoints"] == 0, timeout=10,
                 what="the sleeper out of the activator's endpoints")

        from_sleep = burst(activator.url)
        assert from_sleep["sent"] > 0 and from_sleep["ok"] == from_sleep["sent"], from_sleep
        activated(server, "waking a sleeping replica")
        stats = engine_stats(pod)
        assert stats["wake_up_calls"] == 1 and stats["requests_refused_asleep"] == 0, stats

    metrics = activator.metrics()
    assert metrics[PENDING] == 0
    outcomes = {key: value for key, value in metrics.items() if key.startswith(OUTCOMES) and value}
    assert outcomes == {f'{OUTCOMES}{{outcome="forwarded"}}': from_none["sent"] + from_sleep["sent"]}, outcomes
    assert metrics["ebbtide_activator_hold_seconds_count"] > 0, "some requests were held"
    print(f"held from no replica: latency p50 {from_none['latency_p50']:.1f} s, p99 {from_none['latency_p99']:.1f} s "
          f"({from_none['sent']} requests); from a sleeping one: p50 {from_sleep['latency_p50']:.1f} s, "
          f"p99 {from_sleep['latency_p99']:.1f} s ({from_sleep['sent']} requests)")


@pytest.mark.parametrize(("options", "complaint"), [
    (("--service", "Chat"), "argument --service: metadata.name 'Chat' must be"),
    (("--service", "chat", "-n", "Models"), "argument -n/--namespace: metadata.namespace 'Models' must be"),
    (("--service", "chat", "--hold-seconds", "0"), "argument --hold-seconds: must be greater than 0"),
    (("--service", "chat", "--max-pending", "0"), "argument --max-pending: must be at least 1"),
    (("--service", "chat", "--port", "99999"), "argument --port: must be at least 0 and at most 65535"),
    ((), "the following arguments are required: --service"),
])
def test_bad_options_are_one_line(options, complaint):
    refused(ebbtide("activator", *options), f"ebbtide activator: {complaint}")


def test_a_port_in_use_is_one_line(apiserver):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {**CLI_ENV, "KUBECONFIG": str(apiserver.kubeconfig_path)}
        line = refused(ebbtide("activator", "--service", "chat", "--host", "127.0.0.1",
                               "--port", taken.getsockname()[1], "--metrics-port", "0", env=env))
    assert line.startswith("ebbtide activator: cannot listen:") and "in use" in line, line


def readyz(activator) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"{activator.metrics_url}/readyz", timeout=5) as response:
            return response.status, response.read().decode().strip()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode().strip()


def test_on_sigterm_it_stops_being_ready_but_keeps_taking_requests_for_the_drain(apiserver, activator_factory):
    """The Service forgets a terminating pod a moment after its SIGTERM: meanwhile the activator
    still takes requests (here one, held until its hold runs out), then exits cleanly."""
    activator = activator_factory("chat", "--drain-seconds", "10", "--hold-seconds", "1")
    assert readyz(activator) == (200, "ok")
    activator.process.popen.send_signal(signal.SIGTERM)
    wait_for(lambda: readyz(activator) == (503, "stopping"), timeout=5, what="readyz saying stopping")
    code, _, body = complete(activator.url)
    assert code == 503 and "became ready within 1 s" in body["error"]["message"], body
    assert activator.process.popen.wait(timeout=30) == 0
    assert "Traceback" not in activator.process.output()


@pytest.mark.slow
def test_through_an_api_server_restart_no_request_is_lost_and_the_watch_resumes(
        control_plane, apiserver, kubelet, activator_factory):
    """While kube-apiserver restarts, the activator keeps sending requests to the replicas it
    last saw (as kube-proxy does); once the API server is back its watch resumes: a replica
    then taken out of the Service leaves its endpoints. Not one request fails throughout."""
    server = apiserver.server
    server.create_object(deployment(replicas=2))
    server.create_object(service())
    activator = activator_factory("chat")
    ready = "ebbtide_activator_ready_endpoints"
    wait_for(lambda: activator.metrics()[ready] == 2, timeout=60, what="2 ready endpoints")

    load = LoadGenerator(activator.url, rate=10, duration=600, prompt_tokens=20, max_tokens=4, seed=1).start()
    wait_for(lambda: load.summary()["ok"] >= 10, timeout=30, what="requests answered before the restart")
    control_plane.restart("kube-apiserver")
    answered = load.summary()["ok"]
    wait_for(lambda: load.summary()["ok"] >= answered + 10, timeout=60, what="requests answered after it")

    (out, *_) = sorted(p["metadata"]["name"] for p in server.list_objects("v1/pods", "default"))
    server.patch_object("v1/pods", "default", out, {"metadata": {"labels": {LABEL_SERVING: "false"}}})
    wait_for(lambda: activator.metrics()[ready] == 1, timeout=30, what="the watch seeing one endpoint left")
    load.set_rate(0)
    wait_for(lambda: load.in_flight == 0, timeout=30, what="the requests in flight answered")
    summary = load.stop()
    assert summary["errors"] == 0 and summary["ok"] == summary["sent"], summary
    assert "Traceback" not in activator.process.output()
    print(f"{summary['sent']} requests through a kube-apiserver restart, {summary['errors']} failed")
