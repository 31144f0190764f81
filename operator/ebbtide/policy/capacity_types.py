"""The capacity types a service's replicas run on: one Deployment each (cluster/render.py), one
warm pool each (policy/warm_pool.py), one price each (policy/cost.py)."""

from __future__ import annotations

ON_DEMAND = "on-demand"
SPOT = "spot"
CAPACITY_TYPES = (ON_DEMAND, SPOT)
