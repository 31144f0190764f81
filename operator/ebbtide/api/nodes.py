"""How replicas select and tolerate nodes: shared by spec.placement and each variant's placement."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ebbtide.api.base import ApiModel

# Presets of the node labels and taints that mark capacity types (cluster/render.py, SPOT_PRESETS).
Provider = Literal["karpenter", "eks", "gke", "aks", "custom"]


class Toleration(ApiModel):
    key: str | None = Field(default=None, description="Taint key; empty with Exists matches every taint.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: str | None = Field(default=None, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all."
    )
    toleration_seconds: int | None = Field(default=None, description="How long a NoExecute taint is tolerated.")
