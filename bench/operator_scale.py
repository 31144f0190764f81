"""The operator at fleet scale, on the real control plane (issue #18).

    python bench/operator_scale.py --sizes 100,1000           # make bench-scale
    python bench/operator_scale.py --sizes 3 --window 20 --samples 1 --output /tmp/smoke.json

A real control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler), a
status-only kubelet (tests/testbed/statuswriter.py: pods Running and Ready, no processes), one
exporter for every pod's vLLM metrics (tests/testbed/fleetexporter.py: one target per namespace),
a real Prometheus scraping it, and the operator as its own process (`python -m ebbtide.cli run`)
at its default tick, reaching the API server through a counting proxy
(tests/testbed/countingproxy.py) so that its requests are told from everyone else's.

The fleet grows through the sizes on one control plane: at each size it settles, then for
`--window` seconds nothing changes and the benchmark counts, per operator tick, Prometheus
queries (Prometheus's own counter) and API requests by verb (the proxy); then it puts a backlog
on one service's pods at a time and times until that service's Deployment is scaled.
Results merge into bench/results/operator-scale.json (keys written by others are kept).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "operator"), str(ROOT / "bench")]

from bench.scale_probes import TickWatcher, cpu_seconds, load_average, percentile, rss_mib  # noqa: E402
from render import render  # noqa: E402
from tests.testbed.controlplane import ControlPlane, free_port, kubeconfig_text, stop_process  # noqa: E402
from tests.testbed.countingproxy import CountingProxy  # noqa: E402
from tests.testbed.fleetexporter import FleetExporter  # noqa: E402
from tests.testbed.kubeapi import KubeApi  # noqa: E402
from tests.testbed.prometheus import PrometheusServer  # noqa: E402
from tests.testbed.statuswriter import StatusWriter, status_nodes  # noqa: E402
from tests.testbed.waiting import wait_for  # noqa: E402

from ebbtide.api.crd import crd  # noqa: E402
from ebbtide.cluster.render import LABEL_SERVICE  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "operator-scale.json"
KEPT = ("failover_s", "failover", "before_fix", "under_load")  # written by tests/test_operator_ha.py and by hand
ISVC = "ebbtide.dev/v1alpha1/inferenceservices"
DEPLOYMENTS = "apps/v1/deployments"
SCRAPE_SECONDS = 5.0
BACKLOG = 40  # waiting requests per pod: far above the default target of the minimal spec
BACKLOG_BOUND_S = 120.0  # a backlog sample not scaled by then is recorded as null
FIRST_MINUTE_S = 75.0  # a service's first metrics window (60 s) and an interval: its status then settles


def isvc(name: str, namespace: str, replicas: int) -> dict:
    """The README's minimal spec (defaults everywhere), less the warm-up requests: no engine answers."""
    return {"apiVersion": "ebbtide.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"model": {"name": "Qwen/Qwen2.5-1.5B-Instruct"},
                     "replicas": {"min": replicas, "max": replicas + 5}, "warmup": {"requests": 0}}}


def service_names(count: int, namespaces: int) -> list[tuple[str, str]]:
    return [(f"scale-{i % namespaces:02d}", f"svc-{i:04d}") for i in range(count)]


