"""The emulated cluster: pods of ebbtide's Deployments really run, a Service balances, load arrives."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from ebbtide.api.manifest import parse_spec
from ebbtide.api.ref import ServiceRef
from ebbtide.cluster.render import CONDITION_WARMED_UP, LABEL_SERVING, render_deployment
from tests.testbed import fixtures
from tests.testbed.loadgen import LoadGenerator, percentile
from tests.testbed.podrunner import (
    DELETION_COST_ANNOTATION,
    FINALIZER,
    PORT_ANNOTATION,
    engine_command,
    pid_alive,
    wait_until,
)

# The cluster's fixtures (tests/conftest.py imports only the apiserver fixture so far).
pod_runner_factory = fixtures.pod_runner_factory
pod_runner = fixtures.pod_runner
load_balancer_factory = fixtures.load_balancer_factory

ROOT = Path(__file__).resolve().parents[1]
NS = 'default'
DEPLOYMENTS = 'apps/v1/deployments'
PODS = 'v1/pods'


def deployment(name='chat', replicas=2, **spec):
    ref = ServiceRef(name=name, namespace=NS, uid=f'uid-{name}')
    # No warm-up readiness gate unless a test asks for one: no operator warms these pods up.
    parsed = parse_spec({'model': {'name': 'meta-llama/Llama-3.1-8B-Instruct', 'servedName': name},
                         'warmup': {'requests': 0}, **spec})
    return render_deployment(ref, parsed, replicas=replicas)


def get(url, timeout=2.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def complete(base_url, **body):
    request = urllib.request.Request(base_url + '/v1/completions', method='POST',
                                     data=json.dumps({'prompt': 'hi', 'max_tokens': 2, **body}).encode(),
                                     headers={'Content-Type': 'application/json'})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers.get('X-Testbed-Pod')
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get('X-Testbed-Pod')


def api_pods(apiserver):
    return {p['metadata']['name']: p for p in apiserver.server.list_objects(PODS, NS)}


def condition(pod, type_):
    conditions = (pod.get('status') or {}).get('conditions') or []
    return next((c for c in conditions if c['type'] == type_), {}).get('status')


def test_engine_command_translates_the_vllm_container():
    (container,) = deployment(sleep={'enabled': True}, engine={'args': ['--max-model-len', '1024',
                                                                        '--enforce-eager']},
                              )['spec']['template']['spec']['containers']
    command = engine_command(container, port=1234, preset='tiny', startup_delay=2,
                             capacity_overrides={'max_num_seqs': 8}, base_env={'VLLM_SERVER_DEV_MODE': '0'})
    argv = command.argv
    assert argv[argv.index('--port') + 1] == '1234'
    assert argv[argv.index('--model') + 1] == 'meta-llama/Llama-3.1-8B-Instruct'
    assert argv[argv.index('--served-model-name') + 1] == 'chat'
    assert '--enable-sleep-mode' in argv and argv[argv.index('--max-model-len') + 1] == '1024'
    assert argv[argv.index('--max-num-seqs') + 1] == '8' and '--enforce-eager' not in argv
    assert command.env['VLLM_SERVER_DEV_MODE'] == '1'
    plain = engine_command(deployment()['spec']['template']['spec']['containers'][0], port=1, base_env={})
    assert '--enable-sleep-mode' not in plain.argv and 'VLLM_SERVER_DEV_MODE' not in plain.env


def test_pods_start_scale_by_deletion_cost_and_go_with_the_deployment(apiserver, pod_runner_factory):
    published = []
    runner = pod_runner_factory(publish_targets=published.append)
    started = time.monotonic()
    apiserver.server.create_object(deployment(replicas=2))

    pods = wait_until(lambda: len(api_pods(apiserver)) == 2 and api_pods(apiserver), timeout=5)
    for name, pod in pods.items():
        assert name.startswith('chat-') and len(name) == len('chat-') + 5
        assert pod['metadata']['ownerReferences'][0]['kind'] == 'Deployment'
        assert pod['metadata']['labels'][LABEL_SERVING] == 'true'
        assert pod['metadata']['annotations']['prometheus.io/port'] == '8000'
        assert pod['spec']['nodeName'] == 'runner-node-ondemand-0'
    # Cold start: running at once, ready only after the engine's startup delay.
    wait_until(lambda: all(p.get('status', {}).get('phase') == 'Running' for p in api_pods(apiserver).values()),
               timeout=5)
    assert not any(condition(p, 'Ready') == 'True' for p in api_pods(apiserver).values())
    wait_until(lambda: all(condition(p, 'Ready') == 'True' for p in api_pods(apiserver).values()), timeout=15)
    assert time.monotonic() - started >= 1.0  # the startup delay
    pods = api_pods(apiserver)
    ports = {int(p['metadata']['annotations'][PORT_ANNOTATION]) for p in pods.values()}
    assert len(ports) == 2
    for pod in pods.values():
        status = pod['status']
        assert status['podIP'] == '127.0.0.1'
        (container,) = status['containerStatuses']
        assert container['ready'] and container['started'] and container['restartCount'] == 0
        assert get(f"http://127.0.0.1:{pod['metadata']['annotations'][PORT_ANNOTATION]}/health")[0] == 200
    wait_until(lambda: (apiserver.server.get_object(DEPLOYMENTS, NS, 'chat').get('status') or {})
               .get('readyReplicas') == 2, timeout=5)
    status = apiserver.server.get_object(DEPLOYMENTS, NS, 'chat')['status']
    assert status['replicas'] == status['updatedReplicas'] == status['availableReplicas'] == 2
    assert status['observedGeneration'] == 1
    assert sorted(g['labels']['pod'] for g in published[-1]) == sorted(pods)
    assert {g['targets'][0] for g in published[-1]} == {f'127.0.0.1:{port}' for port in ports}

    # Scale to 3: one more engine process.
    apiserver.server.patch_object(DEPLOYMENTS, NS, 'chat', {'spec': {'replicas': 3}})
    wait_until(lambda: len(runner.pods()) == 3 and all(p.ready for p in runner.pods()), timeout=15)
    assert len({p.pid for p in runner.pods()}) == 3
    wait_until(lambda: (apiserver.server.get_object(DEPLOYMENTS, NS, 'chat').get('status') or {})
               .get('observedGeneration') == 2, timeout=5)

    # Scale to 1: the two cheapest to delete go, the pod with the highest deletion cost stays.
    costs = dict(zip([p.name for p in runner.pods()], ['-10', '100', '5'], strict=True))
    for name, cost in costs.items():
        apiserver.server.patch_object(PODS, NS, name, {'metadata': {'annotations': {DELETION_COST_ANNOTATION: cost}}})
    keeper = max(costs, key=lambda n: int(costs[n]))
    doomed = {p.name: p.pid for p in runner.pods() if p.name != keeper}
    runner.sync()
    apiserver.server.patch_object(DEPLOYMENTS, NS, 'chat', {'spec': {'replicas': 1}})
    wait_until(lambda: set(api_pods(apiserver)) == {keeper}, timeout=10)
    assert not any(pid_alive(pid) for pid in doomed.values())
    wait_until(lambda: [p.name for p in runner.pods()] == [keeper], timeout=5)
    wait_until(lambda: [g['labels']['pod'] for g in published[-1]] == [keeper], timeout=5)

    # A pod deleted by someone else is replaced; its engine gets SIGTERM and drains.
    old_pid = runner.pod(NS, keeper).pid
    apiserver.server.delete_object(PODS, NS, keeper)
    wait_until(lambda: not pid_alive(old_pid), timeout=10)
    replacement = wait_until(lambda: [n for n in api_pods(apiserver) if n != keeper], timeout=5)
    wait_until(lambda: runner.pod(NS, replacement[0]) and runner.pod(NS, replacement[0]).ready, timeout=15)
    wait_until(lambda: keeper not in api_pods(apiserver), timeout=5)

    # Deleting the Deployment takes its pods and their engines with it.
    pids = {p.pid for p in runner.pods()}
    apiserver.server.delete_object(DEPLOYMENTS, NS, 'chat')
    wait_until(lambda: not api_pods(apiserver) and not runner.pods(), timeout=10)
    assert not any(pid_alive(pid) for pid in pids)
    assert runner.live_pids() == set()
    wait_until(lambda: published[-1] == [], timeout=5)


def test_terminating_pod_stays_until_its_engine_drained(apiserver, pod_runner_factory):
    runner = pod_runner_factory(startup_delay=0.2)
    apiserver.server.create_object(deployment(replicas=1))
    (pod,) = wait_until(lambda: [p for p in runner.pods() if p.ready], timeout=10)
    # A long request in flight: SIGTERM lets it finish before the engine exits.
    gen = LoadGenerator(pod.url, rate=1000, duration=0.01, prompt_tokens=10, max_tokens=150).start()
    wait_until(lambda: gen.records, timeout=5)
    time.sleep(0.2)
    apiserver.server.delete_object(PODS, NS, pod.name)
    terminating = apiserver.server.get_object(PODS, NS, pod.name)
    assert terminating['metadata']['deletionTimestamp'] and FINALIZER in terminating['metadata']['finalizers']
    summary = gen.wait(timeout=20)
    assert summary['ok'] == summary['sent'] >= 1, summary
    wait_until(lambda: apiserver.server.get_object(PODS, NS, pod.name) is None, timeout=10)
    assert not pid_alive(pod.pid)


def test_template_change_rolls_one_pod_at_a_time(apiserver, pod_runner_factory):
    runner = pod_runner_factory(startup_delay=0.3)
    apiserver.server.create_object(deployment(replicas=2))  # maxSurge 1, maxUnavailable 0
    old = {p.name for p in wait_until(lambda: len(runner.pods()) == 2 and all(p.ready for p in runner.pods())
                                      and runner.pods(), timeout=10)}
    apiserver.server.patch_object(DEPLOYMENTS, NS, 'chat',
                                  {'spec': {'template': {'metadata': {'annotations': {'restart': '1'}}}}})
    seen_active, seen_ready = set(), set()

    def rolled():
        pods = [p for p in runner.pods() if not p.terminating]
        seen_active.add(len(pods))
        seen_ready.add(sum(p.ready for p in pods))
        return len(pods) == 2 and all(p.ready for p in pods) and not {p.name for p in pods} & old
    wait_until(rolled, timeout=20, interval=0.02)
    assert max(seen_active) <= 3 and min(seen_ready) >= 2, (seen_active, seen_ready)
    pods = wait_until(lambda: len(api_pods(apiserver)) == 2 and api_pods(apiserver), timeout=10)
    assert len({p['metadata']['labels']['pod-template-hash'] for p in pods.values()}) == 1
    assert all(p['metadata']['annotations']['restart'] == '1' for p in pods.values())
    wait_until(lambda: apiserver.server.get_object(DEPLOYMENTS, NS, 'chat')['status'].get('updatedReplicas') == 2
               and apiserver.server.get_object(DEPLOYMENTS, NS, 'chat')['status']['observedGeneration'] == 2,
               timeout=5)


def test_crashed_engine_is_restarted(apiserver, pod_runner_factory):
    runner = pod_runner_factory(startup_delay=0.2)
    apiserver.server.create_object(deployment(replicas=1))
    (pod,) = wait_until(lambda: [p for p in runner.pods() if p.ready], timeout=10)
    runner.kill_engine(NS, pod.name)
    wait_until(lambda: condition(apiserver.server.get_object(PODS, NS, pod.name), 'Ready') == 'False', timeout=5)
    wait_until(lambda: runner.pod(NS, pod.name).ready, timeout=10)
    wait_until(lambda: apiserver.server.get_object(PODS, NS, pod.name)['status']['containerStatuses'][0]
               ['restartCount'] == 1, timeout=5)
    status = apiserver.server.get_object(PODS, NS, pod.name)['status']
    assert status['phase'] == 'Running' and runner.pod(NS, pod.name).pid != pod.pid
    assert status['containerStatuses'][0]['lastState']['terminated']['exitCode'] == -signal.SIGKILL


def test_spot_pool_unavailable_leaves_pods_pending_and_noexecute_evicts(apiserver, pod_runner_factory):
    runner = pod_runner_factory(startup_delay=0.2)
    runner.set_capacity('spot', available=False)
    spot = deployment(name='chat', replicas=1)
    spot['metadata']['name'] = 'chat-spot'
    spot['spec']['template']['spec']['nodeSelector'] = {'karpenter.sh/capacity-type': 'spot'}
    apiserver.server.create_object(spot)
    (name,) = wait_until(lambda: list(api_pods(apiserver)), timeout=5)
    wait_until(lambda: condition(api_pods(apiserver)[name], 'PodScheduled') == 'False', timeout=5)
    pod = api_pods(apiserver)[name]
    scheduled = next(c for c in pod['status']['conditions'] if c['type'] == 'PodScheduled')
    assert scheduled['reason'] == 'Unschedulable' and '0/2 nodes are available' in scheduled['message']
    assert pod['status']['phase'] == 'Pending' and 'nodeName' not in pod['spec']
    runner.sync()
    assert runner.pod(NS, name).pid is None and runner.targets() == []

    runner.set_capacity('spot', available=True)
    wait_until(lambda: runner.pod(NS, name) and runner.pod(NS, name).ready, timeout=10)
    assert api_pods(apiserver)[name]['spec']['nodeName'] == 'runner-node-spot-0'
    assert apiserver.server.get_object('v1/nodes', None, 'runner-node-spot-0')['metadata']['labels'][
        'karpenter.sh/capacity-type'] == 'spot'

    # A spot interruption: a NoExecute taint evicts the pod; with the pool gone its replacement waits.
    runner.set_capacity('spot', available=False)
    runner.taint_node('runner-node-spot-0', {'key': 'karpenter.sh/disrupted', 'effect': 'NoExecute'})
    wait_until(lambda: name not in api_pods(apiserver), timeout=10)
    (replacement,) = wait_until(lambda: list(api_pods(apiserver)), timeout=5)
    wait_until(lambda: condition(api_pods(apiserver)[replacement], 'PodScheduled') == 'False', timeout=5)
    runner.untaint_node('runner-node-spot-0', 'karpenter.sh/disrupted')
    runner.set_capacity('spot', available=True)
    wait_until(lambda: runner.pod(NS, replacement) and runner.pod(NS, replacement).ready, timeout=10)


def test_readiness_gate_holds_ready_until_its_condition_is_true(apiserver, pod_runner_factory):
    """As a kubelet: Ready = containers ready and every readiness gate's condition True."""
    runner = pod_runner_factory(startup_delay=0.2)
    apiserver.server.create_object(deployment(replicas=1, warmup={'requests': 3}))
    (name,) = wait_until(lambda: list(api_pods(apiserver)), timeout=5)
    wait_until(lambda: condition(api_pods(apiserver)[name], 'ContainersReady') == 'True', timeout=10)
    runner.sync()
    pod = api_pods(apiserver)[name]
    ready = next(c for c in pod['status']['conditions'] if c['type'] == 'Ready')
    assert ready['status'] == 'False' and ready['reason'] == 'ReadinessGatesNotReady'
    assert not runner.pod(NS, name).ready
    assert not (apiserver.server.get_object(DEPLOYMENTS, NS, 'chat')['status'] or {}).get('readyReplicas')
    # The engine answers on podIP:containerPort, as in a cluster (the port annotation agrees).
    (port,) = pod['spec']['containers'][0]['ports']
    assert str(port['containerPort']) == pod['metadata']['annotations'][PORT_ANNOTATION]
    assert get(f"http://{pod['status']['podIP']}:{port['containerPort']}/health")[0] == 200

    def set_gate(status):
        apiserver.server.patch_object(PODS, NS, name, {'status': {'conditions': [
            {'type': CONDITION_WARMED_UP, 'status': status, 'reason': 'Test'}]}},
            subresource='status', content_type='application/strategic-merge-patch+json')

    set_gate('True')
    wait_until(lambda: condition(api_pods(apiserver)[name], 'Ready') == 'True', timeout=5)
    wait_until(lambda: apiserver.server.get_object(DEPLOYMENTS, NS, 'chat')['status'].get('readyReplicas') == 1,
               timeout=5)
    assert runner.pod(NS, name).ready
    runner.sync()  # the runner's own status writes keep the gate's condition
    assert condition(api_pods(apiserver)[name], CONDITION_WARMED_UP) == 'True'

    set_gate('False')
    wait_until(lambda: condition(api_pods(apiserver)[name], 'Ready') == 'False', timeout=5)
    assert condition(api_pods(apiserver)[name], 'ContainersReady') == 'True'


