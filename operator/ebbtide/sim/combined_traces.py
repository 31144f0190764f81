"""Traces with a wide size mix, for accelerator variants: two request logs served together.

`--trace conv-1h+mooncake-1h` overlays Azure's conversation hour (prompts of about a thousand
tokens) and Mooncake's long-context hour (Kimi's chat service: 12k-token prompts on average, up
to 125k), both from their first request, each read as `--trace` reads it alone
(sim/trace_formats.py spreads Mooncake's 3 s stamps over their step).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ebbtide.sim import traces
from ebbtide.sim.trace_formats import is_jsonl_log, read_jsonl_log


def is_combined(name: str) -> bool:
    return "+" in name


def _read(name: str, seed: int) -> traces.Trace:
    if is_jsonl_log(name):
        return read_jsonl_log(name, seed, name=name)
    return traces.read_request_log(name, name=name)


def load_combined(name: str, seed: int) -> traces.Trace:
    """`a+b`: both logs overlaid from their first request, over the shorter one's span."""
    parts = [_read(part, seed) for part in name.split("+")]
    if any(p.arrivals is None for p in parts):
        raise traces.TraceError(f"{name}: only request logs can be combined, not rate files")
    span = min(p.duration_s for p in parts)
    keep = [p.arrivals < span for p in parts]
    trace = traces.log_trace(name, *(np.concatenate([getattr(p, field)[k] for p, k in zip(parts, keep, strict=True)])
                                     for field in ("arrivals", "prompt_tokens", "output_tokens")))
    return trace if parts[0].start_utc is None else dataclasses.replace(trace, start_utc=parts[0].start_utc)
