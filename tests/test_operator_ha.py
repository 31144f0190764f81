"""High availability and shards on the real control plane, with the operator as real processes
(`ebbtide run`), so that a leader can be killed with SIGKILL and release nothing.

* two replicas with leader election: only the Lease's holder runs; killed, a standby takes over
  and, under load, keeps the fleet's size (its state comes from status.scaler, not empty history);
* a leader whose Lease is taken exits at once; a leader stopped with SIGTERM hands the Lease over;
* two shards (`--selector`) each run only their own services.

Failover times are measured and printed (bench/RESULTS.md records them), never asserted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.test_closed_loop import SCALING
from tests.testbed.engines import now_rfc3339
from tests.testbed.faultproxy import FaultProxy
from tests.testbed.loadgen import steady_load
from tests.testbed.operator import Operator, isvc, replicas, seconds, status
from tests.testbed.waiting import wait_for

LEASES = "coordination.k8s.io/v1/leases"
LEASE = "ebbtide-test"
RECORD = Path(os.environ.get("EBBTIDE_HA_RECORD", "")) if os.environ.get("EBBTIDE_HA_RECORD") else None


@pytest.fixture()
def operators(apiserver, tmp_path):
    """Start operators: ``operators(name, *args)``; every one still running is stopped at teardown."""
    started: list[Operator] = []

    def start(name: str, *args: str, **kwargs) -> Operator:
        started.append(Operator(apiserver, name, tmp_path, *args, **kwargs))
        return started[-1]

    yield start
    for operator in started:
        operator.stop()


def holder(server) -> str | None:
    lease = server.get_object(LEASES, "default", LEASE) or {}
    return (lease.get("spec") or {}).get("holderIdentity")


def elected(name: str, prometheus_url: str):
    return (name, "--leader-election", "--lease-namespace", "default", "--lease-name", LEASE)


def take_over(server, standby: str, killed_at: float) -> tuple[dict, int]:
    """Watch a failover from the kill: seconds to the standby's Lease and to its first decision,
    and the fewest replicas seen until a few ticks after it (the new leader must not shrink)."""
    started, lowest = time.monotonic(), replicas(server)

    def watching(done):
        def probe():
            nonlocal lowest
            lowest = min(lowest, replicas(server))
            return done()
        return probe

    wait_for(watching(lambda: holder(server) == standby), timeout=30, interval=0.1, what=f"{standby} leading")
    lease_s = time.monotonic() - started

    def decided():  # a decision written after the kill (status times are whole seconds)
        last = status(server).get("lastDecision") or {}
        return last.get("time") and seconds(last["time"]) >= int(killed_at) + 1
    wait_for(watching(decided), timeout=30, interval=0.1, what=f"{standby}'s first decision")
    decision_s = time.monotonic() - started
    end = time.monotonic() + 5  # a few more of its ticks: history from status, so no scale-down
    while time.monotonic() < end:
        watching(lambda: False)()
        time.sleep(0.2)
    return {"lease_s": round(lease_s, 2), "first_decision_s": round(decision_s, 2)}, lowest


@pytest.mark.prometheus
@pytest.mark.slow
def test_a_standby_takes_over_a_killed_leader_and_keeps_the_size_under_load(cluster, operators):
    server = cluster.server
    url = cluster.prometheus.url
    ops = {name: operators(*elected(name, url), prometheus_url=url) for name in ("op-a", "op-b")}
    leader = wait_for(lambda: holder(server), timeout=60, what="a leader")
    standby = next(n for n in ops if n != leader)
    wait_for(lambda: "standing by" in ops[standby].output(), timeout=30, what=f"{standby} standing by")
    # The Lease is written a moment before the leader's gauge is set: wait for it, then both hold.
    wait_for(lambda: "ebbtide_leader 1.0" in ops[leader].metrics(), timeout=10, what=f"{leader}'s leader gauge")
    assert "ebbtide_leader 0.0" in ops[standby].metrics()

    # A scale-down window longer than the test: with the history restored from status, the new
    # leader holds the size; a leader starting on empty history would shrink to what it sees now.
    scaling = {**SCALING, "behavior": {**SCALING["behavior"], "scaleDown": {"stabilizationSeconds": 600}}}
    server.create_object(isvc("chat", replicas={"min": 1, "max": 4}, scaling=scaling))
    wait_for(lambda: cluster.pods.pods("default") and all(p.ready for p in cluster.pods.pods("default")),
             timeout=30, what="the first replica ready")
    balancer = cluster.balancer()
    balancer.wait_for_endpoints(1)
    generator = steady_load(balancer.url, rate=40, duration=240)
    wait_for(lambda: (replicas(server) or 0) >= 2 and status(server).get("replicas", {}).get("ready", 0) >= 2,
             timeout=90, interval=0.5, what="a scale-up, served")
    remembered = status(server)["scaler"]
    failovers = []
    for _ in range(3):
        size = replicas(server)
        killed_at = time.time()
        ops[leader].stop(signal.SIGKILL)  # no release: the standby must wait the Lease out
        measured, lowest = take_over(server, standby, killed_at)
        failovers.append(measured)
        assert lowest >= size, f"the fleet shrank from {size} to {lowest} across the failover"
        after = [d for d in status(server).get("decisions", []) if seconds(d["time"]) >= int(killed_at) + 1]
        assert all(d["toReplicas"] >= d["fromReplicas"] for d in after), after
        kept = status(server)["scaler"]  # the history and the ledger go on; neither started over
        assert kept["since"] == remembered["since"] and kept["cost"]["since"] == remembered["cost"]["since"], kept
        assert kept["downRecommendations"], kept
        # Kubernetes restarts the killed pod: it comes back as the standby.
        ops[leader] = operators(*elected(leader, url), prometheus_url=url)
        wait_for(lambda n=leader: "standing by" in ops[n].output(), timeout=30, what=f"{leader} standing by")
        leader, standby = standby, leader
    generator.stop()
    print(f"failover (kill -9 of the leader -> Lease held / first decision): {failovers}")
    if RECORD is not None:
        RECORD.write_text(json.dumps({"measured": datetime.now(UTC).isoformat(timespec="seconds"),
                                      "failovers": failovers}, indent=1))


def test_a_leader_exits_when_its_lease_is_taken_and_hands_it_over_on_sigterm(apiserver, operators):
    server = apiserver.server
    first = operators(*elected("op-a", ""))
    wait_for(lambda: holder(server) == "op-a" and "ebbtide operator started" in first.output(), timeout=60,
             what="op-a leading")
    # Another holder writes the Lease (a split brain the leader must resolve by stopping).
    lease = server.get_object(LEASES, "default", LEASE)
    now = now_rfc3339(micro=True)
    server.patch_object(LEASES, "default", LEASE, {"spec": {"holderIdentity": "intruder", "renewTime": now},
                                                  "metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]}})
    assert first.process.wait(30) == 1
    assert "leadership lost" in first.output()

    # A clean stop gives the Lease back at once, so that a standby does not wait for its expiry.
    server.patch_object(LEASES, "default", LEASE, {"spec": {"holderIdentity": None}})
    second = operators(*elected("op-b", ""))
    wait_for(lambda: holder(server) == "op-b" and "ebbtide operator started" in second.output(), timeout=60,
             what="op-b leading")
    assert second.stop(signal.SIGTERM) == 0
    assert holder(server) is None, server.get_object(LEASES, "default", LEASE)


def gpu_seconds(operator: Operator) -> float:
    """The operator's on-demand GPU time for chat, from its /metrics: what its ledger holds now."""
    for family in text_string_to_metric_families(operator.metrics()):
        for sample in family.samples:
            if sample.name == "ebbtide_gpu_seconds_total" and sample.labels.get("service") == "chat" \
                    and sample.labels.get("capacity_type") == "on-demand":
                return sample.value
    return 0.0


