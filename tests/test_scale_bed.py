"""The scale benchmark's test bed (bench/operator_scale.py) under the real control plane: the
status-only kubelet marks the real controllers' pods Running with no process, the fleet exporter
serves their vLLM series, and the counting proxy counts a client's requests by verb."""
from __future__ import annotations

import collections
import urllib.request

from ebbtide.api.manifest import parse_spec
from ebbtide.api.ref import ServiceRef
from ebbtide.cluster.render import render_deployment
from tests.testbed.countingproxy import CountingProxy, classify
from tests.testbed.fleetexporter import FleetExporter
from tests.testbed.kubeapi import KubeApi, without_owner
from tests.testbed.statuswriter import StatusWriter, status_nodes
from tests.testbed.waiting import wait_for

DEPLOYMENTS = "apps/v1/deployments"


def test_requests_are_classified_as_the_api_server_counts_them():
    assert classify("GET", "/api/v1/pods", "labelSelector=a") == ("list", "pods")
    assert classify("GET", "/api/v1/pods", "watch=true&resourceVersion=5") == ("watch", "pods")
    assert classify("GET", "/apis/ebbtide.dev/v1alpha1/namespaces/ns/inferenceservices/chat", "") == (
        "get", "inferenceservices")
    assert classify("PATCH", "/apis/ebbtide.dev/v1alpha1/namespaces/ns/inferenceservices/chat/status", "") == (
        "patch", "inferenceservices/status")
    assert classify("POST", "/api/v1/namespaces/ns/events", "") == ("create", "events")


def test_pods_without_processes_run_are_scraped_and_deleted(apiserver):
    exporter = FleetExporter().start()
    node = status_nodes(1, prefix="status-only-smoke")[0]
    writer = StatusWriter(apiserver.api_client(), [node], on_running=lambda p: exporter.add_pod(p.namespace, p.name),
                          on_gone=lambda p: exporter.remove_pod(p.namespace, p.name))
    try:
        writer.start()
        spec = parse_spec({"model": {"name": "tiny-model"}, "warmup": {"requests": 0}})
        body = without_owner(render_deployment(ServiceRef(name="chat", namespace="default", uid="u"), spec, replicas=2))
        body["spec"]["template"]["spec"]["nodeSelector"] = {"kubernetes.io/hostname": node.name}
        apiserver.server.create_object(body)

        running = wait_for(lambda: len(writer.running()) == 2 and writer.running(), timeout=60, what="2 pods Running")
        for pod in running.values():
            live = apiserver.server.get_object("v1/pods", "default", pod.name)
            assert live["status"]["phase"] == "Running" and live["status"]["podIP"] == pod.ip
            assert {c["type"]: c["status"] for c in live["status"]["conditions"]}["Ready"] == "True"
        name = next(iter(running.values())).name
        exporter.set("default", name, waiting=7)
        with urllib.request.urlopen(exporter.metrics_url("default"), timeout=5) as response:
            text = response.read().decode()
        assert f'vllm:num_requests_waiting{{namespace="default",pod="{name}",model_name="test-model",engine="0"}} 7' in text
        assert text.count("vllm:num_requests_running{") == 2

        apiserver.server.patch_object(DEPLOYMENTS, "default", "chat", {"spec": {"replicas": 0}})
        wait_for(lambda: not apiserver.server.list_objects("v1/pods", "default"), timeout=60, what="the pods deleted")
        wait_for(lambda: not exporter.fleet["default"], timeout=10, what="the pods gone from the exporter")
    finally:
        writer.stop()
        apiserver.server.delete_object("v1/nodes", None, node.name)
        exporter.stop()


def test_the_proxy_counts_one_clients_requests_by_verb(apiserver):
    plane = apiserver.plane
    with CountingProxy(plane.url, str(plane.pki / "ca.crt")) as proxy:
        client = proxy.api_client(plane.tokens["admin"])
        try:
            api = KubeApi(client)
            api.list_objects("v1/pods", "default")
            api.get_object("v1/namespaces", None, "default")
            api.request("GET", "/api/v1/namespaces/default/pods", query={"watch": "true", "timeoutSeconds": 1})
        finally:
            client.close()
        assert proxy.since(collections.Counter()) == {"get namespaces": 1, "list pods": 1, "watch pods": 1}
        # The proxy sees the watch end after the client does: wait for it rather than race it.
        wait_for(lambda: proxy.open_watches == 0, what="the ended watch to close in the proxy")
