"""The simulate command's inputs: the spec, the trace, the spot market's defaults."""

from __future__ import annotations

import datetime
from dataclasses import replace
from importlib import resources

import numpy as np

from ebbtide.api.manifest import load_manifests
from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.sim import size_mix, trace_formats, traces
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


def model_max_len(spec: InferenceServiceSpec, capacity: CapacityModel) -> int:
    """The longest request (prompt + output tokens) the spec's engine takes: its
    `--max-model-len` if the args set one below the model's own, else the model's."""
    args = list(spec.engine.args)
    for i, arg in enumerate(args):
        flag, equals, value = arg.partition("=")
        if flag == "--max-model-len":
            text = value if equals else (args[i + 1] if i + 1 < len(args) else "")
            try:
                # vLLM takes 8192, 8k, 8K and 1m (powers of 1000 lower-case, of 1024 upper-case).
                units = {"k": 1000, "K": 1024, "m": 1_000_000, "M": 1024 * 1024}
                number = int(float(text[:-1]) * units[text[-1]]) if text[-1:] in units else int(text)
            except (ValueError, IndexError):
                raise ValueError(f"spec.engine.args: --max-model-len {text!r} is not a number of tokens") from None
            if number > 0:
                return min(number, capacity.max_model_len)
    return capacity.max_model_len


def load_trace(name: str, capacity: CapacityModel, spec: InferenceServiceSpec, peak_replicas: int,
               scale: int, seed: int, hours: float | None, per_request: bool = False,
               span: tuple[float, float] | None = None) -> traces.Trace:
    """The trace `name` as a replay reads it. Rate files are scaled so that their peak needs
    `peak_replicas` replicas of the window's mix, and replayed in aggregate (per_request:
    request by request); request logs are overlaid `scale` times. Requests longer than the
    model's maximum length are counted (Trace.too_long) and left out."""
    if hours is not None:
        span = (0.0, max(60.0, hours * 3600.0))
    if trace_formats.is_jsonl_log(name):
        trace = trace_formats.read_jsonl_log(name, seed, name=name)
    elif traces.is_rate_file(name) or trace_formats.is_window_rate_file(name):
        return _expand(name, capacity, spec, peak_replicas, seed, span, per_request)
    else:
        trace = traces.read_request_log(name, name=name)
    trace = traces.without_too_long(trace, capacity.max_model_len)
    if scale > 1:
        trace = replace(traces.superpose(trace, scale, seed), too_long=trace.too_long * scale)
    return trace


def _expand(name: str, capacity: CapacityModel, spec: InferenceServiceSpec, peak_replicas: int, seed: int,
            span: tuple[float, float] | None, per_request: bool) -> traces.Trace:
    if traces.is_rate_file(name):
        rate = traces.read_rate_file(name)
        drawn, envelope = traces.column_rates(rate, seed)
        log = traces.read_request_log(traces.SIZES_FOR[traces.kind_of(name)])
        mix = size_mix.azure_drift(log.arrivals, log.prompt_tokens, log.output_tokens, len(drawn), seed)
        start = rate.start_utc
    else:
        drawn, first = trace_formats.read_window_rates(name)
        envelope, start = drawn, None
        mix = trace_formats.read_window_sizes(name, first, seed)
    mix, refused = mix.fitting(capacity.max_model_len)
    replica_rates = np.array([per_replica_rate(capacity, spec, p, o) for p, o in zip(*mix.means(), strict=True)])
    if not replica_rates.min() > 0:
        raise ValueError(f"{name}: one replica of {capacity.name} cannot serve a request of some window's mean "
                         "size within the spec's TPOT target")
    return traces.expand_rates(name, drawn, envelope, mix, replica_rates, peak_replicas, seed, start,
                               refused=refused, span=span, per_request=per_request)


def per_replica_rate(capacity: CapacityModel, spec: InferenceServiceSpec, mean_p: float, mean_o: float) -> float:
    """Requests per second one replica serves within the ITL target, with no queue."""
    itl = spec.scaling.targets.tpot.target_seconds if spec.scaling.targets.tpot else None
    return capacity.max_request_rate(mean_p, mean_o, itl)


def epoch_of(trace: traces.Trace) -> float:
    start = trace.start_utc or datetime.datetime(2024, 1, 1)
    return start.replace(tzinfo=datetime.UTC).timestamp()
