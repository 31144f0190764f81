"""Request sizes that drift: a sample of (prompt, output) sizes per time window of a trace.

A rate file says how many requests arrive, not how big they are; the sizes come from one of:
- `azure_drift`: the 2023 request log of the same kind of service (Azure publishes one hour of
  it, not a week). Each hour of the week draws from a different 10-minute slice of that log,
  chosen at random (circularly): the mix moves as much as the real log's does from one
  10 minutes to the next, which is more than nothing and less than a day's worth of drift
  (there is no public record of the latter for these services);
- `quantile_windows`: published quantiles per window (ServeGen gives input and output tokens as
  separate marginals per 6 h window). Each window's sample is drawn by inverse CDF from its
  quantiles (linear between them, clamped at the outermost ones), input and output
  independently: the joint distribution is not published.

Everything is seeded; a trace's windows are fixed before any policy runs, so every policy
replays the same requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Hourly windows over a week; each reads a 10-minute slice of the hour-long log.
AZURE_WINDOW_S = 3600.0
AZURE_SLICE_S = 600.0
# Sizes drawn per quantile window: enough for the tails the SLO is read at (p99 of 4000 is 40 points).
SAMPLE_PER_WINDOW = 4000


@dataclass(frozen=True)
class SizeMix:
    """Window w covers trace seconds [starts[w], starts[w + 1]) (the last one to the end) and
    draws its requests from the paired samples prompts[w], outputs[w]."""

    starts: np.ndarray
    prompts: tuple[np.ndarray, ...]
    outputs: tuple[np.ndarray, ...]

    def window_of(self, seconds: np.ndarray) -> np.ndarray:
        return np.clip(np.searchsorted(self.starts, seconds, side="right") - 1, 0, len(self.starts) - 1)

    def shifted(self, seconds: float) -> SizeMix:
        """The same mix on a clock that starts `seconds` later (windows that ended before are dropped)."""
        first = int(self.window_of(np.array([float(seconds)]))[0])
        starts = np.maximum(0.0, self.starts[first:] - seconds)
        return SizeMix(starts, self.prompts[first:], self.outputs[first:])

    def means(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean prompt and output (at least one token) of each window."""
        return (np.array([p.mean() for p in self.prompts]),
                np.array([max(1.0, float(o.mean())) for o in self.outputs]))

    def fitting(self, max_len: int) -> tuple[SizeMix, np.ndarray]:
        """The mix without the requests a model of `max_len` tokens refuses (prompt + output
        longer), and the share refused in each window."""
        keep = [p + o <= max_len for p, o in zip(self.prompts, self.outputs, strict=True)]
        if not all(k.any() for k in keep):
            raise ValueError(f"every request of a window is longer than the model's maximum length {max_len}")
        refused = np.array([1.0 - k.mean() for k in keep])
        return SizeMix(self.starts, tuple(p[k] for p, k in zip(self.prompts, keep, strict=True)),
                       tuple(o[k] for o, k in zip(self.outputs, keep, strict=True))), refused

    def draw(self, rng: np.random.Generator, arrivals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sizes of requests arriving at `arrivals` (seconds), each from its window's sample."""
        window = self.window_of(arrivals)
        prompt = np.empty(len(arrivals), dtype=np.int64)
        output = np.empty(len(arrivals), dtype=np.int64)
        for w in np.unique(window):
            mine = window == w
            pick = rng.integers(0, len(self.prompts[w]), int(mine.sum()))
            prompt[mine], output[mine] = self.prompts[w][pick], self.outputs[w][pick]
        return prompt, np.maximum(output, 1)

    def sums_per_second(self, rng: np.random.Generator, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Prompt and output token sums of each second's `counts` requests, by the central
        limit theorem (the sum of N draws from the window's sample): a week is tens of millions
        of requests, and the fluid model reads the sums only."""
        window = self.window_of(np.arange(len(counts), dtype=float))
        sums = []
        for sample in (self.prompts, self.outputs):
            mean = np.array([s.mean() for s in sample])[window]
            std = np.array([s.std() for s in sample])[window]
            sums.append(np.maximum(0.0, counts * mean + np.sqrt(counts) * std * rng.standard_normal(len(counts))))
        return sums[0], sums[1]


def stationary(prompts: np.ndarray, outputs: np.ndarray) -> SizeMix:
    """One window for the whole trace: every request from the same sample."""
    return SizeMix(np.array([0.0]), (np.asarray(prompts),), (np.maximum(np.asarray(outputs), 1),))


def azure_drift(log_arrivals: np.ndarray, prompts: np.ndarray, outputs: np.ndarray, duration_s: float,
                seed: int) -> SizeMix:
    """Hourly windows over `duration_s`, each drawing from a random 10-minute slice of the log
    (see the module's docstring)."""
    rng = np.random.default_rng([seed, 16])
    span = float(log_arrivals[-1] - log_arrivals[0]) or 1.0
    starts = np.arange(0.0, max(duration_s, 1.0), AZURE_WINDOW_S)
    relative = log_arrivals - log_arrivals[0]
    window_prompts, window_outputs = [], []
    for _ in starts:
        begin = rng.uniform(0, span)
        inside = (relative - begin) % span < min(AZURE_SLICE_S, span)
        window_prompts.append(prompts[inside])
        window_outputs.append(np.maximum(outputs[inside], 1))
    return SizeMix(starts, tuple(window_prompts), tuple(window_outputs))


def quantile_windows(starts: np.ndarray, levels: np.ndarray, inputs: list[np.ndarray], outputs: list[np.ndarray],
                     seed: int, sample: int = SAMPLE_PER_WINDOW) -> SizeMix:
    """A sample per window drawn from its input and output quantiles (see the module's docstring)."""
    rng = np.random.default_rng([seed, 17])

    def draw(quantiles: np.ndarray) -> np.ndarray:
        return np.maximum(1, np.rint(np.interp(rng.uniform(0, 1, sample), levels, quantiles))).astype(np.int64)

    return SizeMix(np.asarray(starts, dtype=float), tuple(draw(q) for q in inputs), tuple(draw(q) for q in outputs))
