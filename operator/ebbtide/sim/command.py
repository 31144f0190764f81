"""`ebbtide simulate`'s command line: options that make no sense are refused in one line before
any work (argparse types, then `settle`), then the replay of every policy and the table."""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

from ebbtide.api.manifest import InvalidSpec
from ebbtide.arguments import number, option, refuse, writable_file
from ebbtide.policy.decision import Memory
from ebbtide.sim import baselines, report, traces
from ebbtide.sim.calibration import ORACLE_SLO, calibrate_oracle, oracle_rate_limit, right_size_static
from ebbtide.sim.capacity import PRESETS, get_preset
from ebbtide.sim.catalog import (
    ALL_POLICIES,
    EXTRA_POLICIES,
    FLOORS_NOTE,
    LIFECYCLE,
    PEER_KNOBS,
    PEERS,
    SHORT_NAMES,
    build_policies,
    policy_names,
)
from ebbtide.sim.ebbtide_policy import EbbtidePolicy, EbbtideSpotPolicy
from ebbtide.sim.fleet import SimSettings, simulate
from ebbtide.sim.inputs import (
    DEFAULT_SPEC,
    DEFAULT_TRACE,
    SPOT_BURST,
    SPOT_NOTICE_S,
    SPOT_PREEMPTIONS_PER_HOUR,
    load_spec,
    load_trace,
)
from ebbtide.sim.peers.base import Peer
from ebbtide.sim.peers.tuning import SLO as TUNING_SLO
from ebbtide.sim.peers.tuning import Tuned, Tuning
from ebbtide.sim.spot_market import SpotMarket
from ebbtide.sim.training import train

PROG = "ebbtide simulate"
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


def settle(args: argparse.Namespace) -> None:
    """What argparse cannot check alone: the policy names, and options that need each other."""
    args.policies, args.spec = policies_and_spec(args.policies, args.spec)
    if args.train_rotate and not args.train_profile:
        raise ValueError("--train-rotate shifts the training replay: it needs --train-profile")


def policies_and_spec(words: list[str] | None, spec: str | None) -> tuple[list[str], str | None]:
    """--policies takes names, space- or comma-separated, up to the next option, so argparse hands
    it a spec written after them (`--policies ebbtide my.yaml`): a last word that names no policy
    but a manifest (by its suffix, or an existing file) is the spec."""
    if not words:
        return list(ALL_POLICIES), spec
    known = {*ALL_POLICIES, *EXTRA_POLICIES, *SHORT_NAMES}
    last = words[-1]
    names_a_file = last.endswith(MANIFEST_SUFFIXES) or Path(last).is_file()
    if spec is None and names_a_file and not set(last.split(",")) & known:
        spec, words = last, words[:-1]
    names = policy_names([name for word in words for name in word.split(",") if name])
    if not names:
        raise ValueError(f"--policies names no policy; known: {', '.join(ALL_POLICIES + EXTRA_POLICIES)}")
    return names, spec


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    # 100 columns when not a terminal (a log, a pipe): the table is laid out to fit them.
    console = Console(width=None if sys.stdout.isatty() else 100)
    try:
        settle(args)
        spec_name, spec = load_spec(args.spec)
        capacity = get_preset(args.preset)
        trace = load_trace(args.trace, capacity, spec, args.peak_replicas, args.scale, args.seed, args.hours)
        cold_start = float(spec.warmup.default_startup_seconds if args.cold_start is None else args.cold_start)
        policies = build_policies(args.policies, spec, trace, capacity)
    except (InvalidSpec, traces.TraceError, ValueError, OSError) as e:
        return refuse(PROG, e)
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
        spot=spot_market(args),
    )
    mode = "request by request" if trace.per_request else f"fluid, {settings.fluid_step_s:g} s steps"
    console.print(f"[bold]{spec_name}[/] on [bold]{escape(trace.name)}[/]: {trace.requests:,} requests over "
                  f"{trace.duration_s / 3600:.1f} h ({mode})")
    console.print(f"capacity model {capacity.name}, cold start {settings.cold_start_s:g} s")
    results: list[report.PolicyResult] = []
    series: list[report.PlotSeries] = []
    extra: dict[str, float | None] = {}
    ramps = report.ramp_hours(trace)
    started, cpu_started = time.perf_counter(), time.process_time()
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
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("simulating", total=len(policies))
        learned: float | None = None
        learned_memory: Memory | None = None  # the same replay's memory (its rises and costs, see TickState.start)
        tuned: dict[str, Tuning] = {}
        for policy in policies:
            bar.update(task, description=f"simulating {policy.name}")
            if isinstance(policy, baselines.Static) and policy.name == "static-peak" and args.oracle_slo > 0:
                policy, result = right_size_static(spec, trace, settings, policy.replicas, args.oracle_slo)
                extra.update(static_replicas=policy.replicas)
            elif isinstance(policy, baselines.Oracle) and args.oracle_slo > 0:
                limit = oracle_rate_limit(spec, trace, capacity)
                policy, result, rate = calibrate_oracle(spec, trace, settings, limit, args.oracle_slo)
                extra.update(oracle_rate_per_replica=round(rate, 4), oracle_rate_limit=round(limit, 4))
            elif isinstance(policy, Tuned):
                policy, result, tuned[policy.name] = policy.tune(spec, trace, settings)
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
    console.print(title, markup=False)
    for table in report.tables(results, console.width):
        console.print(table)
    console.print(report.slo_caption(spec))
    if spotted:
        extra.update(spot_enabled_by_simulator=spotted[0].spot_enabled_here)
        console.print(f"spot market: {describe_market(settings.spot)}; {report.spot_note(results)}")
    if any(isinstance(p, (Peer, Tuned)) for p in policies):
        extra.update(peer_floors=bool(spec.schedules))
        console.print(f"peers: {FLOORS_NOTE}" if spec.schedules else "peers: the spec has no schedule floors")
    for name, tuning in tuned.items():
        verdict = "the cheapest meeting" if tuning.met else "none meets; the closest to"
        console.print(f"{name}: {tuning.parameter} {tuning.value:g} ({verdict} {TUNING_SLO:.0%} of the SLO "
                      f"of {len(tuning.tried)} settings tried)")
    if extra.get("oracle_rate_per_replica") is not None and extra["oracle_rate_per_replica"] != extra["oracle_rate_limit"]:
        console.print(f"oracle: {extra['oracle_rate_per_replica']:.2f} requests/s per replica meets "
                      f"{args.oracle_slo:.0%} of the SLO (the capacity model allows {extra['oracle_rate_limit']:.2f})")
    try:  # checked before the replay; this catches what changed since (a full disk, a removed directory)
        if args.json:
            document = report.to_json(trace, spec_name, {**_settings_json(settings, args), **extra}, results)
            for policy in policies:  # each peer's main threshold, as set by default or by the sweep
                if isinstance(policy, Peer) and policy.name in PEER_KNOBS:
                    document["policies"][policy.name]["default"] = {
                        "parameter": PEER_KNOBS[policy.name][0], "value": getattr(policy, policy.knob)}
            for name, tuning in tuned.items():
                document["policies"][name]["tuned"] = tuning.to_json()
            document["timing"] = {"wall_s": round(elapsed, 2), "cpu_s": round(cpu, 2)}
            report.write_json(args.json, document)
            console.print(f"wrote {args.json}")
        if args.plot:
            report.plot(args.plot, trace, series, spec)
            console.print(f"wrote {args.plot}")
    except OSError as e:
        return refuse(PROG, f"cannot write {e.filename or 'the output'}: {e.strerror or e}")
    return 0


