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
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np

BUNDLED = {
    "conv-1h": "azure2023_conv_1h.csv",
    "code-1h": "azure2023_code_1h.csv",
    "conv-week": "azure2024_conv_week_rate.csv",
    "code-week": "azure2024_code_week_rate.csv",
}
# A rate file gets its request sizes from the log of the same kind of service.
SIZES_FOR = {"conv": "conv-1h", "code": "code-1h"}

REQUEST_LOG_HEADER = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
RATE_HEADER = ["minute", "start_utc", "requests_per_min_low", "requests_per_min_high"]


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


def _rows(path: Path, header: list[str]):
    with open(path, newline="") as f:
        reader = csv.reader(f)
        first = next(reader, None)
        if first != header:
            raise TraceError(f"{path}:1: expected header {','.join(header)}, found {','.join(first or [])!r}")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise TraceError(f"{path}:{line}: expected {len(header)} columns, found {len(row)}")
            yield line, row


def _parse_timestamp(text: str) -> datetime.datetime:
    # The Azure logs carry 7 fractional digits; Python takes at most 6.
    head, _, frac = text.partition(".")
    return datetime.datetime.fromisoformat(f"{head}.{frac[:6]}" if frac else head)


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
            out.append(value)
    if not stamps:
        raise TraceError(f"{path}: no requests")
    start = min(stamps)
    arrivals = np.array([(s - start).total_seconds() for s in stamps])
    order = np.argsort(arrivals, kind="stable")
    arrivals = arrivals[order]
    prompt_arr, output_arr = np.array(prompt)[order], np.maximum(np.array(output)[order], 1)
    seconds = int(np.ceil(arrivals[-1])) + 1
    counts, p_sum, o_sum = _aggregate(arrivals, prompt_arr, output_arr, seconds)
    return Trace(name=name or name_or_path, duration_s=float(seconds), counts=counts, prompt_sum=p_sum,
                 output_sum=o_sum, arrivals=arrivals, prompt_tokens=prompt_arr, output_tokens=output_arr,
                 start_utc=start)


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
            raise TraceError(f"{path}:{line}: minute and rates must be numbers, found {minute!r}, {lo!r}, {hi!r}") from None
        if values[1] < 0 or values[2] < values[1]:
            raise TraceError(f"{path}:{line}: need 0 <= requests_per_min_low <= requests_per_min_high, "
                             f"found {lo} and {hi}")
        if minutes and values[0] <= minutes[-1]:
            raise TraceError(f"{path}:{line}: minute {minute} does not increase")
        if start is None:
            try:
                start = datetime.datetime.fromisoformat(start_utc)
            except ValueError:
                raise TraceError(f"{path}:{line}: start_utc {start_utc!r} is not an ISO timestamp") from None
        minutes.append(values[0])
        low.append(values[1])
        high.append(values[2])
    if len(minutes) < 2:
        raise TraceError(f"{path}: a rate file needs at least two rows")
    return RateFile(np.array(minutes), np.array(low), np.array(high), start)


def expand_rate_file(rate: RateFile, sizes: Trace, peak_rps: float, seed: int, name: str,
                     hours: float | None = None) -> Trace:
    """Per-second load that follows the rate file, scaled so its peak is `peak_rps`.

    The scale maps the column highs' maximum to `peak_rps`; sizes are drawn with replacement
    from `sizes`' requests, so their joint distribution (long prompts with short outputs for
    code) is kept.
    """
    rng = np.random.default_rng(seed)
    step = float(np.median(np.diff(rate.minutes)))
    total_minutes = int(rate.minutes[-1] + step - rate.minutes[0])
    if hours is not None:
        total_minutes = min(total_minutes, int(hours * 60))
    minute_index = np.arange(total_minutes) + rate.minutes[0]
    column = np.clip(np.searchsorted(rate.minutes, minute_index, side="right") - 1, 0, len(rate.minutes) - 1)
    per_minute = rng.uniform(rate.low[column], rate.high[column])
    scale = peak_rps * 60.0 / rate.high.max()
    per_second_rate = np.repeat(per_minute * scale / 60.0, 60)
    counts = rng.poisson(per_second_rate)
    # Token sums per second: the sum of N draws from the size log, by the central limit theorem
    # (N is in the tens to hundreds at the rates replayed). Drawing tens of millions of sizes
    # one by one would cost seconds and gigabytes for the same aggregates.
    p_sum = _sum_of_draws(rng, counts, sizes.prompt_tokens)
    o_sum = _sum_of_draws(rng, counts, sizes.output_tokens)
    return Trace(name=name, duration_s=float(len(counts)), counts=counts, prompt_sum=p_sum, output_sum=o_sum,
                 start_utc=rate.start_utc)


def _sum_of_draws(rng: np.random.Generator, counts: np.ndarray, population: np.ndarray) -> np.ndarray:
    mean, std = float(population.mean()), float(population.std())
    return np.maximum(0.0, counts * mean + np.sqrt(counts) * std * rng.standard_normal(len(counts)))


def kind_of(name_or_path: str) -> str:
    """conv or code, from the file name (used to pick request sizes for a rate file)."""
    stem = Path(BUNDLED.get(name_or_path, name_or_path)).stem.lower()
    return "code" if "code" in stem else "conv"


def is_rate_file(name_or_path: str) -> bool:
    with open(_path(name_or_path), newline="") as f:
        return next(csv.reader(f), None) == RATE_HEADER


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
