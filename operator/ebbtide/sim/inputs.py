"""The simulate command's inputs: the spec, the trace, the spot market, durations."""

from __future__ import annotations

import argparse
import datetime
from dataclasses import replace
from importlib import resources

from ebbtide.api.manifest import InvalidSpec, load_manifests
from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.sim import traces
from ebbtide.sim.capacity import CapacityModel
from ebbtide.sim.spot_market import SpotMarket

DEFAULT_SPEC = "chat-llama-8b.yaml"
DEFAULT_TRACE = "conv-week"

# The spot market's defaults: deliberately more reclaims than AWS's worst interruption band, so
# that a week exercises the fallback; AWS's two-minute notice (docs/simulator.md, "The defaults, and why").
SPOT_PREEMPTIONS_PER_HOUR = 0.05
SPOT_BURST = 3.0
SPOT_NOTICE_S = 120.0


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


def epoch_of(trace: traces.Trace) -> float:
    start = trace.start_utc or datetime.datetime(2024, 1, 1)
    return start.replace(tzinfo=datetime.UTC).timestamp()


def spot_market(args: argparse.Namespace) -> SpotMarket:
    if args.spot_preemptions_per_hour < 0:
        raise ValueError("--spot-preemptions-per-hour must not be negative")
    if args.spot_burst < 1:
        raise ValueError("--spot-burst is the mean number of replicas a reclaim takes: at least 1")
    if args.spot_notice < 0:
        raise ValueError("--spot-notice must not be negative")
    return SpotMarket(preemptions_per_hour=args.spot_preemptions_per_hour, burst=args.spot_burst,
                      notice_s=args.spot_notice, outages=tuple(parse_outage(o) for o in args.spot_outage or ()))


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds from '90', '90s', '30m', '2h', '1.5d'."""
    text = text.strip().lower()
    scale = _UNITS.get(text[-1:], None)
    number = text[:-1] if scale else text
    try:
        value = float(number) * (scale or 1.0)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration (a number with s, m, h or d)") from None
    if value < 0 or value != value:
        raise ValueError(f"{text!r}: a duration must not be negative")
    return value


def parse_outage(text: str) -> tuple[float, float]:
    """'DURATION@START' (both from the trace's start, e.g. '1h@30h') -> (start, end) seconds."""
    duration, at, start = text.partition("@")
    if not at:
        raise ValueError(f"--spot-outage {text!r}: expected DURATION@START, e.g. 1h@30h")
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
