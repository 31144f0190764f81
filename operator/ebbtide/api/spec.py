"""The InferenceService spec: what a user asks for.

Every field has a description: the CRD is generated from these models, so the descriptions
are what `kubectl explain inferenceservice.spec...` shows. Cross-field rules are written
twice on purpose, in the same words: as CEL (`x-kubernetes-validations`, enforced by the API
server) and as pydantic validators (enforced by `ebbtide render` and by the operator, which
also guards clusters whose API server does not evaluate CEL).
"""

from __future__ import annotations

import zoneinfo
from typing import Literal

from croniter import croniter
from pydantic import Field, field_validator, model_validator

from ebbtide.api.base import ApiModel, cel
from ebbtide.api.engine import EngineSpec, Quantity
from ebbtide.api.nodes import Provider, Toleration
from ebbtide.api.variants import MAX_VARIANTS, UNIQUE_NAMES, Budget, Variant, unique_names


class ModelSpec(ApiModel):
    name: str = Field(
        min_length=1,
        description="The model to serve, as `vllm serve` takes it: a Hugging Face id or a local path.",
    )
    served_name: str | None = Field(
        default=None,
        description="The name clients use in requests (`--served-model-name`); defaults to `name`.",
    )


class Replicas(ApiModel):
    model_config = ApiModel.model_config | {
        "json_schema_extra": cel(("self.min <= self.max", "replicas.min must not be greater than replicas.max"))
    }
    min: int = Field(default=1, ge=0, le=1000, description="Fewest replicas kept (awake or asleep).")
    max: int = Field(default=4, ge=1, le=1000, description="Most replicas ever run.")
    allow_scale_to_zero: bool = Field(
        default=False,
        description="With min 0, let the last replica be deleted instead of kept asleep. "
        "A request then waits a full cold start; see scaling.activation.",
    )

    @model_validator(mode="after")
    def min_not_above_max(self) -> Replicas:
        if self.min > self.max:
            raise ValueError(f"replicas.min ({self.min}) must not be greater than replicas.max ({self.max})")
        return self


class LatencySlo(ApiModel):
    quantile: float = Field(default=0.9, gt=0, lt=1, description="The quantile the target applies to.")
    target_seconds: float = Field(gt=0, le=600, description="The latency that quantile must stay under.")


class ScalingTargets(ApiModel):
    waiting_per_replica: float | None = Field(
        default=2.0,
        ge=0,
        description="Queued (not yet scheduled) requests per ready replica. vLLM only queues when "
        "its batch or KV cache is full, so a sustained queue means the replicas are saturated.",
    )
    running_per_replica: float | None = Field(
        default=None, gt=0, description="Optional concurrency target: requests in the running batch per replica."
    )
    kv_cache_usage: float | None = Field(
        default=0.75,
        gt=0,
        le=1,
        description="Mean KV-cache usage (0 to 1) per replica. Above it vLLM starts preempting.",
    )
    ttft: LatencySlo | None = Field(
        default_factory=lambda: LatencySlo(quantile=0.9, target_seconds=1.0),
        description="Time-to-first-token SLO (queueing included), as a quantile over the metrics window.",
    )
    tpot: LatencySlo | None = Field(
        default_factory=lambda: LatencySlo(quantile=0.9, target_seconds=0.1),
        description="Time-per-output-token (inter-token latency) SLO, as a quantile over the metrics window.",
    )
    throughput: float = Field(
        default=0.8,  # why 0.8: policy/signal_rules.py, THROUGHPUT_TARGET
        gt=0,
        le=1,
        description="Share of a replica's learned token-throughput limit each replica runs at while the load "
        "rises or its rises are not measured yet (the most cautious share). Higher packs load onto fewer "
        "replicas; lower leaves room for bursts.",
    )
    throughput_max: float = Field(
        default=0.95,  # why: policy/headroom.py
        gt=0,
        le=1,
        description="The most of that limit each replica runs at when the load is steady. Between throughput "
        "and this, the share is set from the load's own rises over a startup time (their recent spread, and "
        "a ramp under way). At or below throughput, the share is throughput, fixed.",
    )


class ScaleUpBehavior(ApiModel):
    stabilization_seconds: int = Field(
        default=0, ge=0, le=3600, description="Lowest recommendation over this window wins when scaling up."
    )
    max_increase_percent: int = Field(
        default=100, ge=1, le=1000, description="Most replicas added per period, as a percent of the current count."
    )
    max_increase_replicas: int = Field(
        default=4, ge=1, le=1000, description="Most replicas added per period, as a count (the larger limit wins)."
    )
    period_seconds: int = Field(default=15, ge=1, le=3600, description="The period the increase limits apply to.")


class ScaleDownBehavior(ApiModel):
    stabilization_seconds: int = Field(
        default=300, ge=0, le=7200, description="Highest recommendation over this window wins when scaling down."
    )
    max_decrease_percent: int = Field(
        default=50, ge=1, le=100, description="Most replicas removed per period, as a percent of the current count."
    )
    max_decrease_replicas: int = Field(
        default=1, ge=1, le=1000, description="Most replicas removed per period, as a count (the larger limit wins)."
    )
    period_seconds: int = Field(default=60, ge=1, le=3600, description="The period the decrease limits apply to.")
    drain_seconds: int = Field(
        default=300, ge=0, le=3600,
        description="A replica Ebbtide removes leaves the Service first and goes once its requests in flight "
        "are done, or after this long; 0 removes it at once.",
    )


