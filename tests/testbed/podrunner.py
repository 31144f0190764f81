"""
The emulated cluster's controllers and kubelet: pods of ebbtide's Deployments, really running.

`PodRunner` plays, against a Kubernetes API (the emulated one, see ``apiserver.py``), the
Deployment/ReplicaSet controller, the scheduler and the kubelet, as kwok does, except that
every pod really runs: one engine-simulator process (``python -m ebbtide.sim.engine_server``)
on its own loopback port. It polls the API every ``interval`` seconds (simplest robust choice)
and, for every Deployment labelled ``app.kubernetes.io/managed-by=ebbtide``:

- keeps ``spec.replicas`` pods (named ``<deployment>-<5 chars>``, with the template's labels
  and annotations plus ``pod-template-hash``, owned by the Deployment), rolls them on a
  template change (RollingUpdate with maxSurge/maxUnavailable, or Recreate), and on scale-down
  deletes pods in the ReplicaSet controller's order: unscheduled, pending, not ready, lowest
  ``controller.kubernetes.io/pod-deletion-cost``, ready for the shortest time, most restarts, newest;
- schedules pods onto fake Nodes (``runner-node-ondemand-0``, ``runner-node-spot-0``) by
  ``nodeSelector``, required node affinity and taints; a pod that fits nowhere stays Pending
  with ``PodScheduled=False/Unschedulable``;
- starts the engine of each scheduled pod (translating the container's vLLM args and env:
  model, ``--served-model-name``, ``--enable-sleep-mode``, ``VLLM_SERVER_DEV_MODE``, and the
  vLLM flags the simulator models: ``--max-model-len``, ``--max-num-seqs``,
  ``--max-num-batched-tokens``, ``--block-size``), probes ``/health`` and writes the pod status
  through ``/status`` as a kubelet does (phase, podIP 127.0.0.1, conditions, containerStatuses);
  the engine's loopback port is the container's ``containerPort`` (so ``podIP:containerPort``
  reaches it, as in a cluster) and the annotation ``testbed.ebbtide.dev/port``; a crashed engine
  is restarted (``restartCount`` + 1);
- honours readiness gates as the kubelet does: ``ContainersReady`` follows the engine's health,
  ``Ready`` needs that and every ``spec.readinessGates`` condition True; those conditions belong
  to someone else (the operator's ``ebbtide.dev/warmed-up``), so the status is written as a
  strategic merge patch, which merges conditions by type and leaves them alone;
- writes the Deployment status (replicas, updated/ready/available/unavailable, observedGeneration);
- publishes the scrape targets of every pod whose engine runs (ready or not) through the
  ``publish_targets`` callback, in Prometheus file_sd format.

Graceful deletion: the pods it creates carry the finalizer ``testbed.ebbtide.dev/kubelet``
(the emulated API removes objects at once otherwise), so a deleted pod stays Terminating
(``deletionTimestamp`` set) while its engine gets SIGTERM, drains, and gets SIGKILL after the
termination grace period; then the runner removes the finalizer and the pod is gone. Pods
deleted by anyone (the operator, the garbage collector after the Deployment was deleted, a
NoExecute taint) go the same way, and are replaced while their Deployment still wants them.

In-process (the test thread stays synchronous)::

    with PodRunner(apiserver.api_client(), publish_targets=prometheus.set_targets,
                   startup_delay=2, max_grace_seconds=5, log_dir=tmp_path) as runner:
        ...

As a process (writes the file_sd targets file itself, atomically)::

    python -m tests.testbed.podrunner --kubeconfig KUBECONFIG --targets-file targets.json \\
        --preset tiny --startup-delay 2

Known gaps: no ReplicaSet objects (pods are owned by the Deployment directly, and their names
lack the ReplicaSet hash); a re-allocated port rewrites the pod's containerPort (immutable in
Kubernetes); nodes have unlimited capacity (resources are not checked); the
readiness rule is the runner's (two failed probes), not the container's probe settings;
preStop hooks run only with ``honor_prestop`` (and only ``sleep N``); ``minReadySeconds``,
``paused`` and ``progressDeadlineSeconds`` are ignored.
"""
from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import dataclasses
import datetime
import hashlib
import itertools
import json
import logging
import math
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import aiohttp

logger = logging.getLogger(__name__)

T = TypeVar('T')
Body = dict[str, Any]
TargetGroups = list[dict[str, Any]]
PublishTargets = Callable[[TargetGroups], None]

MANAGED_SELECTOR = 'app.kubernetes.io/managed-by=ebbtide'
FINALIZER = 'testbed.ebbtide.dev/kubelet'
PORT_ANNOTATION = 'testbed.ebbtide.dev/port'
DELETION_COST_ANNOTATION = 'controller.kubernetes.io/pod-deletion-cost'
TEMPLATE_HASH_LABEL = 'pod-template-hash'
CAPACITY_TYPE_LABEL = 'karpenter.sh/capacity-type'
MERGE_PATCH = 'application/merge-patch+json'
STRATEGIC_MERGE_PATCH = 'application/strategic-merge-patch+json'
POD_IP = '127.0.0.1'
# As Kubernetes' names.SimpleNameGenerator: no vowels, no look-alike digits.
NAME_ALPHABET = 'bcdfghjklmnpqrstvwxz2456789'
# The vLLM flags whose values the simulator models (they are also its capacity knobs).
ENGINE_KNOB_FLAGS = ('--max-model-len', '--max-num-seqs', '--max-num-batched-tokens', '--block-size')
# vLLM's store-true flags that may come before a positional argument.
BOOLEAN_FLAGS = frozenset({'--enable-sleep-mode', '--enforce-eager', '--trust-remote-code',
                           '--enable-prefix-caching', '--no-enable-prefix-caching', '--enable-chunked-prefill',
                           '--disable-log-requests', '--disable-log-stats', '--enable-lora'})
READY_FAILURE_THRESHOLD = 2
RESTART_BACKOFF_SECONDS = 1.0

# Every engine process any runner of this process started and has not reaped yet: killed at exit.
_LIVE_PROCESSES: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _kill_leftovers() -> None:
    with _LIVE_LOCK:
        leftovers = list(_LIVE_PROCESSES)
    for proc in leftovers:
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(Exception):
            proc.wait(timeout=5)


# --------------------------------------------------------------------------------------------------
# Small helpers, also used by the load balancer and the load generator.
# --------------------------------------------------------------------------------------------------

def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')


def wait_until(probe: Callable[[], T], timeout: float = 10.0, interval: float = 0.05,
               message: str | None = None) -> T:
    """Poll ``probe()`` until it returns something truthy (returned); AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(message or f'timed out after {timeout}s waiting for {probe!r}')
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = pathlib.Path(f'/proc/{pid}/stat').read_text()
        return stat.rsplit(')', 1)[1].split()[0] != 'Z'
    return True


def make_api_client(api_client: Any = None, kubeconfig: str | os.PathLike | None = None) -> tuple[Any, bool]:
    """The given ApiClient, or one from a kubeconfig (or the default one); and whether we own it."""
    if api_client is not None:
        return api_client, False
    import kubernetes.config
    if kubeconfig is not None:
        return kubernetes.config.new_client_from_config(config_file=str(kubeconfig)), True
    return kubernetes.config.new_client_from_config(), True


def call_api(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call an official client method and decode the raw JSON (plain dicts, as the operator uses)."""
    response = fn(*args, _preload_content=False, **kwargs)
    data = response.data
    return json.loads(data) if data else None


def is_pod_ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get('status') or {}).get('conditions') or []
    return any(c.get('type') == 'Ready' and c.get('status') == 'True' for c in conditions)


def pod_port(pod: Mapping[str, Any]) -> int | None:
    """The loopback port of a runner's pod (annotation), else the first containerPort."""
    annotations = (pod.get('metadata') or {}).get('annotations') or {}
    if annotations.get(PORT_ANNOTATION):
        with contextlib.suppress(ValueError):
            return int(annotations[PORT_ANNOTATION])
    for container in (pod.get('spec') or {}).get('containers') or []:
        for port in container.get('ports') or []:
            if port.get('containerPort'):
                return int(port['containerPort'])
    return None


