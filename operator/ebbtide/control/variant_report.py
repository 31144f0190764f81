"""What status says of a service with accelerator variants: per variant, its replicas and
dollars per hour, in full (status.variants) and in one line (status.variantsSummary, the
Variants column of `kubectl get -o wide`); the mix's projected spend, the cap, and why
(status.spend). The mix's Events and the BudgetLimited condition come with the tick's Turn
(policy/variant_tick.py).

A variant's dollars per hour are counted as the tick counts the service's (variant_rate): a
reserved variant all its replicas (paid for whether they run or not), any other its pods on a
node, at pricePerGpuHour x gpusPerReplica; so the rows add up to status.cost.usdPerHour, and the
cost ledger (status.cost totals) charges each interval at the same rate.
"""

from __future__ import annotations

from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.api.variants import Variant
from ebbtide.cluster.pods import PodRecord
from ebbtide.policy.variant_tick import billed_replicas
from ebbtide.policy.variants import MixPlan


def _row(variant: Variant, desired: int, pods: list[PodRecord]) -> dict:
    billed = billed_replicas(variant, sum(p.node is not None for p in pods))
    return {"name": variant.name, "accelerator": variant.accelerator, "capacityType": variant.capacity_type,
            "desired": desired, "ready": sum(p.state == "awake" and p.serving for p in pods),
            "starting": sum(p.state == "starting" and p.node is not None for p in pods),
            "pending": sum(p.state == "starting" and p.node is None for p in pods),
            "usdPerHour": round(billed * variant.usd_per_replica_hour, 4),
            "usdPerReplicaHour": round(variant.usd_per_replica_hour, 4)}


def variant_rows(spec: InferenceServiceSpec, plan: MixPlan | None, pods: list[PodRecord]) -> list[dict]:
    """status.variants: [] for a service without (several) variants."""
    if not spec.has_variants:
        return []
    targets = plan.targets if plan is not None else {}
    return [_row(v, targets.get(v.name, 0), [p for p in pods if p.variant == v.name]) for v in spec.variants]


def summary(rows: list[dict]) -> str | None:
    """One line without spaces (a column of `kubectl get`): name=ready/desired@USD per hour."""
    return ",".join(f"{r['name']}={r['ready']}/{r['desired']}@{r['usdPerHour']:g}" for r in rows) or None


def spend(spec: InferenceServiceSpec, plan: MixPlan | None) -> dict | None:
    """status.spend: the mix's projected dollars per hour, the cap, and the mix's reasons."""
    if plan is None:
        return None
    return {"projectedUsdPerHour": round(plan.usd_per_hour, 4),
            "maxUsdPerHour": spec.budget.max_usd_per_hour if spec.budget is not None else None,
            "maxUsdPerMonth": spec.budget.max_usd_per_month if spec.budget is not None else None,
            "allowedUsdPerHour": None if plan.budget_usd_per_hour is None else round(plan.budget_usd_per_hour, 4),
            "budgetLimited": plan.budget_limited, "reasons": list(plan.reasons)}
