"""`ebbtide simulate`: what a spec would cost on a trace, and how often it would miss its SLO,
next to the autoscalers users would otherwise pick."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict

from ebbtide.api.manifest import InvalidSpec
from ebbtide.sim import baselines, report, traces
from ebbtide.sim.calibration import ORACLE_SLO, calibrate_oracle, oracle_rate_limit, right_size_static
from ebbtide.sim.capacity import PRESETS, get_preset
from ebbtide.sim.catalog import ALL_POLICIES, LIFECYCLE, build_policies
from ebbtide.sim.ebbtide_policy import EbbtidePolicy, EbbtideSpotPolicy
from ebbtide.sim.fleet import SimSettings, simulate
from ebbtide.sim.inputs import (
    DEFAULT_SPEC,
    DEFAULT_TRACE,
    SPOT_BURST,
    SPOT_NOTICE_S,
    SPOT_PREEMPTIONS_PER_HOUR,
    describe_market,
    load_spec,
    load_trace,
    parse_duration,
    spot_market,
)
from ebbtide.sim.training import train


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        spec_name, spec = load_spec(args.spec)
        capacity = get_preset(args.preset)
        trace = load_trace(args.trace, capacity, spec, args.peak_replicas, args.scale, args.seed, args.hours)
        names = args.policies or list(ALL_POLICIES)
        cold_start = float(spec.warmup.default_startup_seconds if args.cold_start is None else args.cold_start)
        policies = build_policies(names, spec, trace, capacity)
        market = spot_market(args)
        if args.train_rotate and not args.train_profile:
            raise ValueError("--train-rotate shifts the training replay: it needs --train-profile")
        rotate = parse_duration(args.train_rotate) if args.train_rotate else 0.0
    except (InvalidSpec, traces.TraceError, ValueError, OSError) as e:
        print(f"ebbtide simulate: {e}", file=sys.stderr)
        return 2
    targets = spec.scaling.targets
    settings = SimSettings(
        capacity=capacity,
        cold_start_s=cold_start,
        scrape_interval_s=args.scrape_interval,
        metrics_window_s=spec.scaling.behavior.metrics_window_seconds,
        ttft_quantile=targets.ttft.quantile if targets.ttft else None,
        tpot_quantile=targets.tpot.quantile if targets.tpot else None,
        gpus_per_replica=max(1, spec.engine.gpus),
        seed=args.seed,
        spot=market,
    )
    mode = "request by request" if trace.per_request else f"fluid, {settings.fluid_step_s:g} s steps"
    console.print(f"[bold]{spec_name}[/] on [bold]{trace.name}[/]: {trace.requests:,} requests over "
                  f"{trace.duration_s / 3600:.1f} h ({mode}); {capacity.name}, cold start {settings.cold_start_s:g} s")
    results: list[report.PolicyResult] = []
    series: list[report.PlotSeries] = []
    extra: dict[str, float | None] = {}
    ramps = report.ramp_hours(trace)
    started, cpu_started = time.perf_counter(), time.process_time()
    if args.train_profile:
        # An operator that served the same traffic the week before: its demand profile,
        # per-replica limit and startup time, for every Ebbtide policy of the run (ebbtide-warm's
        # pass is then moot).
        training = train(spec, trace, settings, rotate)
        for policy in policies:
            if isinstance(policy, EbbtidePolicy):
                training.teach(policy)
        extra.update(trained_profile=True, train_rotate_s=rotate, trained_startup_s=training.startup.seconds,
                     trained_capacity_tokens_per_s=None if training.capacity is None else round(training.capacity, 1))
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("simulating", total=len(policies))
        learned: float | None = None
        for policy in policies:
            bar.update(task, description=f"simulating {policy.name}")
            if isinstance(policy, baselines.Static) and policy.name == "static-peak" and args.oracle_slo > 0:
                policy, result = right_size_static(spec, trace, settings, policy.replicas, args.oracle_slo)
                extra.update(static_replicas=policy.replicas)
            elif isinstance(policy, baselines.Oracle) and args.oracle_slo > 0:
                limit = oracle_rate_limit(spec, trace, capacity)
                policy, result, rate = calibrate_oracle(spec, trace, settings, limit, args.oracle_slo)
                extra.update(oracle_rate_per_replica=round(rate, 4), oracle_rate_limit=round(limit, 4))
            else:
                if isinstance(policy, EbbtidePolicy) and policy.name == "ebbtide-warm" and not args.train_profile:
                    if learned is None:  # learn it as a new service would, in a replay not reported
                        cold = EbbtidePolicy(spec)
                        simulate(trace, cold, settings)
                        learned = cold.capacity
                    policy.learned_capacity = learned
                    extra.update(warm_capacity_tokens_per_s=None if learned is None else round(learned, 1))
                result = simulate(trace, policy, settings)
                if isinstance(policy, EbbtidePolicy) and policy.name == "ebbtide" and learned is None:
                    learned = policy.capacity
            results.append(report.summarize(result, spec, ramps))
            if args.plot:
                series.append(report.plot_series(result, trace))
            del result  # millions of latency points per week-long run
            bar.advance(task)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    spotted = [p for p in policies if isinstance(p, EbbtideSpotPolicy)]
    title = f"{trace.name} - {spec_name} ({elapsed:.1f} s, CPU {cpu:.1f} s)"
    if spotted and spotted[0].spot_enabled_here:
        title += "; ebbtide-spot: the spec with placement.spot enabled"
    console.print(report.table(results, title))
    if spotted:
        extra.update(spot_enabled_by_simulator=spotted[0].spot_enabled_here)
        console.print(f"spot market: {describe_market(market)}; {report.spot_note(results)}")
    if extra.get("oracle_rate_per_replica") is not None and extra["oracle_rate_per_replica"] != extra["oracle_rate_limit"]:
        console.print(f"oracle: {extra['oracle_rate_per_replica']:.2f} requests/s per replica meets "
                      f"{args.oracle_slo:.0%} of the SLO (the capacity model allows {extra['oracle_rate_limit']:.2f})")
    if args.json:
        document = report.to_json(trace, spec_name, {**_settings_json(settings, args), **extra}, results)
        document["timing"] = {"wall_s": round(elapsed, 2), "cpu_s": round(cpu, 2)}
        report.write_json(args.json, document)
        console.print(f"wrote {args.json}")
    if args.plot:
        report.plot(args.plot, trace, series, spec)
        console.print(f"wrote {args.plot}")
    return 0


def _settings_json(settings: SimSettings, args: argparse.Namespace) -> dict:
    out = {k: v for k, v in asdict(settings).items() if k != "capacity"}
    out.update(capacity=settings.capacity.name, peak_replicas=args.peak_replicas, scale=args.scale,
               oracle_slo=args.oracle_slo)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", default=None,
                        help=f"an InferenceService manifest (default: the bundled examples/{DEFAULT_SPEC})")
    parser.add_argument("--trace", default=DEFAULT_TRACE,
                        help=f"a bundled trace ({', '.join(traces.BUNDLED)}) or a CSV path (default: {DEFAULT_TRACE})")
    parser.add_argument("--policies", nargs="+", metavar="NAME",
                        help=f"policies to compare (default: {' '.join(ALL_POLICIES)}; also: "
                        "ebbtide-warm, Ebbtide with the per-replica limit a first replay taught it; "
                        "ebbtide-spot, Ebbtide on spot with on-demand fallback, the spec's placement.spot "
                        "enabled if it is not)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON (schema in sim/report.py)")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG: load, replicas and TTFT over time")
    parser.add_argument("--seed", type=int, default=1, help="seed for rate expansion and routing (default: 1)")
    parser.add_argument("--preset", default="llama-3.1-8b-h100", choices=sorted(PRESETS),
                        help="replica capacity model (default: llama-3.1-8b-h100)")
    parser.add_argument("--cold-start", type=float, default=None,
                        help="seconds from pod creation to ready (default: spec.warmup.defaultStartupSeconds)")
    parser.add_argument("--scrape-interval", type=float, default=15.0, help="Prometheus scrape interval (s)")
    parser.add_argument("--peak-replicas", type=int, default=12,
                        help="rate traces: scale the load so its peak needs this many replicas (default: 12)")
    parser.add_argument("--scale", type=int, default=1,
                        help="request logs: overlay this many time-shifted copies (default: 1)")
    parser.add_argument("--hours", type=float, default=None, help="rate traces: replay only the first HOURS")
    lifecycle = parser.add_argument_group(
        "lifecycle", "pre-warming and the sleep pool (spec.warmup.predictive, spec.sleep; the policies "
        f"{', '.join(LIFECYCLE)} switch them off and on whatever the spec says)")
    lifecycle.add_argument("--train-profile", action="store_true",
                           help="start Ebbtide as an operator that served the trace's traffic the week before: "
                           "replay it once, one week earlier, to learn the demand profile (pre-warming predicts "
                           "nothing from less than a week) and the per-replica limit, then measure the replay")
    lifecycle.add_argument("--train-rotate", metavar="DURATION", default=None,
                           help="with --train-profile: shift the training week's load this much later first, "
                           "e.g. 1d (each day predicted from the day before instead of itself)")
    spot = parser.add_argument_group(
        "spot market", "what spot capacity does to policies that use it (ebbtide-spot); see docs/simulator.md")
    spot.add_argument("--spot-preemptions-per-hour", type=float, default=SPOT_PREEMPTIONS_PER_HOUR, metavar="R",
                      help="reclaim events per hour, a Poisson process (default: "
                      f"{SPOT_PREEMPTIONS_PER_HOUR:g}: one every 20 h, a pessimistic reading of AWS's top "
                      "interruption band for GPU instances)")
    spot.add_argument("--spot-burst", type=float, default=SPOT_BURST, metavar="B",
                      help="mean spot replicas one reclaim event takes, 1 + Poisson(B - 1) "
                      f"(default: {SPOT_BURST:g})")
    spot.add_argument("--spot-notice", type=float, default=SPOT_NOTICE_S, metavar="S",
                      help="seconds a reclaimed replica keeps serving after the reclaim is announced "
                      f"(default: {SPOT_NOTICE_S:g}, AWS's two-minute warning; GKE and AKS give 30)")
    spot.add_argument("--spot-outage", action="append", metavar="DURATION@START",
                      help="a period with no spot capacity to be had, from the trace's start, e.g. 1h@30h "
                      "(units s, m, h, d; repeatable; default: none)")
    parser.add_argument("--oracle-slo", type=float, default=ORACLE_SLO,
                        help="run the oracle at the highest per-replica rate, and the static fleet at the smallest "
                        "size, that meet the SLO for this share of requests (default: "
                        f"{ORACLE_SLO}; 0: both sized at the capacity model's limit)")
