"""Traces with a wide size mix, for accelerator variants: two request logs served together.

`--trace conv-1h+mooncake-1h` overlays Azure's conversation hour (prompts of about a thousand
tokens) and Mooncake's long-context hour (Kimi's chat service: 12k-token prompts on average, up
to 125k), both from their first request. Mooncake's JSONL log stamps arrivals in 3 s steps
(about ten requests each); replayed as stamped, every 3 s a burst would hit the fleet that the
service never saw, so each request's arrival is spread uniformly over its step, seeded.

A minimal reader: the fidelity work reads the same file with checks and messages of its own
(sim/trace_formats.py there); this one goes when that is merged.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path

import numpy as np

from ebbtide.sim import traces

MOONCAKE = "mooncake-1h"
MOONCAKE_FILE = "mooncake_conversation_1h.jsonl"
MOONCAKE_STEP_S = 3.0


def is_combined(name: str) -> bool:
    return "+" in name or name == MOONCAKE


def _mooncake_path(name: str) -> Path:
    if name == MOONCAKE:
        return Path(str(resources.files("ebbtide") / "data" / "traces" / MOONCAKE_FILE))
    return Path(name)


def read_mooncake(name: str, seed: int) -> traces.Trace:
    path = _mooncake_path(name)
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                    rows.append((float(row["timestamp"]) / 1000.0, int(row["input_length"]),
                                 max(1, int(row["output_length"]))))
                except (ValueError, KeyError, TypeError):
                    raise traces.TraceError(f"{path}:{line}: not a request of a Mooncake log "
                                            "(timestamp, input_length, output_length)") from None
    except OSError as e:
        raise traces.TraceError(f"{path}: {e.strerror or e}") from None
    if not rows:
        raise traces.TraceError(f"{path}: no requests")
    stamps = np.array([r[0] for r in rows])
    spread = np.random.default_rng([seed, 0x300C]).uniform(0.0, MOONCAKE_STEP_S, len(rows))
    return _trace(name, stamps - stamps.min() + spread, np.array([r[1] for r in rows]), np.array([r[2] for r in rows]))


def _read(name: str, seed: int) -> traces.Trace:
    if name == MOONCAKE or name.endswith(".jsonl"):
        return read_mooncake(name, seed)
    return traces.read_request_log(name, name=name)


def load_combined(name: str, seed: int) -> traces.Trace:
    """`a+b`: both logs overlaid from their first request, over the shorter one's span."""
    parts = [_read(part, seed) for part in name.split("+")]
    if any(p.arrivals is None for p in parts):
        raise traces.TraceError(f"{name}: only request logs can be combined, not rate files")
    span = min(p.duration_s for p in parts)
    keep = [p.arrivals < span for p in parts]
    trace = _trace(name, np.concatenate([p.arrivals[k] for p, k in zip(parts, keep, strict=True)]),
                   np.concatenate([p.prompt_tokens[k] for p, k in zip(parts, keep, strict=True)]),
                   np.concatenate([p.output_tokens[k] for p, k in zip(parts, keep, strict=True)]))
    return trace if parts[0].start_utc is None else dataclasses.replace(trace, start_utc=parts[0].start_utc)


def _trace(name: str, arrivals: np.ndarray, prompt: np.ndarray, output: np.ndarray) -> traces.Trace:
    order = np.argsort(arrivals, kind="stable")
    arrivals, prompt, output = arrivals[order], prompt[order], np.maximum(output[order], 1)
    seconds = int(np.ceil(arrivals[-1])) + 1
    counts, p_sum, o_sum = traces._aggregate(arrivals, prompt, output, seconds)  # noqa: SLF001  (the same bins)
    return traces.Trace(name=name, duration_s=float(seconds), counts=counts, prompt_sum=p_sum, output_sum=o_sum,
                        arrivals=arrivals, prompt_tokens=prompt, output_tokens=output)
