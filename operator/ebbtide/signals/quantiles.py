"""Prometheus's `histogram_quantile`, in Python, for classic (le-bucketed) histograms.

The Prometheus source fetches per-pod bucket rates in one query and sums the buckets of each
service's pods here, so services asking for different quantiles still cost one query. The
scrape source feeds it bucket deltas between two scrapes. Both must agree with what PromQL
would answer for the same buckets, so this follows promql/quantile.go (bucketQuantile)
step by step, special cases included.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

# Relative difference below which neighbouring bucket counts are taken as equal: float sums of
# rates can make a higher bucket a hair lower than the one before it (quantile.go uses 1e-12).
_PRECISION_TOLERANCE = 1e-12


def parse_le(le: str) -> float:
    """The upper bound of a bucket from its `le` label value ("0.5", "+Inf")."""
    return float(le)  # float() reads "+Inf", "Inf" and "inf" alike


def sum_buckets(histograms: Iterable[Mapping[float, float]]) -> dict[float, float]:
    """Adds several histograms bucket by bucket (what `sum by (le)` does)."""
    total: dict[float, float] = {}
    for histogram in histograms:
        for upper_bound, count in histogram.items():
            total[upper_bound] = total.get(upper_bound, 0.0) + count
    return total


def bucket_quantile(q: float, buckets: Mapping[float, float]) -> float:
    """The q-quantile of cumulative `buckets` (upper bound -> count), exactly as PromQL computes it.

    Linear interpolation inside the bucket the rank falls in, with a lower bound of 0 for the
    first bucket. If the rank falls in the +Inf bucket, the highest finite upper bound is
    returned (nothing better is known). NaN when there are no observations, fewer than two
    buckets, or no +Inf bucket; -Inf / +Inf for q < 0 / q > 1, as PromQL does.
    """
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    if not buckets:
        return math.nan
    ordered = sorted(buckets.items())
    if not math.isinf(ordered[-1][0]) or ordered[-1][0] < 0:
        return math.nan
    bounds = [bound for bound, _ in ordered]
    counts = [count for _, count in ordered]  # keys of a mapping are unique: nothing to coalesce
    _correct_precision_errors(counts)
    _ensure_monotonic(counts)
    if len(counts) < 2:
        return math.nan
    observations = counts[-1]
    if observations == 0:
        return math.nan
    rank = q * observations
    # First bucket (the +Inf one excluded) whose count reaches the rank; len-1 if none does.
    b = next((i for i in range(len(counts) - 1) if counts[i] >= rank), len(counts) - 1)
    if b == len(counts) - 1:
        return bounds[-2]
    if b == 0 and bounds[0] <= 0:
        return bounds[0]
    bucket_start = 0.0
    bucket_end = bounds[b]
    count = counts[b]
    if b > 0:
        bucket_start = bounds[b - 1]
        count -= counts[b - 1]
        rank -= counts[b - 1]
    return bucket_start + (bucket_end - bucket_start) * (rank / count)


def quantile_or_none(q: float | None, buckets: Mapping[float, float]) -> float | None:
    """`bucket_quantile`, with None for "no quantile asked" and for "no answer" (NaN)."""
    if q is None or not buckets:
        return None
    value = bucket_quantile(q, buckets)
    return None if math.isnan(value) else value


def _correct_precision_errors(counts: list[float]) -> None:
    previous = counts[0]
    for i in range(1, len(counts)):
        current = counts[i]
        delta = abs(current - previous)
        if delta == 0:
            continue
        if current != 0 and delta / current <= _PRECISION_TOLERANCE:  # x/0 is +Inf in Go
            counts[i] = previous
        else:
            previous = current


def _ensure_monotonic(counts: list[float]) -> None:
    highest = counts[0]
    for i in range(1, len(counts)):
        if counts[i] > highest:
            highest = counts[i]
        elif counts[i] < highest:
            counts[i] = highest
