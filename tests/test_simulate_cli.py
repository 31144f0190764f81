"""`ebbtide simulate`'s options behave as users expect: the spec after --policies is the spec,
--help names the policies as the table does, nonsense is refused before any work, and the
table fits 100 columns and says which SLO it measures against."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml

from ebbtide.sim.catalog import ALL_POLICIES, EXTRA_POLICIES
from ebbtide.sim.command import policies_and_spec
from ebbtide.sim.report import PolicyResult, tables
from tests.cli import ROOT, ebbtide, refused
from tests.testbed.replays import CLI_ENV


def test_the_spec_after_policies_is_the_spec_and_the_table_fits_100_columns(tmp_path):
    manifest = yaml.safe_load((ROOT / "examples/chat-llama-8b.yaml").read_text())
    manifest["metadata"]["name"] = "mine"
    manifest["spec"]["scaling"]["targets"]["ttft"] = {"quantile": 0.95, "targetSeconds": 2.0}
    spec = tmp_path / "mine.yaml"
    spec.write_text(yaml.safe_dump(manifest))
    out = tmp_path / "out.json"
    # Space- and comma-separated, table names and the short ones, the spec last: as users write it.
    result = ebbtide("simulate", "--trace", "conv-week", "--hours", "2", "--json", out,
                     "--policies", "ebbtide,static-peak", "hpa", "ebbtide-spot", spec)
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    assert document["spec"] == "mine"
    assert list(document["policies"]) == ["ebbtide", "static-peak", "hpa-kv", "ebbtide-spot"]
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= 100, "\n".join(line for line in lines if len(line) > 100)
    for name in document["policies"]:  # every policy has its rows, the spot one its capacity columns
        assert sum(line.lstrip().startswith(name + " ") for line in lines) >= 1, result.stdout
    assert "spot" in result.stdout and "ramps" in result.stdout
    assert "SLO targets (spec.scaling.targets): TTFT p95 <= 2 s, TPOT p90 <= 0.1 s" in " ".join(lines)


def test_policies_and_spec_take_apart_what_argparse_lumps_together(tmp_path):
    default = list(ALL_POLICIES)
    assert policies_and_spec(None, None) == (default, None)
    assert policies_and_spec(["ebbtide", "my.yaml"], None) == (["ebbtide"], "my.yaml")
    assert policies_and_spec(["static,hpa", "oracle"], "s.yaml") == (["static-peak", "hpa-kv", "oracle"], "s.yaml")
    assert policies_and_spec(["ebbtide", "ebbtide"], None) == (["ebbtide"], None)
    bare = tmp_path / "spec"  # an existing file counts, whatever its name
    bare.write_text("")
    assert policies_and_spec(["oracle", str(bare)], None) == (["oracle"], str(bare))
    with pytest.raises(ValueError, match="unknown policies orcale; known: ebbtide, static-peak"):
        policies_and_spec(["ebbtide", "orcale"], None)  # a typo is no spec
    with pytest.raises(ValueError, match="unknown policies other.yaml"):
        policies_and_spec(["ebbtide", "other.yaml"], "s.yaml")  # one spec only
    with pytest.raises(ValueError, match="names no policy"):
        policies_and_spec(["my.yaml"], None)


def test_help_lists_every_policy_by_the_name_the_table_uses():
    result = ebbtide("simulate", "--help", env={**CLI_ENV, "COLUMNS": "80"})
    assert result.returncode == 0
    words = set(re.findall(r"[\w.-]+", result.stdout))
    assert set(ALL_POLICIES + EXTRA_POLICIES) <= words, set(ALL_POLICIES + EXTRA_POLICIES) - words


@pytest.mark.parametrize("option, value, said", [
    ("--hours", "0", "must be greater than 0"),
    ("--peak-replicas", "0", "must be at least 1"),
    ("--oracle-slo", "2", "at most 1"),
    ("--cold-start", "-5", "must be at least 0"),
    ("--scrape-interval", "0", "must be greater than 0"),
    ("--scale", "1.5", "'1.5' is not a whole number"),
    ("--hours", "nan", "must be greater than 0"),
    ("--spot-outage", "1h", "expected DURATION@START"),
    ("--seeds", "0", "must be at least 1"),
    ("--routing", "round-robin", "invalid choice"),
])
def test_nonsense_numbers_are_refused_before_any_work(option, value, said):
    result = ebbtide("simulate", option, value)
    refused(result, f"ebbtide simulate: argument {option}: ", said)
    assert result.stdout == ""


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_output_paths_are_checked_before_the_replay(tmp_path, option):
    for path, said in ((tmp_path / "no-such-dir" / "out", "is not a directory"),
                       ("/etc/hostname/out", "/etc/hostname is not a directory"),  # refused to root too
                       (tmp_path, "is a directory")):
        result = ebbtide("simulate", option, path)
        refused(result, f"argument {option}: ", said)
        assert result.stdout == "", "the replay ran"


def result(name: str, spot: float = 0.0) -> PolicyResult:
    return PolicyResult(name=name, gpu_hours=1027.3, gpu_hours_by_type={"on-demand": 1027.3 - spot, "spot": spot,
                        "asleep": 0.0}, cost_usd=12345.0, usd_per_million_tokens=0.101, ttft_p50_s=0.09,
                        ttft_p90_s=0.25, ttft_p99_s=148.46, itl_p90_s=1.234, slo_attainment=0.9684,
                        scale_actions=1234, peak_replicas=12, tokens=1.0, ttft_p99_ramps_s=0.32)


def test_a_table_too_wide_is_printed_as_two_that_fit():
    from rich.console import Console

    rows = [result("ebbtide-lifecycle"), result("ebbtide-spot", spot=800.0)]
    for width, count in ((100, 2), (200, 1)):
        console = Console(width=width, record=True)
        printed = tables(rows, width)
        for table in printed:
            console.print(table)
        text = console.export_text()
        assert len(printed) == count and max(len(line.rstrip()) for line in text.splitlines()) <= width
        assert "…" not in text and text.count("ebbtide-lifecycle") == count  # no cell cut short


def test_seeds_report_each_policys_mean_and_spread(tmp_path):
    """Six minutes of a rate trace, request by request, over two seeds: the table's rows are
    the means, the JSON holds every seed's numbers and their lowest and highest."""
    out = tmp_path / "seeds.json"
    result = ebbtide("simulate", "--trace", "conv-week", "--hours", "0.1", "--per-request", "--seeds", "2",
                     "--policies", "ebbtide", "static-max", "--json", out)
    assert result.returncode == 0, result.stderr
    assert "over 2 seeds (1, 2)" in result.stdout and "routed random" in result.stdout
    document = json.loads(out.read_text())
    assert document["settings"]["seeds"] == 2 and document["settings"]["routing"] == "random"
    spread = document["seeds"]["policies"]["ebbtide"]
    assert spread["seeds"] == [1, 2] and len(spread["runs"]) == 2
    for key in ("gpu_hours", "slo_attainment", "ttft_p99_s"):
        low, mean, high = spread[key]["min"], spread[key]["mean"], spread[key]["max"]
        assert low <= mean <= high and mean == pytest.approx(document["policies"]["ebbtide"][key], abs=1e-4)
    assert document["seeds"]["requests"][0] != document["seeds"]["requests"][1], "each seed its own draw"


def test_the_cost_panel_adds_up_to_the_tables_dollars():
    from ebbtide.sim.baselines import Static
    from ebbtide.sim.capacity import LLAMA_3_1_8B_H100
    from ebbtide.sim.fleet import SimSettings, simulate
    from ebbtide.sim.inputs import load_spec, load_trace
    from ebbtide.sim.report import cumulative_usd, summarize

    _, spec = load_spec(None)
    trace = load_trace("conv-week", LLAMA_3_1_8B_H100, spec, 12, 1, 1, hours=2)
    run = simulate(trace, Static(replicas=5), SimSettings(capacity=LLAMA_3_1_8B_H100))
    spent = cumulative_usd(run.timeline, spec)
    assert np.all(np.diff(spent) >= 0)
    assert spent[-1] == pytest.approx(summarize(run, spec).cost_usd, rel=0.02)