class Bed:
    """Everything but the operator; the operator comes and goes with `operator()`."""

    def __init__(self, workdir: pathlib.Path, max_pods: int) -> None:
        self.workdir = workdir
        # A workdir used before holds its etcd: the fleet must grow from an empty cluster.
        shutil.rmtree(workdir / "cluster", ignore_errors=True)
        self.plane = ControlPlane(workdir / "cluster", crds=(crd(),)).start()
        import kubernetes.config
        self.client = kubernetes.config.new_client_from_config(config_file=str(self.plane.kubeconfig))
        self.api = KubeApi(self.client)
        self.exporter = FleetExporter().start()
        self.writer = StatusWriter(self.client, status_nodes(max_pods),
                                   on_running=lambda p: self.exporter.add_pod(p.namespace, p.name),
                                   on_gone=lambda p: self.exporter.remove_pod(p.namespace, p.name)).start()
        self.prometheus = PrometheusServer(scrape_interval=SCRAPE_SECONDS).start()
        self.proxy = CountingProxy(self.plane.url, str(self.plane.pki / "ca.crt")).start()
        self.proxy_kubeconfig = workdir / "operator.kubeconfig"
        self.proxy_kubeconfig.write_text(kubeconfig_text(self.proxy.url, self.plane.pki / "ca.crt",
                                                         self.plane.tokens["admin"], "kubernetes-admin"))
        self.namespaces: set[str] = set()

    def close(self) -> None:
        for stop in (self.proxy.stop, self.prometheus.close, self.writer.stop, self.exporter.stop,
                     self.client.close, self.plane.stop):
            with contextlib.suppress(Exception):
                stop()

    def grow(self, services: list[tuple[str, str]], replicas: int) -> None:
        for namespace in sorted({ns for ns, _ in services} - self.namespaces):
            self.api.create_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
            wait_for(lambda ns=namespace: self.api.get_object("v1/serviceaccounts", ns, "default"), timeout=60,
                     what=f"the default ServiceAccount of {namespace}")
            self.namespaces.add(namespace)
        for namespace, name in services:
            self.api.create_object(isvc(name, namespace, replicas))
        self.prometheus.set_targets(self.exporter.target_groups(sorted(self.namespaces)))

    def scraped_pods(self) -> int:
        found = self.prometheus.query("count(vllm:num_requests_waiting)")
        return int(float(found[0]["value"][1])) if found else 0

    @contextlib.contextmanager
    def operator(self, metrics_port: int, traced: pathlib.Path | None = None):
        """`ebbtide run`; with `traced`, under bench/traced_operator.py (SIGUSR1 writes there)."""
        log = open(self.workdir / "operator.log", "ab")  # noqa: SIM115 - the child keeps it
        env = {**os.environ, "KUBECONFIG": str(self.proxy_kubeconfig),
               "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT)])}
        env.pop("EBBTIDE_TICK_SECONDS", None)  # its default tick
        program = ["-m", "ebbtide.cli"]
        if traced is not None:
            env["EBBTIDE_TRACE_FILE"], program = str(traced), [str(ROOT / "bench" / "traced_operator.py")]
        argv = [sys.executable, *program, "run", "--prometheus-url", self.prometheus.url,
                "--metrics-port", str(metrics_port), "--health-port", "0"]
        with log:
            process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            yield process
        finally:
            stop_process(process, grace=20)


def progress(bed: Bed, started: float) -> int:
    """Pods Running; and every half minute, how far each step of the pipeline got."""
    running = len(bed.writer.running())
    if int(time.monotonic() - started) % 30 < 5:
        pods = bed.api.list_objects("v1/pods")
        print(f"  {time.monotonic() - started:.0f} s: {len(bed.api.list_objects(DEPLOYMENTS))} Deployments, "
              f"{len(pods)} pods, {sum(1 for p in pods if p['spec'].get('nodeName'))} bound, {running} Running",
              flush=True)
    return running


def handled(bed: Bed, services: int) -> bool:
    """Whether kopf has finished every service's handler: its spec applied (observedGeneration in
    status) and kopf's record of the spec it handled written. Under load, a window opened before
    this counted the creations' reads and patches as rest."""
    done = [o for o in bed.api.list_objects(ISVC)
            if (o.get("status") or {}).get("observedGeneration") == o["metadata"].get("generation")
            and "ebbtide.dev/last-handled-configuration" in (o["metadata"].get("annotations") or {})]
    return len(done) >= services


def settle(bed: Bed, services: list[tuple[str, str]], replicas: int, watcher: TickWatcher, timeout: float) -> dict:
    """Until kopf has handled every service, every pod runs, Prometheus has every pod's series and the operator has ticked over
    the whole fleet twice since (the default interval is 15 s: every service evaluated), and the
    services' first minute is over (a ready count's rise is kept for one metrics window, then
    cleared from status: a change, not rest). Each step bounded by `timeout`: a step that does
    not get there is recorded, and the measurement goes on (a fleet that never settles is a
    result too)."""
    started = time.monotonic()
    pods = len(services) * replicas
    since = {"ticks": 0.0, "running": started}
    missed = []
    for what, done, interval in ((f"{len(services)} services handled", lambda: handled(bed, len(services)), 5),
                                 (f"{pods} pods Running", lambda: progress(bed, started) >= pods, 5),
                                 (f"{pods} pods in Prometheus", lambda: bed.scraped_pods() >= pods, 2),
                                 (f"8 more ticks, {FIRST_MINUTE_S:g} s after the last pod ran",
                                  lambda: watcher.count >= since["ticks"] + 8
                                  and time.monotonic() >= since["running"] + FIRST_MINUTE_S, 1)):
        since["ticks"] = watcher.count  # ticks count from the end of the step before
        try:
            wait_for(done, timeout=timeout, interval=interval, what=what)
        except AssertionError as e:
            print(f"  not settled: {e}", flush=True)
            missed.append(what)
        if what.endswith("Running"):
            since["running"] = time.monotonic()
    return {"settle_s": round(time.monotonic() - started, 1), **({"not_settled": missed} if missed else {})}


def measure_window(bed: Bed, pid: int, watcher: TickWatcher, seconds: float) -> dict:
    """Nothing changes for `seconds`: what the operator costs per tick, at rest."""
    queries0, requests0, cpu0, ticks0, t0 = (bed.prometheus.http_requests(), bed.proxy.snapshot(),
                                             cpu_seconds(pid), watcher.count, time.time())
    time.sleep(seconds)
    queries1, requests, cpu1, ticks1, t1 = (bed.prometheus.http_requests(), bed.proxy.since(requests0),
                                            cpu_seconds(pid), watcher.count, time.time())
    ticks = max(1.0, ticks1 - ticks0)
    by_verb: dict[str, float] = {}
    for key, count in requests.items():
        verb = key.split(" ", 1)[0]
        by_verb[verb] = by_verb.get(verb, 0) + count
    durations = watcher.durations(t0, t1)
    return {
        "window_s": round(t1 - t0, 1),
        "ticks": int(ticks),
        "tick_durations_s": [round(d, 2) for d in durations],
        "tick_p50_s": round(percentile(durations, 0.5) or 0.0, 3),
        "tick_p99_s": round(percentile(durations, 0.99) or 0.0, 3),
        "tick_max_s": round(max(durations, default=0.0), 3),
        "prometheus_queries_per_tick": round((queries1 - queries0) / ticks, 2),
        "api_requests_per_tick": {verb: round(n / ticks, 2) for verb, n in sorted(by_verb.items())},
        "api_requests_per_tick_by_resource": {key: round(n / ticks, 2) for key, n in requests.items()},
        "watches": bed.proxy.open_watches,
        "rss_mib": round(rss_mib(pid), 1),
        "cpu_cores": round((cpu1 - cpu0) / (t1 - t0), 3),
    }


def backlog_samples(bed: Bed, services: list[tuple[str, str]], samples: int) -> list[float | None]:
    """A backlog on one service's pods at a time; seconds until its Deployment's replicas change."""
    taken = []
    step = max(1, len(services) // max(1, samples))
    pause = random.Random(18)
    for namespace, name in services[::step][:samples]:
        # A random phase against the tick, the scrape and the service's interval: back to back,
        # every sample would start just after the same tick and measure the same delay.
        time.sleep(pause.uniform(0, 15))
        before = bed.api.get_object(DEPLOYMENTS, namespace, name)["spec"]["replicas"]
        pods = [p for (ns, _), p in bed.writer.running().items()
                if ns == namespace and p.labels.get(LABEL_SERVICE) == name]
        started = time.monotonic()
        for pod in pods:
            bed.exporter.set(namespace, pod.name, waiting=BACKLOG)
        try:
            wait_for(lambda ns=namespace, n=name, b=before: bed.api.get_object(DEPLOYMENTS, ns, n)["spec"]["replicas"]
                     != b, timeout=BACKLOG_BOUND_S, interval=0.1, what=f"{namespace}/{name} scaled")
            taken.append(round(time.monotonic() - started, 2))
        except AssertionError:  # recorded as not scaled within the bound; the next sample goes on
            print(f"  {namespace}/{name} not scaled within {BACKLOG_BOUND_S:.0f} s", flush=True)
            taken.append(None)
        for pod in pods:  # the backlog is served: the service stays scaled up until its window passes
            bed.exporter.set(namespace, pod.name, waiting=0)
    return taken


def run(sizes: list[int], namespaces: int, replicas: int, window: float, samples: int,
        workdir: pathlib.Path, traced: pathlib.Path | None = None) -> list[dict]:
    fleet = service_names(max(sizes), namespaces)
    bed = Bed(workdir, max(sizes) * replicas + samples * 5 + 10)
    port = free_port()
    results = []
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    try:
        with bed.operator(port, traced) as operator:
            watcher = TickWatcher(f"http://127.0.0.1:{port}/metrics").start()
            made = 0
            for size in sizes:
                grow_started = time.monotonic()
                bed.grow(fleet[made:size], replicas)
                made = size
                settled = settle(bed, fleet[:size], replicas, watcher, timeout=300 + size * 1.5)
                print(f"{size} services: settled in {time.monotonic() - grow_started:.0f} s", flush=True)
                result = {"services": size, "namespaces": min(size, namespaces), "pods": size * replicas,
                          "prometheus_series": bed.exporter.series(), **settled,
                          **measure_window(bed, operator.pid, watcher, window)}
                result["load_average"] = load_average()
                if traced is not None:  # where the memory is, as the window ends
                    before = traced.stat().st_size if traced.exists() else 0
                    operator.send_signal(signal.SIGUSR1)
                    wait_for(lambda b=before: traced.exists() and traced.stat().st_size > b, timeout=300,
                             interval=1, what="the allocation trace")
                result["commit"] = commit  # the operator's code: HEAD when it started
                result["backlog_to_patch_s"] = backlog_samples(bed, fleet[:size], samples)
                result["rss_mib_after_backlog"] = round(rss_mib(operator.pid), 1)
                print(json.dumps(result), flush=True)
                results.append(result)
                if operator.poll() is not None:
                    raise RuntimeError(f"the operator exited with {operator.returncode}: see {workdir}/operator.log")
            watcher.stop()
    finally:
        bed.close()
    return results


def record(results: list[dict], command: str, path: pathlib.Path) -> dict:
    """Merge into the results file: the largest size's figures at the top, every size under `sizes`,
    and the keys others keep there (failover_s, the rows measured before a fix) untouched."""
    existing = json.loads(path.read_text()) if path.exists() else {}
    kept = {key: existing[key] for key in KEPT if key in existing}  # not the last run's own figures
    largest = max(results, key=lambda r: r["services"])
    merged = {**kept, **largest, "sizes": results, "command": command,
              "tick_interval_s": 5.0, "scrape_interval_s": SCRAPE_SECONDS, "cpus": os.cpu_count()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2) + "\n")
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000", help="fleet sizes in services, ascending (default 100,1000)")
    parser.add_argument("--namespaces", type=int, default=20)
    parser.add_argument("--replicas", type=int, default=3, help="pods per service (replicas.min)")
    parser.add_argument("--window", type=float, default=90.0, help="seconds of rest measured at each size")
    parser.add_argument("--samples", type=int, default=5, help="backlog samples at each size")
    parser.add_argument("--workdir", type=pathlib.Path, default=None, help="logs and state (default: a temp dir)")
    parser.add_argument("--output", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--traced", type=pathlib.Path, default=None,
                        help="trace the operator's allocations (bench/traced_operator.py); where they are goes "
                             "to this file after each window (the figures are then not comparable)")
    args = parser.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    workdir = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="ebbtide-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"logs in {workdir}", flush=True)
    results = run(sizes, args.namespaces, args.replicas, args.window, args.samples, workdir, args.traced)
    command = "python bench/operator_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(json.dumps(record(results, command.strip(), args.output), indent=2))
    if args.output == RESULTS:
        (ROOT / "bench" / "RESULTS.md").write_text(render(RESULTS.parent))
        print("wrote bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
