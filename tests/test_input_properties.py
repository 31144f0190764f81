"""Whatever a user hands the spec parser, the manifest loader or the trace readers, it is either
read or refused with the module's own error and a message: never another exception."""

from __future__ import annotations

import copy
import csv
import datetime
import io

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ebbtide.api.manifest import InvalidSpec, load_manifests, parse_spec
from ebbtide.sim import traces
from tests.cli import ROOT

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EXAMPLE = yaml.safe_load((ROOT / "examples/spot-sleep.yaml").read_text())
SIZES = traces.read_request_log("conv-1h")

# Values users get wrong: near-misses of the real ones, other types, extremes.
TRICKY = st.sampled_from(["", "America", "Europe/Berlin/", "a" * 300, "\x00", "* * * * *", "0 0 31 2 *", "*/0 * * * *",
                          "500m", "32Gi", "-1", "1e400", "nan", "Active", "karpenter", "--port", [], {}, None, True,
                          -1, 0, 2**63, 1e308, float("nan"), float("inf"), "UTC", [{"name": "x"}]])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | TRICKY,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
                    max_leaves=8)


def paths(value, prefix=()):
    """Every place in a nested document, as a tuple of keys and indexes."""
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        yield from paths(inner, (*prefix, key))


SPEC_PATHS = [p for p in paths(EXAMPLE["spec"]) if p]


def like(value) -> st.SearchStrategy:
    """Values of the same type as `value`, all over its range."""
    kinds = {bool: st.booleans(), int: st.integers(-10, 10**4) | st.integers(), float: st.floats(),
             str: st.text(max_size=20) | TRICKY}
    return kinds.get(type(value), JSON)


@st.composite
def mutated(draw, document):
    """`document` with one place set to anything (often of the same type), and perhaps a key
    added next to it."""
    doc = copy.deepcopy(document)
    path = draw(st.sampled_from([p for p in paths(document) if p]))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = draw(st.one_of(like(parent[path[-1]]), JSON))
    if isinstance(parent, dict) and draw(st.booleans()):
        parent[draw(st.text(max_size=10))] = draw(JSON)
    return doc


def refused_clearly(error: Exception) -> None:
    assert str(error).strip(), "a refusal must say why"


@FUZZ
@given(st.one_of(JSON, mutated(EXAMPLE["spec"])))
def test_parse_spec_reads_or_refuses(raw):
    try:
        parse_spec(raw)
    except InvalidSpec as e:
        refused_clearly(e)


