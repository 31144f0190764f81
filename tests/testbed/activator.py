"""`ebbtide activator` as users run it: the real command, a process of its own, with a kubeconfig
for the test bed's API server, on free loopback ports. Its log is kept for the test's report."""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from pathlib import Path

from e2e.processes import ManagedProcess
from prometheus_client.parser import text_string_to_metric_families

from tests.testbed.controlplane import free_port
from tests.testbed.replays import CLI_ENV
from tests.testbed.waiting import answers, wait_for


class ActivatorProcess:
    def __init__(self, kubeconfig: Path, log_path: Path, service: str, namespace: str = "default",
                 *options: str) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}"
        argv = [sys.executable, "-m", "ebbtide.cli", "activator", "--service", service, "-n", namespace,
                "--host", "127.0.0.1", "--port", str(self.port), "--metrics-port", str(self.metrics_port),
                "--drain-seconds", "0", *options]  # no Service endpoints to leave: stop at once
        self.process = ManagedProcess(f"activator-{service}", argv, log_path,
                                      env={**CLI_ENV, "KUBECONFIG": str(kubeconfig)})
        # Ready once it has read the Service's endpoints (none, at first, is an answer too).
        wait_for(lambda: self._ready(), timeout=60, what=f"the activator ready; log: {log_path}")

    def _ready(self) -> bool:
        if not self.process.alive():
            raise AssertionError(f"the activator exited:\n{self.process.tail()}")
        return answers(f"{self.metrics_url}/readyz", timeout=2)

    def metrics(self) -> dict[str, float]:
        """Its samples as {'name{label="value",...}': value}, labels sorted, service labels left out."""
        with urllib.request.urlopen(f"{self.metrics_url}/metrics", timeout=5) as response:
            text = response.read().decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = {k: v for k, v in sample.labels.items() if k not in ("service", "service_namespace")}
                inside = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
                out[f"{sample.name}{{{inside}}}" if inside else sample.name] = sample.value
        return out

    def stop(self) -> None:
        leftovers = self.process.stop()
        assert not leftovers, f"the activator left processes behind: {leftovers}"
