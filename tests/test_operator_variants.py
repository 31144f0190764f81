"""Accelerator variants on the real control plane: the real operator and scheduler, our kubelet's
nodes labelled by GPU type (nvidia.com/gpu.product, as NVIDIA's feature discovery labels them) and
capacity type (as Karpenter labels them), engine simulators as pods.

No Prometheus answers here, so the demand is what a service with replicas.min above zero and
nothing awake asks for: one replica of the cheapest variant that can take it (policy/variant_tick.py),
on top of each variant's own floor. Everything that moves is which variant carries it: a variant
whose nodes ran out hands over to the next cheapest, a budget caps the mix.
"""

from __future__ import annotations

import pytest

from tests.testbed.kubectl import KUBECTL, kubectl
from tests.testbed.nodes import GPU_PRODUCT_LABEL, accelerator_node
from tests.testbed.operator import ISVC, condition, events, isvc, replicas, running_operator, status
from tests.testbed.waiting import wait_for

pytestmark = pytest.mark.slow
DEPLOYMENTS = "apps/v1/deployments"

H100, A100, L4 = "NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB", "NVIDIA-L4"
FAST = {"behavior": {"intervalSeconds": 1, "scaleDown": {"stabilizationSeconds": 30, "drainSeconds": 0}}}


def variant(name: str, product: str, capacity: str, price: float, low: int, high: int,
            provider: str = "karpenter", **fields) -> dict:
    """A variant on the nodes of one GPU type, of its capacity type as Karpenter labels them."""
    return {"name": name, "accelerator": name.upper(), "capacityType": capacity, "pricePerGpuHour": price,
            "replicas": {"min": low, "max": high},
            "placement": {"provider": provider, "nodeSelector": {GPU_PRODUCT_LABEL: product}}, **fields}


def ready_on(kubelet, deployment: str) -> set[str]:
    """The nodes this Deployment's ready pods run on."""
    return {p.node for p in kubelet.pods("default", deployment) if p.ready}


def columns(header: str, row: str) -> dict[str, str]:
    """kubectl's table by the header's column positions (an empty cell would shift a split())."""
    names = header.split()
    starts = [header.index(f" {n}") + 1 if i else 0 for i, n in enumerate(names)]
    return {n: row[a:b].strip() for n, a, b in zip(names, starts, [*starts[1:], None], strict=True)}


def reasons(server, reason: str) -> list[str]:
    return [e["message"] for e in events(server) if e["reason"] == reason]


def test_each_variant_runs_on_its_own_accelerators_and_says_what_it_costs(apiserver, kubelet_factory):
    server = apiserver.server
    kubelet = kubelet_factory(nodes=[accelerator_node("h100-0", H100, "reserved"),
                                     accelerator_node("a100-0", A100, "on-demand"),
                                     accelerator_node("l4-0", L4, "spot")])
    with running_operator(apiserver, EBBTIDE_TICK_SECONDS="0.25"):
        server.create_object(isvc("chat", replicas={"min": 1, "max": 6}, scaling=FAST, variants=[
            variant("h100", H100, "reserved", 2.0, 1, 1),
            variant("a100", A100, "on-demand", 3.0, 1, 2),
            variant("l4", L4, "spot", 0.5, 1, 3, gpusPerReplica=2, tensorParallelSize=2)]))
        # The real scheduler puts each variant's pods on its own kind of node, and only there.
        for name, node in (("h100", "h100-0"), ("a100", "a100-0"), ("l4", "l4-0")):
            wait_for(lambda name=name, node=node: ready_on(kubelet, f"chat-{name}") == {node}, timeout=60,
                     what=f"chat-{name} ready on {node}")
        assert server.get_object(DEPLOYMENTS, "default", "chat") is None, "no Deployment but the variants'"

        # Status: per variant its replicas and dollars per hour (reserved counted in full, the
        # others per pod on a node, at pricePerGpuHour x gpusPerReplica), adding up to the total.
        expected = {"h100": 2.0, "a100": 3.0, "l4": 2 * 0.5}

        def priced():
            rows = status(server).get("variants") or []
            return rows if {r["name"]: (r["ready"], r["usdPerHour"]) for r in rows} == {
                n: (1, usd) for n, usd in expected.items()} else None

        rows = wait_for(priced, timeout=30, what="status.variants with every variant ready and priced")
        assert [(r["capacityType"], r["desired"]) for r in rows] == [("reserved", 1), ("on-demand", 1), ("spot", 1)]
        assert status(server)["cost"]["usdPerHour"] == pytest.approx(sum(expected.values()))
        assert status(server)["spend"]["projectedUsdPerHour"] == pytest.approx(sum(expected.values()))
        assert status(server)["variantsSummary"] == "h100=1/1@2,a100=1/1@3,l4=1/1@1"
        # The ledger charges each variant at its own price: the totals grow, reserved GPU time apart.
        spent = status(server)["cost"]["usdTotal"]
        grown = wait_for(lambda: (c := status(server)["cost"])["usdTotal"] > spent and c["gpuHours"]["reserved"] > 0
                         and c, timeout=30, what="status.cost.usdTotal growing")
        assert grown["usdThisMonth"] > 0 and grown["gpuHours"]["spot"] > 0, grown
        if KUBECTL.exists():  # `kubectl get -o wide` shows it, through the CRD's printer columns
            header, row = kubectl(apiserver, "get", "isvc", "chat", "-n", "default", "-o", "wide").splitlines()
            cells = columns(header, row)
            assert cells["VARIANTS"] == "h100=1/1@2,a100=1/1@3,l4=1/1@1", (header, row)
            assert float(cells["USD/H"]) == pytest.approx(sum(expected.values())), (header, row)