def set_engine_port(pod_spec: dict[str, Any], port: int) -> None:
    """Make the engine container's port (named http, else its first) the loopback port it runs on."""
    containers = pod_spec.get('containers') or []
    container = next((c for c in containers if c.get('name') == 'vllm'), containers[0] if containers else {})
    ports = container.get('ports') or []
    target = next((p for p in ports if p.get('name') == 'http'), ports[0] if ports else None)
    if target is not None:
        target['containerPort'] = port


def _port_patch(pod_spec: dict[str, Any], port: int) -> Body:
    """A merge patch moving a pod to another port: the annotation and the containerPort."""
    set_engine_port(pod_spec, port)
    return {'metadata': {'annotations': {PORT_ANNOTATION: str(port)}},
            'spec': {'containers': pod_spec.get('containers') or []}}


def readiness_gates_passed(pod: Mapping[str, Any]) -> bool:
    """True when the condition of every ``spec.readinessGates`` entry is True (none: True)."""
    gates = {g.get('conditionType') for g in (pod.get('spec') or {}).get('readinessGates') or []}
    conditions = {c.get('type'): c.get('status') for c in (pod.get('status') or {}).get('conditions') or []}
    return all(conditions.get(gate) == 'True' for gate in gates)


def write_targets_file(path: str | os.PathLike, groups: TargetGroups) -> None:
    """Write Prometheus file_sd JSON atomically (Prometheus never reads half a file)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    tmp.write_text(json.dumps(groups, indent=1))
    os.replace(tmp, path)


class LoopThread:
    """An asyncio event loop in a daemon thread, driven from synchronous code."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        started = threading.Event()

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            started.set()
            try:
                self.loop.run_forever()
            finally:
                with contextlib.suppress(Exception):
                    self.loop.run_until_complete(self.loop.shutdown_asyncgens())
                    self.loop.run_until_complete(self.loop.shutdown_default_executor())
                self.loop.close()

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        started.wait()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Any:
        """Schedule a coroutine in the loop; a concurrent.futures.Future."""
        assert self.loop is not None, 'the loop thread is not started'
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self.submit(coro).result(timeout)

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        if self.loop is not None and self.running:
            self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)


# --------------------------------------------------------------------------------------------------
# Translating a pod's container into an engine-simulator command line.
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EngineCommand:
    argv: list[str]
    env: dict[str, str]
    served_model_name: str


def engine_command(container: Mapping[str, Any], *, port: int, preset: str = 'tiny', startup_delay: float = 0.0,
                   shutdown_timeout: float = 30.0, capacity_overrides: Mapping[str, Any] | None = None,
                   log_level: str = 'WARNING', base_env: Mapping[str, str] | None = None) -> EngineCommand:
    """
    The simulator command (without the interpreter) and environment for a vLLM container.

    Reads ``vllm serve MODEL --served-model-name S [--enable-sleep-mode] [...]`` from the
    container's command and args (``--model M`` works too); the container's port is replaced by
    ``port``; vLLM flags the simulator does not model are dropped. ``capacity_overrides`` (knob
    name to value, e.g. ``{'max_num_seqs': 8}``) win over the container's flags.
    """
    command = list(container.get('command') or [])
    args = list(container.get('args') or [])
    if command[:2] == ['vllm', 'serve']:
        args = command[2:] + args
    model: str | None = None
    served: list[str] = []
    sleep_mode = False
    knobs: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = str(args[i])
        i += 1
        if not arg.startswith('-'):
            model = model or arg
            continue
        flag, eq, inline = arg.partition('=')
        values: list[str] = [inline] if eq else []
        if not eq and flag not in BOOLEAN_FLAGS:
            while i < len(args) and not str(args[i]).startswith('--'):
                values.append(str(args[i]))
                i += 1
                if flag != '--served-model-name':
                    break  # every other flag takes at most one value
        if flag == '--served-model-name':
            served = values
        elif flag == '--model' and values:
            model = values[0]
        elif flag == '--enable-sleep-mode':
            sleep_mode = not values or values[0].lower() not in ('false', '0')
        elif flag == '--no-enable-sleep-mode':
            sleep_mode = False
        elif flag in ENGINE_KNOB_FLAGS and values:
            knobs[flag] = values[0]
        # anything else (--port, --tensor-parallel-size, ...) is not modelled
    model = model or 'model'
    argv = ['--host', POD_IP, '--port', str(port), '--model', model, '--preset', preset,
            '--startup-delay', f'{startup_delay:g}', '--shutdown-timeout', f'{shutdown_timeout:g}',
            '--log-level', log_level]
    if served:
        argv += ['--served-model-name', *served]
    if sleep_mode:
        argv.append('--enable-sleep-mode')
    for flag, value in knobs.items():
        with contextlib.suppress(ValueError):
            argv += [flag, str(int(value))]
    for name, value in (capacity_overrides or {}).items():
        argv += ['--' + name.replace('_', '-'), str(value)]

    env = dict(os.environ if base_env is None else base_env)
    env.pop('VLLM_SERVER_DEV_MODE', None)  # only the container's env decides
    for var in container.get('env') or []:
        if var.get('name') and 'valueFrom' not in var:
            env[var['name']] = str(var.get('value', ''))
    env['PYTHONUNBUFFERED'] = '1'
    return EngineCommand(argv=argv, env=env, served_model_name=served[0] if served else model)


# A trampoline that ties the engine's life to the thread that started it (PR_SET_PDEATHSIG
# survives exec), so a runner killed hard leaves no engines behind.
_TRAMPOLINE = (
    'import ctypes, os, signal, sys\n'
    'ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n'
    'if os.getppid() != int(sys.argv[1]): sys.exit(1)\n'
    "os.execv(sys.executable, [sys.executable, '-m', 'ebbtide.sim.engine_server', *sys.argv[2:]])\n"
)


