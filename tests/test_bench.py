"""bench/RESULTS.md says what the last `make bench` measured, and nothing else."""

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_render():
    if str(BENCH) not in sys.path:  # as bench/run.py runs it: its sections are modules beside it
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_render", BENCH / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_page_is_in_sync_with_the_recorded_runs():
    render = load_render()
    expected = render.render(BENCH / "results")
    assert (BENCH / "RESULTS.md").read_text() == expected, "rerun `make bench` (or bench/render.py) after edits"


def test_every_trace_was_run_with_every_policy_and_timed():
    render = load_render()
    for key in render.TRACES:
        document = json.loads((BENCH / "results" / f"{key}.json").read_text())
        assert document["schema"] == "ebbtide.simulate/v1"
        assert {"ebbtide", "ebbtide-warm", "static-peak", "hpa-kv", "keda-queue", "aibrix-apa", "oracle"} \
            <= set(document["policies"])
        assert document["bench"]["command"].startswith("ebbtide simulate")
        assert (BENCH / f"{key}.png").stat().st_size > 10_000
    speed = json.loads((BENCH / "results" / "speed.json").read_text())
    assert speed["bench"]["command"] == "ebbtide simulate --trace conv-week --json bench/results/speed.json"


def test_the_lifecycle_runs_compare_the_four_ebbtide_rows_on_the_ramps():
    render = load_render()
    for key in render.LIFECYCLE:
        document = json.loads((BENCH / "results" / f"{key}.json").read_text())
        policies = document["policies"]
        assert {render.REACTIVE, render.ALL_FEATURES, "ebbtide-prewarm"} <= set(policies)
        assert document["settings"]["trained_profile"] and document["settings"]["cold_start_s"] == 180
        assert all(p["ttft_p99_ramps_s"] is not None and p["slo_attainment_ramps"] is not None
                   for p in policies.values())
        # The floor the ramp latency target is read against: the spec's maximum all week.
        floor = policies[render.FLOOR]
        assert floor["scale_actions"] == 0 and floor["peak_replicas"] == max(p["peak_replicas"] for p in policies.values())
        assert floor["ttft_p99_ramps_s"] <= policies[render.REACTIVE]["ttft_p99_ramps_s"]
        assert policies[render.REACTIVE]["gpu_hours_by_type"]["asleep"] == 0
        assert policies[render.ALL_FEATURES]["gpu_hours_by_type"]["asleep"] > 0
        assert document["bench"]["command"].startswith("ebbtide simulate --trace ")
