"""The policies `ebbtide simulate` knows by name."""

from __future__ import annotations

from collections.abc import Callable

from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.sim import baselines, traces
from ebbtide.sim.calibration import make_oracle, oracle_rate_limit
from ebbtide.sim.capacity import CapacityModel
from ebbtide.sim.ebbtide_policy import EbbtidePolicy, EbbtideSpotPolicy, SpotOnlyPolicy, with_lifecycle
from ebbtide.sim.inputs import epoch_of
from ebbtide.sim.peers.base import Peer, ScheduleFloors
from ebbtide.sim.peers.tuning import Tuned

ALL_POLICIES = ("ebbtide", "static-peak", "hpa-kv", "keda-queue", "aibrix-apa", "oracle")  # as the table names them
SHORT_NAMES = {"static": "static-peak", "hpa": "hpa-kv", "keda": "keda-queue", "aibrix": "aibrix-apa"}  # still taken
# Not in the default set: Ebbtide starting with the per-replica limit a previous replay of the
# same trace taught it (see EbbtidePolicy.learned_capacity), and Ebbtide placing replicas on spot
# capacity (EbbtideSpotPolicy), which meets the spot market below.
# The lifecycle variants (issue #5): the spec with pre-warming (warmup.predictive) and the
# sleep pool (sleep) switched off or on, whatever it says: (pre-warming, sleep).
LIFECYCLE = {"ebbtide-reactive": (False, False), "ebbtide-prewarm": (True, False),
             "ebbtide-sleep": (False, True), "ebbtide-lifecycle": (True, True)}
# The autoscaling peers (sim/peers/): what each one's main threshold is called in the JSON, and
# the grid a hindsight sweep walks, safest (most replicas) first; `d` is its default setting.
PEER_KNOBS: dict[str, tuple[str, Callable[[float], tuple[float, ...]]]] = {
    "hpa-kv": ("kv_cache_usage_target", lambda d: (0.05, 0.1, 0.2, 0.3, 0.5, 0.75)),
    "hpa-tokens": ("tokens_per_second_per_pod", lambda d: tuple(round(d * f, -2) for f in (0.3, 0.45, 0.6, 0.75, 0.9, 1.0))),
    "hpa-inflight": ("running_plus_waiting_per_pod", lambda d: (*(v for v in (8, 16, 32, 64, 128) if v < d), round(d))),
    "keda-queue": ("waiting_per_replica", lambda d: (1.0, 2.0, 5.0, 10.0, 20.0)),
    "aibrix-apa": ("kv_cache_usage_target", lambda d: (0.05, 0.1, 0.2, 0.3, 0.5, 0.75)),
    "wva": ("kv_cache_threshold", lambda d: (0.1, 0.2, 0.3, 0.4, 0.6, 0.8)),
    "dynamo-planner": ("itl_target_s", lambda d: (0.01, 0.015, 0.02, 0.03, 0.05, 0.1)),
}
PEERS = tuple(PEER_KNOBS)
TUNED = tuple(f"{name}-tuned" for name in PEERS)
# static-max: every replica the spec allows, all the time. Not a contender (it pays for the
# peak all week): the lowest latency any policy bounded by replicas.max can reach, the floor a
# latency target is measured against.
EXTRA_POLICIES = ("ebbtide-warm", "ebbtide-spot", "spot-only", *LIFECYCLE, "static-max",
                  *(p for p in PEERS if p not in ALL_POLICIES), *TUNED)
FLOORS_NOTE = ("the autoscaling peers hold the spec's schedule floors as Ebbtide does (minReplicas by cron window, "
               "one cold start ahead); its off-peak targets are Ebbtide's alone")


