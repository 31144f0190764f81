"""Running the real Ebbtide operator (kopf, in a thread) against the test bed's control plane."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import yaml
from kopf.testing import KopfRunner

from ebbtide.api.crd import crd
from ebbtide.sim.engine_server import free_port

ROOT = Path(__file__).resolve().parents[2]
ISVC = "ebbtide.dev/v1alpha1/inferenceservices"


def isvc(name: str, namespace: str = "default", **spec) -> dict:
    return {"apiVersion": "ebbtide.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"model": {"name": "tiny-model"}, **spec}}


@contextlib.contextmanager
def running_operator(apiserver, **env: str) -> Iterator[KopfRunner]:
    """The operator as `ebbtide run` starts it (same handlers module), in a thread."""
    apiserver.register_crd(crd())
    # By default no Prometheus answers (port 1 refuses at once): tests that need one pass its URL.
    settings = {"EBBTIDE_METRICS_PORT": "0", "EBBTIDE_PROMETHEUS_URL": "http://127.0.0.1:1",
                "EBBTIDE_TICK_SECONDS": "0.5", **env}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    runner = KopfRunner(["run", "--standalone", "-A", "-m", "ebbtide.control.handlers"], timeout=60)
    try:
        with apiserver.as_default_kubeconfig(), runner:
            yield runner
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    if runner.exception is not None:
        raise runner.exception


class Operator:
    """One `ebbtide run` process; its log in a file."""

    def __init__(self, cluster, name: str, log_dir: Path, *args: str, prometheus_url: str = "http://127.0.0.1:1",
                 kubeconfig: Path | None = None):
        self.name, self.metrics_port = name, free_port()
        self.log = log_dir / f"{name}-{len(list(log_dir.glob(f'{name}-*.log')))}.log"  # one per incarnation
        argv = [sys.executable, "-m", "ebbtide.cli", "run", "--prometheus-url", prometheus_url,
                "--metrics-port", str(self.metrics_port), "--health-port", "0", *args]
        env = {**os.environ, **cluster.env, "POD_NAME": name, "EBBTIDE_TICK_SECONDS": "0.5"}
        if kubeconfig is not None:
            env["KUBECONFIG"] = str(kubeconfig)
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return response.read().decode()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(30)



def refusals(output: str) -> list[str]:
    """Lines of an operator's log where the API server refused something (kopf says "Not enough
    permissions" when it falls back for lack of one)."""
    return [line for line in output.splitlines()
            if re.search(r"forbidden|permission denied|not enough permissions|\(403\)|'code': 403", line, re.IGNORECASE)]


def example(name: str) -> dict:
    return next(d for d in yaml.safe_load_all((ROOT / "examples" / name).read_text()) if d)


# --- reading what the operator did, from the API server ---

DEPLOYMENTS = "apps/v1/deployments"


def replicas(server, name="chat"):
    deployment = server.get_object(DEPLOYMENTS, "default", name)
    return deployment["spec"]["replicas"] if deployment else None


def status(server, name="chat"):
    return (server.get_object(ISVC, "default", name) or {}).get("status", {})


def condition(server, type, name="chat"):
    return next((c for c in status(server, name).get("conditions", []) if c["type"] == type), None)


def seconds(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def events(server, name="chat"):
    found = server.list_objects("v1/events", "default", field_selector=f"involvedObject.name={name}")
    return sorted(found, key=lambda e: int(e["metadata"]["resourceVersion"]))
