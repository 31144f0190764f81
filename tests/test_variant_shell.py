"""The operator's side of accelerator variants, without a cluster: the pods and Deployments the
API server returns, through decide (control/decide.py) to the counts each variant's Deployment is
set to, the status rows, and the mix memory kept in status across a restart."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ebbtide.api.manifest import parse_spec
from ebbtide.api.ref import ServiceRef
from ebbtide.cluster.objects import rfc3339
from ebbtide.cluster.render import LABEL_CAPACITY, LABEL_SERVICE, LABEL_SERVING
from ebbtide.cluster.variants import LABEL_VARIANT
from ebbtide.control.decide import decide
from ebbtide.control.explain import export, render_status, substance
from ebbtide.control.metrics import OperatorMetrics
from ebbtide.control.observe import Snapshot
from ebbtide.control.state import ServiceState
from ebbtide.policy.observation import PodSignals, Signals

NOW = 1_750_000_000.0
REF = ServiceRef(name="chat", namespace="ml", uid="u1")
SPEC = parse_spec({"model": {"name": "m"}, "replicas": {"min": 1, "max": 8}, "variants": [
    {"name": "h100", "accelerator": "H100", "capacityType": "reserved", "pricePerGpuHour": 2.0,
     "replicas": {"min": 0, "max": 2}},
    {"name": "l4", "accelerator": "L4", "capacityType": "on-demand", "pricePerGpuHour": 0.8,
     "gpusPerReplica": 2, "replicas": {"min": 0, "max": 4}}]})


def pod(name: str, variant: str, node: str | None, ready: bool) -> dict:
    conditions = [{"type": "Ready", "status": "True", "lastTransitionTime": rfc3339(NOW - 600)}] if ready else []
    return {"metadata": {"name": name, "namespace": "ml", "creationTimestamp": rfc3339(NOW - 900),
                         "labels": {LABEL_SERVICE: "chat", LABEL_VARIANT: variant, LABEL_SERVING: "true",
                                    LABEL_CAPACITY: "on-demand"}},
            "spec": {"nodeName": node}, "status": {"phase": "Running" if node else "Pending", "conditions": conditions}}


def deployment(name: str, replicas: int) -> dict:
    return {"metadata": {"namespace": "ml", "name": name}, "spec": {"replicas": replicas}}


def snapshot(tokens: float, now: float = NOW) -> Snapshot:
    pods = [pod("chat-h100-a", "h100", "n1", True), pod("chat-l4-a", "l4", "n2", True),
            pod("chat-l4-b", "l4", None, False)]
    signals = Signals("prometheus", now - 1, pods=(PodSignals("chat-h100-a", now - 1), PodSignals("chat-l4-a", now - 1)),
                      tokens_per_second=tokens)
    return Snapshot.of(now, pods, [deployment("chat-h100", 1), deployment("chat-l4", 2)], [],
                       {("ml", "chat"): signals})


def test_each_variants_deployment_is_set_to_the_mix_and_status_prices_each_variant():
    state = ServiceState.restore(None, NOW)
    step = decide(snapshot(tokens=20_000.0), REF, SPEC, state.tick)
    assert {p.capacity for p in step.seen.pods} == {"h100", "l4"}, "the tick knows a variant's pods by its name"
    mix = step.turn.decision.variants
    assert mix is not None and dict(step.turn.replicas) == dict(mix.targets)
    # The reserved H100s run to their max first (already paid for); the rest goes on L4s.
    assert mix.targets["h100"] == 2
    assert dict(step.actions.scale) == {f"chat-{n}": c for n, c, have in
                                        (("h100", mix.targets["h100"], 1), ("l4", mix.targets["l4"], 2)) if c != have}
    assert step.actions.pools == {}

    status = render_status({}, state, step, step.turn, applied=True)
    rows = {r["name"]: r for r in status["variants"]}
    # Reserved: paid in full (2 x 2.0); L4: the one pod on a node (2 GPUs x 0.8), not the Pending one.
    assert (rows["h100"]["usdPerHour"], rows["l4"]["usdPerHour"]) == (4.0, 1.6)
    assert (rows["l4"]["ready"], rows["l4"]["pending"]) == (1, 1)
    assert status["cost"]["usdPerHour"] == sum(r["usdPerHour"] for r in rows.values())
    assert status["variantsSummary"] == f"h100=1/2@4,l4=1/{mix.targets['l4']}@1.6"
    assert status["spend"]["projectedUsdPerHour"] == round(mix.usd_per_hour, 4)


def test_status_cost_and_the_cost_metrics_grow_for_a_variant_service():
    state, metrics = ServiceState.restore(None, NOW), OperatorMetrics()
    for now in (NOW, NOW + 1800):
        step = decide(snapshot(tokens=3_000.0, now=now), REF, SPEC, state.tick)
        state.tick = step.turn.state
        export(metrics, REF, step, step.turn)
    cost = render_status({}, state, step, step.turn, applied=True)["cost"]
    # Half an hour of the two reserved H100s (paid in full: 4.0 USD/h) and the L4 on a node (2 GPUs, 1.6 USD/h).
    assert cost["usdTotal"] == cost["usdThisMonth"] == 2.8
    assert cost["gpuHours"] == {"onDemand": 1.0, "spot": 0.0, "asleep": 0.0, "reserved": 1.0}
    service = {"namespace": "ml", "service": "chat"}
    gpu = {kind: metrics.registry.get_sample_value("ebbtide_gpu_seconds_total", {**service, "capacity_type": kind})
           for kind in ("on-demand", "spot", "asleep", "reserved")}
    assert gpu == {"on-demand": pytest.approx(3600.0), "spot": 0.0, "asleep": 0.0, "reserved": pytest.approx(3600.0)}
    assert metrics.registry.get_sample_value("ebbtide_cost_usd_total", service) == pytest.approx(2.8)
    # After a restart the ledger goes on from status.
    assert ServiceState.restore({"scaler": state.to_json()}, NOW + 1801).tick.ledger == state.tick.ledger


def test_the_mix_memory_is_kept_in_status_across_a_restart():
    state = ServiceState.restore(None, NOW)
    for now, tokens in ((NOW, 9_000.0), (NOW + 15, 3_000.0)):
        step = decide(snapshot(tokens=tokens, now=now), REF, SPEC, state.tick)
        state.tick = step.turn.state
    mix = state.tick.mix
    assert mix is not None and len(mix.demand) == 2, "the scale-down window: its highest first, then the newest"
    restarted = ServiceState.restore({"scaler": state.to_json()}, NOW + 60).tick.mix
    # Demand readings and Pending sightings are written only with a refresh (they move every
    # tick): held until the restart, the mix shrinks no sooner than without one.
    stuck = {name: replace(m, stuck_at=None if m.stuck_at is None else NOW + 60) for name, m in mix.variants.items()}
    assert mix.variants["l4"].stuck_at is not None, "the L4 pod Pending for 15 minutes"
    assert restarted == replace(mix, demand=((NOW + 60, mix.demand[0][1]),), variants=stuck)


def test_a_new_demand_reading_alone_is_no_news_for_status():
    state = ServiceState.restore(None, NOW)
    statuses = []
    for now, tokens in ((NOW, 3_000.0), (NOW + 15, 3_050.0), (NOW + 30, 3_100.0)):
        step = decide(snapshot(tokens=tokens, now=now), REF, SPEC, state.tick)
        state.tick = step.turn.state
        statuses.append(render_status({}, state, step, step.turn, applied=True))
    before, after = statuses[1:]  # the first tick set the mix; then the same mix, a new reading
    assert before["scaler"]["mix"]["demand"] != after["scaler"]["mix"]["demand"]
    assert before["scaler"]["mix"]["targets"] == after["scaler"]["mix"]["targets"]
    assert substance(before) == substance(after)


def test_a_service_without_variants_writes_no_variant_fields():
    plain = parse_spec({"model": {"name": "m"}})
    snap = Snapshot.of(NOW, [], [deployment("chat", 1)], [], {})
    step = decide(snap, REF, plain, ServiceState.restore(None, NOW).tick)
    status = render_status({}, ServiceState.restore(None, NOW), step, step.turn, applied=True)
    assert (status["variants"], status["variantsSummary"], status["spend"]) == (None, None, None)


def test_a_single_variant_is_charged_at_its_own_price_and_gpus():
    one = parse_spec({"model": {"name": "m"}, "pricing": {"onDemandPerGpuHour": 4.0}, "variants": [
        {"name": "l4", "accelerator": "L4", "pricePerGpuHour": 0.8, "gpusPerReplica": 2}]})
    running = pod("chat-a", "l4", "n1", True)
    del running["metadata"]["labels"][LABEL_VARIANT]  # one variant: one Deployment, labelled as without variants
    snap = Snapshot.of(NOW, [running], [deployment("chat", 1)], [], {})
    step = decide(snap, REF, one, ServiceState.restore(None, NOW).tick)
    assert step.turn.spend.usd_per_hour == 2 * 0.8, "the variant's price for its 2 GPUs, not spec.pricing's"