class Activation(ApiModel):
    query: str = Field(
        min_length=1,
        description="PromQL over something that exists while no replica does (a gateway or router), "
        "for example the requests `ebbtide activator` holds: "
        '`sum(ebbtide_activator_pending_requests{service="chat",service_namespace="models"})`.',
    )
    threshold: float = Field(default=0.0, ge=0, description="The service wakes when the query exceeds this.")


class ScalingBehavior(ApiModel):
    interval_seconds: int = Field(
        default=15, ge=1, le=600, description="How often the service is evaluated (one tick)."
    )
    metrics_window_seconds: int = Field(
        default=60, ge=10, le=3600, description="Window for rates and latency quantiles."
    )
    stale_after_seconds: int = Field(
        default=60, ge=5, le=3600, description="A sample older than this counts as missing: the size is held."
    )
    tolerance: float = Field(
        default=0.1, ge=0, lt=1, description="Ratios within 1 ± tolerance of the target cause no change."
    )
    scale_up: ScaleUpBehavior = Field(default_factory=ScaleUpBehavior, description="How fast to add replicas.")
    scale_down: ScaleDownBehavior = Field(
        default_factory=ScaleDownBehavior, description="How slowly to remove replicas."
    )


class Scaling(ApiModel):
    targets: ScalingTargets = Field(default_factory=ScalingTargets, description="What each replica should carry.")
    behavior: ScalingBehavior = Field(default_factory=ScalingBehavior, description="Timing and rate limits.")
    activation: Activation | None = Field(
        default=None, description="A signal that wakes a service scaled to zero (or fully asleep)."
    )


class TargetOverrides(ApiModel):
    waiting_per_replica: float | None = Field(default=None, ge=0, description="Overrides scaling.targets.waitingPerReplica.")
    kv_cache_usage: float | None = Field(default=None, gt=0, le=1, description="Overrides scaling.targets.kvCacheUsage.")
    running_per_replica: float | None = Field(default=None, gt=0, description="Overrides scaling.targets.runningPerReplica.")
    throughput: float | None = Field(default=None, gt=0, le=1, description="Overrides scaling.targets.throughput.")


def known_timezone(timezone: str) -> str:
    try:
        zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):  # OSError: "America" is a directory
        raise ValueError(f"{timezone!r} is not an IANA time zone") from None
    return timezone


class ScheduleWindow(ApiModel):
    name: str = Field(min_length=1, max_length=63, description="A name for Events and status.")
    cron: str = Field(min_length=1, description="When the window opens, in cron syntax (5 fields).")
    duration_minutes: int = Field(ge=1, le=10080, description="How long the window stays open.")
    timezone: str = Field(default="UTC", description="IANA time zone the cron expression is read in.")
    min_replicas: int | None = Field(default=None, ge=0, description="Floor while the window is open.")
    max_replicas: int | None = Field(default=None, ge=1, description="Ceiling while the window is open.")
    targets: TargetOverrides | None = Field(default=None, description="Targets used while the window is open.")
    off_peak: bool = Field(
        default=False,
        description="Consolidate while open: higher utilization, prefer spot, prefer sleep over idle replicas.",
    )

    @field_validator("cron")
    @classmethod
    def valid_cron(cls, cron: str) -> str:
        if len(cron.split()) != 5 or not croniter.is_valid(cron):
            raise ValueError(f"{cron!r} is not a 5-field cron expression")
        return cron

    known_timezone = field_validator("timezone")(lambda cls, timezone: known_timezone(timezone))


class Predictive(ApiModel):
    enabled: bool = Field(default=True, description="Scale ahead of the ramp the learned profile predicts.")
    lookback_weeks: int = Field(default=2, ge=1, le=8, description="Weeks of history the profile remembers.")
    headroom: float = Field(default=1.1, ge=1, le=3, description="Predicted demand is multiplied by this.")
    timezone: str = Field(
        default="UTC",
        description="IANA time zone of the profile's days: a ramp at 08:00 local time stays at 08:00 across "
        "daylight-saving changes.",
    )

    known_timezone = field_validator("timezone")(lambda cls, timezone: known_timezone(timezone))


class Warmup(ApiModel):
    predictive: Predictive = Field(default_factory=Predictive, description="Pre-warming from the learned profile.")
    default_startup_seconds: int = Field(
        default=180,
        ge=1,
        le=7200,
        description="Startup time assumed until one has been measured (pod created to ready and warmed).",
    )
    requests: int = Field(
        default=3, ge=0, le=100, description="Warm-up requests a new replica serves before it takes traffic."
    )


