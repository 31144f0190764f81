"""The static fleet and the oracle sized with hindsight: the smallest fixed size, and the highest
per-replica rate, that meet the SLO."""

from __future__ import annotations

from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.sim import baselines, report, traces
from ebbtide.sim.capacity import CapacityModel
from ebbtide.sim.fleet import PolicyRun, SimSettings, simulate
from ebbtide.sim.inputs import epoch_of, per_replica_rate

ORACLE_SLO = 0.99


def oracle_rate_limit(spec: InferenceServiceSpec, trace: traces.Trace, capacity: CapacityModel) -> float:
    """The highest request rate per replica the capacity model allows for the trace's mix."""
    mean_p = float(trace.prompt_sum.sum() / max(trace.requests, 1))
    mean_o = float(max(trace.output_sum.sum() / max(trace.requests, 1), 1.0))
    return per_replica_rate(capacity, spec, mean_p, mean_o)


def make_oracle(spec: InferenceServiceSpec, trace: traces.Trace, rate_per_replica: float) -> baselines.Oracle:
    return baselines.Oracle.for_trace(trace.counts, rate_per_replica, epoch_of(trace), interval_s=15.0,
                                      min_replicas=max(1, spec.replicas.min), max_replicas=spec.replicas.max)


def right_size_static(spec: InferenceServiceSpec, trace: traces.Trace, settings: SimSettings, start: int,
                      slo: float) -> tuple[baselines.Static, PolicyRun]:
    """The smallest fixed fleet within replicas.max that meets the SLO for `slo` of the
    requests, searched from `start` (what the peak needs at the capacity model's limit): the
    best a team provisioning for the peak could do, with hindsight. At max, whatever it gets."""
    hi = spec.replicas.max

    def attempt(size: int) -> tuple[baselines.Static, PolicyRun, bool]:
        static = baselines.Static(replicas=size)
        result = simulate(trace, static, settings)
        return static, result, report.slo_attainment(result, spec) >= slo

    size = max(1, min(hi, start))
    static, result, ok = attempt(size)
    if ok:
        while size > 1:
            smaller, smaller_run, smaller_ok = attempt(size - 1)
            if not smaller_ok:
                break
            size, static, result = size - 1, smaller, smaller_run
        return static, result
    while not ok and size < hi:
        size += 1
        static, result, ok = attempt(size)
    return static, result


def calibrate_oracle(spec: InferenceServiceSpec, trace: traces.Trace, settings: SimSettings, limit: float,
                     slo: float, runs: int = 7) -> tuple[baselines.Oracle, PolicyRun, float]:
    """The oracle at the highest per-replica rate (at most `limit`) at which it still meets the
    SLO for `slo` of the requests: (oracle, its run, the rate).

    At the capacity model's limit the oracle runs every replica at saturation, which the fluid
    model allows (it sees no Poisson bursts inside a step) but request by request, with bursty
    logs and long prompts, breaks the SLO. A lower bound that misses the SLO is no bound for
    policies that meet it, so the rate is lowered (geometrically, then by bisection over
    `runs` replays in all) until the oracle meets it too.
    """
    def attempt(rate: float) -> tuple[baselines.Oracle, PolicyRun, bool]:
        oracle = make_oracle(spec, trace, rate)
        result = simulate(trace, oracle, settings)
        return oracle, result, report.slo_attainment(result, spec) >= slo

    oracle, result, ok = attempt(limit)
    if ok:
        return oracle, result, limit
    best: tuple[baselines.Oracle, PolicyRun, float] | None = None
    high, low, used = limit, None, 1
    while used < runs:
        # Step down by 30 % until a rate meets the SLO, then bisect between it and the last miss.
        rate = high * 0.7 if low is None else (low + high) / 2
        candidate, candidate_run, ok = attempt(rate)
        used += 1
        if ok:
            low, best = rate, (candidate, candidate_run, rate)
        else:
            high = rate
    if best is None:  # nothing met it within the budget: report the most cautious try
        return candidate, candidate_run, rate
    return best
