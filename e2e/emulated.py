"""The emulated cluster: every component in its own process, wired by one kubeconfig.

* the emulated Kubernetes API (``python -m tests.testbed.apiserver``) with the generated CRD;
* a real Prometheus (``python -m tests.testbed.prometheus``) scraping the file_sd targets the
  pod runner writes;
* the pod runner (``python -m tests.testbed.podrunner``): engine-simulator processes for the
  pods of each Deployment, like kwok with real pods, on two fake Nodes labelled as Karpenter
  labels an on-demand and a spot node; its control port taints them (a spot reclaim);
* the operator exactly as the chart runs it: ``ebbtide run --prometheus-url ... --metrics-port
  ... --health-port ...`` with ``KUBECONFIG`` and ``EBBTIDE_TICK_SECONDS`` in its environment;
* a load balancer per Service (in-process, from tests/testbed/loadbalancer.py).

Logs of every process go to ``artifacts/e2e-emulated/`` (one file each, engines under pods/).
"""

from __future__ import annotations

import json
import shutil
import sys
import urllib.parse
import urllib.request
from pathlib import Path

from tests.testbed.loadbalancer import LoadBalancer
from tests.testbed.waiting import wait_for

from e2e.backend import ROOT, Backend, engine_port
from e2e.processes import ManagedProcess
from ebbtide.sim.engine_server import free_port

CRD = ROOT / "crds" / "inferenceservices.ebbtide.dev.yaml"
TICK_SECONDS = "0.5"


def ebbtide_command() -> str:
    """The `ebbtide` console script of this interpreter's environment (as in the operator image)."""
    beside = Path(sys.executable).with_name("ebbtide")
    found = str(beside) if beside.exists() else shutil.which("ebbtide")
    if found is None:
        raise RuntimeError("no `ebbtide` command: pip install -e '.[test]'")
    return found


def missing_requirement() -> str | None:
    """Why this backend cannot run here, or None."""
    if shutil.which("prometheus") is None:
        return "the emulated e2e backend needs the prometheus binary (Debian package 'prometheus'; make system-deps)"
    return None


class EmulatedBackend(Backend):
    name = "emulated"

    def __init__(self, artifacts: Path) -> None:
        super().__init__(artifacts)
        self.logs = artifacts / "e2e-emulated"
        self.processes: list[ManagedProcess] = []
        self.balancers: dict[tuple[str, str], LoadBalancer] = {}
        self.kubeconfig = self.logs / "kubeconfig"
        self.prometheus_url = ""
        self.runner_control = ""  # the pod runner's node API (taints)
        self.metrics_port = self.health_port = 0

    def _spawn(self, name: str, argv: list[str], **env: str) -> ManagedProcess:
        process = ManagedProcess(name, argv, self.logs / f"{name}.log", env=env, cwd=ROOT)
        self.processes.append(process)
        return process

    def start(self) -> None:
        if self.logs.exists():
            shutil.rmtree(self.logs)
        (self.logs / "pods").mkdir(parents=True)
        targets = self.logs / "targets.json"
        python = sys.executable

        api = self._spawn("apiserver", [python, "-m", "tests.testbed.apiserver", "--port", "0", "--crd", str(CRD),
                                        "--kubeconfig", str(self.kubeconfig)])
        api.wait_for_line(r"Serving the emulated Kubernetes API at (\S+)")

        prometheus = self._spawn("prometheus", [python, "-m", "tests.testbed.prometheus", "--targets-file",
                                                str(targets), "--scrape-interval", "1"])
        self.prometheus_url = prometheus.wait_for_line(r"prometheus ready at (\S+)", timeout=60).group(1)

        runner = self._spawn("podrunner", [python, "-m", "tests.testbed.podrunner", "--kubeconfig",
                                           str(self.kubeconfig), "--targets-file", str(targets), "--preset", "tiny",
                                           "--startup-delay", "1", "--max-grace-seconds", "5",
                                           "--control-port", "0", "--log-dir", str(self.logs / "pods")])
        runner.wait_for_line(r"pod runner ready")
        self.runner_control = runner.wait_for_line(r"pod runner control at (\S+)").group(1)

        self.metrics_port, self.health_port = free_port(), free_port()
        operator = self._spawn("operator", [ebbtide_command(), "run", "--prometheus-url", self.prometheus_url,
                                            "--metrics-port", str(self.metrics_port),
                                            "--health-port", str(self.health_port)],
                               KUBECONFIG=str(self.kubeconfig), EBBTIDE_TICK_SECONDS=TICK_SECONDS)
        wait_for(lambda: self._healthy(operator), timeout=60, interval=0.3, what="the operator's /healthz")

    def _healthy(self, operator: ManagedProcess) -> bool:
        if not operator.alive():
            raise RuntimeError(f"the operator exited:\n{operator.tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def service_url(self, name: str, namespace: str = "default") -> str:
        key = (namespace, name)
        if key not in self.balancers:
            self.balancers[key] = LoadBalancer(name, namespace, kubeconfig=self.kubeconfig).start()
        return self.balancers[key].url

    def set_taint(self, node: str, taint: dict, present: bool) -> None:
        # The pod runner owns its fake Nodes (it schedules by their taints and writes them to the API).
        url = f"{self.runner_control}/nodes/{node}/taints"
        if present:
            request = urllib.request.Request(url, data=json.dumps(taint).encode(), method="POST",
                                             headers={"Content-Type": "application/json"})
        else:
            request = urllib.request.Request(f"{url}?{urllib.parse.urlencode({'key': taint['key']})}",
                                             method="DELETE")
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()

    def engine_get(self, pod: dict, path: str) -> dict | None:
        # No API server proxy here, but every engine listens on this machine: podIP:containerPort.
        try:
            with urllib.request.urlopen(f"http://{pod['status']['podIP']}:{engine_port(pod)}{path}",
                                        timeout=5) as response:
                return json.loads(response.read())
        except (OSError, KeyError, ValueError):
            return None

    def stop(self) -> None:
        for balancer in self.balancers.values():
            balancer.stop()
        self.balancers.clear()
        leftovers = {}
        # The operator first (it would recreate what goes away), the API last (the others talk to it).
        for process in reversed(self.processes):
            if stray := process.stop():
                leftovers[process.name] = stray
        self.processes.clear()
        if leftovers:
            raise RuntimeError(f"processes left behind (killed now): {leftovers}")