class SleepPolicy(ApiModel):
    enabled: bool = Field(default=False, description="Put idle replicas to vLLM sleep instead of deleting them.")
    level: Literal[1, 2] = Field(
        default=1, description="1: weights to CPU RAM (wakes in seconds); 2: weights dropped (wakes slower)."
    )
    idle_seconds: int = Field(default=120, ge=0, le=86400, description="Idle time before a surplus replica sleeps.")
    max_pool: int = Field(default=2, ge=0, le=100, description="Most replicas kept asleep.")
    ttl_seconds: int = Field(default=1800, ge=0, le=604800, description="A sleeping replica is deleted after this.")
    host_memory: Quantity = Field(
        default="32Gi", description="Host memory each replica needs for the offloaded weights (level 1)."
    )
    reclaimed_fraction: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Share of a sleeping replica's GPU time used by other work and so not charged to this service.",
    )


class SpotPlacement(ApiModel):
    enabled: bool = Field(default=False, description="Run replicas beyond the on-demand base on spot capacity.")
    on_demand_base: int = Field(default=1, ge=0, le=1000, description="Replicas that always run on demand.")
    max_spot_fraction: float = Field(default=1.0, ge=0, le=1, description="Cap on the spot share of replicas.")
    overprovision: int = Field(
        default=0, ge=0, le=100, description="Extra spot replicas kept to absorb preemptions."
    )
    pending_timeout_seconds: int = Field(
        default=120,
        ge=0,
        le=3600,
        description="A spot pod Pending longer than this counts as unavailable and on-demand covers it.",
    )
    provider: Provider = Field(
        default="karpenter", description="Preset of spot node labels and taints."
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Extra node labels for spot pods.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Extra tolerations for spot pods.")


class Placement(ApiModel):
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels every replica needs.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Tolerations of every replica.")
    spot: SpotPlacement = Field(default_factory=SpotPlacement, description="Spot capacity with on-demand fallback.")


class Pricing(ApiModel):
    on_demand_per_gpu_hour: float = Field(default=4.0, ge=0, description="US dollars per on-demand GPU-hour.")
    spot_per_gpu_hour: float = Field(default=1.6, ge=0, description="US dollars per spot GPU-hour.")


class InferenceServiceSpec(ApiModel):
    model_config = ApiModel.model_config | {
        "json_schema_extra": cel(
            (
                "!self.placement.spot.enabled || self.placement.spot.onDemandBase <= self.replicas.max",
                "placement.spot.onDemandBase must not be greater than replicas.max",
            ),
            (
                "!has(self.schedules) || self.schedules.all(w, !has(w.minReplicas) || w.minReplicas <= self.replicas.max)",
                "a schedule's minReplicas must not be greater than replicas.max",
            ),
            UNIQUE_NAMES,
        )
    }
    mode: Literal["Active", "Advisory"] = Field(
        default="Active", description="Active scales the Deployment; Advisory only reports what it would do."
    )
    model: ModelSpec = Field(description="The model to serve.")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="The vLLM engine each replica runs.")
    replicas: Replicas = Field(default_factory=Replicas, description="Replica bounds.")
    scaling: Scaling = Field(default_factory=Scaling, description="Autoscaling targets and behaviour.")
    schedules: list[ScheduleWindow] = Field(
        default_factory=list,
        max_length=32,  # bounds the cost of the CEL rule that walks the list
        description="Time windows that change floors, ceilings and targets."
    )
    warmup: Warmup = Field(default_factory=Warmup, description="Starting replicas ahead of demand.")
    sleep: SleepPolicy = Field(default_factory=SleepPolicy, description="vLLM sleep mode as a warm pool.")
    placement: Placement = Field(default_factory=Placement, description="Where replicas run: nodes, spot.")
    pricing: Pricing = Field(default_factory=Pricing, description="GPU prices, for cost reporting.")
    variants: list[Variant] = Field(
        default_factory=list,
        max_length=MAX_VARIANTS,
        description="Accelerator variants of the model (GPU type, capacity type, price), one Deployment each; "
        "each tick picks the cheapest mix that carries the demand, reserved capacity first. "
        "None or one: a single Deployment as without variants.",
    )
    budget: Budget | None = Field(
        default=None,
        description="A hard cap on the GPU spend: cheaper variants first, then fewer replicas (BudgetLimited).",
    )

    @model_validator(mode="after")
    def consistent(self) -> InferenceServiceSpec:
        if self.placement.spot.enabled and self.placement.spot.on_demand_base > self.replicas.max:
            raise ValueError(
                f"placement.spot.onDemandBase ({self.placement.spot.on_demand_base}) must not be greater "
                f"than replicas.max ({self.replicas.max})"
            )
        unique_names(self.variants)
        names = [w.name for w in self.schedules]
        if len(names) != len(set(names)):
            raise ValueError("schedules must have unique names")
        for window in self.schedules:
            if window.min_replicas is not None and window.min_replicas > self.replicas.max:
                raise ValueError(
                    f"schedule {window.name!r}: minReplicas ({window.min_replicas}) is greater than "
                    f"replicas.max ({self.replicas.max})"
                )
        return self

    @property
    def served_model_name(self) -> str:
        return self.model.served_name or self.model.name

    @property
    def has_variants(self) -> bool:
        """More than one variant: the tick chooses a mix (policy/variants.py)."""
        return len(self.variants) > 1
