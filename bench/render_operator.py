"""The operator's sections of bench/RESULTS.md: its failover (tests/test_operator_ha.py) and its
cost at fleet scale (bench/operator_scale.py), from bench/results/operator-scale.json."""

from __future__ import annotations

import statistics

SCALE_TICK_S, SCALE_RSS_MIB = 5.0, 500  # issue 18: tick p99 under the tick interval, RSS under 500 MiB


def mark(ok: bool) -> str:
    return "met" if ok else "**not met**"


def failover(doc: dict) -> str:
    """High availability (tests/test_operator_ha.py): a killed leader's standby, in seconds."""
    runs, detail = doc["failover_s"], doc.get("failover", {})
    lines = ["## Operator failover", "", f"{detail.get('what', '')}. Target: within 15 s.", "",
             "| | runs | min | median | max |", "|---|---:|---:|---:|---:|"]
    for name, values in (("first decision (`failover_s`)", runs), ("Lease held", detail.get("lease_s") or [])):
        if values:
            ordered = sorted(values)
            lines.append(f"| {name} | {len(values)} | {ordered[0]:.1f} s | {ordered[len(values) // 2]:.1f} s | "
                         f"{ordered[-1]:.1f} s |")
    if "how" in detail:
        lines += ["", f"Measured with {detail['how']}."]
    return "\n".join(lines)


def scale_section(doc: dict, note: str | None) -> list[str]:
    """The operator at fleet scale (bench/operator_scale.py)."""
    out = ["## Operator at scale", "", f"    {doc['command']}", "",
           f"The operator (`ebbtide run`, its own process, default {doc['tick_interval_s']:g} s tick) on the real "
           f"control plane with {doc['cpus']} CPUs shared; status-only pods, one exporter, a real Prometheus "
           f"scraping every {doc['scrape_interval_s']:g} s. Per tick: averages over a window with nothing changing. "
           f"Targets: tick p99 < {SCALE_TICK_S:g} s, Prometheus queries and API requests per tick that do not grow "
           f"with the services, RSS < {SCALE_RSS_MIB} MiB.", ""]
    rows = [*doc["sizes"], *doc.get("before_fix", [])]
    out += ["| operator at | services | pods | tick p50 | tick p99 | Prometheus queries / tick | API requests / tick "
            "| watches | RSS | CPU | backlog to patch (median, max) | load |",
            "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        backlog = [b for b in r.get("backlog_to_patch_s") or [] if b is not None]
        waited = f"{statistics.median(backlog):.1f} s, {max(backlog):.1f} s" if backlog else "-"
        if missed := sum(1 for b in r.get("backlog_to_patch_s") or [] if b is None):
            waited += f" ({missed} not scaled)"
        requests = ", ".join(f"{verb} {n:g}" for verb, n in r["api_requests_per_tick"].items())
        out.append(f"| {r.get('commit', '')} | {r['services']:,} | {r['pods']:,} | {r['tick_p50_s']:.2f} s | "
                   f"{r['tick_p99_s']:.2f} s {mark(r['tick_p99_s'] < SCALE_TICK_S)} | {r['prometheus_queries_per_tick']:g} | "
                   f"{requests} | {r['watches']} | {r['rss_mib']:.0f} MiB {mark(r['rss_mib'] < SCALE_RSS_MIB)} | "
                   f"{r['cpu_cores']:.2f} | {waited} | {' / '.join(str(x) for x in r.get('load_average', []))} |")
    if "failover_s" in doc:
        out += ["", f"Leader failover: {doc['failover_s']} s."]
    if note:
        out += ["", note]
    return out + [""]
