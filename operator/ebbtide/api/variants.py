"""Accelerator variants of one model, and a dollar budget (issue 19).

A variant is the same model on another kind of GPU or another kind of capacity: its own node
placement, GPUs per replica, engine arguments, price and capacity type (reserved, on-demand,
spot). Each variant runs as its own Deployment; the tick chooses how many replicas each gets
(policy/variants.py). A spec without variants, or with one, behaves as before.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ebbtide.api.base import ApiModel, cel
from ebbtide.api.engine import managed_args_clash
from ebbtide.api.nodes import Provider, Toleration

# A DNS label, short enough that `<service>-<variant>` still names a Deployment and its pods.
VARIANT_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
MAX_VARIANTS = 8  # bounds the cost of the CEL rule that checks names are unique


class VariantPlacement(ApiModel):
    provider: Provider = Field(
        default="custom",
        description="Preset of capacity-type node labels and taints (as placement.spot.provider): a spot "
        "variant goes to the provider's spot nodes, the others to its on-demand ones. The default, custom, "
        "adds none: a cluster without those labels still schedules the variant on its nodeSelector alone.",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels this variant's replicas need (for example the GPU type)."
    )
    affinity: dict[str, Any] = Field(
        default_factory=dict, description="A pod affinity object, as in a pod spec, for this variant's replicas."
    )
    tolerations: list[Toleration] = Field(default_factory=list, description="Tolerations of this variant's replicas.")


class VariantReplicas(ApiModel):
    model_config = ApiModel.model_config | {
        "json_schema_extra": cel(("self.min <= self.max", "a variant's replicas.min must not be greater than its replicas.max"))
    }
    min: int = Field(default=0, ge=0, le=1000, description="Fewest replicas of this variant.")
    max: int = Field(default=4, ge=0, le=1000, description="Most replicas of this variant.")

    @model_validator(mode="after")
    def min_not_above_max(self) -> VariantReplicas:
        if self.min > self.max:
            raise ValueError(
                f"a variant's replicas.min ({self.min}) must not be greater than its replicas.max ({self.max})"
            )
        return self


class Variant(ApiModel):
    model_config = ApiModel.model_config | {
        "json_schema_extra": cel((
            "self.tensorParallelSize <= self.gpusPerReplica",
            "a variant's tensorParallelSize must not be greater than its gpusPerReplica",
        ))
    }
    name: str = Field(
        min_length=1, max_length=24, pattern=VARIANT_NAME,
        description="A DNS label; the variant's Deployment is named `<service>-<name>`.",
    )
    accelerator: str = Field(
        min_length=1, max_length=63,
        description='The GPU type, for display and the capacity seed ("H100", "A100-80G", "L40S", "L4"); '
        "the capacity is then learned from the variant's own replicas.",
    )
    placement: VariantPlacement = Field(default_factory=VariantPlacement, description="Where this variant runs.")
    gpus_per_replica: int = Field(default=1, ge=1, le=16, description="GPUs each replica of this variant holds.")
    tensor_parallel_size: int = Field(default=1, ge=1, le=16, description="vLLM's --tensor-parallel-size.")
    engine_args: list[str] = Field(
        default_factory=list,
        description="Arguments for `vllm serve` after engine.args; one that names the same flag replaces it.",
    )
    price_per_gpu_hour: float = Field(
        ge=0, description="US dollars per GPU-hour of this variant (for reserved capacity, what it is billed at)."
    )
    capacity_type: Literal["reserved", "on-demand", "spot"] = Field(
        default="on-demand",
        description="reserved: paid whether used or not, so filled first; on-demand; spot: priced with its "
        "expected reclaim and retry cost, with the spot fallback of placement.spot.",
    )
    replicas: VariantReplicas = Field(default_factory=VariantReplicas, description="Replica bounds of this variant.")

    @field_validator("engine_args")
    @classmethod
    def no_managed_args(cls, args: list[str]) -> list[str]:
        if clash := managed_args_clash(args, "a variant's engineArgs"):
            raise ValueError(clash)
        return args

    @model_validator(mode="after")
    def tensor_parallel_fits(self) -> Variant:
        if self.tensor_parallel_size > self.gpus_per_replica:
            raise ValueError(
                f"variant {self.name!r}: tensorParallelSize ({self.tensor_parallel_size}) must not be greater "
                f"than gpusPerReplica ({self.gpus_per_replica})"
            )
        return self

    @property
    def usd_per_replica_hour(self) -> float:
        return self.price_per_gpu_hour * self.gpus_per_replica


class Budget(ApiModel):
    max_usd_per_hour: float = Field(
        gt=0, description="Hard cap on what the service's GPUs cost per hour, at the variants' prices."
    )
    max_usd_per_month: float | None = Field(
        default=None, gt=0,
        description="Optional cap per calendar month (UTC); what is left of it is spread over the hours left.",
    )


UNIQUE_NAMES = (
    "!has(self.variants) || self.variants.all(v, self.variants.exists_one(w, w.name == v.name))",
    "variant names must be unique",
)


def unique_names(variants: list[Variant]) -> None:
    names = [v.name for v in variants]
    if len(names) != len(set(names)):
        raise ValueError(UNIQUE_NAMES[1])