def mostly(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    """`good` three times in four: enough input is read for the fuzzing to reach past the first check."""
    return st.sampled_from([good, good, good, bad]).flatmap(lambda chosen: chosen)  # one_of would weigh them 1:1


def yaml_documents() -> st.SearchStrategy[bytes]:
    name = mostly(st.from_regex(r"[a-z]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True), st.text(max_size=70) | TRICKY)
    metadata = mostly(st.fixed_dictionaries({"name": name}, optional={"namespace": name}), JSON)
    service = st.builds(lambda version, meta, spec: {**EXAMPLE, "apiVersion": version, "metadata": meta, "spec": spec},
                        mostly(st.just(EXAMPLE["apiVersion"]), JSON), metadata,
                        st.one_of(st.just(EXAMPLE["spec"]), mutated(EXAMPLE["spec"]), JSON))
    other = st.one_of(mutated(EXAMPLE), JSON, st.just({"apiVersion": "v1", "kind": "ConfigMap"}))
    listed = st.lists(mostly(service, other), max_size=3).map(lambda items: {"kind": "List", "items": items})
    dumped = st.lists(mostly(service | listed, other), max_size=3).map(lambda docs: yaml.safe_dump_all(docs).encode())
    yamlish = st.text(alphabet=":-[]{}!&*#|>'\"\n\t %@`,?ab01", max_size=60).map(str.encode)
    return mostly(dumped, st.one_of(yamlish, st.binary(max_size=60)))


@FUZZ
@given(content=yaml_documents())
def test_manifest_loader_reads_or_refuses(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("manifest") / "in.yaml"
    path.write_bytes(content)
    try:
        services = load_manifests(path)
    except InvalidSpec as e:
        refused_clearly(e)
        assert str(path) in str(e), "a refusal names the file"
    else:
        assert services


# A trace is mostly well formed, with at most one fault: enough files are read for the fuzzing
# to reach past the header, and what is read is replayed.
JUNK = st.one_of(st.text(max_size=8), st.sampled_from(["", "nan", "inf", "-1", "1_000", "١٢", "1e400", "2**70"]),
                 st.integers().map(str), st.floats(allow_nan=True, allow_infinity=True).map(str))
START = datetime.datetime(2024, 5, 13, 8)
NEAR = st.floats(0, 7200).map(lambda s: (START + datetime.timedelta(seconds=s)).isoformat(sep=" "))
ANYWHEN = st.builds(lambda stamp, digit: stamp.isoformat(sep=" ") + digit,  # Azure's logs have a 7th digit
                    st.datetimes(timezones=st.none() | st.timezones()), st.sampled_from(["", "", "7"]))
TOKENS = st.integers(0, 10**5).map(str)
LOG_ROWS = st.lists(st.tuples(NEAR, TOKENS, TOKENS).map(list), max_size=6)
RATE_ROWS = st.lists(st.tuples(st.floats(0.001, 10**4), NEAR, st.floats(0, 10**4), st.floats(0, 10**4)),
                     max_size=6).map(lambda rows: [  # minutes increasing, low <= high
                         [str(sum(r[0] for r in rows[:i + 1])), start, str(low), str(low + more)]
                         for i, (_, start, low, more) in enumerate(rows)])


@st.composite
def csv_file(draw, header: list[str], rows: st.SearchStrategy[list[list[str]]]) -> bytes:
    """A CSV file of `rows` with at most one fault: a wrong header, a row of the wrong width, a
    field of junk, or bytes that are no text or break CSV quoting."""
    rows = [header, *draw(rows)]
    fault = draw(mostly(st.none(), st.sampled_from(["header", "width", "field", "bytes"])))
    where = draw(st.integers(0, len(rows) - 1))
    if fault == "header":
        rows[0] = draw(st.sampled_from([header[:-1], ["x"], [h.lower() for h in header]]))
    elif fault == "width":
        rows[where] = draw(st.sampled_from([rows[where][:-1], [*rows[where], "extra"]]))
    elif fault == "field" and where:
        rows[where][draw(st.integers(0, len(header) - 1))] = draw(st.one_of(JUNK, ANYWHEN))
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    text = out.getvalue().encode()
    if fault == "bytes":
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.sampled_from([b"\x00", b"\xff\xfe", b'"unclosed\n', b"\n\n"])) + text[cut:]
    return text


def read_or_refused(tmp_path_factory, content: bytes, read):
    path = tmp_path_factory.mktemp("trace") / "trace.csv"
    path.write_bytes(content)
    try:
        return read(str(path))
    except traces.TraceError as e:
        refused_clearly(e)
        assert str(path) in str(e), "a refusal names the file"
        return None


@FUZZ
@given(content=csv_file(traces.REQUEST_LOG_HEADER, LOG_ROWS))
def test_request_log_reads_or_refuses(tmp_path_factory, content):
    trace = read_or_refused(tmp_path_factory, content, traces.read_request_log)
    if trace is not None:
        assert trace.requests == len(trace.arrivals) > 0 and trace.duration_s <= traces.MAX_DURATION_S + 1


@FUZZ
@given(content=csv_file(traces.RATE_HEADER, RATE_ROWS))
def test_rate_file_reads_or_refuses_and_what_it_reads_expands(tmp_path_factory, content):
    rate = read_or_refused(tmp_path_factory, content, traces.read_rate_file)
    if rate is not None:
        trace = traces.expand_rate_file(rate, SIZES, peak_rps=5.0, seed=1, name="fuzz", hours=0.5)
        assert trace.duration_s >= 60


@pytest.mark.parametrize("reader", [traces.read_request_log, traces.read_rate_file, traces.is_rate_file])
def test_trace_readers_refuse_a_directory_and_a_missing_file(tmp_path, reader):
    for path, said in ((tmp_path, "Is a directory"), (tmp_path / "nope.csv", "no such file")):
        with pytest.raises(traces.TraceError, match=said):
            reader(str(path))
