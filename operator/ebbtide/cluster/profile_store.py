"""Where a service's learned demand profile lives in the cluster: a ConfigMap it owns.

Not the status: the profile is about 15 KB of JSON and changes every tick, while the status is
read by every `kubectl get`. The ConfigMap is written once per 15 minutes (a bin's length; longer
in a fleet past the periodic writes' budget: 2 h at 1,000 services), each service at its own
phase so that a fleet's saves spread over the period (control/cadence.py); the tick's samples
in between are lost on a restart: at most a period's worth, which the weekly profile's
exponential weighting turns into a few bins learned a week later. It goes with its service through the owner reference.
"""

from __future__ import annotations

import json

from ebbtide.api.ref import ServiceRef
from ebbtide.cluster.render import LABEL_SERVICE, MANAGED_BY
from ebbtide.policy.profile import Profile

KEY = "profile.json"


def configmap_name(ref: ServiceRef) -> str:
    return f"{ref.name}-demand-profile"


def render_profile(ref: ServiceRef, profile: Profile) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(ref),
            "namespace": ref.namespace,
            "labels": {LABEL_SERVICE: ref.name, **MANAGED_BY},
            "ownerReferences": [ref.owner_reference()],
        },
        "data": {KEY: json.dumps(profile.to_json(), separators=(",", ":"))},
    }


def read_profile(configmap: dict | None) -> dict | None:
    """The stored profile's JSON, or None if there is none or it is not JSON (Profile.load
    starts an empty one then)."""
    text = ((configmap or {}).get("data") or {}).get(KEY)
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None