def test_load_balancer_spreads_over_ready_serving_pods(apiserver, pod_runner, load_balancer_factory):
    # (pod_runner: the default test runner, engines ready ~1.5 s after their pods appear)
    apiserver.server.create_object(deployment(replicas=2))
    balancer = load_balancer_factory('chat')
    assert complete(balancer.url)[0] == 503  # no pod is ready yet
    assert balancer.stats()['no_endpoint'] == 1
    names = balancer.wait_for_endpoints(2, timeout=15)

    gen = LoadGenerator(balancer.url, rate=40, duration=1.0, prompt_tokens=20, max_tokens=4, seed=1)
    summary = gen.start().wait()
    assert summary['errors'] == 0 and summary['sent'] >= 20, summary
    assert set(summary['per_pod']) == set(names)
    assert min(summary['per_pod'].values()) >= summary['sent'] // 4, summary['per_pod']
    assert balancer.stats()['per_pod'] == summary['per_pod']

    # Flip one pod out of the Service (as the operator does before putting it to sleep).
    out, stays = names
    apiserver.server.patch_object(PODS, NS, out, {'metadata': {'labels': {LABEL_SERVING: 'false'}}})
    balancer.wait_for_endpoints(1, timeout=5)
    assert balancer.endpoints() == [stays]
    assert {complete(balancer.url)[1] for _ in range(10)} == {stays}

    # No endpoints at all: 503s, counted.
    apiserver.server.patch_object(PODS, NS, stays, {'metadata': {'labels': {LABEL_SERVING: 'false'}}})
    balancer.wait_for_endpoints(0, timeout=5)
    assert complete(balancer.url)[0] == 503
    assert balancer.stats()['no_endpoint'] == 2


