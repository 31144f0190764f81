"""One replay of every policy of a `simulate` run on one trace (one seed): the hindsight
sizing of static-peak and the oracle, the peers' sweeps, Ebbtide's learned start."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field

from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.policy.decision import Memory
from ebbtide.sim import baselines, report, traces
from ebbtide.sim.calibration import calibrate_oracle, oracle_rate_limit, right_size_static
from ebbtide.sim.capacity import CapacityModel
from ebbtide.sim.ebbtide_policy import EbbtidePolicy
from ebbtide.sim.fleet import SimSettings, simulate
from ebbtide.sim.peers.tuning import Tuned, Tuning
from ebbtide.sim.policy import SimulatedPolicy
from ebbtide.sim.training import train


@dataclass
class Replay:
    policies: list[SimulatedPolicy]  # as run: static-peak and the oracle as sized, the tuned peers as set
    results: list[report.PolicyResult] = field(default_factory=list)
    series: list[report.PlotSeries] = field(default_factory=list)
    extra: dict[str, float | None] = field(default_factory=dict)
    tuned: dict[str, Tuning] = field(default_factory=dict)


def replay_policies(args: argparse.Namespace, spec: InferenceServiceSpec, trace: traces.Trace,
                    capacity: CapacityModel, settings: SimSettings, policies: list[SimulatedPolicy],
                    starting: Callable[[str], None] = lambda name: None) -> Replay:
    """Every policy replayed on `trace`; `starting(name)` is called before each (progress)."""
    replay = Replay(policies=[])
    extra = replay.extra
    ramps = report.ramp_hours(trace)
    if args.train_profile:
        # An operator that served the same traffic the week before: its demand profile,
        # per-replica limit and startup time, for every Ebbtide policy of the run (ebbtide-warm's
        # pass is then moot).
        training = train(spec, trace, settings, args.train_rotate)
        for policy in policies:
            if isinstance(policy, EbbtidePolicy):
                training.teach(policy)
        extra.update(trained_profile=True, train_rotate_s=args.train_rotate, trained_startup_s=training.startup.seconds,
                     trained_capacity_tokens_per_s=None if training.capacity is None else round(training.capacity, 1))
    learned: float | None = None
    learned_memory: Memory | None = None  # the same replay's memory (its rises and costs, see TickState.start)
    for policy in policies:
        starting(policy.name)
        if isinstance(policy, baselines.Static) and policy.name == "static-peak" and args.oracle_slo > 0:
            policy, result = right_size_static(spec, trace, settings, policy.replicas, args.oracle_slo)
            extra.update(static_replicas=policy.replicas)
        elif isinstance(policy, baselines.Oracle) and args.oracle_slo > 0:
            limit = oracle_rate_limit(spec, trace, capacity)
            policy, result, rate = calibrate_oracle(spec, trace, settings, limit, args.oracle_slo)
            extra.update(oracle_rate_per_replica=round(rate, 4), oracle_rate_limit=round(limit, 4))
        elif isinstance(policy, Tuned):
            policy, result, replay.tuned[policy.name] = policy.tune(spec, trace, settings)
        else:
            if isinstance(policy, EbbtidePolicy) and policy.name == "ebbtide-warm" and not args.train_profile:
                if learned is None:  # learn it as a new service would, in a replay not reported
                    cold = EbbtidePolicy(spec)
                    simulate(trace, cold, settings)
                    learned, learned_memory = cold.capacity, cold.memory
                policy.learned_capacity, policy.learned = learned, learned_memory
                extra.update(warm_capacity_tokens_per_s=None if learned is None else round(learned, 1))
            result = simulate(trace, policy, settings)
            if isinstance(policy, EbbtidePolicy) and policy.name == "ebbtide" and learned is None:
                learned, learned_memory = policy.capacity, policy.memory
        replay.policies.append(policy)
        replay.results.append(report.summarize(result, spec, ramps))
        if args.plot:
            replay.series.append(report.plot_series(result, trace))
        del result  # millions of latency points per week-long run
    return replay