def test_a_leader_stopped_with_sigterm_writes_the_cost_it_held_back(apiserver, kubelet, operators):
    """At rest a status is written again once per refresh period (control/cadence.py: 300 s at
    the default interval, longer in a large fleet); the ledger accrues at every evaluation in
    between. A graceful stop writes the last evaluation's status, so that the next leader
    resumes from the cost totals as they stood at the stop, not as they were last written."""
    server = apiserver.server
    operator = operators("op")
    server.create_object(isvc("chat", replicas={"min": 1, "max": 1}))  # the default 15 s interval
    wait_for(lambda: status(server).get("replicas", {}).get("ready") == 1, timeout=60, what="chat ready")
    written = wait_for(lambda: status(server)["cost"]["gpuHours"]["onDemand"], timeout=60,
                       what="GPU time in status")
    # An evaluation since then charged more than status says: held back (no news at rest).
    ahead = wait_for(lambda: (held := gpu_seconds(operator)) > written * 3600 + 1 and held, timeout=60,
                     what="the ledger ahead of status")
    assert operator.stop(signal.SIGTERM) == 0
    stopped_with = status(server)["cost"]["gpuHours"]["onDemand"] * 3600
    assert stopped_with >= ahead - 0.5, (written * 3600, ahead, stopped_with)  # status rounds to 1e-4 h


