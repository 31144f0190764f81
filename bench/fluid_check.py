"""Does the fluid model agree with request-by-request replay? (issue #16, item 2)

For a window of every bundled trace where replaying each request is affordable, the same
requests (the same seed's draw: a rate trace expanded request by request, then replayed both
ways) go through the fluid model and through the engine scheduler, one `EngineCore` per replica,
requests routed as a Kubernetes Service routes them (random) and, for the static fleet, also as
a gateway does (power of two choices). Policies: a static fleet sized with hindsight on the fluid
replay (the smallest meeting the SLO for 99 % of requests there) and Ebbtide with the spec's
defaults. The targets: GPU-hours within 2 %, SLO attainment within 0.3 points.

    python bench/fluid_check.py            # writes bench/results/fluid-check.json (~15 min on 2 cores)

It runs this checkout's code (operator/ first on sys.path), whatever is installed.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT / "operator"))

from ebbtide.sim import report  # noqa: E402
from ebbtide.sim.baselines import Static  # noqa: E402
from ebbtide.sim.calibration import right_size_static  # noqa: E402
from ebbtide.sim.capacity import get_preset  # noqa: E402
from ebbtide.sim.ebbtide_policy import EbbtidePolicy  # noqa: E402
from ebbtide.sim.fleet import SimSettings, simulate  # noqa: E402
from ebbtide.sim.inputs import load_spec, load_trace, model_max_len  # noqa: E402

GPU_HOURS_TOLERANCE = 0.02
SLO_POINTS_TOLERANCE = 0.3
SEED = 1
LONG_CONTEXT = str(ROOT / "examples" / "long-context-chat.yaml")
# (trace, spec, scale, window in hours from the trace's start, why this window). Weeks: three
# hours around a weekday's morning ramp, where a fleet that lags shows.
WINDOWS = [
    ("conv-week", None, 1, (30.0, 33.0), "Monday 06:00-09:00 UTC, the morning rise"),
    ("code-week", None, 1, (10.0, 13.0), "Friday 10:00-13:00 UTC, the weekday ramp"),
    ("servegen-14d", None, 1, (30.0, 33.0), "day 2, 06:00-09:00 from the trace's start"),
    ("conv-1h", None, 14, None, "the whole hour, overlaid 14 times as in the bench"),
    ("code-1h", None, 12, None, "the whole hour, overlaid 12 times as in the bench"),
    ("mooncake-1h", LONG_CONTEXT, 3, None, "the whole hour, overlaid 3 times, long-context spec"),
]


def replay(trace, policy, spec, settings, per_request: bool) -> tuple[report.PolicyResult, float]:
    started = time.process_time()
    run = simulate(trace, policy, settings, per_request=per_request)
    return report.summarize(run, spec), time.process_time() - started


def check(name: str, spec_path: str | None, scale: int, hours: tuple[float, float] | None, why: str) -> dict:
    spec_name, spec = load_spec(spec_path)
    preset = get_preset("llama-3.1-8b-h100")
    capacity = preset.with_overrides(max_model_len=model_max_len(spec, preset))
    span = None if hours is None else (hours[0] * 3600, hours[1] * 3600)
    trace = load_trace(name, capacity, spec, 12, scale, SEED, None, per_request=True, span=span)
    targets = spec.scaling.targets
    settings = SimSettings(capacity=capacity, cold_start_s=float(spec.warmup.default_startup_seconds),
                           metrics_window_s=spec.scaling.behavior.metrics_window_seconds,
                           ttft_quantile=targets.ttft.quantile if targets.ttft else None,
                           tpot_quantile=targets.tpot.quantile if targets.tpot else None, seed=SEED)
    # Sized on the fluid replay (the same load without its per-request arrivals): cheap.
    static, _ = right_size_static(spec, replace(trace, arrivals=None), settings, 1, 0.99)
    rows = []
    for label, make, routings in (
            (f"static-{static.replicas}", lambda: Static(replicas=static.replicas), ("random", "power-of-two")),
            ("ebbtide", lambda: EbbtidePolicy(spec), ("random",))):
        fluid, fluid_cpu = replay(trace, make(), spec, settings, per_request=False)
        for routing in routings:
            exact, exact_cpu = replay(trace, make(), spec, replace(settings, routing=routing), per_request=True)
            gpu = fluid.gpu_hours / exact.gpu_hours - 1 if exact.gpu_hours else 0.0
            slo = 100 * (fluid.slo_attainment - exact.slo_attainment)
            rows.append({
                "policy": label, "routing": routing,
                "request": _numbers(exact, exact_cpu), "fluid": _numbers(fluid, fluid_cpu),
                "gpu_hours_gap": round(gpu, 4), "slo_points_gap": round(slo, 2),
                "agrees": abs(gpu) <= GPU_HOURS_TOLERANCE and abs(slo) <= SLO_POINTS_TOLERANCE})
            print(f"{name} {label} {routing}: GPU-h {exact.gpu_hours:.2f} / {fluid.gpu_hours:.2f}, SLO met "
                  f"{exact.slo_attainment:.2%} / {fluid.slo_attainment:.2%} (request / fluid; CPU "
                  f"{exact_cpu:.0f} s / {fluid_cpu:.1f} s)", flush=True)
    return {"trace": name, "spec": spec_name, "scale": scale, "hours": hours, "window": why,
            "requests": trace.requests, "requests_too_long": trace.too_long, "rows": rows}


def _numbers(result: report.PolicyResult, cpu: float) -> dict:
    return {"gpu_hours": result.gpu_hours, "slo_attainment": result.slo_attainment, "ttft_p90_s": result.ttft_p90_s,
            "ttft_p99_s": result.ttft_p99_s, "itl_p90_s": result.itl_p90_s, "cpu_s": round(cpu, 1)}


def main() -> int:
    only = set(sys.argv[1:])
    out = BENCH / "results" / "fluid-check.json"
    previous = json.loads(out.read_text())["traces"] if out.exists() and only else []
    checked = [check(*window) for window in WINDOWS if not only or window[0] in only]
    keep = [t for t in previous if t["trace"] not in {c["trace"] for c in checked}]
    order = [w[0] for w in WINDOWS]
    traces = sorted(keep + checked, key=lambda t: order.index(t["trace"]))
    document = {"command": "python bench/fluid_check.py", "seed": SEED,
                "tolerance": {"gpu_hours": GPU_HOURS_TOLERANCE, "slo_points": SLO_POINTS_TOLERANCE},
                "traces": traces}
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
