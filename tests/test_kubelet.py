"""Our kubelet under the real control plane: the real controllers make the pods, it runs them, a Service balances."""
from __future__ import annotations

import ipaddress
import json
import urllib.error
import urllib.request

from ebbtide.api.manifest import parse_spec
from ebbtide.api.ref import ServiceRef
from ebbtide.cluster.render import CONDITION_WARMED_UP, LABEL_SERVING, render_deployment
from tests.testbed.engines import engine_command, pid_alive
from tests.testbed.kubeapi import without_owner
from tests.testbed.loadgen import LoadGenerator, percentile
from tests.testbed.waiting import wait_for

DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"

NS = "default"
DEPLOYMENTS = "apps/v1/deployments"
PODS = "v1/pods"


def deployment(name="chat", replicas=2, **spec):
    ref = ServiceRef(name=name, namespace=NS, uid=f"uid-{name}")
    # No warm-up readiness gate unless a test asks for one: no operator warms these pods up.
    parsed = parse_spec({"model": {"name": "meta-llama/Llama-3.1-8B-Instruct", "servedName": name},
                         "warmup": {"requests": 0}, **spec})
    return without_owner(render_deployment(ref, parsed, replicas=replicas))


def get(url, timeout=2.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def complete(base_url, **body):
    request = urllib.request.Request(base_url + "/v1/completions", method="POST",
                                     data=json.dumps({"prompt": "hi", "max_tokens": 2, **body}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers.get("X-Testbed-Pod")
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("X-Testbed-Pod")


def api_pods(apiserver):
    return {p["metadata"]["name"]: p for p in apiserver.server.list_objects(PODS, NS)}


def condition(pod, type_):
    conditions = (pod.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == type_), {}).get("status")


def test_engine_command_translates_the_vllm_container():
    (container,) = deployment(sleep={"enabled": True}, engine={"args": ["--max-model-len", "1024",
                                                                        "--enforce-eager"]},
                              )["spec"]["template"]["spec"]["containers"]
    command = engine_command(container, host="127.1.0.9", port=1234, preset="tiny", startup_delay=2,
                             capacity_overrides={"max_num_seqs": 8}, base_env={"VLLM_SERVER_DEV_MODE": "0"})
    argv = command.argv
    assert argv[argv.index("--host") + 1] == "127.1.0.9" and argv[argv.index("--port") + 1] == "1234"
    assert argv[argv.index("--model") + 1] == "meta-llama/Llama-3.1-8B-Instruct"
    assert argv[argv.index("--served-model-name") + 1] == "chat"
    assert "--enable-sleep-mode" in argv and argv[argv.index("--max-model-len") + 1] == "1024"
    assert argv[argv.index("--max-num-seqs") + 1] == "8" and "--enforce-eager" not in argv
    assert command.env["VLLM_SERVER_DEV_MODE"] == "1"
    plain = engine_command(deployment()["spec"]["template"]["spec"]["containers"][0], host="127.1.0.9", port=1,
                           base_env={})
    assert "--enable-sleep-mode" not in plain.argv and "VLLM_SERVER_DEV_MODE" not in plain.env


def test_the_real_controllers_make_the_pods_and_the_kubelet_runs_them(apiserver, kubelet_factory):
    kubelet = kubelet_factory()
    apiserver.server.create_object(deployment(replicas=2))

    pods = wait_for(lambda: len(api_pods(apiserver)) == 2 and api_pods(apiserver), timeout=15)
    for name, pod in pods.items():
        # The ReplicaSet controller's names and owners, the scheduler's binding.
        (owner,) = pod["metadata"]["ownerReferences"]
        assert owner["kind"] == "ReplicaSet" and name.startswith(owner["name"] + "-")
        assert pod["metadata"]["labels"][LABEL_SERVING] == "true"
        assert pod["spec"]["nodeName"] in kubelet.nodes
    wait_for(lambda: all(condition(p, "Ready") == "True" for p in api_pods(apiserver).values()), timeout=20)
    pods = api_pods(apiserver)
    addresses = {p["status"]["podIP"] for p in pods.values()}
    assert len(addresses) == 2 and all(ipaddress.ip_address(a) in kubelet.network.subnet for a in addresses)
    for pod in pods.values():
        (container,) = pod["status"]["containerStatuses"]
        assert container["ready"] and container["started"] and container["restartCount"] == 0
        # podIP:containerPort reaches the engine, as in a cluster.
        assert get(f"http://{pod['status']['podIP']}:8000/health")[0] == 200
    wait_for(lambda: (apiserver.server.get_object(DEPLOYMENTS, NS, "chat").get("status") or {})
               .get("readyReplicas") == 2, timeout=10)
    slices = apiserver.server.list_objects("discovery.k8s.io/v1/endpointslices", NS,
                                           label_selector="kubernetes.io/service-name=chat")
    assert slices == [], "no Service, no EndpointSlice"

    # Scale to 3, then to 1: the real ReplicaSet controller removes the cheapest to delete.
    apiserver.server.patch_object(DEPLOYMENTS, NS, "chat", {"spec": {"replicas": 3}})
    wait_for(lambda: len(kubelet.pods()) == 3 and all(p.ready for p in kubelet.pods()), timeout=20)
    assert len({p.pid for p in kubelet.pods()}) == 3
    costs = dict(zip([p.name for p in kubelet.pods()], ["-10", "100", "5"], strict=True))
    for name, cost in costs.items():
        apiserver.server.patch_object(PODS, NS, name, {"metadata": {"annotations": {DELETION_COST_ANNOTATION: cost}}})
    keeper = max(costs, key=lambda n: int(costs[n]))
    doomed = {p.name: p.pid for p in kubelet.pods() if p.name != keeper}
    apiserver.server.patch_object(DEPLOYMENTS, NS, "chat", {"spec": {"replicas": 1}})
    wait_for(lambda: set(api_pods(apiserver)) == {keeper}, timeout=20)
    assert not any(pid_alive(pid) for pid in doomed.values())

    # A pod deleted by someone else is replaced; its engine gets SIGTERM.
    old_pid = kubelet.pod(NS, keeper).pid
    apiserver.server.delete_object(PODS, NS, keeper)
    wait_for(lambda: not pid_alive(old_pid), timeout=15)
    (replacement,) = wait_for(lambda: [n for n in api_pods(apiserver) if n != keeper], timeout=10)
    wait_for(lambda: kubelet.pod(NS, replacement) and kubelet.pod(NS, replacement).ready, timeout=20)
    wait_for(lambda: keeper not in api_pods(apiserver), timeout=10)

    # Deleting the Deployment: the garbage collector takes the ReplicaSet and the pods, the engines stop.
    pids = {p.pid for p in kubelet.pods()}
    apiserver.server.delete_object(DEPLOYMENTS, NS, "chat")
    wait_for(lambda: not api_pods(apiserver) and not kubelet.pods(), timeout=30)
    assert not any(pid_alive(pid) for pid in pids)
    assert kubelet.live_pids() == set()


def test_terminating_pod_stays_until_its_engine_drained(apiserver, kubelet_factory):
    kubelet = kubelet_factory(startup_delay=0.2)
    apiserver.server.create_object(deployment(replicas=1))
    (pod,) = wait_for(lambda: [p for p in kubelet.pods() if p.ready], timeout=20)
    # A long request in flight: SIGTERM lets it finish before the engine exits.
    gen = LoadGenerator(pod.url, rate=1000, duration=0.01, prompt_tokens=10, max_tokens=150).start()
    wait_for(lambda: gen.records, timeout=5)
    apiserver.server.delete_object(PODS, NS, pod.name)
    terminating = apiserver.server.get_object(PODS, NS, pod.name)
    assert terminating["metadata"]["deletionTimestamp"], "a pod on a node is deleted gracefully"
    summary = gen.wait(timeout=20)
    assert summary["ok"] == summary["sent"] >= 1, summary
    wait_for(lambda: apiserver.server.get_object(PODS, NS, pod.name) is None, timeout=15)
    assert not pid_alive(pod.pid)


def test_template_change_rolls_one_pod_at_a_time(apiserver, kubelet_factory):
    kubelet = kubelet_factory(startup_delay=0.3)
    apiserver.server.create_object(deployment(replicas=2))  # maxSurge 1, maxUnavailable 0
    old = {p.name for p in wait_for(lambda: len(kubelet.pods()) == 2 and all(p.ready for p in kubelet.pods())
                                      and kubelet.pods(), timeout=20)}
    apiserver.server.patch_object(DEPLOYMENTS, NS, "chat",
                                  {"spec": {"template": {"metadata": {"annotations": {"restart": "1"}}}}})
    seen_ready = set()

    def rolled():
        pods = [p for p in kubelet.pods() if not p.terminating]
        seen_ready.add(sum(p.ready for p in pods))
        return len(pods) == 2 and all(p.ready for p in pods) and not {p.name for p in pods} & old
    wait_for(rolled, timeout=40, interval=0.02)
    assert min(seen_ready) >= 2, seen_ready
    pods = wait_for(lambda: len(api_pods(apiserver)) == 2 and api_pods(apiserver), timeout=20)
    assert len({p["metadata"]["labels"]["pod-template-hash"] for p in pods.values()}) == 1
    assert all(p["metadata"]["annotations"]["restart"] == "1" for p in pods.values())


def test_crashed_engine_is_restarted(apiserver, kubelet_factory):
    kubelet = kubelet_factory(startup_delay=0.2)
    apiserver.server.create_object(deployment(replicas=1))
    (pod,) = wait_for(lambda: [p for p in kubelet.pods() if p.ready], timeout=20)
    kubelet.kill_engine(NS, pod.name)
    wait_for(lambda: apiserver.server.get_object(PODS, NS, pod.name)["status"]["containerStatuses"][0]
               ["restartCount"] == 1, timeout=10)
    wait_for(lambda: kubelet.pod(NS, pod.name).ready, timeout=15)
    status = apiserver.server.get_object(PODS, NS, pod.name)["status"]
    assert status["phase"] == "Running" and kubelet.pod(NS, pod.name).pid != pod.pid
    assert status["containerStatuses"][0]["lastState"]["terminated"]["exitCode"] == 137


def test_spot_pods_wait_for_spot_nodes_and_a_noexecute_taint_evicts(apiserver, kubelet_factory):
    kubelet = kubelet_factory(startup_delay=0.2)
    kubelet.set_capacity("spot", available=False)
    spot = deployment(name="chat", replicas=1)
    spot["metadata"]["name"] = "chat-spot"
    spot["spec"]["template"]["spec"]["nodeSelector"] = {"karpenter.sh/capacity-type": "spot"}
    apiserver.server.create_object(spot)
    (name,) = wait_for(lambda: list(api_pods(apiserver)), timeout=10)
    # The real scheduler's verdict: no node matches.
    wait_for(lambda: condition(api_pods(apiserver)[name], "PodScheduled") == "False", timeout=15)
    scheduled = next(c for c in api_pods(apiserver)[name]["status"]["conditions"] if c["type"] == "PodScheduled")
    assert scheduled["reason"] == "Unschedulable" and "didn't match Pod's node affinity/selector" in scheduled[
        "message"], scheduled
    assert kubelet.pod(NS, name) is None

    kubelet.set_capacity("spot", available=True)
    wait_for(lambda: kubelet.pod(NS, name) and kubelet.pod(NS, name).ready, timeout=30)
    assert api_pods(apiserver)[name]["spec"]["nodeName"] == "testbed-spot-0"

    # A spot interruption: the taint-eviction controller deletes the pod; with no spot node, its replacement waits.
    kubelet.taint_node("testbed-spot-0", {"key": "karpenter.sh/disrupted", "effect": "NoExecute"})
    wait_for(lambda: name not in api_pods(apiserver), timeout=30)
    (replacement,) = wait_for(lambda: list(api_pods(apiserver)), timeout=10)
    wait_for(lambda: condition(api_pods(apiserver)[replacement], "PodScheduled") == "False", timeout=15)
    kubelet.untaint_node("testbed-spot-0", "karpenter.sh/disrupted")
    # The scheduler retries an unschedulable pod on the node's update, or after its backoff: slow on a busy machine.
    wait_for(lambda: kubelet.pod(NS, replacement) and kubelet.pod(NS, replacement).ready, timeout=90)


def test_readiness_gate_holds_ready_until_its_condition_is_true(apiserver, kubelet_factory):
    """As a kubelet: Ready = containers ready and every readiness gate's condition True."""
    kubelet = kubelet_factory(startup_delay=0.2)
    apiserver.server.create_object(deployment(replicas=1, warmup={"requests": 3}))
    (name,) = wait_for(lambda: list(api_pods(apiserver)), timeout=10)
    wait_for(lambda: condition(api_pods(apiserver)[name], "ContainersReady") == "True", timeout=20)
    kubelet.sync()
    pod = api_pods(apiserver)[name]
    ready = next(c for c in pod["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "ReadinessGatesNotReady"
    assert not kubelet.pod(NS, name).ready
    assert not (apiserver.server.get_object(DEPLOYMENTS, NS, "chat")["status"] or {}).get("readyReplicas")

    def set_gate(status):
        apiserver.server.patch_object(PODS, NS, name, {"status": {"conditions": [
            {"type": CONDITION_WARMED_UP, "status": status, "reason": "Test"}]}},
            subresource="status", content_type="application/strategic-merge-patch+json")

    set_gate("True")
    wait_for(lambda: condition(api_pods(apiserver)[name], "Ready") == "True", timeout=10)
    wait_for(lambda: apiserver.server.get_object(DEPLOYMENTS, NS, "chat")["status"].get("readyReplicas") == 1,
               timeout=10)
    assert kubelet.pod(NS, name).ready
    kubelet.sync()  # the kubelet's own status writes keep the gate's condition
    assert condition(api_pods(apiserver)[name], CONDITION_WARMED_UP) == "True"

    set_gate("False")
    wait_for(lambda: condition(api_pods(apiserver)[name], "Ready") == "False", timeout=10)
    assert condition(api_pods(apiserver)[name], "ContainersReady") == "True"


def service(name="chat"):
    from ebbtide.cluster.render import render_service
    ref = ServiceRef(name=name, namespace=NS, uid=f"uid-{name}")
    return without_owner(render_service(ref, parse_spec({"model": {"name": "m"}})))


def test_load_balancer_follows_the_endpointslices(apiserver, kubelet, load_balancer_factory):
    apiserver.server.create_object(deployment(replicas=2))
    apiserver.server.create_object(service())
    balancer = load_balancer_factory("chat")
    names = balancer.wait_for_endpoints(2, timeout=30)

    gen = LoadGenerator(balancer.url, rate=40, duration=1.0, prompt_tokens=20, max_tokens=4, seed=1)
    summary = gen.start().wait()
    assert summary["errors"] == 0 and summary["sent"] >= 20, summary
    assert set(summary["per_pod"]) == set(names)
    assert balancer.stats()["per_pod"] == summary["per_pod"]

    # Flip one pod out of the Service (as the operator does before putting it to sleep): the
    # real EndpointSlice controller drops it.
    out, stays = names
    apiserver.server.patch_object(PODS, NS, out, {"metadata": {"labels": {LABEL_SERVING: "false"}}})
    balancer.wait_for_endpoints(1, timeout=15)
    assert balancer.endpoints() == [stays]
    assert {complete(balancer.url)[1] for _ in range(10)} == {stays}

    # No endpoints at all: 503s, counted.
    apiserver.server.patch_object(PODS, NS, stays, {"metadata": {"labels": {LABEL_SERVING: "false"}}})
    balancer.wait_for_endpoints(0, timeout=15)
    assert complete(balancer.url)[0] == 503


def test_load_above_capacity_queues_and_ttft_grows(apiserver, kubelet_factory, load_balancer_factory):
    kubelet_factory(startup_delay=0.2)
    apiserver.server.create_object(deployment(replicas=1))
    apiserver.server.create_object(service())
    balancer = load_balancer_factory("chat")
    balancer.wait_for_endpoints(1, timeout=30)
    # tiny: 4 sequences, ~10 ms per step: ~20 requests/s of 20 tokens. Calm first, then 3x that.
    # The overload lasts 4 s: on a busy machine the generator itself can fall behind for a while.
    gen = LoadGenerator(balancer.url, rate=4, duration=5.0, prompt_tokens=100, max_tokens=20, seed=7).start()
    wait_for(lambda: gen.elapsed() >= 1.0, timeout=10)
    gen.set_rate(50)
    summary = gen.wait(timeout=60)
    assert summary["errors"] == 0, summary
    calm = [r.ttft for r in gen.records if r.start < 1.0]
    late = [r.ttft for r in gen.records if r.start >= 3.5]
    assert calm and late
    assert percentile(late, 0.5) > 5 * percentile(calm, 0.5)
    assert summary["ttft_p99"] >= summary["ttft_p90"] >= summary["ttft_p50"]
    assert gen.finished and gen.in_flight == 0
