"""Latency records of a replay, and weighted quantiles over them (exact at any size)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class LatencyRecords:
    """Per-request (or per-group) latencies: TTFT, mean inter-token latency, weight, arrival time.

    `group`: consecutive points that share their arrival time and ITL (the fluid model writes
    PROMPT_POINTS per step), so ITL quantiles can be taken over one point per group.
    """

    arrival: list[np.ndarray] = field(default_factory=list)
    ttft: list[np.ndarray] = field(default_factory=list)
    itl: list[np.ndarray] = field(default_factory=list)
    weight: list[np.ndarray] = field(default_factory=list)
    group: int = 1
    _one: list[tuple[float, float, float]] = field(default_factory=list)  # single requests, batched

    def add(self, arrival, ttft, itl, weight) -> None:
        self._flush()
        self.arrival.append(np.asarray(arrival, dtype=float).ravel())
        self.ttft.append(np.asarray(ttft, dtype=float).ravel())
        self.itl.append(np.asarray(itl, dtype=float).ravel())
        self.weight.append(np.asarray(weight, dtype=float).ravel())

    def add_request(self, arrival: float, ttft: float, itl: float) -> None:
        """One request of weight 1 (four arrays per request would cost more than its replay)."""
        self._one.append((arrival, ttft, itl))

    def _flush(self) -> None:
        if self._one:
            block = np.array(self._one, dtype=float)
            self._one = []
            self.arrival.append(block[:, 0])
            self.ttft.append(block[:, 1])
            self.itl.append(block[:, 2])
            self.weight.append(np.ones(len(block)))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        self._flush()
        if not self.ttft:
            empty = np.zeros(0)
            return empty, empty, empty, empty
        if len(self.ttft) == 1:
            return self.arrival[0], self.ttft[0], self.itl[0], self.weight[0]
        return (np.concatenate(self.arrival), np.concatenate(self.ttft), np.concatenate(self.itl),
                np.concatenate(self.weight))


def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float | None:
    """The smallest value whose cumulative weight (in value order) reaches q of the total."""
    return weighted_quantiles(values, weights, (q,))[0]


# Above this many values, quantiles are found by bucketing (one pass) and sorting only the
# bucket that holds each quantile: argsort of millions of points costs half a second each.
_BUCKET_ABOVE = 100_000
_BUCKETS = 1 << 16


def weighted_quantiles(values: np.ndarray, weights: np.ndarray, qs) -> list[float | None]:
    """`weighted_quantile` for several q at once; exact at any size (up to float rounding of the
    cumulative weights)."""
    values = np.asarray(values, dtype=float)
    weights = np.asarray(weights, dtype=float)
    total = float(weights.sum()) if len(values) else 0.0
    if total <= 0:
        return [None for _ in qs]
    if len(values) <= _BUCKET_ABOVE:
        order = np.argsort(values, kind="stable")
        cumulative = np.cumsum(weights[order])
        ordered = values[order]
        out: list[float | None] = []
        for q in qs:
            index = int(np.searchsorted(cumulative, q * cumulative[-1], side="left"))
            out.append(float(ordered[min(index, len(values) - 1)]))
        return out
    # Buckets by a monotone transform of the value (log-like, so heavy tails get resolution):
    # bucket order is value order, so the cumulative weight below a bucket is exact.
    low = float(values.min())
    spread = float(values.max()) - low
    if spread <= 0:
        return [low for _ in qs]
    scaled = np.log1p((values - low) * (1e6 / spread))
    index = np.minimum((scaled * ((_BUCKETS - 1) / scaled.max())).astype(np.int64), _BUCKETS - 1)
    cumulative = np.cumsum(np.bincount(index, weights=weights, minlength=_BUCKETS))
    out = []
    for q in qs:
        target = q * cumulative[-1]
        bucket = int(np.searchsorted(cumulative, target, side="left"))
        bucket = min(bucket, _BUCKETS - 1)
        below = float(cumulative[bucket - 1]) if bucket else 0.0
        inside = index == bucket
        vals, wts = values[inside], weights[inside]
        if not len(vals):  # only for q = 0 with an empty first bucket
            vals, wts, below = values[index >= bucket], weights[index >= bucket], below
        order = np.argsort(vals, kind="stable")
        running = below + np.cumsum(wts[order])
        # Float sums in a different order can differ in the last bits: clamp into the bucket.
        j = min(int(np.searchsorted(running, target, side="left")), len(vals) - 1)
        out.append(float(vals[order][j]))
    return out
