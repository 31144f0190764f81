"""The trace formats beyond Azure's CSVs (see data/traces/README.md for the files and their licences):

- a JSONL request log (Mooncake's, Kimi's chat service): one object per request with
  `timestamp` (milliseconds from the start), `input_length`, `output_length`. Mooncake
  records arrivals in 3 s steps (about ten requests share each stamp); replayed as stamped,
  every 3 s a burst would hit the fleet that the service never saw. When the stamps come in
  such steps (fewer distinct stamps than half the requests, at least a second apart), each
  request's arrival is spread uniformly over its step, seeded;
- a window rate file (ServeGen's): `window_start_s,requests_per_s`, one row per window, with
  the request sizes in `<prefix>_sizes.json` beside `<prefix>_rate.csv`: per window of its own
  (`window_s`, 6 h for ServeGen), quantiles of input and output tokens at `quantile_levels`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ebbtide.sim import traces
from ebbtide.sim.size_mix import SizeMix, quantile_windows

WINDOW_RATE_HEADER = ["window_start_s", "requests_per_s"]
JSONL_FIELDS = ("timestamp", "input_length", "output_length")


def is_jsonl_log(name_or_path: str) -> bool:
    return str(traces.BUNDLED.get(name_or_path, name_or_path)).lower().endswith((".jsonl", ".ndjson"))


def is_window_rate_file(name_or_path: str) -> bool:
    return next(traces._csv(traces._path(name_or_path)), (1, None))[1] == WINDOW_RATE_HEADER


def read_jsonl_log(name_or_path: str, seed: int, name: str | None = None) -> traces.Trace:
    path = traces._path(name_or_path)
    rows: list[tuple[float, int, int]] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line, text in enumerate(f, start=1):
                if text.strip():
                    rows.append(_jsonl_request(path, line, text))
    except OSError as e:
        raise traces.TraceError(f"{path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise traces.TraceError(f"{path}: not UTF-8 text") from None
    if not rows:
        raise traces.TraceError(f"{path}: no requests")
    stamps = np.array([r[0] for r in rows]) / 1000.0
    stamps -= stamps.min()
    if stamps.max() > traces.MAX_DURATION_S:
        raise traces.TraceError(f"{path}: the requests span more than {traces.MAX_DURATION_S // 86400} days")
    arrivals = stamps + _spread(stamps, seed)
    return traces.log_trace(name or name_or_path, arrivals, np.array([r[1] for r in rows]),
                            np.array([r[2] for r in rows]))


def _jsonl_request(path: Path, line: int, text: str) -> tuple[float, int, int]:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise traces.TraceError(f"{path}:{line}: not JSON ({e.msg})") from None
    if not isinstance(row, dict) or not all(k in row for k in JSONL_FIELDS):
        raise traces.TraceError(f"{path}:{line}: expected an object with {', '.join(JSONL_FIELDS)}")
    stamp, prompt, output = (row[k] for k in JSONL_FIELDS)
    if isinstance(stamp, bool) or not isinstance(stamp, int | float) or not math.isfinite(stamp) or stamp < 0:
        raise traces.TraceError(f"{path}:{line}: timestamp {stamp!r} is not a number of milliseconds")
    for field, value in (("input_length", prompt), ("output_length", output)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= traces.MAX_TOKENS:
            raise traces.TraceError(f"{path}:{line}: {field} {value!r} is not a whole number of tokens "
                                    f"from 0 to {traces.MAX_TOKENS:,}")
    return float(stamp), prompt, output


def _spread(stamps: np.ndarray, seed: int) -> np.ndarray:
    """Offsets that spread requests over the step their stamps were rounded to (none if the
    stamps are not in steps)."""
    distinct = np.unique(stamps)
    if len(distinct) < 2 or len(distinct) > len(stamps) / 2:
        return np.zeros(len(stamps))
    step = float(np.median(np.diff(distinct)))
    if step < 1.0:
        return np.zeros(len(stamps))
    return np.random.default_rng([seed, 4]).uniform(0.0, step, len(stamps))


def read_window_rates(name_or_path: str) -> tuple[np.ndarray, float]:
    """(requests per second of every second, the first window's start) of a window rate file."""
    path = traces._path(name_or_path)
    starts, rates = [], []
    for line, (start, rate) in traces._rows(path, WINDOW_RATE_HEADER):
        try:
            values = float(start), float(rate)
        except ValueError:
            values = (math.nan, math.nan)
        if not all(map(math.isfinite, values)) or values[1] < 0:
            raise traces.TraceError(f"{path}:{line}: window_start_s and requests_per_s must be numbers, "
                                    f"the rate not negative; found {start!r}, {rate!r}")
        if starts and values[0] <= starts[-1]:
            raise traces.TraceError(f"{path}:{line}: window_start_s {start} does not increase")
        starts.append(values[0])
        rates.append(values[1])
    if len(starts) < 2:
        raise traces.TraceError(f"{path}: a rate file needs at least two rows")
    step = float(np.median(np.diff(starts)))
    if starts[-1] + step - starts[0] > traces.MAX_DURATION_S:
        raise traces.TraceError(f"{path}: its windows span more than {traces.MAX_DURATION_S // 86400} days")
    if max(rates) <= 0:
        raise traces.TraceError(f"{path}: no requests (every rate is 0)")
    seconds = np.arange(starts[0], starts[-1] + step)
    index = np.clip(np.searchsorted(starts, seconds, side="right") - 1, 0, len(starts) - 1)
    return np.asarray(rates)[index], starts[0]


def sizes_path(rate_path: Path) -> Path:
    """`<prefix>_sizes.json` beside `<prefix>_rate.csv`."""
    stem = rate_path.stem.removesuffix("_rate")
    return rate_path.with_name(f"{stem}_sizes.json")


def read_window_sizes(rate_name_or_path: str, first_start: float, seed: int) -> SizeMix:
    """The request sizes of a window rate file, per window, on the rate file's clock."""
    path = sizes_path(traces._path(rate_name_or_path))
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        levels = np.array(document["quantile_levels"], dtype=float)
        windows = document["windows"]
        starts = np.array([w["start_s"] for w in windows], dtype=float) - first_start
        inputs = [np.array(w["input_quantiles"], dtype=float) for w in windows]
        outputs = [np.array(w["output_quantiles"], dtype=float) for w in windows]
    except FileNotFoundError:
        raise traces.TraceError(f"{path}: no such file; a window rate file takes its request sizes from it") from None
    except OSError as e:
        raise traces.TraceError(f"{path}: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise traces.TraceError(f"{path}: expected quantile_levels and windows of start_s, input_quantiles and "
                                f"output_quantiles ({type(e).__name__}: {e})") from None
    ordered = len(windows) and np.all(np.diff(levels) > 0) and 0 <= levels[0] and levels[-1] <= 1
    if not ordered or any(len(q) != len(levels) or np.any(np.diff(q) < 0) or q[0] < 0 for q in inputs + outputs):
        raise traces.TraceError(f"{path}: every window needs as many non-decreasing, non-negative quantiles as "
                                "quantile_levels, which must increase within [0, 1]")
    if np.any(np.diff(starts) <= 0):
        raise traces.TraceError(f"{path}: the windows' start_s must increase")
    return quantile_windows(starts, levels, inputs, outputs, seed)