def test_when_a_variants_nodes_run_out_the_next_cheapest_takes_over(apiserver, kubelet_factory):
    server = apiserver.server
    kubelet = kubelet_factory(nodes=[accelerator_node("l4-0", L4, "spot"), accelerator_node("a100-0", A100, "on-demand"),
                                     accelerator_node("h100-0", H100, "on-demand")])
    kubelet.set_capacity("l4-0", False)  # the L4 spot pool has no nodes: its pods stay Pending
    with running_operator(apiserver, EBBTIDE_TICK_SECONDS="0.25"):
        server.create_object(isvc("chat", replicas={"min": 1, "max": 4}, scaling=FAST,
                                  placement={"spot": {"pendingTimeoutSeconds": 3}}, variants=[
                                      variant("l4", L4, "spot", 0.5, 0, 3),
                                      variant("a100", A100, "on-demand", 3.0, 0, 2),
                                      variant("h100", H100, "on-demand", 6.0, 0, 2)]))
        # From zero, only the cheapest variant starts.
        wait_for(lambda: replicas(server, "chat-l4") == 1, timeout=30, what="one L4 replica asked for")
        assert (replicas(server, "chat-a100"), replicas(server, "chat-h100")) == (0, 0)
        wait_for(lambda: [r["pending"] for r in status(server).get("variants") or [] if r["name"] == "l4"] == [1],
                 timeout=30, what="status showing the L4 replica Pending")

        # Past the pending timeout the L4 variant is capped at what found a node (none): the next
        # cheapest, A100, takes over; the dearest, H100, is left alone.
        wait_for(lambda: ready_on(kubelet, "chat-a100") == {"a100-0"}, timeout=60, what="the A100 replica ready")
        wait_for(lambda: replicas(server, "chat-l4") == 0, timeout=30, what="the Pending L4 replica given up")
        assert replicas(server, "chat-h100") == 0
        told = wait_for(lambda: [m for m in reasons(server, "VariantMix") if "a100 1" in m], timeout=30,
                        what="a VariantMix Event for the A100")
        assert "l4" in told[-1], told

        # A variant taken out of the spec: its Deployment goes, the others stay.
        kept = server.get_object(ISVC, "default", "chat")["spec"]["variants"][:2]
        server.patch_object(ISVC, "default", "chat", {"spec": {"variants": kept}})
        wait_for(lambda: server.get_object(DEPLOYMENTS, "default", "chat-h100") is None, timeout=30,
                 what="chat-h100 deleted")
        assert replicas(server, "chat-a100") == 1 and ready_on(kubelet, "chat-a100") == {"a100-0"}


def test_a_budget_that_binds_says_budget_limited_and_holds_the_cap(apiserver):
    server = apiserver.server
    with running_operator(apiserver, EBBTIDE_TICK_SECONDS="0.25"):
        server.create_object(isvc("chat", replicas={"min": 1, "max": 4}, scaling=FAST, budget={"maxUsdPerHour": 0.5},
                                  variants=[variant("l4", L4, "on-demand", 0.8, 0, 3),
                                            variant("a100", A100, "on-demand", 3.0, 0, 2)]))
        # The cheapest replica costs 0.80 USD/h, over the 0.50 cap: none runs, and it says so.
        limited = wait_for(lambda: (c := condition(server, "BudgetLimited")) and c["status"] == "True" and c,
                           timeout=30, what="BudgetLimited=True")
        assert "0.5" in limited["message"], limited
        warning = wait_for(lambda: reasons(server, "BudgetLimited"), timeout=30, what="a BudgetLimited Event")
        assert "cap" in warning[0], warning
        assert (replicas(server, "chat-l4"), replicas(server, "chat-a100")) == (0, 0)
        spend = status(server)["spend"]
        assert spend["budgetLimited"] and spend["projectedUsdPerHour"] <= 0.5, spend

        # A cap the cheapest replica fits: it runs, and the condition clears.
        server.patch_object(ISVC, "default", "chat", {"spec": {"budget": {"maxUsdPerHour": 5}}})
        wait_for(lambda: (condition(server, "BudgetLimited") or {}).get("status") == "False", timeout=30,
                 what="BudgetLimited=False")
        assert (replicas(server, "chat-l4"), replicas(server, "chat-a100")) == (1, 0)

        # Down to one variant: one Deployment named after the service, as without variants.
        one = server.get_object(ISVC, "default", "chat")["spec"]["variants"][:1]
        server.patch_object(ISVC, "default", "chat", {"spec": {"variants": one}})
        wait_for(lambda: [d["metadata"]["name"] for d in server.list_objects(DEPLOYMENTS, "default")] == ["chat"],
                 timeout=30, what="the variants' Deployments replaced by chat")
