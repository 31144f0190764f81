"""A real Prometheus for tests: the `prometheus` binary on a free loopback port.

Scrape targets come from a file_sd JSON file that `set_targets()` rewrites atomically, so a
test (or the end-to-end pod runner) adds and removes "pods" while Prometheus runs. The scrape
interval is short (1 s by default) so tests see data within a few seconds.

    with PrometheusServer() as prometheus:
        prometheus.set_targets([{"targets": ["127.0.0.1:8001"], "labels": {"namespace": "ns", "pod": "p-1"}}])
        prometheus.url  # http://127.0.0.1:PORT

`stop()` / `start()` restart it on the same port and storage (an outage that keeps the data);
`pause()` / `resume()` freeze it with SIGSTOP / SIGCONT (connections hang: the timeout path).

Standalone, for end-to-end runs (runs until SIGINT or SIGTERM; ``--kubeconfig`` adds the
kubernetes_sd job of docs/prometheus-scrape.yaml):

    python -m tests.testbed.prometheus --port 9090 --targets-file /tmp/targets.json [--kubeconfig K]
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from ebbtide.sim.engine_server import free_port
from tests.testbed.controlplane import stop_process
from tests.testbed.waiting import answers, wait_for

JOB = "vllm"
SCRAPE_CONFIG = Path(__file__).resolve().parents[2] / "docs" / "prometheus-scrape.yaml"

# Servers still running when the interpreter exits (a test run interrupted, a failing fixture)
# are stopped then, so that no prometheus process outlives its test run.
_running_servers: set[PrometheusServer] = set()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_running_servers):
        server.close()


def prometheus_binary() -> str | None:
    """The prometheus executable: $PROMETHEUS_BIN, then PATH, then Debian's /usr/bin/prometheus."""
    for candidate in (os.environ.get("PROMETHEUS_BIN"), shutil.which("prometheus"), "/usr/bin/prometheus"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


MISSING_BINARY = (
    "the prometheus binary is not installed (apt-get install -y prometheus, or set PROMETHEUS_BIN)"
)
BUILD_SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "prometheus" / "build.sh"


def kubernetes_sd_binary() -> str:
    """A Prometheus that has kubernetes_sd_configs: $PROMETHEUS_BIN, else tools/prometheus/build.sh's.

    Debian's package is built without Kubernetes discovery (a Debian patch removes it), so the
    discovering Prometheus is built from the Prometheus Go module, once (cached by version).
    """
    if override := os.environ.get("PROMETHEUS_BIN"):
        return override
    done = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise FileNotFoundError(f"building Prometheus with Kubernetes discovery failed ({BUILD_SCRIPT}):\n{tail}")
    return done.stdout.strip().splitlines()[-1]


class PrometheusServer:
    """One Prometheus process with its own config, storage and file_sd target file."""

    def __init__(
        self,
        port: int | None = None,
        scrape_interval: float = 1.0,
        targets_file: str | os.PathLike | None = None,
        storage_dir: str | os.PathLike | None = None,
        lookback_delta: str = "5m",
        binary: str | None = None,
        host: str = "127.0.0.1",
        kubeconfig: str | os.PathLike | None = None,
    ):
        # Discovering pods through the API server needs a Prometheus built with it (see kubernetes_sd_binary).
        self.binary = binary or (kubernetes_sd_binary() if kubeconfig else prometheus_binary())
        if self.binary is None:
            raise FileNotFoundError(MISSING_BINARY)
        self.host = host
        self.port = port or free_port(host)
        self.scrape_interval = scrape_interval
        # With a kubeconfig it also discovers the engines' pods through the API server, with the
        # scrape job the docs give users (docs/prometheus-scrape.yaml).
        self.kubeconfig = Path(kubeconfig) if kubeconfig else None
        self.lookback_delta = lookback_delta
        self._workdir = Path(tempfile.mkdtemp(prefix="ebbtide-prometheus-"))
        self.storage_dir = Path(storage_dir) if storage_dir else self._workdir / "data"
        self.targets_file = Path(targets_file) if targets_file else self._workdir / "targets.json"
        self.config_file = self._workdir / "prometheus.yml"
        self.log_file = self._workdir / "prometheus.log"
        self._process: subprocess.Popen | None = None
        self._paused = False
        if not self.targets_file.exists():
            self.set_targets([])
        self._write_config()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # --- targets ---

    def set_targets(self, groups: list[dict]) -> None:
        """Replaces the scrape targets (file_sd format).

        Prometheus re-reads the file within ~1 s but hands target changes to its scrapers at
        most every 5 s (a fixed throttle in Prometheus 2.x): expect new targets to be scraped
        5 to 6 s later (`wait_for_targets_up`), also right after `start()`. Write the targets
        before `start()` and start several servers before waiting, to pay this once.
        """
        self.targets_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.targets_file.with_name(f".{self.targets_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(groups, indent=1))
        os.replace(tmp, self.targets_file)  # atomic: Prometheus never reads half a file

    def _write_config(self) -> None:
        interval = _duration(self.scrape_interval)
        # JSON is YAML: no YAML writer needed.
        config = {
            "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "file_sd_configs": [{"files": [str(self.targets_file)], "refresh_interval": "1s"}],
                }
            ],
        }
        if self.kubeconfig is not None:
            for job in yaml.safe_load(SCRAPE_CONFIG.read_text()):
                for discovery in job["kubernetes_sd_configs"]:
                    discovery["kubeconfig_file"] = str(self.kubeconfig)
                config["scrape_configs"].append(job)
        self.config_file.write_text(json.dumps(config, indent=1))

    # --- process ---

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        if self._process is not None and self._process.poll() is None:
            return self
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        command = [
            self.binary,
            f"--config.file={self.config_file}",
            f"--storage.tsdb.path={self.storage_dir}",
            f"--web.listen-address={self.host}:{self.port}",
            f"--query.lookback-delta={self.lookback_delta}",
            "--storage.tsdb.retention.time=1d",
            "--web.enable-lifecycle",
            "--log.level=warn",
        ]
        log = open(self.log_file, "ab")  # noqa: SIM115 - the child keeps it open
        try:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        self._paused = False
        _running_servers.add(self)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        def ready() -> bool:
            if self._process is None or self._process.poll() is not None:
                raise RuntimeError(f"prometheus exited during startup:\n{self.log_tail()}")
            return answers(f"{self.url}/-/ready")
        try:
            wait_for(ready, timeout=timeout, interval=0.05, what="prometheus ready")
        except AssertionError:
            self.stop()
            raise TimeoutError(f"prometheus not ready after {timeout} s at {self.url}:\n{self.log_tail()}") from None

    def stop(self, crash: bool = False) -> None:
        """Stops the process; storage, port and target file stay for a later `start()`.

        A clean stop ends every scrape loop with staleness markers, so the series vanish from
        queries at once; `crash=True` (SIGKILL) writes none, so after a restart the last
        samples are still answered, with their old timestamps, until the lookback delta.
        """
        process, self._process = self._process, None
        _running_servers.discard(self)
        if process is None or process.poll() is not None:
            return
        if self._paused:
            process.send_signal(signal.SIGCONT)
            self._paused = False
        stop_process(process, grace=10, crash=crash)

    def pause(self) -> None:
        """SIGSTOP: the port stays open but nothing answers (clients hit their timeouts)."""
        if self._process is not None and not self._paused:
            self._process.send_signal(signal.SIGSTOP)
            self._paused = True
            _wait_for_state(self._process.pid, "T")  # signals are delivered asynchronously

    def resume(self) -> None:
        if self._process is not None and self._paused:
            self._process.send_signal(signal.SIGCONT)
            self._paused = False

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def close(self) -> None:
        """Stops it and deletes the temporary directory (storage too, unless given by the caller)."""
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- helpers for tests ---

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def query(self, promql: str, at: float | None = None) -> list[dict]:
        """A raw instant query (result list of the HTTP API), bypassing the code under test."""
        params = {"query": promql}
        if at is not None:
            params["time"] = repr(at)
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise RuntimeError(f"query {promql!r} failed: {body}")
        return body["data"]["result"]

    def http_requests(self, handler: str = "/api/v1/query") -> float:
        """Prometheus's own count of HTTP requests to `handler` (from its /metrics, all codes)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as response:
            text = response.read().decode()
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "prometheus_http_requests_total" and sample.labels.get("handler") == handler:
                    total += sample.value
        return total

    def active_targets(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets?state=active", timeout=5) as response:
            return json.load(response)["data"]["activeTargets"]

    def wait_for_targets_up(self, count: int, timeout: float = 20.0) -> None:
        """Until `count` targets have been scraped successfully at least once."""
        up = [0]

        def enough() -> bool:
            up[0] = sum(1 for t in self.active_targets() if t.get("health") == "up")
            return up[0] >= count
        try:
            wait_for(enough, timeout=timeout, interval=0.2, what=f"{count} targets up")
        except AssertionError:
            raise TimeoutError(f"only {up[0]} of {count} targets up after {timeout} s:\n{self.log_tail()}") from None


def _wait_for_state(pid: int, state: str, timeout: float = 2.0) -> None:
    """Until /proc says the process is in `state` ("T": stopped), for up to `timeout`; a no-op without /proc."""
    def there() -> bool:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                return stat.read().rsplit(")", 1)[1].split()[0] == state
        except (OSError, IndexError):
            return True
    with contextlib.suppress(AssertionError):
        wait_for(there, timeout=timeout, interval=0.01, what=f"{pid} in state {state}")


def _duration(seconds: float) -> str:
    """A Prometheus duration string: 1 -> '1s', 0.5 -> '500ms'."""
    millis = round(seconds * 1000)
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a test-bed Prometheus that scrapes file_sd targets (and, with --kubeconfig, the engines' pods).")
    parser.add_argument("--port", type=int, default=None, help="listen port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--targets-file", default=None, help="file_sd JSON file to watch (created if missing)")
    parser.add_argument("--storage", default=None, help="TSDB directory (default: a temporary one)")
    parser.add_argument("--scrape-interval", type=float, default=1.0, help="seconds (default 1)")
    parser.add_argument("--kubeconfig", default=None,
                        help="also discover the engines' pods through this API server (docs/prometheus-scrape.yaml)")
    args = parser.parse_args(argv)
    server = PrometheusServer(port=args.port, targets_file=args.targets_file, storage_dir=args.storage,
                              scrape_interval=args.scrape_interval, kubeconfig=args.kubeconfig)
    stop = False

    def on_signal(signum, frame) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    print(f"prometheus ready at {server.url} (targets file {server.targets_file})", flush=True)
    try:
        while not stop:
            if not server.running:
                print(f"prometheus exited:\n{server.log_tail()}", file=sys.stderr)
                return 1
            time.sleep(0.5)
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