def spot_market(args: argparse.Namespace) -> SpotMarket:
    return SpotMarket(preemptions_per_hour=args.spot_preemptions_per_hour, burst=args.spot_burst,
                      notice_s=args.spot_notice, outages=tuple(args.spot_outage or ()))


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds from '90', '90s', '30m', '2h', '1.5d'."""
    text = text.strip().lower()
    scale = _UNITS.get(text[-1:], None)
    try:
        value = float(text[:-1] if scale else text) * (scale or 1.0)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration (a number with s, m, h or d)") from None
    if not 0 <= value < math.inf:
        raise ValueError(f"{text!r}: a duration must be finite and not negative")
    return value


def parse_outage(text: str) -> tuple[float, float]:
    """'DURATION@START' (both from the trace's start, e.g. '1h@30h') -> (start, end) seconds."""
    duration, at, start = text.partition("@")
    if not at:
        raise ValueError(f"{text!r}: expected DURATION@START, e.g. 1h@30h")
    begin = parse_duration(start)
    return begin, begin + parse_duration(duration)


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size and (seconds / size * 10) % 1 == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def describe_market(market: SpotMarket) -> str:
    outages = ", ".join(f"{_human(b - a)} from {_human(a)}" for a, b in market.outages) or "none"
    return (f"{market.preemptions_per_hour:g} reclaim events/h taking {market.burst:g} replicas on average, "
            f"notice {market.notice_s:g} s, outages: {outages}")


def _settings_json(settings: SimSettings, args: argparse.Namespace) -> dict:
    out = {k: v for k, v in asdict(settings).items() if k != "capacity"}
    out.update(capacity=settings.capacity.name, peak_replicas=args.peak_replicas, scale=args.scale,
               oracle_slo=args.oracle_slo)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", default=None, metavar="SPEC",
                        help=f"an InferenceService manifest (default: the bundled examples/{DEFAULT_SPEC})")
    parser.add_argument("--trace", default=DEFAULT_TRACE,
                        help=f"a bundled trace ({', '.join(traces.BUNDLED)}) or a CSV path (default: {DEFAULT_TRACE})")
    parser.add_argument("--policies", nargs="+", metavar="NAME",
                        help="policies to compare, as the table names them, space- or comma-separated "
                        f"(default: {', '.join(ALL_POLICIES)}; {', '.join(SHORT_NAMES)} also name the middle "
                        "four). Also: ebbtide-warm, Ebbtide with the per-replica limit a first replay taught it; "
                        "ebbtide-spot, Ebbtide on spot with on-demand fallback (the spec's placement.spot enabled "
                        "if it is not); spot-only, every replica on spot, nothing covering; "
                        f"{', '.join(LIFECYCLE)} (see lifecycle below); static-max, every replica replicas.max "
                        f"allows, all the time; the peers {', '.join(PEERS)} at their documented defaults, and "
                        f"{', '.join(p + '-tuned' for p in PEERS)}, each with its main threshold swept on this "
                        "replay and set to the cheapest setting meeting 99%% of the SLO (several replays each). "
                        f"The peers hold the spec's schedule floors, as Ebbtide does")
    parser.add_argument("--json", metavar="PATH", type=writable_file,
                        help="write the results as JSON (schema in sim/report.py)")
    parser.add_argument("--plot", metavar="PATH", type=writable_file,
                        help="write a PNG: load, replicas and TTFT over time")
    parser.add_argument("--seed", type=number(int, minimum=0), default=1,
                        help="seed for rate expansion and routing (default: 1)")
    parser.add_argument("--preset", default="llama-3.1-8b-h100", choices=sorted(PRESETS),
                        help="replica capacity model (default: llama-3.1-8b-h100)")
    parser.add_argument("--cold-start", type=number(minimum=0), default=None,
                        help="seconds from pod creation to ready (default: spec.warmup.defaultStartupSeconds)")
    parser.add_argument("--scrape-interval", type=number(above=0), default=15.0,
                        help="Prometheus scrape interval (s, default: 15)")
    parser.add_argument("--peak-replicas", type=number(int, minimum=1), default=12,
                        help="rate traces: scale the load so its peak needs this many replicas (default: 12)")
    parser.add_argument("--scale", type=number(int, minimum=1), default=1,
                        help="request logs: overlay this many time-shifted copies (default: 1)")
    parser.add_argument("--hours", type=number(above=0), default=None,
                        help="rate traces: replay only the first HOURS")
    lifecycle = parser.add_argument_group(
        "lifecycle", "pre-warming and the sleep pool (spec.warmup.predictive, spec.sleep; the policies "
        f"{', '.join(LIFECYCLE)} switch them off and on whatever the spec says)")
    lifecycle.add_argument("--train-profile", action="store_true",
                           help="start Ebbtide as an operator that served the trace's traffic the week before: "
                           "replay it once, one week earlier, to learn the demand profile (pre-warming predicts "
                           "nothing from less than a week) and the per-replica limit, then measure the replay")
    lifecycle.add_argument("--train-rotate", metavar="DURATION", type=option(parse_duration), default=0.0,
                           help="with --train-profile: shift the training week's load this much later first, "
                           "e.g. 1d (each day predicted from the day before instead of itself)")
    spot = parser.add_argument_group(
        "spot market", "what spot capacity does to policies that use it (ebbtide-spot); see docs/simulator.md")
    spot.add_argument("--spot-preemptions-per-hour", type=number(minimum=0), default=SPOT_PREEMPTIONS_PER_HOUR, metavar="R",
                      help="reclaim events per hour, a Poisson process (default: "
                      f"{SPOT_PREEMPTIONS_PER_HOUR:g}: one every 20 h, a pessimistic reading of AWS's top "
                      "interruption band for GPU instances)")
    spot.add_argument("--spot-burst", type=number(minimum=1), default=SPOT_BURST, metavar="B",
                      help="mean spot replicas one reclaim event takes, 1 + Poisson(B - 1) "
                      f"(default: {SPOT_BURST:g})")
    spot.add_argument("--spot-notice", type=number(minimum=0), default=SPOT_NOTICE_S, metavar="S",
                      help="seconds a reclaimed replica keeps serving after the reclaim is announced "
                      f"(default: {SPOT_NOTICE_S:g}, AWS's two-minute warning; GKE and AKS give 30)")
    spot.add_argument("--spot-outage", action="append", metavar="DURATION@START", type=option(parse_outage),
                      help="a period with no spot capacity to be had, from the trace's start, e.g. 1h@30h "
                      "(units s, m, h, d; repeatable; default: none)")
    parser.add_argument("--oracle-slo", type=number(minimum=0, maximum=1), default=ORACLE_SLO,
                        help="run the oracle at the highest per-replica rate, and the static fleet at the smallest "
                        "size, that meet the SLO for this share of requests (default: "
                        f"{ORACLE_SLO}; 0: both sized at the capacity model's limit)")