def peer_makers(spec: InferenceServiceSpec, trace: traces.Trace, capacity: CapacityModel
                ) -> dict[str, tuple[float, Callable[[float], Peer]]]:
    """Each peer's default setting and a maker for it at any setting of its main threshold.

    Token and in-flight targets default to what a load test of one replica finds at its limit
    within the ITL target, on the capacity model (sim/peers/hpa.py says why)."""
    lo, hi = max(1, spec.replicas.min), spec.replicas.max
    requests = max(trace.requests, 1)
    mean_p = float(trace.prompt_sum.sum()) / requests
    mean_o = max(float(trace.output_sum.sum()) / requests, 1.0)
    limit = oracle_rate_limit(spec, trace, capacity)
    in_flight = min(capacity.concurrency_at_rate(limit, mean_p, mean_o), capacity.max_concurrency(mean_p, mean_o))
    bounds = dict(min_replicas=lo, max_replicas=hi)

    def floors() -> ScheduleFloors | None:  # one each: it caches
        return ScheduleFloors.of(spec)

    return {
        "hpa-kv": (baselines.KV_TARGET, lambda v: baselines.Hpa(**bounds, floors=floors(), target=v)),
        "hpa-tokens": (round(limit * (mean_p + mean_o), -2),
                       lambda v: baselines.HpaTokens(**bounds, floors=floors(), target=v)),
        "hpa-inflight": (round(in_flight), lambda v: baselines.HpaInflight(**bounds, floors=floors(), target=v)),
        "keda-queue": (5.0, lambda v: baselines.Keda(**bounds, floors=floors(), threshold=v)),
        "aibrix-apa": (baselines.KV_TARGET, lambda v: baselines.AibrixApa(**bounds, floors=floors(), target=v)),
        "wva": (0.80, lambda v: baselines.Wva(**bounds, floors=floors(), kv_threshold=v)),
        "dynamo-planner": (0.05, lambda v: baselines.DynamoPlanner(
            **bounds, floors=floors(), capacity=capacity, counts=trace.counts, prompt_sum=trace.prompt_sum,
            output_sum=trace.output_sum, epoch=epoch_of(trace), itl_slo_s=v)),
    }


def build_policies(names: list[str], spec: InferenceServiceSpec, trace: traces.Trace, capacity: CapacityModel):
    """The policies by name; Ebbtide's measure their startup time on their own replicas. A
    `<peer>-tuned` is a Tuned, which sim/command.py sweeps on the replay."""
    oracle = make_oracle(spec, trace, oracle_rate_limit(spec, trace, capacity))
    hi = spec.replicas.max
    peers = peer_makers(spec, trace, capacity)
    make = {
        "ebbtide": lambda: EbbtidePolicy(spec),
        "ebbtide-warm": lambda: EbbtidePolicy(spec, name="ebbtide-warm"),
        **{name: (lambda name=name, on=on: EbbtidePolicy(with_lifecycle(spec, *on), name=name))
           for name, on in LIFECYCLE.items()},
        "ebbtide-spot": lambda: EbbtideSpotPolicy(spec),
        "spot-only": lambda: SpotOnlyPolicy(spec),
        "static-peak": lambda: baselines.Static(replicas=min(hi, oracle.peak)),
        "static-max": lambda: baselines.Static(replicas=hi, name="static-max"),
        **{name: (lambda default=default, maker=maker: maker(default)) for name, (default, maker) in peers.items()},
        **{f"{name}-tuned": (lambda name=name, default=default, maker=maker: Tuned(
            f"{name}-tuned", maker, PEER_KNOBS[name][0], PEER_KNOBS[name][1](default)))
           for name, (default, maker) in peers.items()},
        "oracle": lambda: oracle,
    }
    return [make[n]() for n in policy_names(names)]


def policy_names(names: list[str]) -> list[str]:
    """The names as the table prints them, each once; a ValueError names any unknown one."""
    # ebbtide-<variant> and ebbtide-variants are checked against the spec once it is read (sim/variant_runs.py).
    unknown = [n for n in names if SHORT_NAMES.get(n, n) not in ALL_POLICIES + EXTRA_POLICIES
               and not n.startswith("ebbtide-")]
    if unknown:
        raise ValueError(f"unknown policies {', '.join(unknown)}; known: {', '.join(ALL_POLICIES + EXTRA_POLICIES)}")
    return list(dict.fromkeys(SHORT_NAMES.get(n, n) for n in names))
