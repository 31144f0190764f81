"""The policies `ebbtide simulate` knows by name."""

from __future__ import annotations

from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.sim import baselines, traces
from ebbtide.sim.calibration import make_oracle, oracle_rate_limit
from ebbtide.sim.capacity import CapacityModel
from ebbtide.sim.ebbtide_policy import EbbtidePolicy, EbbtideSpotPolicy, SpotOnlyPolicy, with_lifecycle

ALL_POLICIES = ("ebbtide", "static-peak", "hpa-kv", "keda-queue", "aibrix-apa", "oracle")  # as the table names them
SHORT_NAMES = {"static": "static-peak", "hpa": "hpa-kv", "keda": "keda-queue", "aibrix": "aibrix-apa"}  # still taken
# Not in the default set: Ebbtide starting with the per-replica limit a previous replay of the
# same trace taught it (see EbbtidePolicy.learned_capacity), and Ebbtide placing replicas on spot
# capacity (EbbtideSpotPolicy), which meets the spot market below.
# The lifecycle variants (issue #5): the spec with pre-warming (warmup.predictive) and the
# sleep pool (sleep) switched off or on, whatever it says: (pre-warming, sleep).
LIFECYCLE = {"ebbtide-reactive": (False, False), "ebbtide-prewarm": (True, False),
             "ebbtide-sleep": (False, True), "ebbtide-lifecycle": (True, True)}
# static-max: every replica the spec allows, all the time. Not a contender (it pays for the
# peak all week): the lowest latency any policy bounded by replicas.max can reach, the floor a
# latency target is measured against.
EXTRA_POLICIES = ("ebbtide-warm", "ebbtide-spot", "spot-only", *LIFECYCLE, "static-max")


def build_policies(names: list[str], spec: InferenceServiceSpec, trace: traces.Trace, capacity: CapacityModel):
    """The policies by name; Ebbtide's measure their startup time on their own replicas."""
    oracle = make_oracle(spec, trace, oracle_rate_limit(spec, trace, capacity))
    lo, hi = max(1, spec.replicas.min), spec.replicas.max
    make = {
        "ebbtide": lambda: EbbtidePolicy(spec),
        "ebbtide-warm": lambda: EbbtidePolicy(spec, name="ebbtide-warm"),
        **{name: (lambda name=name, on=on: EbbtidePolicy(with_lifecycle(spec, *on), name=name))
           for name, on in LIFECYCLE.items()},
        "ebbtide-spot": lambda: EbbtideSpotPolicy(spec),
        "spot-only": lambda: SpotOnlyPolicy(spec),
        "static-peak": lambda: baselines.Static(replicas=min(hi, oracle.peak)),
        "static-max": lambda: baselines.Static(replicas=hi, name="static-max"),
        "hpa-kv": lambda: baselines.Hpa(min_replicas=lo, max_replicas=hi),
        "keda-queue": lambda: baselines.Keda(min_replicas=lo, max_replicas=hi),
        "aibrix-apa": lambda: baselines.AibrixApa(min_replicas=lo, max_replicas=hi),
        "oracle": lambda: oracle,
    }
    return [make[n]() for n in policy_names(names)]


def policy_names(names: list[str]) -> list[str]:
    """The names as the table prints them, each once; a ValueError names any unknown one."""
    unknown = [n for n in names if SHORT_NAMES.get(n, n) not in ALL_POLICIES + EXTRA_POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {', '.join(unknown)}; known: {', '.join(ALL_POLICIES + EXTRA_POLICIES)}")
    return list(dict.fromkeys(SHORT_NAMES.get(n, n) for n in names))