def test_load_above_capacity_queues_and_ttft_grows(apiserver, pod_runner_factory, load_balancer_factory):
    pod_runner_factory(startup_delay=0.2)
    apiserver.server.create_object(deployment(replicas=1))
    balancer = load_balancer_factory('chat')
    balancer.wait_for_endpoints(1, timeout=15)
    # tiny: 4 sequences, ~10 ms per step: ~20 requests/s of 20 tokens. Calm first, then 3x that.
    gen = LoadGenerator(balancer.url, rate=4, duration=3.0, prompt_tokens=100, max_tokens=20, seed=7).start()
    time.sleep(1.0)
    gen.set_rate(50)
    summary = gen.wait(timeout=60)
    assert summary['errors'] == 0, summary
    calm = [r.ttft for r in gen.records if r.start < 1.0]
    late = [r.ttft for r in gen.records if r.start >= 2.2]
    assert calm and late
    assert percentile(calm, 0.5) < 0.1
    assert percentile(late, 0.5) > 0.3 and percentile(late, 0.5) > 5 * percentile(calm, 0.5)
    assert summary['ttft_p99'] >= summary['ttft_p90'] >= summary['ttft_p50']
    assert gen.finished and gen.in_flight == 0


def test_standalone_runner_writes_targets_and_cleans_up(apiserver, tmp_path):
    targets = tmp_path / 'targets.json'
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')]))}
    proc = subprocess.Popen([sys.executable, '-m', 'tests.testbed.podrunner', '--kubeconfig',
                             str(apiserver.kubeconfig_path), '--targets-file', str(targets), '--preset', 'tiny',
                             '--startup-delay', '0.2', '--max-grace-seconds', '3'],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout.readline().strip() == b'pod runner ready'
        apiserver.server.create_object(deployment(replicas=1))
        groups = wait_until(lambda: targets.exists() and json.loads(targets.read_text()), timeout=10)
        (pod,) = api_pods(apiserver).values()
        assert groups == [{'targets': [f"127.0.0.1:{pod['metadata']['annotations'][PORT_ANNOTATION]}"],
                           'labels': {'namespace': NS, 'pod': pod['metadata']['name']}}]
        wait_until(lambda: condition(api_pods(apiserver)[pod['metadata']['name']], 'Ready') == 'True', timeout=10)
        pid = int(api_pods(apiserver)[pod['metadata']['name']]['status']['containerStatuses'][0]['containerID']
                  .rsplit('/', 1)[1])
        assert pid_alive(pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, proc.stdout.read()
        assert not pid_alive(pid)
        assert json.loads(targets.read_text()) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
