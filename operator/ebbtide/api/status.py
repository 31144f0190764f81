"""The InferenceService status: what the operator decided and why, and what it costs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ebbtide.api.base import ApiModel

Phase = Literal["Pending", "Ready", "Scaling", "Idle", "Degraded"]


class Condition(ApiModel):
    type: str = Field(description="SpecValid, MetricsAvailable, ScalingLimited, SpotAvailable, ...")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="A CamelCase word for machines.")
    message: str = Field(default="", description="What it means, for people.")
    last_transition_time: str = Field(description="When the status last changed (RFC 3339).")
    observed_generation: int | None = Field(default=None, description="The spec generation it was computed for.")


class ReplicaCounts(ApiModel):
    desired: int = Field(default=0, description="Replicas the operator wants (awake).")
    ready: int = Field(default=0, description="Replicas ready to serve.")
    starting: int = Field(default=0, description="Replicas created but not ready yet.")
    asleep: int = Field(default=0, description="Replicas in vLLM sleep (the warm pool).")
    draining: int = Field(default=0, description="Awake replicas out of the Service, on their way to sleep or deletion.")
    on_demand: int = Field(default=0, description="Replicas on on-demand capacity.")
    spot: int = Field(default=0, description="Replicas on spot capacity.")


class DecisionRecord(ApiModel):
    time: str = Field(description="When it was decided (RFC 3339).")
    from_replicas: int = Field(description="Replicas before.")
    to_replicas: int = Field(description="Replicas wanted after.")
    reason: str = Field(description="The signal that drove it: QueueBacklog, KVCache, TTFT, TPOT, MinReplicas, ...")
    message: str = Field(description="The decision in words and numbers.")
    source: str = Field(description="Where the signals came from: prometheus, scrape, or none.")
    signals: dict[str, float] = Field(default_factory=dict, description="Signal values the decision used.")
    applied: bool = Field(default=True, description="False in Advisory mode: computed, reported, not acted on.")

    @property
    def summary(self) -> str:
        return f"{self.from_replicas}->{self.to_replicas} {self.reason}"


class GpuHours(ApiModel):
    on_demand: float = Field(default=0.0, description="GPU-hours on on-demand capacity.")
    spot: float = Field(default=0.0, description="GPU-hours on spot capacity.")
    asleep: float = Field(default=0.0, description="GPU-hours held by sleeping replicas (charged share).")
    reserved: float = Field(default=0.0, description="GPU-hours of reserved variants (all their replicas, "
                            "paid for whether they run or not).")


class Cost(ApiModel):
    since: str | None = Field(default=None, description="Start of the accounting (RFC 3339).")
    gpu_hours: GpuHours = Field(default_factory=GpuHours, description="GPU-hours since `since`, by capacity type.")
    usd_total: float = Field(default=0.0, description="US dollars since `since`.")
    usd_this_month: float = Field(default=0.0, description="US dollars this calendar month (UTC), as far as "
                                  "`since` goes back: what a monthly budget counts.")
    usd_per_hour: float = Field(default=0.0, description="US dollars per hour at the current fleet.")
    usd_per_million_tokens: float | None = Field(
        default=None, description="US dollars per million tokens (prompt + generated) over the recent window."
    )


class VariantStatus(ApiModel):
    name: str = Field(description="The variant (spec.variants[].name); its Deployment is NAME-<variant>.")
    accelerator: str = Field(description="Its GPU type.")
    capacity_type: str = Field(description="reserved, on-demand or spot.")
    desired: int = Field(default=0, description="Replicas the latest mix asks of it.")
    ready: int = Field(default=0, description="Its replicas ready to serve.")
    starting: int = Field(default=0, description="Its replicas on a node, not ready yet.")
    pending: int = Field(default=0, description="Its replicas on no node: its kind of node ran out, or is coming.")
    usd_per_hour: float = Field(default=0.0, description="What its replicas on a node cost per hour now.")
    usd_per_replica_hour: float = Field(default=0.0, description="pricePerGpuHour x gpusPerReplica.")


class Spend(ApiModel):
    projected_usd_per_hour: float | None = Field(
        default=None, description="What the latest mix of variants costs per hour once in place (reserved "
        "variants counted in full: they are paid for either way).")
    max_usd_per_hour: float | None = Field(default=None, description="The hourly cap (spec.budget).")
    max_usd_per_month: float | None = Field(default=None, description="The monthly cap (spec.budget), if any.")
    allowed_usd_per_hour: float | None = Field(
        default=None, description="The hourly cap in force: maxUsdPerHour, or what is left of the monthly cap "
        "(status.cost.usdThisMonth spent) over the hours left in the month, whichever is lower.")
    budget_limited: bool = Field(default=False, description="The cap binds: the mix carries less than the demand.")
    reasons: list[str] = Field(default_factory=list, description="Why this mix, in words and numbers.")


class Startup(ApiModel):
    measured_seconds: float | None = Field(
        default=None,
        description="Measured time from pod creation to ready (90th percentile of the last 20): "
        "the lead time for scheduled floors and pre-warming.",
    )
    samples: list[float] = Field(default_factory=list, description="Recent startup times, newest last.")
    count: int = Field(default=0, description="Startups measured since the service was created.")
    last_ready_at: float | None = Field(
        default=None, description="Unix time of the newest ready pod counted (each pod counts once)."
    )


class DemandProfile(ApiModel):
    timezone: str = Field(description="IANA time zone of the profile's time-of-week bins.")
    learning_since: str | None = Field(default=None, description="First demand sample learned (RFC 3339).")
    bins_learned: int = Field(default=0, description="Quarter-hours of the week (of 672) with demand learned.")
    predicting: bool = Field(
        default=False, description="A week of history is learned: pre-warming can act on predicted ramps."
    )


class InferenceServiceStatus(ApiModel):
    model_config = ApiModel.model_config | {"extra": "ignore"}

    observed_generation: int | None = Field(default=None, description="The spec generation last acted on.")
    phase: Phase = Field(default="Pending", description="Pending, Ready, Scaling, Idle or Degraded.")
    conditions: list[Condition] = Field(default_factory=list, description="What holds, and what blocks.")
    replicas: ReplicaCounts = Field(default_factory=ReplicaCounts, description="Replica counts.")
    last_decision: DecisionRecord | None = Field(default=None, description="The latest scaling decision.")
    last_decision_summary: str | None = Field(default=None, description="The latest decision, short.")
    decisions: list[DecisionRecord] = Field(
        default_factory=list, description="Recent scaling decisions that changed the size, newest last (bounded)."
    )
    cost: Cost = Field(default_factory=Cost, description="GPU-hours and dollars.")
    variants: list[VariantStatus] = Field(
        default_factory=list, description="Per accelerator variant: replicas and dollars per hour (spec.variants)."
    )
    variants_summary: str | None = Field(
        default=None, description="The variants in one line: name=ready/desired@USD per hour (kubectl get -o wide)."
    )
    spend: Spend | None = Field(
        default=None, description="The variants' mix: its projected dollars per hour, the budget, and why."
    )
    startup: Startup = Field(default_factory=Startup, description="Measured replica startup time.")
    demand_profile: DemandProfile | None = Field(
        default=None, description="What pre-warming has learned (the profile itself: ConfigMap NAME-demand-profile)."
    )
    scaler: dict[str, Any] | None = Field(
        default=None,
        description="The autoscaler's recent history (stabilization windows, rate limits), kept here "
        "so that a restarted operator does not act on empty history. Internal; do not edit.",
    )
