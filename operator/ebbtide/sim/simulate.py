"""`ebbtide simulate`: what a spec would cost on a trace, and how often it would miss its SLO,
next to the autoscalers users would otherwise pick."""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from dataclasses import asdict, dataclass, replace
from importlib import resources

from ebbtide.api.manifest import InvalidSpec, load_manifests
from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.policy.observation import FleetState, Signals
from ebbtide.sim import baselines, report, traces
from ebbtide.sim.capacity import PRESETS, CapacityModel, get_preset
from ebbtide.sim.fleet import PolicyRun, SimSettings, simulate

DEFAULT_SPEC = "chat-llama-8b.yaml"
DEFAULT_TRACE = "conv-week"
ALL_POLICIES = ("ebbtide", "static", "hpa", "keda", "aibrix", "oracle")


@dataclass
class EbbtidePolicy:
    """The operator's own decision core, called exactly as the operator calls it."""

    spec: InferenceServiceSpec
    name: str = "ebbtide"

    def __post_init__(self) -> None:
        from ebbtide.policy.autoscaling import decide
        from ebbtide.policy.decision import Memory

        self._decide = decide
        self._memory: Memory | None = None
        self.interval_s = float(self.spec.scaling.behavior.interval_seconds)

    def decide(self, signals: Signals, fleet: FleetState, now: float) -> int:
        from ebbtide.policy.decision import Memory

        if self._memory is None:
            self._memory = Memory.empty(now)
        decision = self._decide(self.spec, signals, fleet, self._memory, now)
        self._memory = decision.memory
        return decision.desired


def load_spec(path: str | None) -> tuple[str, InferenceServiceSpec]:
    if path is None:
        path = str(resources.files("ebbtide") / "examples" / DEFAULT_SPEC)
    services = list(load_manifests(path))
    if not services:
        raise InvalidSpec(f"{path}: no InferenceService in this file")
    ref, spec = services[0]
    return ref.name, spec


def load_trace(name: str, capacity: CapacityModel, spec: InferenceServiceSpec, peak_replicas: int,
               scale: int, seed: int, hours: float | None) -> traces.Trace:
    if traces.is_rate_file(name):
        sizes = traces.read_request_log(traces.SIZES_FOR[traces.kind_of(name)])
        mean_p = float(sizes.prompt_tokens.mean())
        mean_o = float(sizes.output_tokens.mean())
        peak_rps = peak_replicas * per_replica_rate(capacity, spec, mean_p, mean_o)
        trace = traces.expand_rate_file(traces.read_rate_file(name), sizes, peak_rps, seed, name, hours)
        # Keep the size sample for the fluid model's TTFT distribution.
        return replace(trace, prompt_tokens=sizes.prompt_tokens)
    trace = traces.read_request_log(name, name=name)
    if scale > 1:
        trace = traces.superpose(trace, scale, seed)
    return trace


def per_replica_rate(capacity: CapacityModel, spec: InferenceServiceSpec, mean_p: float, mean_o: float) -> float:
    """Requests per second one replica serves within the ITL target, with no queue."""
    itl = spec.scaling.targets.tpot.target_seconds if spec.scaling.targets.tpot else None
    return capacity.max_request_rate(mean_p, mean_o, itl)


def build_policies(names: list[str], spec: InferenceServiceSpec, trace: traces.Trace, capacity: CapacityModel):
    mean_p = float(trace.prompt_sum.sum() / max(trace.requests, 1))
    mean_o = float(max(trace.output_sum.sum() / max(trace.requests, 1), 1.0))
    epoch = epoch_of(trace)
    oracle = baselines.Oracle.for_trace(trace.counts, per_replica_rate(capacity, spec, mean_p, mean_o), epoch,
                                        interval_s=15.0, min_replicas=max(1, spec.replicas.min))
    lo, hi = max(1, spec.replicas.min), spec.replicas.max
    make = {
        "ebbtide": lambda: EbbtidePolicy(spec),
        "static": lambda: baselines.Static(replicas=min(hi, oracle.peak)),
        "hpa": lambda: baselines.Hpa(min_replicas=lo, max_replicas=hi),
        "keda": lambda: baselines.Keda(min_replicas=lo, max_replicas=hi),
        "aibrix": lambda: baselines.AibrixApa(min_replicas=lo, max_replicas=hi),
        "oracle": lambda: oracle,
    }
    unknown = [n for n in names if n not in make]
    if unknown:
        raise ValueError(f"unknown policies {', '.join(unknown)}; known: {', '.join(ALL_POLICIES)}")
    return [make[n]() for n in names]


def epoch_of(trace: traces.Trace) -> float:
    start = trace.start_utc or datetime.datetime(2024, 1, 1)
    return start.replace(tzinfo=datetime.UTC).timestamp()


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        spec_name, spec = load_spec(args.spec)
        capacity = get_preset(args.preset)
        trace = load_trace(args.trace, capacity, spec, args.peak_replicas, args.scale, args.seed, args.hours)
        names = args.policies or list(ALL_POLICIES)
        policies = build_policies(names, spec, trace, capacity)
    except (InvalidSpec, traces.TraceError, ValueError, OSError) as e:
        print(f"ebbtide simulate: {e}", file=sys.stderr)
        return 2
    targets = spec.scaling.targets
    settings = SimSettings(
        capacity=capacity,
        cold_start_s=args.cold_start if args.cold_start is not None else spec.warmup.default_startup_seconds,
        scrape_interval_s=args.scrape_interval,
        metrics_window_s=spec.scaling.behavior.metrics_window_seconds,
        ttft_quantile=targets.ttft.quantile if targets.ttft else None,
        tpot_quantile=targets.tpot.quantile if targets.tpot else None,
        gpus_per_replica=max(1, spec.engine.gpus),
        seed=args.seed,
    )
    mode = "request by request" if trace.per_request else f"fluid, {settings.fluid_step_s:g} s steps"
    console.print(f"[bold]{spec_name}[/] on [bold]{trace.name}[/]: {trace.requests:,} requests over "
                  f"{trace.duration_s / 3600:.1f} h ({mode}); {capacity.name}, cold start {settings.cold_start_s:g} s")
    runs: list[PolicyRun] = []
    started = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("simulating", total=len(policies))
        for policy in policies:
            bar.update(task, description=f"simulating {policy.name}")
            runs.append(simulate(trace, policy, settings))
            bar.advance(task)
    results = [report.summarize(r, spec) for r in runs]
    console.print(report.table(results, f"{trace.name} - {spec_name} ({time.perf_counter() - started:.1f} s)"))
    if args.json:
        document = report.to_json(trace, spec_name, _settings_json(settings, args), results)
        report.write_json(args.json, document)
        console.print(f"wrote {args.json}")
    if args.plot:
        report.plot(args.plot, trace, runs, spec)
        console.print(f"wrote {args.plot}")
    return 0


def _settings_json(settings: SimSettings, args: argparse.Namespace) -> dict:
    out = {k: v for k, v in asdict(settings).items() if k != "capacity"}
    out.update(capacity=settings.capacity.name, peak_replicas=args.peak_replicas, scale=args.scale)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", default=None,
                        help=f"an InferenceService manifest (default: the bundled examples/{DEFAULT_SPEC})")
    parser.add_argument("--trace", default=DEFAULT_TRACE,
                        help=f"a bundled trace ({', '.join(traces.BUNDLED)}) or a CSV path (default: {DEFAULT_TRACE})")
    parser.add_argument("--policies", nargs="+", metavar="NAME",
                        help=f"policies to compare (default: all: {' '.join(ALL_POLICIES)})")
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