def test_a_leader_that_cannot_renew_exits_before_its_lease_expires(apiserver, operators, tmp_path):
    """The API server stops answering the leader's renewals (500s): it must stop writing, i.e.
    exit, before a standby may take the Lease (the deadline is shorter than the lease)."""
    plane = apiserver.plane
    with FaultProxy(plane.url, str(plane.pki / "ca.crt")) as proxy:
        kubeconfig = tmp_path / "through-proxy.kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "proxy",
            "clusters": [{"name": "proxy", "cluster": {"server": proxy.url}}],
            "users": [{"name": "admin", "user": {"token": plane.tokens["admin"]}}],
            "contexts": [{"name": "proxy", "context": {"cluster": "proxy", "user": "admin"}}]}))
        leader = operators(*elected("op-a", ""), kubeconfig=kubeconfig)
        wait_for(lambda: holder(apiserver.server) == "op-a" and "ebbtide operator started" in leader.output(),
                 timeout=60, what="op-a leading")
        proxy.fail("PUT", r"/leases/", 500)
        failing = time.monotonic()
        assert leader.process.wait(30) == 1
        exited, gone_s = time.time(), time.monotonic() - failing  # a little after the exit: stricter
        renewed = seconds(apiserver.server.get_object(LEASES, "default", LEASE)["spec"]["renewTime"])
        # Gone before the Lease (its last renewal + 12 s) could pass to anyone else.
        assert exited < renewed + 12, (exited - renewed, gone_s)
        assert "leadership lost" in leader.output()
        print(f"a leader that cannot renew exits {gone_s:.1f} s after its renewals start failing")


def test_two_shards_each_run_only_their_own_services(apiserver, operators):
    server = apiserver.server
    for shard in ("a", "b"):
        body = isvc(f"chat-{shard}")
        body["metadata"]["labels"] = {"ebbtide.dev/shard": shard}
        server.create_object(body)
    shard_a = operators("shard-a", "--selector", "ebbtide.dev/shard=a")
    wait_for(lambda: status(server, "chat-a").get("lastDecision"), timeout=60, what="shard a deciding for chat-a")
    # Shard a alone: chat-b is not its own, so no workload, no status, no metrics for it.
    assert server.get_object("apps/v1/deployments", "default", "chat-b") is None
    assert not status(server, "chat-b")
    shard_b = operators("shard-b", "--selector", "ebbtide.dev/shard=b")
    wait_for(lambda: status(server, "chat-b").get("lastDecision"), timeout=60, what="shard b deciding for chat-b")
    for operator, mine, other in ((shard_a, "chat-a", "chat-b"), (shard_b, "chat-b", "chat-a")):
        exposition = operator.metrics()
        assert f'service="{mine}"' in exposition and f'service="{other}"' not in exposition, operator.name
    bad = subprocess.run([sys.executable, "-m", "ebbtide.cli", "run", "--selector", "shard in a"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
