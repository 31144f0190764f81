"""The local backend (default): a real Kubernetes control plane on this machine, Ebbtide installed
with its Helm chart, every component in its own process.

* etcd, kube-apiserver, kube-controller-manager and kube-scheduler (tests/testbed/controlplane.py,
  built from their Go modules): token auth over TLS, RBAC, the real Deployment, ReplicaSet,
  EndpointSlice, garbage-collector and node-lifecycle controllers, the real scheduler;
* our kubelet (``python -m tests.testbed.kubelet``) for two fake Nodes, labelled as Karpenter
  labels an on-demand and a spot node: one engine-simulator process per pod bound to them, on
  the pod's own address in a network namespace of its own (10.244.x.y, or the next free /16);
* a real Prometheus (``python -m tests.testbed.prometheus --kubeconfig``) finding the engines
  through the API server with the scrape job the docs give users (docs/prometheus-scrape.yaml);
  built from its Go module by tools/prometheus/build.sh, as Debian's has no Kubernetes discovery;
* the chart, installed by the real helm (`install_args`, `install_values`): CRDs, ServiceAccount, ClusterRole and
  binding, the operator's Deployment at 0 replicas (our kubelet would run its pod as an engine);
* the operator as a process, with the command, arguments and environment of that Deployment's pod
  template and the chart's ServiceAccount's credentials (a token from the TokenRequest API), so
  every call it makes passes the chart's RBAC or shows up as a 403 (checked at stop);
* a load balancer per Service (in-process, tests/testbed/loadbalancer.py), as kube-proxy.

A spot reclaim is a taint on the Node written through the API, as Karpenter writes it. Logs of
every process go to ``artifacts/e2e-local/`` (the control plane's under controlplane/logs/,
the engines' under pods/).
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import re
import shutil
import signal
import sys
import time
import urllib.request
from pathlib import Path

import yaml
from kubernetes.client.rest import ApiException
from kubernetes.dynamic.exceptions import ConflictError
from tests.testbed import podnetwork
from tests.testbed.activator import ActivatorProcess
from tests.testbed.controlplane import ControlPlane
from tests.testbed.fixtures import Cluster
from tests.testbed.helm import CHART, HELM, MISSING_HELM, Release, helm, service_account_kubeconfig
from tests.testbed.loadbalancer import LoadBalancer
from tests.testbed.prometheus import kubernetes_sd_binary
from tests.testbed.waiting import wait_for

from e2e.backend import ROOT, SPOT_NODE_SELECTOR, Backend, engine_port
from e2e.processes import ManagedProcess, group_members
from ebbtide.control.config import OperatorConfig
from ebbtide.sim.engine_server import free_port

RELEASE = Release("ebbtide", "ebbtide-system")
TICK_SECONDS = 0.5
# Not the default (120): the operator's startup line must show the chart's value, not its own.
# Short: an engine that stops answering /sleep or /wake_up is given up on within seconds.
ENGINE_TIMEOUT_SECONDS = 5.0
CRDS = ("inferenceservices.ebbtide.dev",)
SPOT_LABEL = SPOT_NODE_SELECTOR.split("=")[0]
TOKEN_SECONDS = 6 * 3600  # longer than any session: the operator never sees its token expire
# What a refused API call looks like in the operator's log: the operator's own line for a 403,
# the official client's ApiException ("(403)"), kopf's APIForbiddenError ("'code': 403").
FORBIDDEN = re.compile(r"forbidden|permission denied|\(403\)|'code': 403", re.IGNORECASE)
# A restarted kube-apiserver answers before its RBAC caches are filled: for a moment it refuses
# every call ("clusterrole ... not found"). 403s that soon after a restart are not the chart's.
RBAC_WARMUP_SECONDS = 10.0
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def install_args(values_file: Path) -> list[str]:
    """helm's arguments for the chart's install, as README.md's, with this machine's values in a file.

    A file rather than ``--set``: helm's ``--set`` reads 0.5 as a string, which the chart's values
    schema rightly refuses for ``operator.tickSeconds``.
    """
    return ["upgrade", "--install", RELEASE.name, str(CHART), "--namespace", RELEASE.namespace,
            "--create-namespace", "--wait", "--timeout", "5m", "--values", str(values_file)]


def install_values(prometheus_url: str) -> dict:
    """`replicaCount: 0`: the operator runs as a process here (`LocalBackend._start_operator`), since
    our kubelet runs every pod it is given as an engine; its ports are free ones, as the process
    shares the machine's network with everything else."""
    return {"replicaCount": 0, "prometheus": {"url": prometheus_url},
            "operator": {"tickSeconds": TICK_SECONDS, "engineTimeoutSeconds": ENGINE_TIMEOUT_SECONDS,
                         "metricsPort": free_port(), "healthPort": free_port()}}


