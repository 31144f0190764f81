"""Which requests miss the SLO on the variants bench, and could a fleet sized with hindsight do better?

The variants row (bench/run.py variants) reports one SLO attainment per run; this breaks the misses
down: TTFT or ITL, by the context a request needs, by its output length, by the variant that served
it, and by five-minute slice of the hour. A run is a bench policy (ebbtide-variants, or
ebbtide-<variant> alone), warm as the bench runs it (a first replay teaches the limits), or a static
fleet given as counts per variant (`--static h100=2,l40s=12`: each variant held at that count), and
`--routes` replaces the plan's size routes by fixed ones (JSON, MixPlan.routes' shape), to ask what
another routing would have done.

    python bench/variants_misses.py ebbtide-variants
    python bench/variants_misses.py --static h100=2,l40s=20
    python bench/variants_misses.py --static h100=2,l40s=16 --routes '[[null, ["h100"]], [65536, ["l40s"]]]'

It runs this checkout's code (operator/ first on sys.path). Scratch diagnosis: nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))

from ebbtide.api.manifest import load_manifests  # noqa: E402
from ebbtide.sim.capacity import LLAMA_3_1_8B_H100  # noqa: E402
from ebbtide.sim.combined_traces import load_combined  # noqa: E402
from ebbtide.sim.engine_types import Finished  # noqa: E402
from ebbtide.sim.fleet import SimSettings  # noqa: E402
from ebbtide.sim.variant_fleet import VARIANTS_POLICY, VariantsPolicy, simulate_variants  # noqa: E402
from ebbtide.sim.variant_runs import PREFIX, run_setup  # noqa: E402
from ebbtide.sim.variant_serving import VariantServing  # noqa: E402

SIZES = ((0, 2_048), (2_048, 8_192), (8_192, 16_384), (16_384, 65_536), (65_536, None))
OUTPUTS = ((0, 10), (10, 50), (50, 200), (200, None))


class Recorded(VariantServing):
    """The serving of the run, keeping each finished request: (arrival, prompt, output, TTFT,
    mean ITL, variant), with the time it waited at the gateway counted as the report counts it."""

    rows: list[tuple[float, int, int, float, float, str]] = []

    def _collect(self, rid: int, events: list) -> None:
        for e in events:
            if isinstance(e, Finished):
                held = self._held.get(e.request_id, 0.0)
                Recorded.rows.append((e.arrival - held, e.prompt_tokens, e.output_tokens, (e.ttft or 0.0) + held,
                                      e.mean_itl or 0.0, self.kinds[rid]))
        super()._collect(rid, events)


def held_at(spec, counts: dict[str, int]):
    """The spec with each variant named held at its count (min = max), the others left out."""
    variants = [v.model_copy(update={"replicas": v.replicas.model_copy(update={"min": counts[v.name], "max": counts[v.name]})})
                for v in spec.variants if v.name in counts]
    return spec.model_copy(update={"variants": variants})


def run(spec, name: str, seed: int, routes):
    trace = load_combined("conv-1h+mooncake-1h", seed)
    targets = spec.scaling.targets
    settings = SimSettings(capacity=LLAMA_3_1_8B_H100, cold_start_s=float(spec.warmup.default_startup_seconds),
                           seed=seed, ttft_quantile=targets.ttft.quantile,
                           tpot_quantile=targets.tpot.quantile)
    kinds, policy = run_setup(name, spec, None)
    simulate_variants(trace, policy, kinds, settings)  # the replay that teaches the limits, as the bench's
    kinds, policy = run_setup(name, spec, None, learned=policy)
    if routes is not None and isinstance(policy, VariantsPolicy):
        policy.size_routing, policy.routes = False, routes
    Recorded.rows = []
    _, usd = simulate_variants(trace, policy, kinds, settings, serving_type=Recorded)
    return trace, usd, policy


def breakdown(trace, spec, rows) -> list[str]:
    arrival, prompt, output, ttft, itl = (np.array([r[i] for r in rows], dtype=float) for i in range(5))
    kind = np.array([r[5] for r in rows])
    targets = spec.scaling.targets
    late, slow = ttft > targets.ttft.target_seconds, itl > targets.tpot.target_seconds
    miss = late | slow
    total = trace.requests
    lines = [f"{miss.sum():,} of {len(rows):,} finished requests miss ({miss.sum() / total:.2%} of all {total:,}; "
             f"{total - len(rows)} unfinished at the end): TTFT only {(late & ~slow).sum()}, ITL only "
             f"{(slow & ~late).sum()}, both {(late & slow).sum()}"]

    def row(label: str, m: np.ndarray) -> str:
        share = miss[m].mean() if m.any() else 0.0
        return f"  {label:<26} {m.sum():>6} requests, {miss[m].sum():>5} miss ({share:.1%}): TTFT {late[m].sum()}, ITL {slow[m].sum()}"

    need = prompt + output + 1
    lines += [row(f"context {lo}-{hi or ''}", (need > lo) & (need <= (hi or np.inf))) for lo, hi in SIZES]
    lines += [row(f"output {lo + 1}-{hi or ''}", (output > lo) & (output <= (hi or np.inf))) for lo, hi in OUTPUTS]
    lines += [row(f"on {k}", kind == k) for k in sorted(set(kind))]
    edges = np.arange(0.0, trace.duration_s + 300.0, 300.0)
    missed, served = np.histogram(arrival[miss], edges)[0], np.histogram(arrival, edges)[0]
    lines.append("  by 5 min: " + " ".join(f"{100 * m / max(1, s):.1f}%" for m, s in zip(missed, served, strict=True)))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("policy", nargs="?", default=VARIANTS_POLICY, help="ebbtide-variants or ebbtide-<variant>")
    parser.add_argument("--spec", default=str(ROOT / "bench" / "variants.yaml"))
    parser.add_argument("--static", help="counts per variant, e.g. h100=2,l40s=12: a fleet held at them")
    parser.add_argument("--routes", help="fixed size routes for the gateway, JSON: [[bound or null, [variants]], ...]")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    ((_, spec),) = load_manifests(args.spec)
    name = args.policy
    if args.static:
        counts = {k: int(v) for k, v in (kv.split("=") for kv in args.static.split(","))}
        spec = held_at(spec, counts)
        name = VARIANTS_POLICY if len(counts) > 1 else f"{PREFIX}{next(iter(counts))}"
    routes = None if args.routes is None else tuple((b, tuple(n)) for b, n in json.loads(args.routes))
    trace, usd, policy = run(spec, name, args.seed, routes)
    spent = ", ".join(f"{k} {v:.2f}" for k, v in usd.items() if v)
    print(f"{args.static or name}, seed {args.seed}: {sum(usd.values()):.2f} USD ({spent})")
    if isinstance(policy, VariantsPolicy):
        print("  limits learned (tokens/s a replica): " + ", ".join(f"{k} {v:,.0f}" for k, v in policy.limits().items()))
    print("\n".join(breakdown(trace, spec, Recorded.rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
