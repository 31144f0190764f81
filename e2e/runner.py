"""The counted scenarios' runner: one InferenceService in a namespace of its own, a load generator
through its Service for the whole scenario, one disruption, then the checks every scenario owes
(issue #17) and one entry of ``artifacts/e2e/summary.json``.

A scenario is declarative (`Scenario`): the spec, the load, what it waits for before the load, the
disruption (a function of a `Run`) and what it explains. Everything else is written once here:

* the counts: sent, succeeded, failed by cause (tests/testbed/loadgen.py), latency p50/p99;
* the invariants (`e2e/invariants.py`): 0 failed requests unless a cause is declared unavoidable
  (and explained in the notes), no request refused by a sleeping engine, no sleeper woken twice,
  no orphaned sleeper, the InferenceService and its workload intact (same uids), and for a
  restart no pod removed (no scale-down on empty history);
* the summary entry, written even when the scenario fails (with its counts and why).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.testbed.loadgen import LoadGenerator
from tests.testbed.waiting import wait_for

from e2e import invariants
from e2e.backend import Backend, StoryLog, Unsupported
from e2e.observe import ISVC, Observer
from ebbtide.control.explain import REFRESH_INTERVALS

NAME = "model"
# Short requests: a replica of the engine simulator's `tiny` preset serves about 13 of them a second.
PROMPT_TOKENS, MAX_TOKENS = 100, 32
REQUEST_TIMEOUT = 60.0  # beyond anything a scenario waits for: a timeout here is a lost request


@dataclasses.dataclass
class Run:
    """What a scenario's disruption gets: the cluster, its service, the load running through it."""

    backend: Backend
    story: StoryLog
    watch: Observer
    load: LoadGenerator
    notes: list[str]
    # Causes the disruption turned out to make unavoidable, with why (see `excuse`).
    excused: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.watch.namespace

    def step(self, message: str) -> None:
        self.story.step(message)

    def note(self, message: str) -> None:
        """A line of the summary's notes (and of the log)."""
        self.notes.append(message)
        self.story.step(f"note: {message}")

    def excuse(self, cause: str, why: str) -> None:
        """Failures with this cause were unavoidable in this run (said in the notes with the count)."""
        self.excused[cause] = why
        self.note(f"failures with {cause} are unavoidable in this run: {why}")

    def edit(self, spec: dict) -> None:
        """Merge-patch the InferenceService's spec."""
        self.step(f"edit the spec: {json.dumps(spec)}")
        self.backend.patch(*ISVC, NAME, {"spec": spec}, self.namespace)

    def wait(self, probe: Callable[[], Any], what: str, timeout: float = 60, interval: float = 0.5) -> Any:
        return self.watch.wait(probe, what, timeout=timeout, interval=interval)

    def ticks(self, count: int) -> None:
        """Wait for `count` more decisions of the operator written to status. A decision that
        changes nothing is written only with its status's refresh, once per REFRESH_INTERVALS of
        the service's intervals (control/explain.py): at rest, `count` refreshes."""
        seen: list[str] = []
        spec = (self.watch.isvc() or {}).get("spec") or {}
        interval = ((spec.get("scaling") or {}).get("behavior") or {}).get("intervalSeconds", 15)
        refresh = REFRESH_INTERVALS * interval

        def moved() -> bool:
            stamp = (self.watch.status().get("lastDecision") or {}).get("time")
            if stamp and (not seen or stamp != seen[-1]):
                seen.append(stamp)
            return len(seen) > count
        self.wait(moved, f"{count} more decisions of the operator (at rest, one per {refresh} s refresh)",
                  timeout=(count + 1) * refresh + 30, interval=0.3)

    def ready(self, replicas: int, timeout: float = 90) -> None:
        """Wait until `replicas` replicas are ready and nothing else is starting or leaving."""
        def settled() -> bool:
            counts = self.watch.counts()
            return (counts.get("status.ready", 0) == replicas and not counts.get("status.starting")
                    and len(self.watch.live_pods()) - counts.get("status.asleep", 0) == replicas)
        self.wait(settled, f"{replicas} replica(s) ready", timeout=timeout)


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str  # the summary's `scenario`, and the namespace (e2e-<name>)
    spec: dict  # the InferenceService's spec; the backend's engine is added
    disrupt: Callable[[Run], None]  # runs while the load runs
    setup: Callable[[Run], None] | None = None  # under load too, before the pods are counted (keeps_pods)
    rate: float = 4.0  # requests per second, for the whole scenario unless the disruption changes it
    max_tokens: int = MAX_TOKENS  # longer requests for a scenario about requests in flight
    stream: bool = True  # False: one answer per request (no chunks to relay: long requests cost less)
    ready: int = 1  # replicas ready before the load starts (0: the load starts at once)
    spot: bool = False  # the service has a spot Deployment too
    keeps_pods: bool = False  # a restart: every pod there when the load started is still there at the end
    # Causes of failure the scenario cannot avoid, each with why (it goes to the notes); any other
    # cause, or these in a scenario that does not declare them, fails the scenario.
    unavoidable: dict[str, str] = dataclasses.field(default_factory=dict)
    # How requests reach the Service (a URL); the default is the backend's, as kube-proxy.
    gateway: Callable[[Backend, str, str], str] | None = None
    notes: str = ""


