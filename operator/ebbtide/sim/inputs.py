"""The simulate command's inputs: the spec, the trace, the spot market's defaults."""

from __future__ import annotations

import datetime
from dataclasses import replace
from importlib import resources

from ebbtide.api.manifest import load_manifests
from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.sim import traces
from ebbtide.sim.capacity import CapacityModel

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
    ref, spec = load_manifests(path)[0]
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
