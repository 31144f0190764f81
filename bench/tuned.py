"""The one-hour replays again with other seeds (the overlay's offsets and the routing change):
Ebbtide with its defaults, each peer at its default, and each peer at the setting its hindsight
sweep chose on seed 1 (bench/run.py's runs, `"tuned"` in their JSON; sim/peers/tuning.py).
Not swept again per seed: a sweep costs five to ten replays, and the question here is how much
one setting's outcome moves with the seed. Writes bench/results/seeds.json (run by bench/run.py
after the runs; `python bench/tuned.py` alone reruns it from the recorded seed-1 choices).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "operator"))

from ebbtide.sim import report  # noqa: E402
from ebbtide.sim.capacity import get_preset  # noqa: E402
from ebbtide.sim.catalog import PEERS, build_policies, peer_makers  # noqa: E402
from ebbtide.sim.fleet import SimSettings, simulate  # noqa: E402
from ebbtide.sim.inputs import load_spec, load_trace, model_max_len  # noqa: E402

TRACES = {"conv-1h": 14, "code-1h": 12}  # key -> --scale, as bench/run.py runs them
SEEDS = (2, 3)  # seed 1 is bench/run.py's run


def main() -> int:
    only = sys.argv[1:] or list(TRACES)  # `python bench/tuned.py conv-1h`: that trace's rows only
    unknown = set(only) - set(TRACES)
    if unknown:
        raise SystemExit(f"unknown traces {', '.join(sorted(unknown))}; known: {', '.join(TRACES)}")
    out = BENCH / "results" / "seeds.json"
    kept = [row for row in json.loads(out.read_text())["rows"] if row["trace"] not in only] if out.exists() else []
    spec_name, spec = load_spec(None)
    preset = get_preset("llama-3.1-8b-h100")
    capacity = preset.with_overrides(max_model_len=model_max_len(spec, preset))  # as `simulate` reads the spec
    targets = spec.scaling.targets
    rows = []
    for key in only:
        scale = TRACES[key]
        chosen = {name[: -len("-tuned")]: p["tuned"]["value"]
                  for name, p in json.loads((BENCH / "results" / f"{key}.json").read_text())["policies"].items()
                  if "tuned" in p}
        for seed in SEEDS:
            trace = load_trace(key, capacity, spec, peak_replicas=12, scale=scale, seed=seed, hours=None)
            settings = SimSettings(capacity=capacity, cold_start_s=spec.warmup.default_startup_seconds,
                                   metrics_window_s=spec.scaling.behavior.metrics_window_seconds,
                                   ttft_quantile=targets.ttft.quantile, tpot_quantile=targets.tpot.quantile,
                                   gpus_per_replica=max(1, spec.engine.gpus), seed=seed,
                                   routing="random")  # `simulate`'s default, as bench/run.py's seed 1 ran
            makers = peer_makers(spec, trace, capacity)
            policies = build_policies(["ebbtide", *PEERS], spec, trace, capacity)
            for name in PEERS:
                if name in chosen:
                    tuned = makers[name][1](chosen[name])
                    tuned.name = f"{name}-tuned"
                    policies.append(tuned)
            for policy in policies:
                result = report.summarize(simulate(trace, policy, settings), spec)
                rows.append({"trace": key, "seed": seed, "policy": policy.name, **result.to_json()})
                print(f"{key} seed {seed} {policy.name}: {result.gpu_hours:.1f} GPU-h, "
                      f"SLO {result.slo_attainment:.2%}", flush=True)
    rows = sorted(kept + rows, key=lambda row: list(TRACES).index(row["trace"]))  # stable: seeds, policies in order
    out.write_text(json.dumps({"spec": spec_name, "seeds": list(SEEDS), "tuned_on_seed": 1, "rows": rows},
                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