class Summary:
    """artifacts/e2e/summary.json: one entry per scenario, rewritten whole after each one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[dict] = []
        self._write()

    def record(self, entry: dict) -> None:
        self.entries = [e for e in self.entries if e["scenario"] != entry["scenario"]] + [entry]
        self._write()

    def table(self) -> list[str]:
        """One line per scenario: the counts, the causes of failure, the verdict."""
        verdicts = {True: "ok", False: "FAILED", None: "skipped"}
        return [f"{e['scenario']:34} sent {e['sent']:5} ok {e['succeeded']:5} failed {e['failed']:4} "
                f"{verdicts[e['passed']]:7} {json.dumps(e['failed_by_cause']) if e['failed'] else ''}"
                for e in self.entries]

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.entries, indent=2) + "\n")
        os.replace(tmp, self.path)  # a reader never sees half a file


def manifest(backend: Backend, namespace: str, spec: dict, name: str = NAME) -> dict:
    if backend.engine:
        spec = {**spec, "engine": backend.engine}
    return {"apiVersion": ISVC[0], "kind": ISVC[1], "metadata": {"name": name, "namespace": namespace},
            "spec": spec}


def drain(load: LoadGenerator) -> dict:
    """No new arrivals; the requests in flight finish (or time out: a lost request), never cancelled."""
    load.set_rate(0)
    wait_for(lambda: load.in_flight == 0, timeout=REQUEST_TIMEOUT + 10, interval=0.2, what="the requests in flight")
    return load.stop()


def entry(scenario: Scenario, counts: dict, notes: list[str], problems: list[str], skipped: bool) -> dict:
    latency = {k: round(v, 3) for k in ("latency_p50", "latency_p99") if (v := counts.get(k)) is not None}
    return {"scenario": scenario.name, "sent": counts.get("sent", 0), "succeeded": counts.get("ok", 0),
            "failed": counts.get("errors", 0), "failed_by_cause": counts.get("failed_by_cause", {}),
            **latency, "passed": None if skipped else not problems, "problems": problems, "notes": notes}


def run_scenario(backend: Backend, story: StoryLog, summary: Summary, scenario: Scenario) -> None:
    namespace = f"e2e-{scenario.name}"
    story.heading(f"counted scenario {scenario.name} (namespace {namespace})")
    notes = [scenario.notes] if scenario.notes else []
    counts: dict = {}
    problems: list[str] = []
    skipped = ""
    watch = Observer(backend, story, NAME, spot=scenario.spot, namespace=namespace)
    backend.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    try:
        backend.apply(manifest(backend, namespace, scenario.spec))
        url = (scenario.gateway or default_gateway)(backend, NAME, namespace)
        load = LoadGenerator(url, rate=0, duration=3600, prompt_tokens=PROMPT_TOKENS, max_tokens=scenario.max_tokens,
                             stream=scenario.stream, request_timeout=REQUEST_TIMEOUT, seed=len(scenario.name)).start()
        run = Run(backend, story, watch, load, notes)
        try:
            if scenario.ready:
                run.ready(scenario.ready, timeout=120)
            story.step(f"load: {scenario.rate} requests/s through {url}")
            load.set_rate(scenario.rate)
            if scenario.setup:
                scenario.setup(run)
            before = invariants.identities(watch)
            scenario.disrupt(run)
        finally:
            counts = drain(load)
        story.step(f"load over: sent {counts['sent']}, ok {counts['ok']}, failed {counts['failed_by_cause']}")
        problems = invariants.check(run, scenario, counts, before)
    except Unsupported as e:  # the backend cannot produce this fault: skipped, and said so
        notes.append(f"skipped: {e}")
        skipped = str(e)
    except BaseException as e:  # the scenario broke (or was interrupted): recorded, then raised
        problems.append(f"{type(e).__name__}: {e}".splitlines()[0][:400])
        raise
    finally:
        summary.record(entry(scenario, counts, notes, problems, bool(skipped)))
        clean_up(backend, watch, namespace)
    if skipped:
        pytest.skip(skipped)
    assert not problems, "\n".join(problems)


def default_gateway(backend: Backend, name: str, namespace: str) -> str:
    return backend.service_url(name, namespace)


def holding_gateway(backend: Backend, name: str, namespace: str) -> str:
    """`ebbtide activator`: it holds requests while no replica is ready, and Prometheus scrapes
    the count for the activation query."""
    return backend.activator_url(name, namespace)


def clean_up(backend: Backend, watch: Observer, namespace: str) -> None:
    """Delete the InferenceService and wait until it is gone (its finalizer released); its pods go
    on terminating alongside the next scenario. The namespace stays: deleting it under the
    operator's feet makes its last writes fail with 403s that are not RBAC's."""
    backend.close_service_url(NAME, namespace)
    backend.delete(*ISVC, NAME, namespace)
    started = time.monotonic()
    wait_for(lambda: watch.isvc() is None, timeout=120, interval=0.5, what=f"the InferenceService of {namespace} gone")
    watch.story.step(f"InferenceService deleted and gone in {time.monotonic() - started:.0f} s")
