"""The baselines with their one knob turned, on conv-week: what a user tuning HPA, AIBrix or KEDA
by hand could reach, so that Ebbtide is also compared with the best of them, not only with
their documented samples. Writes bench/results/tuned.json (run by bench/run.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "operator"))

from ebbtide.sim import baselines, report  # noqa: E402
from ebbtide.sim.capacity import get_preset  # noqa: E402
from ebbtide.sim.fleet import SimSettings, simulate  # noqa: E402
from ebbtide.sim.inputs import load_spec, load_trace  # noqa: E402

TRACE = "conv-week"
SWEEP = [
    ("hpa-kv", "KV-cache usage target", [0.05, 0.1, 0.2, 0.3, 0.5], lambda v: baselines.Hpa(1, 12, target=v)),
    ("aibrix-apa", "KV-cache usage target", [0.05, 0.1, 0.2, 0.5], lambda v: baselines.AibrixApa(1, 12, target=v)),
    ("keda-queue", "waiting requests per replica", [1.0, 5.0, 20.0], lambda v: baselines.Keda(1, 12, threshold=v)),
]


def main() -> int:
    spec_name, spec = load_spec(None)
    capacity = get_preset("llama-3.1-8b-h100")
    trace = load_trace(TRACE, capacity, spec, peak_replicas=12, scale=1, seed=1, hours=None)
    targets = spec.scaling.targets
    settings = SimSettings(capacity=capacity, cold_start_s=spec.warmup.default_startup_seconds,
                           metrics_window_s=spec.scaling.behavior.metrics_window_seconds,
                           ttft_quantile=targets.ttft.quantile, tpot_quantile=targets.tpot.quantile, seed=1)
    rows = []
    for name, knob, values, make in SWEEP:
        for value in values:
            result = report.summarize(simulate(trace, make(value), settings), spec)
            rows.append({"policy": name, "knob": knob, "value": value, **result.to_json()})
            print(f"{name} {knob} {value}: {result.gpu_hours:.1f} GPU-h, SLO {result.slo_attainment:.2%}", flush=True)
    out = BENCH / "results" / "tuned.json"
    out.write_text(json.dumps({"trace": TRACE, "spec": spec_name, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