def ebbtide_command() -> str:
    """The `ebbtide` console script of this interpreter's environment (as in the operator image)."""
    beside = Path(sys.executable).with_name("ebbtide")
    found = str(beside) if beside.exists() else shutil.which("ebbtide")
    if found is None:
        raise RuntimeError("no `ebbtide` command: pip install -e '.[test]'")
    return found


def missing_requirement() -> str | None:
    """Why this backend cannot run here, or None."""
    if not HELM.is_file():
        return f"the local e2e backend installs the chart with helm: {MISSING_HELM}"
    if shutil.which("go") is None and not (os.environ.get("EBBTIDE_CONTROLPLANE_BIN")
                                           and os.environ.get("PROMETHEUS_BIN")):
        return ("the local e2e backend builds the control plane and Prometheus (with Kubernetes discovery) "
                "from their Go modules: Go is not installed")
    return podnetwork.missing_requirement()


class LocalBackend(Backend):
    name = "local"

    def __init__(self, artifacts: Path) -> None:
        super().__init__(artifacts)
        self.logs = artifacts / "e2e-local"
        self.plane: ControlPlane | None = None
        self.cluster: Cluster | None = None  # the admin's view of the plane (tests/testbed/fixtures.py)
        self.processes: list[ManagedProcess] = []
        self.operator: ManagedProcess | None = None
        self.operators: list[ManagedProcess] = []  # every operator process, restarts included
        self.operator_settings: dict = {}
        self.kubelet: ManagedProcess | None = None
        self.prometheus: ManagedProcess | None = None
        self.targets_file: Path | None = None  # Prometheus's file_sd targets: the scraped gateways
        self.balancers: dict[tuple[str, str], LoadBalancer] = {}
        self.activators: dict[tuple[str, str], ActivatorProcess] = {}
        self.restarts: list[tuple[float, float]] = []  # wall-clock spans of control-plane restarts
        self.kubeconfig = self.logs / "controlplane" / "kubeconfig"  # the admin's: the scenarios are the user
        self.operator_kubeconfig = self.logs / "operator.kubeconfig"
        self.prometheus_url = ""

    def _spawn(self, name: str, argv: list[str], **env: str) -> ManagedProcess:
        process = ManagedProcess(name, argv, self.logs / f"{name}.log", env=env, cwd=ROOT)
        self.processes.append(process)
        return process

    # ------------------------------------------------------------------------------ start

    def start(self) -> None:
        if self.logs.exists():
            shutil.rmtree(self.logs)
        (self.logs / "pods").mkdir(parents=True)
        prometheus_binary = kubernetes_sd_binary()  # built once (minutes), cached: before any timeout runs
        self.plane = ControlPlane(self.logs / "controlplane").start()
        self.kubeconfig = self.plane.kubeconfig
        python = sys.executable
        kubelet = self._spawn("kubelet", [python, "-m", "tests.testbed.kubelet", "--kubeconfig", str(self.kubeconfig),
                                          # A real kubelet runs the chart's preStop hook (sleep 5) before
                                          # SIGTERM: while the pod leaves the endpoints, it still serves.
                                          "--startup-delay", "1", "--max-grace-seconds", "5", "--honor-prestop",
                                          "--log-dir", str(self.logs / "pods")])
        prometheus = self._spawn("prometheus", [python, "-m", "tests.testbed.prometheus", "--kubeconfig",
                                                str(self.kubeconfig), "--scrape-interval", "1"],
                                 PROMETHEUS_BIN=prometheus_binary)
        self.kubelet, self.prometheus = kubelet, prometheus
        kubelet.wait_for_line(r"kubelet ready", timeout=120)
        ready = prometheus.wait_for_line(r"prometheus ready at (\S+) \(targets file (\S+)\)", timeout=60)
        self.prometheus_url, self.targets_file = ready.group(1), Path(ready.group(2))

        values = install_values(self.prometheus_url)
        (self.logs / "values.yaml").write_text(yaml.safe_dump(values))
        self.cluster = Cluster(self.plane)
        installed = helm(*install_args(self.logs / "values.yaml"), kubeconfig=self.kubeconfig)
        (self.logs / "helm.log").write_text(f"$ helm {' '.join(install_args(self.logs / 'values.yaml'))}\n"
                                            f"{installed.stdout}{installed.stderr}")
        self._check_installed()
        self.operator_settings = values["operator"]
        self._start_operator(values["operator"])

    def _check_installed(self) -> None:
        """The chart's CRDs are Established and its ClusterRole is in force for its ServiceAccount:
        the API server's RBAC allows every verb of every rule (SubjectAccessReviews)."""
        server = self.cluster.server
        for name in CRDS:
            server.wait_established(name, timeout=60)
        # Established is not yet served: for a moment the new resource's storage answers 429
        # ("storage is (re)initializing"), which kopf would log as an error before retrying.
        wait_for(lambda: self._lists("ebbtide.dev/v1alpha1/inferenceservices"), timeout=60, interval=0.2,
                 what="InferenceServices served")
        role = server.get_object("rbac.authorization.k8s.io/v1/clusterroles", None, RELEASE.fullname)
        assert role, f"no ClusterRole {RELEASE.fullname}: the chart's RBAC was not applied"
        user = f"system:serviceaccount:{RELEASE.namespace}:{RELEASE.fullname}"
        denied = []
        for rule in role["rules"]:
            for group, resource, verb in itertools.product(rule["apiGroups"], rule["resources"], rule["verbs"]):
                plural, _, sub = resource.partition("/")
                review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": {
                    "user": user, "resourceAttributes": {"group": group, "resource": plural, "subresource": sub,
                                                         "verb": verb}}}
                if not server.request("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews",
                                      review)["status"]["allowed"]:
                    denied.append(f"{verb} {group}/{resource}")
        assert not denied, f"{user} is refused what its ClusterRole grants (no binding?): {denied}"

    def _lists(self, resource: str) -> bool:
        try:
            self.cluster.server.list_objects(resource)
            return True
        except ApiException:
            return False

    def _start_operator(self, settings: dict) -> None:
        """Run the chart's operator container as a process, with its ServiceAccount's token."""
        # In a pod the client finds its credentials in the mounted token; here, in KUBECONFIG.
        service_account_kubeconfig(self.cluster, RELEASE, self.operator_kubeconfig, seconds=TOKEN_SECONDS)
        deployment = self.cluster.server.get_object("apps/v1/deployments", RELEASE.namespace, RELEASE.fullname)
        pod = deployment["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == RELEASE.fullname, pod["serviceAccountName"]
        (container,) = pod["containers"]
        command = container["command"] + container.get("args", [])
        assert command[0] == "ebbtide", command
        env = {e["name"]: e["value"] for e in container.get("env") or [] if "value" in e}
        # A restarted operator gets a log of its own: the first one's stays for the 403 check.
        name = "operator" + (f"-{len(self.operators) + 1}" if self.operators else "")
        self.operator = self._spawn(name, [ebbtide_command(), *command[1:]],
                                    KUBECONFIG=str(self.operator_kubeconfig), **env)
        self.operators.append(self.operator)
        wait_for(lambda: self._healthy(settings["healthPort"]), timeout=120, interval=0.3,
                 what="the operator's /healthz")
        # What the chart set reaches the operator through its command line and environment.
        expected = OperatorConfig(prometheus_url=self.prometheus_url, metrics_port=settings["metricsPort"],
                                  tick_seconds=settings["tickSeconds"],
                                  engine_timeout_seconds=settings["engineTimeoutSeconds"])
        started = self.operator.wait_for_line(r"ebbtide operator started with (.*)").group(1)
        assert started == repr(expected), f"the operator runs with {started}, the chart says {expected!r}"

    def _healthy(self, port: int) -> bool:
        if not self.operator.alive():
            raise RuntimeError(f"the operator exited:\n{self.operator.tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    # ------------------------------------------------------------------------------ the backend API

    def service_url(self, name: str, namespace: str = "default") -> str:
        key = (namespace, name)
        if key not in self.balancers:
            self.balancers[key] = LoadBalancer(name, namespace, kubeconfig=self.kubeconfig).start()
        return self.balancers[key].url

    def activator_url(self, name: str, namespace: str = "default") -> str:
        key = (namespace, name)
        if key not in self.activators:
            self.activators[key] = ActivatorProcess(self.kubeconfig, self.logs / f"activator-{namespace}-{name}.log",
                                                    name, namespace)
            self._write_targets()
        return self.activators[key].url

    def close_service_url(self, name: str, namespace: str = "default") -> None:
        key = (namespace, name)
        if balancer := self.balancers.pop(key, None):
            balancer.stop()
        if activator := self.activators.pop(key, None):
            activator.stop()
            self._write_targets()

    def _write_targets(self) -> None:
        """The activators' metrics as Prometheus's file_sd targets (written whole, then renamed)."""
        groups = [{"targets": [self.activators[key].metrics_url.removeprefix("http://")],
                   "labels": {"job": "activator"}} for key in sorted(self.activators)]
        tmp = self.targets_file.with_name(f".{self.targets_file.name}.tmp")
        tmp.write_text(json.dumps(groups))
        os.replace(tmp, self.targets_file)

    # ------------------------------------------------------------------------------ faults

    def kill_operator(self) -> None:
        self.operator.popen.kill()
        self.operator.popen.wait(10)

    def start_operator(self) -> None:
        self._start_operator(self.operator_settings)

    def restart_component(self, component: str) -> None:
        started = time.time()
        self.plane.restart(component)
        self.restarts.append((started, time.time() + RBAC_WARMUP_SECONDS))

    def pause_prometheus(self, paused: bool) -> None:
        """SIGSTOP (SIGCONT) Prometheus and its wrapper: its port stays open, nothing answers."""
        os.killpg(self.prometheus.pid, signal.SIGSTOP if paused else signal.SIGCONT)

    def partition_node(self, node: str, partitioned: bool) -> None:
        """The kubelet stops (resumes) renewing the spot pool's Leases (tests/testbed/kubelet_cli.py:
        SIGUSR1, SIGUSR2); the node-lifecycle controller then marks the node NotReady. Its engines run on."""
        assert (self.get("v1", "Node", node, "") or {}).get("metadata", {}).get("labels", {}).get(
            SPOT_LABEL) == "spot", f"only the spot node can be partitioned here, not {node}"
        os.kill(self.kubelet.pid, signal.SIGUSR1 if partitioned else signal.SIGUSR2)

    def pause_engine(self, pod: dict, paused: bool) -> None:
        """SIGSTOP (SIGCONT) one pod's engine, found among the kubelet's children by its address."""
        address = ["--host", pod["status"]["podIP"], "--port", str(engine_port(pod))]
        pids = [pid for pid in group_members(self.kubelet.pid) if contains(cmdline(pid), address)]
        assert pids, f"no engine process for {pod['metadata']['name']} at {address}"
        for pid in pids:
            os.kill(pid, signal.SIGSTOP if paused else signal.SIGCONT)

    def set_taint(self, node: str, taint: dict, present: bool) -> None:
        """Write the Node's spec.taints, as Karpenter does; the resourceVersion turns a concurrent
        write (the node-lifecycle controller's not-ready taints) into a conflict to retry."""
        for _ in range(10):
            live = self.get("v1", "Node", node, "")
            same = (taint["key"], taint["effect"])
            taints = [t for t in live["spec"].get("taints") or [] if (t["key"], t["effect"]) != same]
            taints += [taint] if present else []
            patch = {"metadata": {"resourceVersion": live["metadata"]["resourceVersion"]},
                     "spec": {"taints": taints or None}}
            try:
                self.patch("v1", "Node", node, patch, "")
                return
            except ConflictError:
                continue
        raise RuntimeError(f"Node {node} kept changing: taint {taint} not {'added' if present else 'removed'}")

    # ------------------------------------------------------------------------------ stop

    def forbidden_lines(self) -> list[str]:
        """The lines of the operators' logs where the API server refused them (403)."""
        found = []
        for operator in self.operators:
            if not operator.log_path.exists():
                continue
            when = 0.0  # a line without a time (a traceback's) is as old as the last line with one
            for line in operator.output().splitlines():
                if stamp := LOG_TIME.match(line):
                    when = datetime.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                if FORBIDDEN.search(line) and not any(start <= when <= end for start, end in self.restarts):
                    found.append(line)
        return found

    def stop(self) -> None:
        for balancer in self.balancers.values():
            balancer.stop()
        self.balancers.clear()
        for activator in self.activators.values():
            activator.stop()
        self.activators.clear()
        leftovers = {}
        # The operator first (it would recreate what goes away), the control plane last.
        for process in reversed(self.processes):
            if stray := process.stop():
                leftovers[process.name] = stray
        self.processes.clear()
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None
        if self.plane is not None:
            self.plane.stop()
            self.plane = None
        problems = []
        if leftovers:
            problems.append(f"processes left behind (killed now): {leftovers}")
        if forbidden := self.forbidden_lines():
            problems.append("the API server refused the operator (HTTP 403: the chart's ClusterRole misses a "
                            "verb it uses):\n" + "\n".join(forbidden[:40]))
        if problems:
            raise AssertionError("\n".join(problems))


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def contains(argv: list[str], part: list[str]) -> bool:
    return any(argv[i:i + len(part)] == part for i in range(len(argv)))
