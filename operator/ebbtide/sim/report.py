"""Turn simulated runs into the numbers users compare: cost, latency, SLO attainment.

The JSON schema (`ebbtide simulate --json`) is stable; fields are only ever added:

    {"schema": "ebbtide.simulate/v1", "trace": str, "duration_s": float, "requests": int,
     "requests_too_long": int, "spec": str, "settings": {...},
     "policies": {NAME: {"gpu_hours": float, "gpu_hours_by_type": {"on-demand": float, "spot": float,
                         "asleep": float}, "cost_usd": float, "usd_per_million_tokens": float,
                         "ttft_p50_s": float, "ttft_p90_s": float, "ttft_p99_s": float,
                         "itl_p90_s": float, "slo_attainment": float, "scale_actions": int,
                         "peak_replicas": int, "tokens": float, "spot_reclaim_events": int,
                         "spot_replicas_reclaimed": int, "requests_retried": float,
                         "ttft_p99_ramps_s": float | null, "slo_attainment_ramps": float | null}}}

`requests_too_long` counts the requests longer (prompt + output) than the engine's max_model_len
(the spec's `--max-model-len`, else the model's): vLLM refuses them on arrival, so they are not in
`requests` and serve nothing.

GPU-hours count from the moment a replica has a node (a spot pod Pending for want of capacity
costs nothing) to the end of its drain or its reclaim, so the GPU time spent on requests in
flight on a reclaimed replica, which are then served again elsewhere, is charged, and their
tokens count once. Asleep hours cost 1 - sleep.reclaimedFraction of the price of the GPU
they hold (on demand or spot). The spot fields are zero for policies that place nothing on spot;
`requests_retried` is fractional in the fluid model.

`ttft_p99_ramps_s` is the TTFT p99 of the requests that arrive during the trace's ramps
(`ramp_hours`: each day's two hours whose request rate rises most over the hour before), and
`slo_attainment_ramps` the share of them that meet the SLO; both null for a trace shorter
than two hours. The p99 of a ramp is mostly the latency at the fleet's operating point (long
prompts prefilled next to a busy batch); the SLO misses are where a fleet that runs behind the
ramp shows.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ebbtide.api.spec import InferenceServiceSpec
from ebbtide.policy.capacity_types import CAPACITY_TYPES as DEPLOYMENTS
from ebbtide.policy.capacity_types import ON_DEMAND, SPOT
from ebbtide.sim.fleet import PolicyRun, Timeline
from ebbtide.sim.latency import weighted_quantiles
from ebbtide.sim.replicas import ASLEEP, ASLEEP_SPOT
from ebbtide.sim.traces import Trace

SCHEMA = "ebbtide.simulate/v1"
CAPACITY_TYPES = (*DEPLOYMENTS, ASLEEP)  # what GPU time is charged as


@dataclass(frozen=True)
class PolicyResult:
    name: str
    gpu_hours: float
    gpu_hours_by_type: dict[str, float]
    cost_usd: float
    usd_per_million_tokens: float
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    itl_p90_s: float
    slo_attainment: float
    scale_actions: int
    peak_replicas: int
    tokens: float
    spot_reclaim_events: int = 0  # reclaim events that took some of its replicas
    spot_replicas_reclaimed: int = 0
    requests_retried: float = 0.0  # in flight on a reclaimed replica, served again elsewhere
    ttft_p99_ramps_s: float | None = None  # requests arriving during the ramps (ramp_hours)
    slo_attainment_ramps: float | None = None  # of those, the share that meets the SLO

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "name"}


def slo_met(ttft: np.ndarray, itl: np.ndarray, spec: InferenceServiceSpec) -> np.ndarray:
    """Per request: does it meet every SLO target of the spec?"""
    ok = np.ones(len(ttft), dtype=bool)
    targets = spec.scaling.targets
    if targets.ttft is not None:
        ok &= ttft <= targets.ttft.target_seconds
    if targets.tpot is not None:
        ok &= itl <= targets.tpot.target_seconds
    return ok


RAMP_HOURS_PER_DAY = 2


def ramp_hours(trace: Trace, per_day: int = RAMP_HOURS_PER_DAY) -> list[tuple[float, float]]:
    """The trace's ramps, from its own load: for each day (24 h from the trace's start), the
    `per_day` whole hours (from the trace's start) whose mean request rate rises most over the
    hour before, if it rises at all. (start, end) in trace seconds, in time order. On the
    bundled weeks these are the mornings: code 11:00-14:00 UTC on weekdays (the rate doubles
    hour on hour), conversation's rises are gentler and less regular."""
    hours = int(trace.duration_s // 3600)
    if hours < 2:
        return []
    per_hour = np.asarray(trace.counts[: hours * 3600], dtype=float).reshape(hours, 3600).sum(axis=1)
    rise = np.diff(per_hour, prepend=np.inf)  # the first hour has no hour before it
    ramps = []
    for first in range(0, hours, 24):
        day = range(first, min(first + 24, hours))
        best = sorted(day, key=lambda h: -rise[h])[:per_day]
        ramps += [(h * 3600.0, (h + 1) * 3600.0) for h in best if rise[h] > 0]
    return sorted(ramps)


def summarize(run: PolicyRun, spec: InferenceServiceSpec, ramps: list[tuple[float, float]] | None = None
              ) -> PolicyResult:
    """The numbers of one run; with `ramps` (ramp_hours of its trace), also the TTFT p99 of the
    requests that arrived during them."""
    arrival, ttft, itl, weight = run.records.arrays()
    hours = {kind: run.gpu_seconds.get(kind, 0.0) / 3600.0 for kind in CAPACITY_TYPES}
    prices = {ON_DEMAND: spec.pricing.on_demand_per_gpu_hour, SPOT: spec.pricing.spot_per_gpu_hour,
              # A sleeping replica still holds its GPU; the reclaimed share is used by others.
              ASLEEP: spec.pricing.on_demand_per_gpu_hour * (1 - spec.sleep.reclaimed_fraction)}
    cost = sum(hours[k] * prices[k] for k in CAPACITY_TYPES)
    # Spot sleepers hold spot GPUs: their asleep hours at the spot price instead.
    asleep_spot = run.gpu_seconds.get(ASLEEP_SPOT, 0.0) / 3600.0
    cost -= asleep_spot * (prices[ON_DEMAND] - prices[SPOT]) * (1 - spec.sleep.reclaimed_fraction)
    met = slo_met(ttft, itl, spec)
    ttft_q = weighted_quantiles(ttft, weight, (0.5, 0.9, 0.99))
    # Points of one group share their arrival and ITL: one point per group, with the group's weight.
    group = run.records.group
    if group > 1 and len(itl) % group == 0:
        itl_q = weighted_quantiles(itl[::group], weight.reshape(-1, group).sum(axis=1), (0.9,))
        ramp = _inside(arrival[::group], ramps)
        ramp = None if ramp is None else np.repeat(ramp, group)
    else:
        itl_q = weighted_quantiles(itl, weight, (0.9,))
        ramp = _inside(arrival, ramps)

    def rounded(value: float | None) -> float:
        return float("nan") if value is None else round(value, 4)

    return PolicyResult(
        name=run.name,
        gpu_hours=gpu_hours(run),
        gpu_hours_by_type={k: round(v, 3) for k, v in hours.items()},
        cost_usd=round(cost, 2),
        usd_per_million_tokens=round(cost / run.tokens_served * 1e6, 4) if run.tokens_served else float("nan"),
        ttft_p50_s=rounded(ttft_q[0]),
        ttft_p90_s=rounded(ttft_q[1]),
        ttft_p99_s=rounded(ttft_q[2]),
        itl_p90_s=rounded(itl_q[0]),
        slo_attainment=_attained(weight, met),
        scale_actions=run.scale_actions,
        peak_replicas=max(run.timeline.replicas, default=0),
        tokens=round(run.tokens_served),
        spot_reclaim_events=run.spot.reclaim_events,
        spot_replicas_reclaimed=run.spot.replicas_reclaimed,
        requests_retried=round(run.spot.requests_retried, 1),
        ttft_p99_ramps_s=None if ramp is None else _rounded_or_none(
            weighted_quantiles(ttft[ramp], weight[ramp], (0.99,))[0]),
        slo_attainment_ramps=None if ramp is None or not weight[ramp].sum() else round(
            float(weight[ramp & met].sum() / weight[ramp].sum()), 5),
    )


def gpu_hours(run: PolicyRun) -> float:
    return round(sum(run.gpu_seconds.get(kind, 0.0) for kind in CAPACITY_TYPES) / 3600.0, 3)


def slo_attainment(run: PolicyRun, spec: InferenceServiceSpec) -> float:
    """summarize(run, spec).slo_attainment, without the quantiles: what a hindsight search asks
    of each of its replays."""
    _, ttft, itl, weight = run.records.arrays()
    return _attained(weight, slo_met(ttft, itl, spec))


def _attained(weight: np.ndarray, met: np.ndarray) -> float:
    return round(float(weight[met].sum()) / (float(weight.sum()) or 1.0), 5)


def _rounded_or_none(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _inside(arrival: np.ndarray, ramps: list[tuple[float, float]] | None) -> np.ndarray | None:
    """Which requests arrived during the ramps; None without ramps."""
    if not ramps:
        return None
    starts = np.array([a for a, _ in ramps])
    ends = np.array([b for _, b in ramps])
    index = np.searchsorted(starts, arrival, side="right") - 1
    return (index >= 0) & (arrival < ends[np.maximum(index, 0)])


def spot_note(results: list[PolicyResult]) -> str:
    """What spot capacity did to the policies that used it, in one line."""
    return "; ".join(f"{r.name}: {r.spot_reclaim_events} reclaim events took {r.spot_replicas_reclaimed} "
                     f"replicas, {r.requests_retried:,.0f} requests retried" for r in results
                     if r.gpu_hours_by_type.get(SPOT, 0.0) > 0 or r.spot_replicas_reclaimed)


def to_json(trace: Trace, spec_name: str, settings: dict, results: list[PolicyResult]) -> dict:
    return {
        "schema": SCHEMA,
        "trace": trace.name,
        "duration_s": trace.duration_s,
        "requests": trace.requests,
        "requests_too_long": trace.too_long,
        "spec": spec_name,
        "settings": settings,
        "policies": {r.name: r.to_json() for r in results},
    }


def write_json(path: str | Path, document: dict) -> None:
    Path(path).write_text(json.dumps(document, indent=2) + "\n")


COST, LATENCY = "cost", "latency"


def _columns(results: list[PolicyResult]) -> list[tuple[str | None, str, Callable[[PolicyResult], str]]]:
    """(cost or latency, header, cell) of each column. GPU-hours by capacity type only when some
    policy held spot or sleeping GPUs: else they are all on demand, the total."""
    used = [k for k in CAPACITY_TYPES[1:] if any(r.gpu_hours_by_type[k] for r in results)]
    columns = [(None, "policy", lambda r: r.name), (COST, "GPU-h\ntotal", lambda r: f"{r.gpu_hours:.1f}")]
    columns += [(COST, f"GPU-h\n{k}", lambda r, k=k: f"{r.gpu_hours_by_type[k]:.1f}")
                for k in (["on-demand", *used] if used else [])]
    columns += [(COST, "USD", lambda r: f"{r.cost_usd:,.0f}"),
                (COST, "USD/1M\ntokens", lambda r: f"{r.usd_per_million_tokens:.3f}"),
                (COST, "scale\nactions", lambda r: str(r.scale_actions)),
                (COST, "peak\nreplicas", lambda r: str(r.peak_replicas)),
                (LATENCY, "TTFT\np50", lambda r: f"{r.ttft_p50_s:.2f}s"),
                (LATENCY, "TTFT\np90", lambda r: f"{r.ttft_p90_s:.2f}s"),
                (LATENCY, "TTFT\np99", lambda r: f"{r.ttft_p99_s:.2f}s")]
    if any(r.ttft_p99_ramps_s is not None for r in results):
        columns.append((LATENCY, "ramps\nTTFT p99",
                        lambda r: "-" if r.ttft_p99_ramps_s is None else f"{r.ttft_p99_ramps_s:.2f}s"))
    return columns + [(LATENCY, "ITL\np90", lambda r: f"{r.itl_p90_s * 1000:.0f}ms"),
                      (LATENCY, "SLO\nmet", lambda r: f"{100 * r.slo_attainment:.2f}%")]


def tables(results: list[PolicyResult], width: int) -> list:
    """One row per policy, in one table if it fits `width` columns, else in two (cost, then
    latency) rather than one whose cells rich would cut to fit."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    def table(columns: list) -> Table:
        t = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for _, header, _ in columns:
            t.add_column(header, justify="left" if header == "policy" else "right", no_wrap=True)
        for r in results:
            t.add_row(*(cell(r) for _, _, cell in columns))
        return t

    columns = _columns(results)
    whole = table(columns)
    if Console(width=10_000).measure(whole).maximum <= width:
        return [whole]
    return [table([c for c in columns if c[0] != LATENCY]), table([c for c in columns if c[0] != COST])]


def slo_caption(spec: InferenceServiceSpec) -> str:
    """The SLO the "SLO met" column measures against: the spec's latency targets."""
    targets = spec.scaling.targets
    slos = [f"{name} p{100 * slo.quantile:g} <= {slo.target_seconds:g} s"
            for name, slo in (("TTFT", targets.ttft), ("TPOT", targets.tpot)) if slo is not None]
    if not slos:
        return "SLO: the spec sets no latency target, so every request counts as meeting it"
    return (f"SLO targets (spec.scaling.targets): {', '.join(slos)}. SLO met: the share of requests whose "
            "own TTFT and ITL are within those targets.")


def markdown_table(results: list[PolicyResult]) -> str:
    lines = ["| policy | GPU-h | USD | USD/1M tok | TTFT p50 | TTFT p90 | TTFT p99 | ITL p90 | SLO met | actions |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.name} | {r.gpu_hours:.1f} | {r.cost_usd:,.0f} | {r.usd_per_million_tokens:.3f} | "
                     f"{r.ttft_p50_s:.2f} s | {r.ttft_p90_s:.2f} s | {r.ttft_p99_s:.2f} s | "
                     f"{r.itl_p90_s * 1000:.0f} ms | {100 * r.slo_attainment:.2f} % | {r.scale_actions} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class PlotSeries:
    """What the plot needs of one run, so its per-request records can be dropped early (a week
    replay holds about 4 million latency points per policy)."""

    name: str
    timeline: Timeline
    ttft_hours: np.ndarray
    ttft_p90: np.ndarray
    replica_hours: np.ndarray
    replicas: np.ndarray  # mean over each bin: per-minute steps of a week are a solid block


def plot_series(run: PolicyRun, trace: Trace) -> PlotSeries:
    window = max(60.0, trace.duration_s / 400)
    hours, p90 = _binned_p90(run.records, window)
    minutes = np.asarray(run.timeline.minute)
    bins = ((minutes - 1e-9) * 60.0 // window).astype(int)
    counts = np.bincount(bins)
    keep = counts > 0
    mean = np.bincount(bins, weights=np.asarray(run.timeline.replicas, dtype=float))[keep] / counts[keep]
    return PlotSeries(run.name, run.timeline, hours, p90, np.nonzero(keep)[0] * window / 3600, mean)


def plot(path: str | Path, trace: Trace, series: list[PlotSeries], spec: InferenceServiceSpec) -> None:
    """Load, replicas per policy, TTFT p90 per policy, and what each has cost so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_load, ax_rep, ax_ttft, ax_cost) = plt.subplots(
        4, 1, figsize=(12, 11), sharex=True, gridspec_kw={"height_ratios": (1, 1.2, 1.2, 1)})
    first = series[0].timeline
    ax_load.plot(np.asarray(first.minute) / 60.0, first.arrivals_per_s, color="black", lw=0.8)
    ax_load.set_ylabel("requests/s")
    ax_load.set_title(f"{trace.name}: load, replicas, TTFT p90 and cost by policy")
    for one in series:
        style = {"color": "black", "ls": "--"} if one.name == "oracle" else {}
        width = 1.6 if one.name.startswith("ebbtide") else 0.9
        ax_rep.step(one.replica_hours, one.replicas, where="post", lw=width, label=one.name, **style)
        ax_ttft.plot(one.ttft_hours, one.ttft_p90, lw=width * 0.8, label=one.name, **style)
        ax_cost.plot(np.asarray(one.timeline.minute) / 60.0, cumulative_usd(one.timeline, spec), lw=width,
                     label=one.name, **style)
    if spec.scaling.targets.ttft is not None:
        ax_ttft.axhline(spec.scaling.targets.ttft.target_seconds, color="red", ls="--", lw=0.8, label="TTFT target")
    ax_rep.set_ylabel("replicas (mean per bin)")
    ax_ttft.set_yscale("log")
    ax_ttft.set_ylabel("TTFT p90 (s)")
    ax_cost.set_ylabel("USD so far")
    ax_cost.set_xlabel("hours")
    # One legend for every panel, beside them: inside, it hid the lines it names.
    fig.legend(*ax_ttft.get_legend_handles_labels(), loc="center right", fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cumulative_usd(timeline: Timeline, spec: InferenceServiceSpec) -> np.ndarray:
    """Dollars spent by the end of each minute of the timeline, from the replicas it held then
    (each minute charged at its last step's count: the table's total, from the exact GPU time,
    differs by the minutes' changes)."""
    od, spot_price = spec.pricing.on_demand_per_gpu_hour, spec.pricing.spot_per_gpu_hour
    replicas, spot, asleep = (np.asarray(x, dtype=float) for x in (timeline.replicas, timeline.spot, timeline.asleep))
    # Spot replicas asleep are rare and charged here at the on-demand asleep price: a plot's approximation.
    per_hour = ((replicas - spot - asleep) * od + spot * spot_price
                + asleep * od * (1 - spec.sleep.reclaimed_fraction)) * max(1, spec.engine.gpus)
    minutes = np.diff(np.concatenate([[0.0], np.asarray(timeline.minute, dtype=float)]))
    return np.cumsum(per_hour * minutes / 60.0)


def _binned_p90(records, window: float) -> tuple[np.ndarray, np.ndarray]:
    """(hours, TTFT p90) per `window` seconds of arrival time, read off a histogram with 100
    log-spaced TTFT buckets per decade: about 2 % resolution, plenty for a plot, and one pass
    over millions of points instead of a sort per bin."""
    arrival, ttft, _, weight = records.arrays()
    if not len(arrival):
        return np.zeros(0), np.zeros(0)
    per_decade, lowest, decades = 100, 1e-3, 7
    buckets = decades * per_decade + 1
    bucket = np.clip(np.floor(np.log10(np.maximum(ttft, lowest) / lowest) * per_decade), 0, buckets - 1)
    time_bin = (arrival // window).astype(np.int64)
    hist = np.bincount(time_bin * buckets + bucket.astype(np.int64), weights=weight,
                       minlength=(int(time_bin.max()) + 1) * buckets).reshape(-1, buckets)
    totals = hist.sum(axis=1)
    keep = totals > 0
    below = (np.cumsum(hist[keep], axis=1) < 0.9 * totals[keep][:, None]).sum(axis=1)
    p90 = lowest * 10 ** ((below + 1) / per_decade)  # the bucket's upper edge
    return (np.nonzero(keep)[0] + 0.5) * window / 3600, p90
