"""Traffic traces for the simulator: request logs replayed as they are, rate files expanded.

Two formats (both from Azure's public LLM inference traces, CC-BY 4.0; see data/traces/README.md):
- a request log: `TIMESTAMP,ContextTokens,GeneratedTokens`, one row per request;
- a rate file: `minute,start_utc,requests_per_min_low,requests_per_min_high`, one row per
  plot column (7.2 min) of a week. It is expanded into load: each minute's rate is drawn
  between the column's low and high (the recorded minute-to-minute spread), arrivals are
  Poisson at that rate, and request sizes come from the request log of the same kind of
  service. All draws come from one seeded generator.

Week-long replays are kept as per-second aggregates (count and token sums), which is what the
fluid fleet model consumes; request logs keep every request as well.
"""

from __future__ import annotations

import csv
import datetime
import math
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np

from ebbtide.sim.size_mix import SizeMix, stationary

BUNDLED = {
    "conv-1h": "azure2023_conv_1h.csv",
    "code-1h": "azure2023_code_1h.csv",
    "conv-week": "azure2024_conv_week_rate.csv",
    "code-week": "azure2024_code_week_rate.csv",
    "mooncake-1h": "mooncake_conversation_1h.jsonl",
    "servegen-14d": "servegen_language_m-large_14d_rate.csv",
}
# A rate file gets its request sizes from the log of the same kind of service.
SIZES_FOR = {"conv": "conv-1h", "code": "code-1h"}

REQUEST_LOG_HEADER = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
RATE_HEADER = ["minute", "start_utc", "requests_per_min_low", "requests_per_min_high"]
# A replay keeps arrays per second of the trace, and token counts in int64 arrays: a trace
# longer than a month, or a request longer than any model's context, is a mistake that would
# otherwise end in a MemoryError or an OverflowError, not a replay.
MAX_DURATION_S = 31 * 86400
MAX_TOKENS = 10_000_000


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class Trace:
    name: str
    duration_s: float
    counts: np.ndarray  # requests arriving in each second
    prompt_sum: np.ndarray  # prompt tokens arriving in each second
    output_sum: np.ndarray  # output tokens arriving in each second
    # Per request, for request logs (None for expanded rate files, which are aggregate only).
    arrivals: np.ndarray | None = None
    prompt_tokens: np.ndarray | None = None
    output_tokens: np.ndarray | None = None
    start_utc: datetime.datetime | None = None
    # Request sizes by time window (rate files: drawn per window; see sim/size_mix.py).
    mix: SizeMix | None = None
    # Requests longer than the model's maximum length: refused on arrival, as vLLM refuses them,
    # so counted here and left out of the load.
    too_long: int = 0

    @property
    def requests(self) -> int:
        return int(self.counts.sum())

    @property
    def per_request(self) -> bool:
        return self.arrivals is not None

    def rate_per_second(self, smooth_s: int = 60) -> np.ndarray:
        kernel = np.ones(smooth_s) / smooth_s
        return np.convolve(self.counts, kernel, mode="same")


def _path(name_or_path: str) -> Path:
    if name_or_path in BUNDLED:
        return Path(str(resources.files("ebbtide") / "data" / "traces" / BUNDLED[name_or_path]))
    path = Path(name_or_path)
    if not path.exists():
        raise TraceError(f"{name_or_path}: no such file, and not a bundled trace ({', '.join(BUNDLED)})")
    return path


