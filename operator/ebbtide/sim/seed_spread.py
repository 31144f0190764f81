"""Runs over several seeds (`simulate --seeds N`): what a table and the JSON say of them. The
main table shows each policy's mean over the seeds; the spread table its lowest and highest
GPU-hours, SLO attainment and TTFT p99; the JSON both, and every seed's numbers."""

from __future__ import annotations

from dataclasses import fields

import numpy as np

from ebbtide.sim.report import PolicyResult

# The measures whose spread is shown in the table (all numeric ones are in the JSON).
SHOWN = (("gpu_hours", "GPU-h", "{:.1f}"), ("slo_attainment", "SLO met", "{:.2%}"),
         ("ttft_p99_s", "TTFT p99", "{:.2f}s"))


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]
    return None if not present else float(np.mean(present))


def mean_results(by_seed: list[list[PolicyResult]]) -> list[PolicyResult]:
    """Each policy's mean over the seeds (same policies, same order, in every seed)."""
    means = []
    for runs in zip(*by_seed, strict=True):
        values = {}
        for f in fields(PolicyResult):
            column = [getattr(r, f.name) for r in runs]
            if f.name == "name":
                values[f.name] = column[0]
            elif isinstance(column[0], dict):
                values[f.name] = {k: round(_mean([c[k] for c in column]), 3) for k in column[0]}
            else:
                mean = _mean(column)
                values[f.name] = None if mean is None else round(mean, 5)
        means.append(PolicyResult(**values))
    return means


def spread_json(seeds: list[int], by_seed: list[list[PolicyResult]]) -> dict[str, dict]:
    """policy -> {"seeds": [...], measure: {"mean", "min", "max"}, "runs": [one per seed]}."""
    out: dict[str, dict] = {}
    for runs in zip(*by_seed, strict=True):
        entry: dict = {"seeds": seeds}
        for f in fields(PolicyResult):
            column = [getattr(r, f.name) for r in runs]
            if f.name == "name" or isinstance(column[0], dict) or _mean(column) is None:
                continue
            present = [v for v in column if v is not None and not np.isnan(v)]
            entry[f.name] = {"mean": round(_mean(present), 5), "min": min(present), "max": max(present)}
        entry["runs"] = [r.to_json() for r in runs]
        out[runs[0].name] = entry
    return out


def spread_table(seeds: list[int], by_seed: list[list[PolicyResult]]):
    """A rich table: per policy, the lowest and highest of the SHOWN measures over the seeds."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                  title=f"over {len(seeds)} seeds ({', '.join(map(str, seeds))}): mean, lowest - highest",
                  title_justify="left")
    table.add_column("policy", no_wrap=True)
    for _, header, _ in SHOWN:
        table.add_column(header, justify="right", no_wrap=True)
    for runs in zip(*by_seed, strict=True):
        cells = []
        for key, _, form in SHOWN:
            column = [getattr(r, key) for r in runs]
            present = [v for v in column if v is not None and not np.isnan(v)]
            cells.append("-" if not present else
                         f"{form.format(np.mean(present))} ({form.format(min(present))} - {form.format(max(present))})")
        table.add_row(runs[0].name, *cells)
    return table
