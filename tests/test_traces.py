"""Trace loading: bundled traces, rate expansion, and clear errors for malformed files."""

import json
from importlib import resources

import numpy as np
import pytest

from ebbtide.sim.capacity import get_preset
from ebbtide.sim.inputs import load_spec, load_trace, model_max_len, per_replica_rate
from ebbtide.sim.trace_formats import read_jsonl_log, read_window_rates, read_window_sizes
from ebbtide.sim.traces import (
    TraceError,
    expand_rate_file,
    read_rate_file,
    read_request_log,
    without_too_long,
)


def test_bundled_request_log_replays_every_request_in_order():
    trace = read_request_log("conv-1h")
    assert trace.requests == 19366 == len(trace.arrivals)
    assert np.all(np.diff(trace.arrivals) >= 0)
    assert trace.arrivals[0] == 0.0 and 3400 < trace.duration_s < 3600
    assert trace.counts.sum() == trace.requests
    assert trace.prompt_sum.sum() == trace.prompt_tokens.sum()


def test_rate_file_expansion_follows_the_shape_and_peak():
    sizes = read_request_log("code-1h")
    rate = read_rate_file("code-week")
    week = expand_rate_file(rate, sizes, peak_rps=50.0, seed=7, name="code-week")
    assert 7 * 86400 - 3600 < week.duration_s <= 7 * 86400
    per_minute = week.counts[: len(week.counts) // 60 * 60].reshape(-1, 60).sum(axis=1)
    assert per_minute.max() <= 50 * 60 * 1.1, "the peak is scaled to the requested rate"
    # The coding service has a ~10x swing between night and day.
    hourly = per_minute[: len(per_minute) // 60 * 60].reshape(-1, 60).mean(axis=1)
    assert hourly.max() / hourly.min() > 5
    # Sizes come from the code log: long prompts, short outputs.
    assert week.prompt_sum.sum() / week.requests > 10 * week.output_sum.sum() / week.requests
    again = expand_rate_file(rate, sizes, peak_rps=50.0, seed=7, name="code-week")
    assert np.array_equal(week.counts, again.counts), "seeded: the same seed gives the same load"


@pytest.mark.parametrize("content, words", [
    ("TIMESTAMP,ContextTokens\n2023-11-16 18:17:03.9,10\n", ":1: expected header"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9,10,5\n2023-11-16 18:17:04.0,ten,5\n",
     ":3: ContextTokens 'ten' is not a whole number"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,10,5\n", ":2: TIMESTAMP 'yesterday' is not a date"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9,10\n", ":2: expected 3 columns, found 2"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9,10,-5\n", ":2: GeneratedTokens -5 is negative"),
])
def test_malformed_request_log_names_line_and_problem(tmp_path, content, words):
    path = tmp_path / "trace.csv"
    path.write_text(content)
    with pytest.raises(TraceError, match=str(path).replace(".", r"\.") + ".*") as e:
        read_request_log(str(path))
    assert words in str(e.value)


def test_malformed_rate_file_names_line_and_problem(tmp_path):
    path = tmp_path / "rate.csv"
    path.write_text("minute,start_utc,requests_per_min_low,requests_per_min_high\n"
                    "7.2,2024-05-10T00:07:12,100,200\n14.4,2024-05-10T00:14:24,300,200\n")
    with pytest.raises(TraceError, match=r"rate\.csv:3: need 0 <= requests_per_min_low <= requests_per_min_high"):
        read_rate_file(str(path))


def test_unknown_trace_name_lists_the_bundled_ones():
    with pytest.raises(TraceError, match="not a bundled trace .*conv-week"):
        read_request_log("no-such-trace")


def test_the_mooncake_log_spreads_its_3s_stamps_over_their_step():
    trace = read_jsonl_log("mooncake-1h", seed=1)
    assert trace.requests == 12031 and trace.per_request
    assert 3500 < trace.duration_s < 3600
    stamps = np.array([json.loads(line)["timestamp"] for line in
                       (resources.files("ebbtide") / "data/traces/mooncake_conversation_1h.jsonl").open()]) / 1000.0
    # Every arrival within its 3 s step, and no longer ten requests at one instant.
    offsets = np.sort(trace.arrivals) - np.sort(stamps)
    assert offsets.min() > -3.1 and offsets.max() < 3.1
    assert len(np.unique(trace.arrivals)) > 0.99 * trace.requests
    assert trace.prompt_tokens.mean() > 10_000, "Mooncake's long-context mix"


def test_servegen_sizes_drift_by_window_and_the_peak_needs_the_replicas_asked_for():
    preset = get_preset("llama-3.1-8b-h100")
    _, spec = load_spec(None)
    capacity = preset.with_overrides(max_model_len=model_max_len(spec, preset))
    trace = load_trace("servegen-14d", capacity, spec, 10, 1, 1, hours=None)
    assert trace.mix is not None and trace.duration_s == 14 * 86400
    means_p, _ = trace.mix.means()
    assert means_p[:8].max() > 1.5 * means_p[:8].min(), "the mix drifts from one 6 h window to the next"
    # Requests longer than the engine takes (2048 tokens; the spec's 8192) are counted, not served.
    short = load_trace("servegen-14d", capacity.with_overrides(max_model_len=2048), spec, 10, 1, 1, hours=12)
    assert short.too_long > 0 and 0 < trace.too_long < 0.01 * trace.requests  # 8192: a few of the longest
    assert max((p + o).max() for p, o in zip(short.mix.prompts, short.mix.outputs, strict=True)) <= 2048
    # Scaled so that the window needing most replicas needs 10 (Poisson spread aside).
    window = trace.mix.window_of(np.arange(len(trace.counts), dtype=float))
    per_minute = trace.counts.reshape(-1, 60).mean(axis=1)
    rates = np.array([per_replica_rate(capacity, spec, p, o) for p, o in zip(*trace.mix.means(), strict=True)])
    assert 9 < (per_minute / rates[window[::60]]).max() < 12


def test_a_request_log_counts_what_is_longer_than_the_engine_takes(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(json.dumps({"timestamp": 1000 * i, "input_length": n, "output_length": 10})
                              for i, n in enumerate([100, 9000, 200, 20_000])) + "\n")
    trace = without_too_long(read_jsonl_log(str(path), seed=1), max_len=8192)
    assert trace.requests == 2 and trace.too_long == 2
    assert list(trace.prompt_tokens) == [100, 200]


@pytest.mark.parametrize("content, words", [
    ('{"timestamp": 0, "input_length": 5}\n', ":1: expected an object with timestamp, input_length, output_length"),
    ('{"timestamp": 0, "input_length": 5, "output_length": 1}\nnot json\n', ":2: not JSON"),
    ('{"timestamp": -1, "input_length": 5, "output_length": 1}\n', ":1: timestamp -1 is not a number"),
    ('{"timestamp": 0, "input_length": 5.5, "output_length": 1}\n', ":1: input_length 5.5 is not a whole number"),
])
def test_malformed_jsonl_log_names_line_and_problem(tmp_path, content, words):
    path = tmp_path / "log.jsonl"
    path.write_text(content)
    with pytest.raises(TraceError) as e:
        read_jsonl_log(str(path), seed=1)
    assert str(e.value).startswith(str(path)) and words in str(e.value)


def test_a_window_rate_file_needs_its_sizes_beside_it(tmp_path):
    path = tmp_path / "mine_rate.csv"
    path.write_text("window_start_s,requests_per_s\n0,10\n600,20\n")
    rates, first = read_window_rates(str(path))
    assert len(rates) == 1200 and first == 0 and rates[0] == 10 and rates[-1] == 20
    with pytest.raises(TraceError, match=r"mine_sizes\.json: no such file"):
        read_window_sizes(str(path), first, seed=1)
    (tmp_path / "mine_sizes.json").write_text(json.dumps({"quantile_levels": [0.1, 0.9], "windows": [
        {"start_s": 0, "input_quantiles": [10, 5], "output_quantiles": [1, 2]}]}))
    with pytest.raises(TraceError, match="non-decreasing"):
        read_window_sizes(str(path), first, seed=1)


@pytest.mark.parametrize("args, expected", [
    ([], 131_072), (["--max-model-len", "8192"], 8192), (["--max-model-len=4k"], 4000),
    (["--max-model-len", "32K"], 32_768), (["--max-model-len", "1000000"], 131_072),  # the model's own caps it
])
def test_the_engines_max_length_is_the_specs_max_model_len(args, expected):
    _, spec = load_spec(None)
    spec = spec.model_copy(update={"engine": spec.engine.model_copy(update={"args": args})})
    assert model_max_len(spec, get_preset("llama-3.1-8b-h100")) == expected