def _spawn(argv: list[str], env: Mapping[str, str], log_path: pathlib.Path | None) -> subprocess.Popen:
    if sys.platform == 'linux':
        cmd = [sys.executable, '-c', _TRAMPOLINE, str(os.getpid()), *argv]
    else:
        cmd = [sys.executable, '-m', 'ebbtide.sim.engine_server', *argv]
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, 'ab') as log:
            proc = subprocess.Popen(cmd, env=dict(env), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    else:
        proc = subprocess.Popen(cmd, env=dict(env), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with _LIVE_LOCK:
        _LIVE_PROCESSES.add(proc)
    return proc


def _reaped(proc: subprocess.Popen) -> None:
    with _LIVE_LOCK:
        _LIVE_PROCESSES.discard(proc)


# --------------------------------------------------------------------------------------------------
# Scheduling: fake nodes, selectors, affinity, taints.
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class FakeNode:
    name: str
    capacity_type: str  # 'on-demand' or 'spot': the pool that set_capacity() switches
    labels: dict[str, str]
    taints: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    gpus: int = 8


def default_nodes() -> list[FakeNode]:
    """One node per capacity pool, labelled as Karpenter, EKS, GKE and AKS label theirs."""
    def labels(name: str, capacity: str) -> dict[str, str]:
        out = {
            'kubernetes.io/hostname': name,
            'kubernetes.io/os': 'linux',
            'kubernetes.io/arch': 'amd64',
            'node.kubernetes.io/instance-type': 'p5.48xlarge',
            'topology.kubernetes.io/zone': 'testbed-a',
            'nvidia.com/gpu.present': 'true',
            CAPACITY_TYPE_LABEL: capacity,
            'karpenter.sh/nodepool': capacity,
            'eks.amazonaws.com/capacityType': 'SPOT' if capacity == 'spot' else 'ON_DEMAND',
        }
        if capacity == 'spot':
            out['cloud.google.com/gke-spot'] = 'true'
            out['kubernetes.azure.com/scalesetpriority'] = 'spot'
        return out
    return [FakeNode('runner-node-ondemand-0', 'on-demand', labels('runner-node-ondemand-0', 'on-demand')),
            FakeNode('runner-node-spot-0', 'spot', labels('runner-node-spot-0', 'spot'))]


def tolerates(tolerations: Iterable[Mapping[str, Any]], taint: Mapping[str, Any]) -> bool:
    for tol in tolerations:
        if tol.get('effect') and tol.get('effect') != taint.get('effect'):
            continue
        operator = tol.get('operator') or 'Equal'
        if not tol.get('key'):
            if operator == 'Exists':
                return True
            continue
        if tol.get('key') != taint.get('key'):
            continue
        if operator == 'Exists' or (tol.get('value') or '') == (taint.get('value') or ''):
            return True
    return False


def _match_expression(labels: Mapping[str, str], expr: Mapping[str, Any]) -> bool:
    key, op, values = expr.get('key'), expr.get('operator'), expr.get('values') or []
    if op == 'In':
        return labels.get(key) in values
    if op == 'NotIn':
        return labels.get(key) not in values
    if op == 'Exists':
        return key in labels
    if op == 'DoesNotExist':
        return key not in labels
    if op in ('Gt', 'Lt'):
        try:
            have, want = int(labels[key]), int(values[0])
        except (KeyError, ValueError, IndexError):
            return False
        return have > want if op == 'Gt' else have < want
    return False


def node_matches(pod_spec: Mapping[str, Any], node: FakeNode) -> bool:
    """nodeSelector and required node affinity (the label part of scheduling)."""
    if any(node.labels.get(k) != v for k, v in (pod_spec.get('nodeSelector') or {}).items()):
        return False
    required = (((pod_spec.get('affinity') or {}).get('nodeAffinity') or {})
                .get('requiredDuringSchedulingIgnoredDuringExecution') or {})
    terms = required.get('nodeSelectorTerms') or []
    if terms and not any(all(_match_expression(node.labels, e) for e in term.get('matchExpressions') or [])
                         for term in terms):
        return False
    return True


def untolerated_taint(pod_spec: Mapping[str, Any], node: FakeNode,
                      effects: Sequence[str] = ('NoSchedule', 'NoExecute')) -> Mapping[str, Any] | None:
    tolerations = pod_spec.get('tolerations') or []
    for taint in node.taints:
        if taint.get('effect') in effects and not tolerates(tolerations, taint):
            return taint
    return None


# --------------------------------------------------------------------------------------------------
# The runner.
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PodInfo:
    """A snapshot of one pod as the runner sees it."""
    namespace: str
    name: str
    deployment: str
    port: int
    pid: int | None
    phase: str
    ready: bool
    node: str | None
    terminating: bool
    restart_count: int

    @property
    def url(self) -> str:
        return f'http://{POD_IP}:{self.port}'


@dataclasses.dataclass
class _Pod:
    namespace: str
    name: str
    uid: str
    deployment: str
    owner_uid: str
    port: int
    seq: int
    grace: float
    container: dict[str, Any]
    spec: dict[str, Any]
    template_hash: str | None = None
    node: str | None = None
    scheduled_at: str | None = None
    unschedulable: str | None = None
    proc: subprocess.Popen | None = None
    start_time: str | None = None  # pod status.startTime (the kubelet accepted it)
    container_started_at: str | None = None
    started: bool = False
    ready: bool = False
    ready_since: float | None = None  # monotonic
    failures: int = 0
    gates_passed: bool = True  # every readiness gate's condition True (as last read from the API)
    restart_count: int = 0
    last_state: dict[str, Any] | None = None
    restart_after: float | None = None  # monotonic: crash-loop back-off
    transitions: dict[str, str] = dataclasses.field(default_factory=dict)
    terminating: bool = False
    finished: bool = False
    last_status: dict[str, Any] | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def containers_ready(self) -> bool:
        return self.ready and self.alive

    @property
    def pod_ready(self) -> bool:
        """The pod's Ready condition: containers ready and every readiness gate passed."""
        return self.containers_ready and self.gates_passed

    def transition(self, condition: str, status: bool) -> str:
        """The lastTransitionTime of a condition, bumped when its status changes."""
        marker = f'{condition}={status}'
        if marker not in self.transitions:
            self.transitions = {k: v for k, v in self.transitions.items() if not k.startswith(condition + '=')}
            self.transitions[marker] = now_rfc3339()
        return self.transitions[marker]


class PodRunner:
    """
    ReplicaSet controller + scheduler + kubelet for ebbtide's Deployments (see the module doc).

    ``api_client`` (an official ``kubernetes.client.ApiClient``) or ``kubeconfig`` (a path; else
    the default kubeconfig); ``publish_targets(groups)`` gets the file_sd target groups whenever
    they change; ``preset`` and ``capacity_overrides`` (knob name to value) shape every engine;
    ``startup_delay`` is the cold start of every engine (the port binds after it; attribute,
    may be changed between pods); ``max_grace_seconds`` caps the pods' termination grace period;
    ``honor_prestop`` waits out a ``sleep N`` preStop hook before SIGTERM; ``nodes`` are the
    fake nodes (default: `default_nodes`; empty: no Node objects and no scheduling
    constraints); ``log_dir`` receives one log file per pod (default: no logs);
    ``namespace`` limits the runner to one namespace.
    """

    def __init__(self, api_client: Any = None, *, kubeconfig: str | os.PathLike | None = None,
                 publish_targets: PublishTargets | None = None, preset: str = 'tiny',
                 startup_delay: float = 2.0, capacity_overrides: Mapping[str, Any] | None = None,
                 max_grace_seconds: float | None = None, honor_prestop: bool = False,
                 interval: float = 0.25, nodes: Sequence[FakeNode] | None = None,
                 log_dir: str | os.PathLike | None = None, namespace: str | None = None,
                 engine_log_level: str = 'WARNING') -> None:
        self._api_client_arg, self._kubeconfig = api_client, kubeconfig
        self.publish_targets = publish_targets
        self.preset = preset
        self.startup_delay = startup_delay
        self.capacity_overrides = dict(capacity_overrides or {})
        self.max_grace_seconds = max_grace_seconds
        self.honor_prestop = honor_prestop
        self.interval = interval
        self.nodes: dict[str, FakeNode] = {n.name: n for n in (default_nodes() if nodes is None else nodes)}
        self.unavailable_pools: set[str] = set()
        self.log_dir = pathlib.Path(log_dir) if log_dir is not None else None
        self.namespace = namespace
        self.engine_log_level = engine_log_level

        self._client: Any = None
        self._owns_client = False
        self._core: Any = None
        self._apps: Any = None
        self._pods: dict[tuple[str, str], _Pod] = {}
        self._reserved_ports: set[int] = set()
        self._seq = itertools.count()
        self._deploy_status: dict[tuple[str, str], dict[str, Any]] = {}
        self._deploy_transitions: dict[tuple[str, str, str], tuple[str, str]] = {}
        self._published: TargetGroups | None = None
        self._tasks: set[asyncio.Task] = set()
        self._session: aiohttp.ClientSession | None = None
        self._stop: asyncio.Event | None = None
        self._loop_thread: LoopThread | None = None
        self._main_future: Any = None
        self._tick_cond = threading.Condition()
        self._ticks = 0
        self._snapshot: list[PodInfo] = []
        self._all_pids: set[int] = set()
        self.errors: list[BaseException] = []  # failed ticks (logged; the loop goes on)

    # ------------------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 30.0) -> PodRunner:
        """Run in a background thread with its own loop; returns after the first full tick."""
        self._loop_thread = LoopThread('pod-runner')
        self._loop_thread.start()
        self._main_future = self._loop_thread.submit(self.run())
        try:
            wait_until(lambda: self._ticks > 0 or self._main_future.done(), timeout=timeout,
                       message='the pod runner did not complete its first tick')
        except BaseException:
            self.stop()
            raise
        if self._main_future.done():
            self._main_future.result()  # raises the failure
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Stop: terminate every engine this runner started, delete its pods, publish no targets."""
        thread = self._loop_thread
        if thread is None or thread.loop is None:
            return
        if self._stop is not None and thread.running:
            thread.loop.call_soon_threadsafe(self._stop.set)
        if self._main_future is not None:
            with contextlib.suppress(Exception):
                self._main_future.result(timeout)
        thread.stop()
        self._loop_thread = None

    def __enter__(self) -> PodRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """The runner's main loop, in the current event loop, until ``stop`` is set (or stop())."""
        self._stop = stop or asyncio.Event()
        self._client, self._owns_client = make_api_client(self._api_client_arg, self._kubeconfig)
        import kubernetes.client
        self._core = kubernetes.client.CoreV1Api(self._client)
        self._apps = kubernetes.client.AppsV1Api(self._client)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0))
        try:
            await self._ensure_nodes()
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    await self._tick()
                except Exception as e:  # the API may blip; a runner that dies leaves a test hanging
                    self.errors.append(e)
                    logger.exception('pod runner tick failed')
                with self._tick_cond:
                    self._ticks += 1
                    self._tick_cond.notify_all()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), max(0.0, self.interval - (time.monotonic() - started)))
        finally:
            await self._shutdown()

    def sync(self, ticks: int = 2, timeout: float = 30.0) -> None:
        """Block until ``ticks`` full ticks have run after this call (so the runner saw the latest API)."""
        with self._tick_cond:
            target = self._ticks + ticks
            if not self._tick_cond.wait_for(lambda: self._ticks >= target, timeout):
                raise TimeoutError('the pod runner did not tick')

    # ------------------------------------------------------------------------------- test API

    def pods(self, namespace: str | None = None, deployment: str | None = None) -> list[PodInfo]:
        """What the runner runs now (a snapshot, refreshed every tick), oldest first."""
        return [p for p in self._snapshot
                if (namespace is None or p.namespace == namespace)
                and (deployment is None or p.deployment == deployment)]

    def pod(self, namespace: str, name: str) -> PodInfo | None:
        return next((p for p in self._snapshot if p.namespace == namespace and p.name == name), None)

    @property
    def started_pids(self) -> set[int]:
        """Every engine process this runner ever started (to check none is left behind)."""
        return set(self._all_pids)

    def live_pids(self) -> set[int]:
        return {pid for pid in self._all_pids if pid_alive(pid)}

    def targets(self) -> TargetGroups:
        return list(self._published or [])

    def set_capacity(self, capacity_type: str, available: bool) -> None:
        """Make a capacity pool (``'spot'``, ``'on-demand'``) (un)able to take new pods; running pods stay."""
        if available:
            self.unavailable_pools.discard(capacity_type)
        else:
            self.unavailable_pools.add(capacity_type)
        self._call_soon(self._sync_nodes())

    def taint_node(self, name: str, taint: Mapping[str, Any]) -> None:
        """Add (or replace, by key and effect) a taint; NoExecute evicts the pods that do not tolerate it."""
        node = self.nodes[name]
        taint = dict(taint)
        node.taints = [t for t in node.taints
                       if (t.get('key'), t.get('effect')) != (taint.get('key'), taint.get('effect'))] + [taint]
        self._call_soon(self._sync_nodes())

    def untaint_node(self, name: str, key: str) -> None:
        node = self.nodes[name]
        node.taints = [t for t in node.taints if t.get('key') != key]
        self._call_soon(self._sync_nodes())

    def kill_engine(self, namespace: str, name: str, sig: int = signal.SIGKILL) -> int:
        """Crash a pod's engine (the kubelet restarts it: restartCount + 1); returns the pid."""
        pod = self._pods[(namespace, name)]
        assert pod.proc is not None, f'{namespace}/{name} runs no engine'
        pod.proc.send_signal(sig)
        return pod.proc.pid

    def _call_soon(self, coro: Coroutine[Any, Any, Any]) -> None:
        thread = self._loop_thread
        if thread is not None and thread.running and threading.current_thread() is thread.thread:
            self._spawn_task(coro)  # called from the runner's own loop (e.g. a publish callback)
        elif thread is not None and thread.running:
            thread.run(coro, timeout=30)
        elif thread is None and self._stop is not None and _in_running_loop():
            self._spawn_task(coro)  # run() in the caller's own loop (the CLI), called from that loop
        else:
            coro.close()  # not started: the first tick syncs the nodes anyway

    # ------------------------------------------------------------------------------- API calls

    async def _api(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(call_api, fn, *args, **kwargs)

    async def _api_quiet(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """As `_api`, but a 404/409 (the object is gone or changed under us) is no error: None."""
        from kubernetes.client.rest import ApiException
        try:
            return await self._api(fn, *args, **kwargs)
        except ApiException as e:
            if e.status in (404, 409):
                return None
            raise

    # ------------------------------------------------------------------------------- nodes

    def _node_body(self, node: FakeNode) -> Body:
        taints = list(node.taints)
        unavailable = node.capacity_type in self.unavailable_pools
        if unavailable:
            taints.append({'key': 'node.kubernetes.io/unschedulable', 'effect': 'NoSchedule'})
        spec: Body = {'taints': taints or None, 'unschedulable': True if unavailable else None,
                      'providerID': f'testbed://{node.name}'}
        return {'metadata': {'name': node.name, 'labels': dict(node.labels)}, 'spec': spec}

    def _node_status(self, node: FakeNode) -> Body:
        resources = {'cpu': '192', 'memory': '2048Gi', 'nvidia.com/gpu': str(node.gpus), 'pods': '110'}
        now = now_rfc3339()
        return {'status': {
            'capacity': resources, 'allocatable': resources,
            'addresses': [{'type': 'InternalIP', 'address': POD_IP}, {'type': 'Hostname', 'address': node.name}],
            'conditions': [{'type': 'Ready', 'status': 'True', 'reason': 'KubeletReady',
                            'message': 'kubelet is posting ready status', 'lastHeartbeatTime': now,
                            'lastTransitionTime': now}],
            'nodeInfo': {'kubeletVersion': 'v1.31.0-testbed', 'containerRuntimeVersion': 'testbed://1',
                         'operatingSystem': 'linux', 'architecture': 'amd64'},
        }}

    async def _ensure_nodes(self) -> None:
        from kubernetes.client.rest import ApiException
        for node in self.nodes.values():
            body = self._node_body(node)
            try:
                await self._api(self._core.create_node, {'apiVersion': 'v1', 'kind': 'Node', **body})
            except ApiException as e:
                if e.status != 409:
                    raise
            await self._api_quiet(self._core.patch_node, node.name, body, _content_type=MERGE_PATCH)
            await self._api_quiet(self._core.patch_node_status, node.name, self._node_status(node),
                                  _content_type=MERGE_PATCH)

    async def _sync_nodes(self) -> None:
        for node in self.nodes.values():
            await self._api_quiet(self._core.patch_node, node.name, self._node_body(node), _content_type=MERGE_PATCH)
        # NoExecute taints evict at once (the taint manager, without tolerationSeconds).
        for pod in list(self._pods.values()):
            node = self.nodes.get(pod.node or '')
            if node is not None and not pod.terminating and untolerated_taint(pod.spec, node, ('NoExecute',)):
                logger.info('evicting %s/%s from %s (NoExecute taint)', pod.namespace, pod.name, node.name)
                await self._delete_pod(pod)

    def _schedule(self, pod_spec: Mapping[str, Any]) -> tuple[str | None, str | None]:
        """(node name, None) or (None, the Unschedulable message)."""
        if not self.nodes:
            return 'runner-node-0', None
        reasons: dict[str, int] = {}
        for node in self.nodes.values():
            if not node_matches(pod_spec, node):
                reason = "node(s) didn't match Pod's node affinity/selector"
            elif node.capacity_type in self.unavailable_pools:
                reason = 'node(s) were unschedulable'
            elif (taint := untolerated_taint(pod_spec, node)) is not None:
                value = f": {taint['value']}" if taint.get('value') else ''
                reason = f"node(s) had untolerated taint {{{taint.get('key')}{value}}}"
            else:
                return node.name, None
            reasons[reason] = reasons.get(reason, 0) + 1
        detail = ', '.join(f'{n} {r}' for r, n in sorted(reasons.items()))
        return None, (f'0/{len(self.nodes)} nodes are available: {detail}. preemption: 0/{len(self.nodes)} '
                      f'nodes are available: {len(self.nodes)} Preemption is not helpful for scheduling.')

    # ------------------------------------------------------------------------------- the tick

    async def _tick(self) -> None:
        if self.namespace:
            deployments = await self._api(self._apps.list_namespaced_deployment, self.namespace,
                                          label_selector=MANAGED_SELECTOR)
            pods = await self._api(self._core.list_namespaced_pod, self.namespace)
        else:
            deployments = await self._api(self._apps.list_deployment_for_all_namespaces,
                                          label_selector=MANAGED_SELECTOR)
            pods = await self._api(self._core.list_pod_for_all_namespaces)
        deployments = deployments.get('items') or []
        by_uid = {d['metadata']['uid']: d for d in deployments}
        api_pods: dict[tuple[str, str], Body] = {}
        for body in pods.get('items') or []:
            meta = body['metadata']
            if FINALIZER in (meta.get('finalizers') or []) or self._owner_uid(body) in by_uid:
                api_pods[(meta['namespace'], meta['name'])] = body

        await self._kubelet_sync(api_pods, by_uid)
        for deployment in deployments:
            owned = [b for b in api_pods.values() if self._owner_uid(b) == deployment['metadata']['uid']]
            await self._reconcile_deployment(deployment, owned)
        await self._probe_all()
        self._refresh_snapshot()  # before the API shows it, so the snapshot is never behind the API
        await self._write_pod_statuses(api_pods)
        for deployment in deployments:
            await self._write_deployment_status(deployment)
        self._publish()
        self._refresh_snapshot()

    @staticmethod
    def _owner_uid(pod: Mapping[str, Any]) -> str | None:
        refs = (pod.get('metadata') or {}).get('ownerReferences') or []
        ref = next((r for r in refs if r.get('kind') == 'Deployment'), None)
        return ref.get('uid') if ref else None

    # ------------------------------------------------------------------------------- kubelet

    async def _kubelet_sync(self, api_pods: Mapping[tuple[str, str], Body], by_uid: Mapping[str, Body]) -> None:
        # Pods that vanished from the API (force-deleted): their engines stop.
        for key, pod in list(self._pods.items()):
            body = api_pods.get(key)
            if body is None or body['metadata'].get('uid') != pod.uid:
                if not pod.terminating:
                    self._begin_termination(pod, remove_finalizer=False)
        for key, body in api_pods.items():
            meta = body['metadata']
            pod = self._pods.get(key)
            if pod is None or pod.uid != meta.get('uid'):
                if meta.get('deletionTimestamp'):
                    # Left by an earlier runner: nothing runs, let it go.
                    await self._remove_finalizer(key[0], key[1])
                    continue
                if self._owner_uid(body) not in by_uid:
                    continue
                pod = self._adopt(body, by_uid[self._owner_uid(body)])
            pod.gates_passed = readiness_gates_passed(body)
            if meta.get('deletionTimestamp') and not pod.terminating:
                self._begin_termination(pod)
                continue
            if pod.terminating:
                continue
            if pod.node is None:
                await self._try_schedule(pod)
            # (A crashed engine is noticed by the probe, which schedules the restart.)
            if pod.node is not None and pod.proc is None and not pod.finished:
                self._run_container(pod)

    def _adopt(self, body: Body, deployment: Body) -> _Pod:
        """A pod this runner did not create (a restarted runner): the kubelet (re)starts it."""
        meta, spec = body['metadata'], body.get('spec') or {}
        port = pod_port(body) or 0
        if port in self._reserved_ports or not _port_free(port):
            port = self._allocate_port()
            self._spawn_task(self._api_quiet(self._core.patch_namespaced_pod, meta['name'], meta['namespace'],
                                             _port_patch(spec, port), _content_type=MERGE_PATCH))
        self._reserved_ports.add(port)
        statuses = (body.get('status') or {}).get('containerStatuses') or [{}]
        pod = _Pod(namespace=meta['namespace'], name=meta['name'], uid=meta['uid'],
                   deployment=deployment['metadata']['name'], owner_uid=deployment['metadata']['uid'],
                   port=port, seq=next(self._seq), grace=self._grace(spec), container=self._container(spec),
                   spec=spec, node=spec.get('nodeName'),
                   template_hash=(meta.get('labels') or {}).get(TEMPLATE_HASH_LABEL),
                   restart_count=int(statuses[0].get('restartCount') or 0) + (1 if spec.get('nodeName') else 0))
        if pod.node:
            pod.scheduled_at = now_rfc3339()
        self._pods[pod.key] = pod
        return pod

    @staticmethod
    def _container(spec: Mapping[str, Any]) -> dict[str, Any]:
        containers = spec.get('containers') or [{}]
        return next((c for c in containers if c.get('name') == 'vllm'), containers[0])

    def _grace(self, spec: Mapping[str, Any]) -> float:
        grace = float(spec.get('terminationGracePeriodSeconds', 30))
        return min(grace, self.max_grace_seconds) if self.max_grace_seconds is not None else grace

    def _allocate_port(self) -> int:
        for _ in range(100):
            port = _free_port()
            if port not in self._reserved_ports:
                return port
        raise RuntimeError('no free loopback port')

    async def _try_schedule(self, pod: _Pod) -> None:
        node, message = self._schedule(pod.spec)
        if node is None:
            pod.unschedulable = message
            return
        if await self._api_quiet(self._core.patch_namespaced_pod, pod.name, pod.namespace,
                                 {'spec': {'nodeName': node}}, _content_type=MERGE_PATCH) is not None:
            pod.node, pod.unschedulable, pod.scheduled_at = node, None, now_rfc3339()
            pod.spec['nodeName'] = node

    def _run_container(self, pod: _Pod) -> None:
        now = time.monotonic()
        if pod.restart_after is not None and now < pod.restart_after:
            return
        command = engine_command(pod.container, port=pod.port, preset=self.preset,
                                 startup_delay=self.startup_delay, shutdown_timeout=max(0.0, pod.grace - 0.5),
                                 capacity_overrides=self.capacity_overrides, log_level=self.engine_log_level)
        log_path = self.log_dir / f'{pod.namespace}_{pod.name}.log' if self.log_dir is not None else None
        pod.proc = _spawn(command.argv, command.env, log_path)
        self._all_pids.add(pod.proc.pid)
        pod.start_time = pod.start_time or now_rfc3339()
        pod.container_started_at = now_rfc3339()
        pod.started = pod.ready = False
        pod.failures = 0
        pod.restart_after = None
        logger.info('started %s/%s: pid %d on port %d', pod.namespace, pod.name, pod.proc.pid, pod.port)

    async def _probe_all(self) -> None:
        pods = [p for p in self._pods.values() if p.proc is not None and not p.finished]
        await asyncio.gather(*(self._probe(p) for p in pods))

    async def _probe(self, pod: _Pod) -> None:
        assert pod.proc is not None and self._session is not None
        code = pod.proc.poll()
        if code is not None:
            if pod.terminating:
                return
            # Crashed: CrashLoopBackOff, then the kubelet starts it again.
            pod.last_state = {'terminated': {'exitCode': code, 'reason': 'Error' if code else 'Completed',
                                             'startedAt': pod.container_started_at, 'finishedAt': now_rfc3339()}}
            pod.restart_count += 1
            pod.ready = pod.started = False
            pod.ready_since = None
            _reaped(pod.proc)
            pod.restart_after = time.monotonic() + RESTART_BACKOFF_SECONDS
            if not _port_free(pod.port):
                self._reserved_ports.discard(pod.port)
                pod.port = self._allocate_port()
                self._reserved_ports.add(pod.port)
                await self._api_quiet(self._core.patch_namespaced_pod, pod.name, pod.namespace,
                                      _port_patch(pod.spec, pod.port), _content_type=MERGE_PATCH)
            logger.warning('engine of %s/%s exited with %s; restarting', pod.namespace, pod.name, code)
            pod.proc = None
            return
        try:
            async with self._session.get(f'http://{POD_IP}:{pod.port}/health') as response:
                ok = response.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            ok = False
        if ok:
            pod.failures = 0
            pod.started = True
            if not pod.ready:
                pod.ready, pod.ready_since = True, time.monotonic()
        else:
            pod.failures += 1
            if pod.ready and pod.failures >= READY_FAILURE_THRESHOLD:
                pod.ready, pod.ready_since = False, None

    def _pod_status(self, pod: _Pod) -> Body:
        scheduled = pod.node is not None
        conditions = []
        if scheduled:
            conditions.append({'type': 'PodScheduled', 'status': 'True',
                               'lastTransitionTime': pod.transition('PodScheduled', True)})
        else:
            conditions.append({'type': 'PodScheduled', 'status': 'False', 'reason': 'Unschedulable',
                               'message': pod.unschedulable or '',
                               'lastTransitionTime': pod.transition('PodScheduled', False)})
        status: Body = {'phase': 'Pending', 'conditions': conditions, 'qosClass': 'Burstable'}
        if not scheduled:
            return status
        ready = pod.containers_ready
        for condition in ('Initialized', 'PodReadyToStartContainers'):
            conditions.append({'type': condition, 'status': 'True',
                               'lastTransitionTime': pod.transition(condition, True)})
        for condition, true in (('ContainersReady', ready), ('Ready', pod.pod_ready)):
            item = {'type': condition, 'status': 'True' if true else 'False',
                    'lastTransitionTime': pod.transition(condition, true)}
            if not ready:
                item['reason'] = 'ContainersNotReady'
                item['message'] = 'containers with unready status: [vllm]'
            elif not true:
                item['reason'] = 'ReadinessGatesNotReady'
                item['message'] = 'the conditions of some readiness gates are not True'
            conditions.append(item)
        container = pod.container
        if pod.alive:
            state: Body = {'running': {'startedAt': pod.container_started_at}}
        elif pod.finished:
            state = pod.last_state or {'terminated': {'exitCode': 0, 'reason': 'Completed'}}
        elif pod.restart_after is not None:
            state = {'waiting': {'reason': 'CrashLoopBackOff',
                                 'message': f'back-off restarting failed container vllm in pod {pod.name}'}}
        else:
            state = {'waiting': {'reason': 'ContainerCreating'}}
        container_status = {
            'name': container.get('name', 'vllm'), 'image': container.get('image', ''),
            'imageID': '', 'ready': ready, 'started': pod.started and pod.alive,
            'restartCount': pod.restart_count, 'state': state,
            'lastState': pod.last_state if pod.restart_count else {},
        }
        if pod.proc is not None:
            container_status['containerID'] = f'testbed://{pod.proc.pid}'
        status.update(phase='Running' if pod.start_time else 'Pending', hostIP=POD_IP,
                      hostIPs=[{'ip': POD_IP}], podIP=POD_IP, podIPs=[{'ip': POD_IP}],
                      containerStatuses=[container_status])
        if pod.start_time:
            status['startTime'] = pod.start_time
        if pod.finished:
            code = ((pod.last_state or {}).get('terminated') or {}).get('exitCode', 0)
            status['phase'] = 'Succeeded' if code == 0 else 'Failed'
        return status

    async def _write_pod_statuses(self, api_pods: Mapping[tuple[str, str], Body]) -> None:
        for pod in list(self._pods.values()):
            await self._write_pod_status(pod, (api_pods.get(pod.key) or {}).get('status'))

    async def _write_pod_status(self, pod: _Pod, current: Mapping[str, Any] | None = None) -> None:
        status = self._pod_status(pod)
        if status == pod.last_status:
            return
        patch = {'status': {**{k: None for k in (current or pod.last_status or {}) if k not in status}, **status}}
        # Strategic: conditions merge by type, so the readiness-gate conditions others set stay.
        if await self._api_quiet(self._core.patch_namespaced_pod_status, pod.name, pod.namespace, patch,
                                 _content_type=STRATEGIC_MERGE_PATCH) is not None:
            pod.last_status = status

    # ------------------------------------------------------------------------------- termination

    def _spawn_task(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _begin_termination(self, pod: _Pod, *, remove_finalizer: bool = True) -> None:
        pod.terminating = True
        self._spawn_task(self._terminate(pod, remove_finalizer=remove_finalizer))

    async def _terminate(self, pod: _Pod, *, remove_finalizer: bool = True, prestop: bool = True) -> None:
        try:
            if pod.alive and self.honor_prestop and prestop:
                await asyncio.sleep(min(_prestop_seconds(pod.container), pod.grace))
            await self._stop_process(pod, pod.grace)
            pod.finished = True
            pod.ready = False
            if remove_finalizer:
                await self._write_pod_status(pod)
                await self._remove_finalizer(pod.namespace, pod.name, pod.uid)
        except Exception:
            logger.exception('terminating %s/%s failed', pod.namespace, pod.name)
        finally:
            if self._pods.get(pod.key) is pod:
                del self._pods[pod.key]
            self._reserved_ports.discard(pod.port)
            self._publish()
            self._refresh_snapshot()

    async def _stop_process(self, pod: _Pod, grace: float) -> None:
        proc = pod.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if proc.poll() is None:
                logger.warning('%s/%s did not stop in %.1fs: SIGKILL', pod.namespace, pod.name, grace)
                with contextlib.suppress(OSError):
                    proc.kill()
                await asyncio.to_thread(proc.wait)
        code = proc.returncode
        pod.last_state = {'terminated': {'exitCode': code if code is not None and code >= 0 else 137,
                                         'reason': 'Completed' if code == 0 else 'Error',
                                         'startedAt': pod.container_started_at, 'finishedAt': now_rfc3339()}}
        _reaped(proc)
        logger.info('stopped %s/%s (pid %d): exit %s', pod.namespace, pod.name, proc.pid, code)

    async def _remove_finalizer(self, namespace: str, name: str, uid: str | None = None) -> None:
        body = await self._api_quiet(self._core.read_namespaced_pod, name, namespace)
        if body is None or (uid is not None and body['metadata'].get('uid') != uid):
            return
        finalizers = body['metadata'].get('finalizers') or []
        if FINALIZER in finalizers:
            patch = {'metadata': {'finalizers': [f for f in finalizers if f != FINALIZER],
                                  'resourceVersion': body['metadata']['resourceVersion']}}
            await self._api_quiet(self._core.patch_namespaced_pod, name, namespace, patch,
                                  _content_type=MERGE_PATCH)

    async def _delete_pod(self, pod: _Pod) -> None:
        """Delete through the API (the pod turns Terminating) and start terminating at once."""
        await self._api_quiet(self._core.delete_namespaced_pod, pod.name, pod.namespace,
                              body={'preconditions': {'uid': pod.uid}})
        if not pod.terminating:
            self._begin_termination(pod)

    async def _shutdown(self) -> None:
        """Stop every engine (SIGTERM, SIGKILL after 5 s), delete our pods, publish no targets."""
        pods = list(self._pods.values())
        for pod in pods:
            pod.terminating = True
        await asyncio.gather(*(self._stop_process(p, min(p.grace, 5.0)) for p in pods), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for pod in pods:
            if pod.proc is not None and pod.proc.poll() is None:
                pod.proc.kill()
                pod.proc.wait()
                _reaped(pod.proc)
        # Best effort: the API may be gone already.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._cleanup_api(pods), timeout=10)
        self._pods.clear()
        self._reserved_ports.clear()
        self._published = None
        self._publish()
        self._refresh_snapshot()
        if self._session is not None:
            await self._session.close()
        if self._owns_client and self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()

    async def _cleanup_api(self, pods: Iterable[_Pod]) -> None:
        for pod in pods:
            await self._remove_finalizer(pod.namespace, pod.name, pod.uid)
            await self._api_quiet(self._core.delete_namespaced_pod, pod.name, pod.namespace)

    # ------------------------------------------------------------------------------- controller

    async def _reconcile_deployment(self, deployment: Body, owned: list[Body]) -> None:
        meta, spec = deployment['metadata'], deployment.get('spec') or {}
        if meta.get('deletionTimestamp'):
            return
        replicas = int(spec.get('replicas', 1))
        template_hash = pod_template_hash(spec.get('template') or {})
        active = [b for b in owned if not b['metadata'].get('deletionTimestamp')
                  and not (self._pods.get(_key(b)) and self._pods[_key(b)].terminating)]
        new = [b for b in active if (b['metadata'].get('labels') or {}).get(TEMPLATE_HASH_LABEL) == template_hash]
        old = [b for b in active if b not in new]
        strategy = spec.get('strategy') or {}

        if not old:
            if len(new) < replicas:
                for _ in range(replicas - len(new)):
                    await self._create_pod(deployment, template_hash)
            elif len(new) > replicas:
                for body in self._ranked_for_deletion(new)[:len(new) - replicas]:
                    await self._delete_body(body)
            return

        if strategy.get('type') == 'Recreate':
            for body in old:
                await self._delete_body(body)
            return

        rolling = strategy.get('rollingUpdate') or {}
        surge = _resolve_int_or_percent(rolling.get('maxSurge', '25%'), replicas, round_up=True)
        unavailable = _resolve_int_or_percent(rolling.get('maxUnavailable', '25%'), replicas, round_up=False)
        if surge == 0 and unavailable == 0:
            unavailable = 1
        # Scale up the new pods within the surge.
        room = replicas + surge - len(active)
        for _ in range(max(0, min(replicas - len(new), room))):
            await self._create_pod(deployment, template_hash)
        # Scale down the old ones while enough pods stay available.
        min_available = max(0, replicas - unavailable)
        new_unready = sum(1 for b in new if not self._ready(b))
        can_remove = len(active) - min_available - new_unready
        if len(new) > replicas:
            for body in self._ranked_for_deletion(new)[:len(new) - replicas]:
                await self._delete_body(body)
        # Old pods that are not ready do not count towards availability: they go first, freely.
        ranked = self._ranked_for_deletion(old)
        for body in ranked:
            if not self._ready(body):
                await self._delete_body(body)
            elif can_remove > 0:
                await self._delete_body(body)
                can_remove -= 1

    def _ready(self, body: Body) -> bool:
        pod = self._pods.get(_key(body))
        if pod is not None and pod.uid == body['metadata'].get('uid'):
            return pod.pod_ready
        return is_pod_ready(body)

    def _ranked_for_deletion(self, bodies: list[Body]) -> list[Body]:
        """The ReplicaSet controller's order (controller.ActivePodsWithRanks): delete the first first."""
        now = time.monotonic()

        def rank(body: Body) -> tuple:
            pod = self._pods.get(_key(body))
            meta = body['metadata']
            try:
                cost = int((meta.get('annotations') or {}).get(DELETION_COST_ANNOTATION, 0))
            except ValueError:
                cost = 0
            ready = self._ready(body)
            assigned = bool(pod.node if pod else (body.get('spec') or {}).get('nodeName'))
            running = bool(pod and pod.alive) or (body.get('status') or {}).get('phase') == 'Running'
            ready_for = (now - pod.ready_since) if (pod and ready and pod.ready_since is not None) else 0.0
            restarts = pod.restart_count if pod else 0
            newest = -(pod.seq if pod else -1)
            return (assigned, running, ready, cost, ready_for, -restarts, newest)
        return sorted(bodies, key=rank)

    async def _delete_body(self, body: Body) -> None:
        pod = self._pods.get(_key(body))
        if pod is not None and pod.uid == body['metadata'].get('uid'):
            await self._delete_pod(pod)
        else:
            await self._api_quiet(self._core.delete_namespaced_pod, body['metadata']['name'],
                                  body['metadata']['namespace'],
                                  body={'preconditions': {'uid': body['metadata']['uid']}})

    async def _create_pod(self, deployment: Body, template_hash: str) -> None:
        from kubernetes.client.rest import ApiException
        meta, template = deployment['metadata'], (deployment.get('spec') or {}).get('template') or {}
        template_meta = template.get('metadata') or {}
        spec = json.loads(json.dumps(template.get('spec') or {}))
        spec.setdefault('restartPolicy', 'Always')
        spec.setdefault('terminationGracePeriodSeconds', 30)
        spec.setdefault('dnsPolicy', 'ClusterFirst')
        spec.setdefault('schedulerName', 'default-scheduler')
        spec.setdefault('serviceAccountName', 'default')
        node, message = self._schedule(spec)
        if node is not None:
            spec['nodeName'] = node
        port = self._allocate_port()
        self._reserved_ports.add(port)
        set_engine_port(spec, port)
        body = {
            'apiVersion': 'v1', 'kind': 'Pod',
            'metadata': {
                'namespace': meta['namespace'],
                'labels': {**(template_meta.get('labels') or {}), TEMPLATE_HASH_LABEL: template_hash},
                'annotations': {**(template_meta.get('annotations') or {}), PORT_ANNOTATION: str(port)},
                'ownerReferences': [{'apiVersion': 'apps/v1', 'kind': 'Deployment', 'name': meta['name'],
                                     'uid': meta['uid'], 'controller': True, 'blockOwnerDeletion': True}],
                'finalizers': [FINALIZER],
            },
            'spec': spec,
        }
        created = None
        for _ in range(5):
            body['metadata']['name'] = f"{meta['name']}-{''.join(random.choices(NAME_ALPHABET, k=5))}"
            try:
                created = await self._api(self._core.create_namespaced_pod, meta['namespace'], body)
                break
            except ApiException as e:
                if e.status != 409:
                    self._reserved_ports.discard(port)
                    raise
        if created is None:
            self._reserved_ports.discard(port)
            return
        cmeta = created['metadata']
        pod = _Pod(namespace=cmeta['namespace'], name=cmeta['name'], uid=cmeta['uid'], deployment=meta['name'],
                   owner_uid=meta['uid'], port=port, seq=next(self._seq), grace=self._grace(spec),
                   container=self._container(spec), spec=spec, template_hash=template_hash,
                   node=node, unschedulable=message, gates_passed=readiness_gates_passed(created),
                   scheduled_at=now_rfc3339() if node else None)
        self._pods[pod.key] = pod
        logger.info('created %s/%s on %s', pod.namespace, pod.name, node or '(unschedulable)')
        if node is not None:
            self._run_container(pod)
        await self._write_pod_status(pod)

    async def _write_deployment_status(self, deployment: Body) -> None:
        meta, spec = deployment['metadata'], deployment.get('spec') or {}
        key = (meta['namespace'], meta['name'])
        replicas = int(spec.get('replicas', 1))
        template_hash = pod_template_hash(spec.get('template') or {})
        mine = [p for p in self._pods.values() if p.owner_uid == meta['uid'] and not p.terminating]
        updated = sum(1 for p in mine if p.template_hash == template_hash)
        ready = sum(1 for p in mine if p.pod_ready)
        available = ready
        is_available = available >= replicas - _resolve_int_or_percent(
            ((spec.get('strategy') or {}).get('rollingUpdate') or {}).get('maxUnavailable', '25%'),
            replicas, round_up=False)
        complete = updated == replicas and len(mine) == replicas and available == replicas
        status = {
            'observedGeneration': meta.get('generation'),
            'replicas': len(mine) or None,
            'updatedReplicas': updated or None,
            'readyReplicas': ready or None,
            'availableReplicas': available or None,
            'unavailableReplicas': max(0, replicas - available) or None,
            'conditions': [
                self._deployment_condition(key, 'Available', is_available,
                                           'MinimumReplicasAvailable' if is_available else 'MinimumReplicasUnavailable',
                                           'Deployment has minimum availability.' if is_available
                                           else 'Deployment does not have minimum availability.'),
                self._deployment_condition(key, 'Progressing', True,
                                           'NewReplicaSetAvailable' if complete else 'ReplicaSetUpdated',
                                           f'Deployment "{meta["name"]}" '
                                           + ('has successfully progressed.' if complete else 'is progressing.')),
            ],
        }
        if self._deploy_status.get(key) == status and (deployment.get('status') or {}).get('observedGeneration') \
                == meta.get('generation'):
            return
        if await self._api_quiet(self._apps.patch_namespaced_deployment_status, meta['name'], meta['namespace'],
                                 {'status': status}, _content_type=MERGE_PATCH) is not None:
            self._deploy_status[key] = status

    def _deployment_condition(self, key: tuple[str, str], type_: str, status: bool, reason: str,
                              message: str) -> Body:
        marker = (key[0], key[1], type_)
        previous = self._deploy_transitions.get(marker)
        text = 'True' if status else 'False'
        now = now_rfc3339()
        if previous is None or previous[0] != text:
            previous = self._deploy_transitions[marker] = (text, now)
        return {'type': type_, 'status': text, 'reason': reason, 'message': message,
                'lastTransitionTime': previous[1], 'lastUpdateTime': previous[1]}

    # ------------------------------------------------------------------------------- targets

    def _publish(self) -> None:
        groups = [{'targets': [f'{POD_IP}:{p.port}'], 'labels': {'namespace': p.namespace, 'pod': p.name}}
                  for p in sorted(self._pods.values(), key=lambda p: p.key) if p.alive]
        if groups == self._published:
            return
        self._published = groups
        if self.publish_targets is not None:
            try:
                self.publish_targets(groups)
            except Exception:
                logger.exception('publishing the scrape targets failed')

    def _refresh_snapshot(self) -> None:
        self._snapshot = [
            PodInfo(namespace=p.namespace, name=p.name, deployment=p.deployment, port=p.port,
                    pid=p.proc.pid if p.proc is not None and p.alive else None,
                    phase=self._pod_status(p)['phase'] if not p.terminating else 'Terminating',
                    ready=p.pod_ready, node=p.node, terminating=p.terminating,
                    restart_count=p.restart_count)
            for p in sorted(self._pods.values(), key=lambda p: p.seq)
        ]


def _key(body: Mapping[str, Any]) -> tuple[str, str]:
    return body['metadata']['namespace'], body['metadata']['name']


def pod_template_hash(template: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()
    return ''.join(NAME_ALPHABET[int(digest[i:i + 2], 16) % len(NAME_ALPHABET)] for i in range(0, 20, 2))


def _resolve_int_or_percent(value: Any, total: int, *, round_up: bool) -> int:
    if isinstance(value, str) and value.endswith('%'):
        fraction = float(value[:-1]) / 100 * total
        return math.ceil(fraction) if round_up else math.floor(fraction)
    return int(value)


def _prestop_seconds(container: Mapping[str, Any]) -> float:
    command = (((container.get('lifecycle') or {}).get('preStop') or {}).get('exec') or {}).get('command') or []
    if len(command) == 2 and command[0] == 'sleep':
        with contextlib.suppress(ValueError):
            return float(command[1])
    return 0.0


def _in_running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((POD_IP, 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    if port <= 0:
        return False
    with socket.socket() as s:
        try:
            s.bind((POD_IP, port))
        except OSError:
            return False
    return True


# --------------------------------------------------------------------------------------------------
# Standalone.
# --------------------------------------------------------------------------------------------------

def _parse_override(text: str) -> tuple[str, float | int]:
    name, _, value = text.partition('=')
    if not value:
        raise argparse.ArgumentTypeError(f'expected KNOB=VALUE, got {text!r}')
    number = float(value)
    return name.replace('-', '_'), int(number) if number.is_integer() and '.' not in value else number


async def _serve_control(runner: PodRunner, port: int) -> Any:
    """The runner's node API over HTTP (`taint_node`, `untaint_node`), for a runner in its own process."""
    from aiohttp import web

    async def taint(request: web.Request) -> web.Response:
        runner.taint_node(request.match_info['name'], await request.json())
        return web.json_response(runner.nodes[request.match_info['name']].taints)

    async def untaint(request: web.Request) -> web.Response:
        runner.untaint_node(request.match_info['name'], request.query['key'])
        return web.json_response(runner.nodes[request.match_info['name']].taints)

    app = web.Application()
    app.router.add_post('/nodes/{name}/taints', taint)
    app.router.add_delete('/nodes/{name}/taints', untaint)
    app_runner = web.AppRunner(app)
    await app_runner.setup()
    port = port or _free_port()
    await web.TCPSite(app_runner, '127.0.0.1', port).start()
    print(f'pod runner control at http://127.0.0.1:{port}', flush=True)
    return app_runner


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog='python -m tests.testbed.podrunner',
                                     description="Run the pods of ebbtide's Deployments as engine-simulator "
                                                 'processes (an emulated cluster, like kwok with real pods).')
    parser.add_argument('--kubeconfig', type=pathlib.Path, help='default: the default kubeconfig')
    parser.add_argument('--targets-file', type=pathlib.Path,
                        help='write Prometheus file_sd targets here (atomically) whenever they change')
    parser.add_argument('--preset', default='tiny')
    parser.add_argument('--startup-delay', type=float, default=2.0, metavar='SECONDS')
    parser.add_argument('--override', action='append', default=[], type=_parse_override, metavar='KNOB=VALUE',
                        help='capacity override of every engine, e.g. max_num_seqs=8 (repeatable)')
    parser.add_argument('--max-grace-seconds', type=float, default=None)
    parser.add_argument('--honor-prestop', action='store_true')
    parser.add_argument('--interval', type=float, default=0.25)
    parser.add_argument('--namespace', default=None)
    parser.add_argument('--no-nodes', action='store_true', help='create no Node objects, schedule anywhere')
    parser.add_argument('--log-dir', type=pathlib.Path, default=None, help='one engine log per pod')
    parser.add_argument('--control-port', type=int, default=None, metavar='PORT',
                        help='serve POST /nodes/NAME/taints (a taint as JSON) and DELETE '
                             '/nodes/NAME/taints?key=KEY on 127.0.0.1:PORT (0: any free port), for tests '
                             'that run the runner as a process')
    parser.add_argument('--verbose', action='store_true')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format='%(asctime)s %(levelname)s %(name)s: %(message)s')

    def publish(groups: TargetGroups) -> None:
        if args.targets_file is not None:
            write_targets_file(args.targets_file, groups)

    if args.targets_file is not None:
        write_targets_file(args.targets_file, [])
    runner = PodRunner(kubeconfig=args.kubeconfig, publish_targets=publish, preset=args.preset,
                       startup_delay=args.startup_delay, capacity_overrides=dict(args.override),
                       max_grace_seconds=args.max_grace_seconds, honor_prestop=args.honor_prestop,
                       interval=args.interval, nodes=[] if args.no_nodes else None, log_dir=args.log_dir,
                       namespace=args.namespace)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        task = loop.create_task(runner.run(stop))
        while runner._ticks == 0 and not task.done():
            await asyncio.sleep(0.05)
        control = await _serve_control(runner, args.control_port) if args.control_port is not None else None
        print('pod runner ready', flush=True)
        try:
            await task
        finally:
            if control is not None:
                await control.cleanup()

    asyncio.run(run())


if __name__ == '__main__':
    main()
