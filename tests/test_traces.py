"""Trace loading: bundled traces, rate expansion, and clear errors for malformed files."""

import numpy as np
import pytest

from ebbtide.sim.traces import TraceError, expand_rate_file, read_rate_file, read_request_log


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