def _csv(path: Path):
    """(line, row) of a CSV file; what keeps it from being read is a TraceError."""
    line = 0
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for line, row in enumerate(csv.reader(f), start=1):
                yield line, row
    except OSError as e:
        raise TraceError(f"{path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise TraceError(f"{path}:{line + 1}: not UTF-8 text") from None
    except csv.Error as e:
        raise TraceError(f"{path}:{line + 1}: {e}") from None


def _rows(path: Path, header: list[str]):
    rows = _csv(path)
    _, first = next(rows, (1, None))
    if first != header:
        raise TraceError(f"{path}:1: expected header {','.join(header)}, found {','.join(first or [])!r}")
    for line, row in rows:
        if not row:
            continue
        if len(row) != len(header):
            raise TraceError(f"{path}:{line}: expected {len(header)} columns, found {len(row)}")
        yield line, row


def _parse_timestamp(text: str) -> datetime.datetime:
    # The Azure logs carry 7 fractional digits; Python takes at most 6 (a zone may follow them).
    head, dot, frac = text.partition(".")
    digits = len(frac) - len(frac.lstrip("0123456789"))
    stamp = datetime.datetime.fromisoformat(f"{head}{dot}{frac[:min(digits, 6)]}{frac[digits:]}")
    # In UTC without a zone: stamps with and without one can then be compared.
    try:
        return stamp.astimezone(datetime.UTC).replace(tzinfo=None) if stamp.tzinfo else stamp
    except OverflowError:  # 0001-01-01T00:00+01:00 is in year 0 in UTC
        raise ValueError(f"{text!r} is out of range") from None


def _aggregate(arrivals: np.ndarray, prompt: np.ndarray, output: np.ndarray, seconds: int):
    bins = np.minimum(arrivals.astype(np.int64), seconds - 1)
    return (np.bincount(bins, minlength=seconds).astype(np.int64),
            np.bincount(bins, weights=prompt, minlength=seconds),
            np.bincount(bins, weights=output, minlength=seconds))


def read_request_log(name_or_path: str, name: str | None = None) -> Trace:
    path = _path(name_or_path)
    stamps, prompt, output = [], [], []
    for line, (ts, ctx, gen) in _rows(path, REQUEST_LOG_HEADER):
        try:
            stamps.append(_parse_timestamp(ts))
        except ValueError:
            raise TraceError(f"{path}:{line}: TIMESTAMP {ts!r} is not a date and time") from None
        for column, text, out in (("ContextTokens", ctx, prompt), ("GeneratedTokens", gen, output)):
            try:
                value = int(text)
            except ValueError:
                raise TraceError(f"{path}:{line}: {column} {text!r} is not a whole number") from None
            if value < 0:
                raise TraceError(f"{path}:{line}: {column} {value} is negative")
            if value > MAX_TOKENS:
                raise TraceError(f"{path}:{line}: {column} {value} is more than {MAX_TOKENS:,} tokens")
            out.append(value)
    if not stamps:
        raise TraceError(f"{path}: no requests")
    start = min(stamps)
    if (max(stamps) - start).total_seconds() > MAX_DURATION_S:
        raise TraceError(f"{path}: the requests span {max(stamps) - start}, more than {MAX_DURATION_S // 86400} days")
    arrivals = np.array([(s - start).total_seconds() for s in stamps])
    return log_trace(name or name_or_path, arrivals, np.array(prompt), np.array(output), start)


def log_trace(name: str, arrivals: np.ndarray, prompt: np.ndarray, output: np.ndarray,
              start_utc: datetime.datetime | None = None, too_long: int = 0) -> Trace:
    """A request log's trace from its requests (in any order; an output is at least one token)."""
    order = np.argsort(arrivals, kind="stable")
    arrivals = arrivals[order]
    prompt_arr, output_arr = np.asarray(prompt)[order], np.maximum(np.asarray(output)[order], 1)
    seconds = int(np.ceil(arrivals[-1])) + 1 if len(arrivals) else 1
    counts, p_sum, o_sum = _aggregate(arrivals, prompt_arr, output_arr, seconds)
    return Trace(name=name, duration_s=float(seconds), counts=counts, prompt_sum=p_sum,
                 output_sum=o_sum, arrivals=arrivals, prompt_tokens=prompt_arr, output_tokens=output_arr,
                 start_utc=start_utc, too_long=too_long)


def without_too_long(trace: Trace, max_len: int) -> Trace:
    """A request log without the requests longer than `max_len` (prompt + output), counted in
    `too_long`: vLLM refuses them on arrival, so they are no load."""
    fits = trace.prompt_tokens + trace.output_tokens <= max_len
    if fits.all():
        return trace
    if not fits.any():
        raise TraceError(f"{trace.name}: every request is longer than the model's maximum length {max_len}")
    return log_trace(trace.name, trace.arrivals[fits], trace.prompt_tokens[fits], trace.output_tokens[fits],
                     trace.start_utc, trace.too_long + int((~fits).sum()))


@dataclass(frozen=True)
class RateFile:
    minutes: np.ndarray  # column start, minutes since the start of the week
    low: np.ndarray  # requests per minute, lowest in the column
    high: np.ndarray
    start_utc: datetime.datetime


def read_rate_file(name_or_path: str) -> RateFile:
    path = _path(name_or_path)
    minutes, low, high, start = [], [], [], None
    for line, (minute, start_utc, lo, hi) in _rows(path, RATE_HEADER):
        try:
            values = float(minute), float(lo), float(hi)
        except ValueError:
            values = (math.nan,)
        if not all(map(math.isfinite, values)):
            raise TraceError(f"{path}:{line}: minute and rates must be numbers, found {minute!r}, {lo!r}, {hi!r}")
        if values[1] < 0 or values[2] < values[1]:
            raise TraceError(f"{path}:{line}: need 0 <= requests_per_min_low <= requests_per_min_high, "
                             f"found {lo} and {hi}")
        if minutes and values[0] <= minutes[-1]:
            raise TraceError(f"{path}:{line}: minute {minute} does not increase")
        if start is None:
            try:
                start = _parse_timestamp(start_utc)
            except ValueError:
                raise TraceError(f"{path}:{line}: start_utc {start_utc!r} is not an ISO timestamp") from None
        minutes.append(values[0])
        low.append(values[1])
        high.append(values[2])
    if len(minutes) < 2:
        raise TraceError(f"{path}: a rate file needs at least two rows")
    if (minutes[-1] - minutes[0]) * 60 > MAX_DURATION_S:
        raise TraceError(f"{path}: its minutes span more than {MAX_DURATION_S // 86400} days")
    if max(high) < 1e-6:  # less than a request a year: nothing to scale to a peak (and 1 / peak overflows)
        raise TraceError(f"{path}: no requests (the highest rate is {max(high):g} per minute)")
    return RateFile(np.array(minutes), np.array(low), np.array(high), start)


def column_rates(rate: RateFile, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(drawn, envelope) requests per second of every second of the file, unscaled: each
    minute's rate drawn between its column's low and high (the recorded minute-to-minute
    spread), and the column's high, which scaling maps to the peak."""
    rng = np.random.default_rng([seed, 2])
    step = float(np.median(np.diff(rate.minutes)))
    total_minutes = max(1, int(rate.minutes[-1] + step - rate.minutes[0]))
    minute_index = np.arange(total_minutes) + rate.minutes[0]
    column = np.clip(np.searchsorted(rate.minutes, minute_index, side="right") - 1, 0, len(rate.minutes) - 1)
    per_minute = rng.uniform(rate.low[column], rate.high[column])
    return np.repeat(per_minute / 60.0, 60), np.repeat(rate.high[column] / 60.0, 60)


def expand_rates(name: str, drawn: np.ndarray, envelope: np.ndarray, mix: SizeMix, replica_rates: np.ndarray,
                 peak_replicas: float, seed: int, start_utc: datetime.datetime | None = None,
                 refused: np.ndarray | None = None, span: tuple[float, float] | None = None,
                 per_request: bool = False) -> Trace:
    """Load that follows a rate (requests per second of each second, unscaled), scaled so that
    its peak needs `peak_replicas` replicas: the largest `envelope` over a window's
    `replica_rates` (what one replica serves of that window's mix) is mapped to it. Arrivals
    are Poisson; a `refused` share of each window's (too long for the model) is counted and
    dropped. `span` (start, end seconds) keeps a part of it, on its own clock. Aggregate per
    second, or with `per_request` every request with its arrival (uniform in its second) and
    sizes drawn from its window's sample (sim/size_mix.py)."""
    rng = np.random.default_rng([seed, 3])
    window = mix.window_of(np.arange(len(drawn), dtype=float))
    scale = peak_replicas / float((envelope / replica_rates[window]).max())
    first, last = (0, len(drawn)) if span is None else (int(span[0]), max(int(span[0]) + 1, int(span[1])))
    counts = rng.poisson(drawn[first:last] * scale)
    too_long = 0
    if refused is not None and refused.any():
        kept = rng.binomial(counts, 1.0 - refused[window[first:last]])
        too_long, counts = int((counts - kept).sum()), kept
    if first:
        mix = mix.shifted(first)
        start_utc = None if start_utc is None else start_utc + datetime.timedelta(seconds=first)
    if per_request:
        arrivals = np.sort(np.repeat(np.arange(len(counts), dtype=float), counts)
                           + rng.uniform(0, 1, int(counts.sum())))
        prompt, output = mix.draw(rng, arrivals)
        counts, p_sum, o_sum = _aggregate(arrivals, prompt, output, len(counts))
        return Trace(name=name, duration_s=float(len(counts)), counts=counts, prompt_sum=p_sum, output_sum=o_sum,
                     arrivals=arrivals, prompt_tokens=prompt, output_tokens=output, start_utc=start_utc, mix=mix,
                     too_long=too_long)
    p_sum, o_sum = mix.sums_per_second(rng, counts)
    return Trace(name=name, duration_s=float(len(counts)), counts=counts, prompt_sum=p_sum, output_sum=o_sum,
                 prompt_tokens=np.concatenate(mix.prompts), start_utc=start_utc, mix=mix, too_long=too_long)


def expand_rate_file(rate: RateFile, sizes: Trace, peak_rps: float, seed: int, name: str,
                     hours: float | None = None) -> Trace:
    """Per-second load that follows the rate file, its column highs' maximum scaled to
    `peak_rps`, every request's size drawn from `sizes`' (one stationary mix)."""
    drawn, envelope = column_rates(rate, seed)
    span = None if hours is None else (0.0, max(60.0, hours * 3600))
    return expand_rates(name, drawn, envelope, stationary(sizes.prompt_tokens, sizes.output_tokens),
                        np.array([1.0]), peak_rps, seed, rate.start_utc, span=span)


def kind_of(name_or_path: str) -> str:
    """conv or code, from the file name (used to pick request sizes for a rate file)."""
    stem = Path(BUNDLED.get(name_or_path, name_or_path)).stem.lower()
    return "code" if "code" in stem else "conv"


def is_rate_file(name_or_path: str) -> bool:
    return next(_csv(_path(name_or_path)), (1, None))[1] == RATE_HEADER


def superpose(trace: Trace, copies: int, seed: int) -> Trace:
    """A request log `copies` times as busy: the log overlaid on itself, each copy shifted
    circularly by a random offset, so the load keeps its burstiness and its request sizes."""
    rng = np.random.default_rng(seed)
    duration = trace.duration_s
    arrivals = [trace.arrivals]
    for _ in range(copies - 1):
        arrivals.append((trace.arrivals + rng.uniform(0, duration)) % duration)
    all_arrivals = np.concatenate(arrivals)
    order = np.argsort(all_arrivals, kind="stable")
    prompt = np.tile(trace.prompt_tokens, copies)[order]
    output = np.tile(trace.output_tokens, copies)[order]
    all_arrivals = all_arrivals[order]
    seconds = int(np.ceil(duration))
    counts, p_sum, o_sum = _aggregate(all_arrivals, prompt, output, seconds)
    return Trace(name=f"{trace.name} x{copies}", duration_s=float(seconds), counts=counts, prompt_sum=p_sum,
                 output_sum=o_sum, arrivals=all_arrivals, prompt_tokens=prompt, output_tokens=output,
                 start_utc=trace.start_utc)


def rotate(trace: Trace, seconds: float) -> Trace:
    """The trace shifted circularly `seconds` later (what arrived at t arrives at t + seconds,
    the end wrapping round to the start), on the same clock: with one day, each day of a week
    carries the day before's load."""
    shift = int(round(seconds)) % max(1, len(trace.counts))
    rolled = {k: np.roll(getattr(trace, k), shift) for k in ("counts", "prompt_sum", "output_sum")}
    if trace.arrivals is None:
        return replace(trace, **rolled)
    arrivals = (trace.arrivals + shift) % trace.duration_s
    order = np.argsort(arrivals, kind="stable")
    return replace(trace, **rolled, arrivals=arrivals[order], prompt_tokens=trace.prompt_tokens[order],
                   output_tokens=trace.output_tokens[order])
