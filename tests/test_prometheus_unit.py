"""billing_dags.ingest.prometheus without a Prometheus: escaping, planning, dedupe, errors, retries, auth."""

from __future__ import annotations

import base64
import json
import re
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from servers import HandlerServer, free_port

from billing_dags.ingest import prometheus as prom
from billing_dags.ingest import raw

# --------------------------------------------------------------------------- escaping

_SIMPLE = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "f": "\f", "v": "\v", "\\": "\\", '"': '"', "'": "'"}


def go_unquote(literal: str) -> str:
    """A reference decoder of a double-quoted Go/PromQL string literal (what Prometheus' lexer accepts)."""
    assert literal[0] == '"' and literal[-1] == '"'
    body, out, i = literal[1:-1], [], 0
    while i < len(body):
        c = body[i]
        assert c != "\n", "raw newline in a PromQL string"
        assert c != '"', "unescaped quote ends the string early"
        if c != "\\":
            out.append(c)
            i += 1
            continue
        e = body[i + 1]
        if e in _SIMPLE:
            out.append(_SIMPLE[e])
            i += 2
        elif e == "u":
            out.append(chr(int(body[i + 2 : i + 6], 16)))
            i += 6
        elif e == "U":
            out.append(chr(int(body[i + 2 : i + 10], 16)))
            i += 10
        else:
            raise AssertionError(f"unknown escape \\{e}")
    return "".join(out)


TRICKY = ['a"b', "back\\slash", "new\nline", "Zürich-矿工", "\u2028", "end\\", '\\"', "tab\tx", "\x7f", "🙂", ""]


@pytest.mark.parametrize("value", TRICKY)
def test_promql_string_round_trips_tricky_values(value):
    assert go_unquote(prom.promql_string(value)) == value


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=60))
def test_promql_string_round_trips_any_text(value):
    literal = prom.promql_string(value)
    assert "\n" not in literal and "\r" not in literal
    assert go_unquote(literal) == value


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=30), st.text(min_size=1, max_size=5))
def test_regex_quote_matches_only_that_value(value, suffix):
    pattern = prom.regex_quote(value)
    assert re.fullmatch(pattern, value, flags=re.DOTALL)
    assert not re.fullmatch(pattern, value + suffix, flags=re.DOTALL)
    assert not re.fullmatch(pattern, suffix + value, flags=re.DOTALL)


def test_lone_surrogate_is_rejected():
    with pytest.raises(ValueError, match="surrogate"):
        prom.promql_string("a\ud800")


def test_a_value_cannot_select_another_customer():
    """A customer label value crafted as PromQL stays one literal matcher."""
    evil = 'x"} or {client_id=~".*'
    sel = prom.Selector("m", "metric_total", "client_id", (evil,))
    text = sel.promql()
    assert text == '{__name__="metric_total", client_id="x\\"} or {client_id=~\\".*"}'
    batch = prom.Selector("m", "metric_total", "client_id", (".*", "a|b"))
    assert batch.promql() == '{__name__="metric_total", client_id=~"\\\\.\\\\*|a\\\\|b"}'
    assert go_unquote(batch.promql().split("=~", 1)[1][:-1]) == r"\.\*|a\|b"


def test_plan_selectors_batches_customers_and_adds_one_rest_selector():
    meters = [
        {"meter_id": "bytes", "metrics": "a_total b_total", "customer_label": "client_id"},
        {"meter_id": "again", "metrics": "a_total", "customer_label": "client_id"},  # same series: skipped
    ]
    sels = prom.plan_selectors(meters, ["c3", "c1", "c2", "c1"], customers_per_query=2)
    assert [(s.metric, s.values) for s in sels] == [
        ("a_total", ("c1", "c2")),
        ("a_total", ("c3",)),
        ("a_total", None),
        ("b_total", ("c1", "c2")),
        ("b_total", ("c3",)),
        ("b_total", None),
    ]
    assert sels[2].promql() == '{__name__="a_total", client_id!~"c1|c2|c3"}'
    assert sels[1].promql() == '{__name__="a_total", client_id="c3"}'
    extra = prom.Selector("m", "a_total", "client_id", ("c1",), (), 'job="billing"').promql()
    assert extra == '{__name__="a_total", client_id="c1", job="billing"}'


def test_a_shard_selects_its_customers_by_label_value_and_finds_its_unmatched_series_by_their_labels():
    from billing_dags.core.shards import Shard, shard_of, shard_of_series_id

    meters = [
        {"meter_id": "bytes", "metrics": "a_total", "customer_label": "client_id"},
        {"meter_id": "other", "metrics": "a_total", "customer_label": "tenant"},  # sharded by the first meter's label: pulled once
    ]
    values = [f"c{i}.x" for i in range(12)]
    shard = Shard(1, 3)
    mine = sorted(v for v in values if shard_of(v, 3) == 1)
    sels, rests = prom.plan_shard_selectors(meters, values, 2, shard)
    assert [s.values for s in sels] == [tuple(mine[i : i + 2]) for i in range(0, len(mine), 2)] and 2 < len(mine) < 12
    assert {(s.metric, s.customer_label) for s in sels} == {("a_total", "client_id")}
    quoted = lambda vs: prom.promql_string("|".join(v.replace(".", "\\.") for v in vs))  # noqa: E731  (c0\.x: the dot escaped)
    assert sels[0].promql() == f'{{__name__="a_total", client_id=~{quoted(mine[:2])}}}'
    assert [r.promql() for r in rests] == [f'{{__name__="a_total", client_id!~{quoted(sorted(values))}}}']

    unknown = [f"u{i}" for i in range(20)]
    labelless = [{"pool": f"p{i}"} for i in range(20)]
    listed = [{"__name__": "a_total", "client_id": u} for u in unknown] + [{"__name__": "a_total", **lab} for lab in labelless]

    class Listing:
        def series(self, match, start_ms, end_ms, what=""):
            assert match == rests[0].promql() and (start_ms, end_ms) == (0, 99)
            return listed

    got = prom.shard_rest_selectors(Listing(), rests[0], shard, {"a_total": "client_id"}, 0, 100, 2)
    theirs = sorted(u for u in unknown if shard_of(u, 3) == 1)
    assert [s.values for s in got[:-1]] == [tuple(theirs[i : i + 2]) for i in range(0, len(theirs), 2)]
    assert any(shard_of_series_id(raw.series_id("a_total", lab), 3) == 1 for lab in labelless)
    assert got[-1].values == ("",) and got[-1].promql() == '{__name__="a_total", client_id=""}'
    assert all(s.unmatched and s.rest for s in got) and not any(s.unmatched for s in sels)


def test_selector_rejects_bad_names():
    with pytest.raises(ValueError, match="meter m"):
        prom.Selector("m", "bad-metric", "client_id", ("x",)).promql()
    with pytest.raises(ValueError, match="label name"):
        prom.Selector("m", "ok", "bad label", ("x",)).promql()


# --------------------------------------------------------------------------- planning


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**12), st.integers(1, 3 * raw.DAY_MS), st.integers(1, 2000))
def test_plan_chunks_cover_the_window_without_overlap(start, length, pieces):
    chunk = max(1, length // pieces + pieces % 7)
    chunks = prom.plan_chunks(start, start + length, chunk)
    assert chunks[0][0] == start and chunks[-1][1] == start + length
    assert all(b - a <= chunk and a < b for a, b in chunks)
    assert all(chunks[i][1] == chunks[i + 1][0] for i in range(len(chunks) - 1))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40_000), st.sampled_from([1000, 5000, 15000, 60000, 7]), st.integers(2, 11000))
def test_plan_range_requests_respect_the_point_limit(points_wanted, step, max_points):
    start = 1_700_000_000_000
    length = points_wanted * step - (points_wanted % 3)
    reqs = prom.plan_range_requests(start, start + length, step, max_points)
    points = [t for s, e in reqs for t in range(s, e + 1, step)]
    assert all((e - s) // step + 1 <= max_points for s, e in reqs)
    assert points == list(range(start, start + length, step))


def test_two_days_at_15s_need_two_range_requests():
    s, _ = raw.day_bounds_ms(raw.day_of_ms(1_700_000_000_000))
    reqs = prom.plan_range_requests(s, s + 2 * raw.DAY_MS, 15_000)
    assert len(reqs) == 2 and all((e - a) // 15_000 + 1 <= 11_000 for a, e in reqs)


def test_exact_query_is_evaluated_one_ms_before_the_end():
    q, t = prom.exact_query('{__name__="m"}', 1_000_000, 4_600_000)
    assert q == '{__name__="m"}[3600000ms]' and t == 4_599_999
    assert prom.format_time(4_599_999) == "4599.999" and prom.format_time(5_000) == "5.000"


def test_both_ends_samples_are_kept_once_and_midnight_goes_to_the_next_day():
    """Prometheus 2.x returns both ends of each range: the shared boundary sample appears twice."""
    day_start, day_end = raw.day_bounds_ms(raw.day_of_ms(1_700_000_000_000))
    col = prom.Collector()
    chunks = prom.plan_chunks(day_start, day_end, 12 * 3_600_000)
    grid = np.arange(day_start - 60_000, day_end + 60_001, 60_000, dtype=np.int64)
    for a, b in chunks:
        # what a both-ends range selector over [a - 1, b - 1] plus a sloppy server could return
        sel = grid[(grid >= a - 60_000) & (grid <= b)]
        ts, values = prom.keep_window(sel, sel.astype(float), a, b)
        col.add(7, "m", (), ts, values)
        col.add(7, "m", (), ts[:3], values[:3])  # and a duplicate of the chunk's first samples
    ts = col.tables()[0]["ts"].to_pylist()  # one row per (series, ts)
    assert ts == list(range(day_start, day_end, 60_000))
    assert day_end not in ts and day_start in ts


def test_parse_series_converts_prometheus_json_exactly():
    item = {
        "metric": {"__name__": "m_total", "b": "2", "a": "ü"},
        "values": [[1709251199.999, "9007199254740991"], [1709251200, "NaN"], [1709251200.001, "+Inf"]],
    }
    sid, metric, labels, ts, values = prom.parse_series(item, "x")
    assert metric == "m_total" and labels == (("a", "ü"), ("b", "2"))
    assert sid == raw.series_id("m_total", {"a": "ü", "b": "2"})
    assert ts.tolist() == [1709251199999, 1709251200000, 1709251200001]
    assert values[0] == 9007199254740991.0 and np.isnan(values[1]) and np.isinf(values[2])


def test_collector_tables_fit_the_raw_layout():
    col = prom.Collector()
    col.add(5, "m", (("k", "v"),), np.array([20, 10], np.int64), np.array([2.0, np.nan]))
    col.add(3, "m", (), np.array([30], np.int64), np.array([1.0]))
    samples, series = col.tables()
    assert samples.schema == raw.SAMPLES_SCHEMA and series.schema == raw.SERIES_SCHEMA
    assert series["series_id"].to_pylist() == [3, 5] and series["first_seen"].to_pylist() == [30, 10]
    assert col.non_finite == 1 and col.samples == 3


def test_parse_headers():
    assert prom.parse_headers('{"X-Scope-OrgID": "t1"}') == {"X-Scope-OrgID": "t1"}
    assert prom.parse_headers("X-A: 1; X-B: two words") == {"X-A": "1", "X-B": "two words"}
    assert prom.parse_headers(None) == {}
    with pytest.raises(prom.PrometheusError, match="Name: value"):
        prom.parse_headers("nonsense")


def test_redact_url_drops_credentials():
    assert prom.redact_url("https://user:secret@mimir.example:8443/prometheus?x=1") == "https://mimir.example:8443/prometheus"


# --------------------------------------------------------------------------- HTTP behaviour


class FakePrometheus(HandlerServer):
    """A tiny HTTP server answering a scripted list of (status, body, headers); records requests."""

    def __init__(self, script):
        self.script = list(script)
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                form = parse_qs(body.decode(errors="replace"))
                outer.requests.append({"path": self.path, "form": form, "headers": dict(self.headers), "body": body})
                status, body, headers = outer.script.pop(0) if len(outer.script) > 1 else outer.script[0]
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        super().__init__(Handler, poll_interval=0.02)


OK = {
    "status": "success",
    "data": {"resultType": "matrix", "result": [{"metric": {"__name__": "m_total", "client_id": "c1"}, "values": [[100, "1"], [160, "2"]]}]},
}
BAD = {"status": "error", "errorType": "bad_data", "error": "1:5: parse error: unexpected character"}


def test_retries_503_then_succeeds_with_backoff():
    sleeps = []
    with FakePrometheus([(503, {"status": "error", "errorType": "unavailable", "error": "busy"}, None), (503, b"overloaded", None), (200, OK, None)]) as fake:
        client = prom.PrometheusClient(fake.url, max_retries=3, backoff_s=0.25, sleep=sleeps.append)
        res = client.query("m_total[1h]", 3_600_000, what="meter m")
    assert res.result[0]["values"] == [[100, "1"], [160, "2"]]
    assert sleeps == [0.25, 0.5] and len(fake.requests) == 3
    form = fake.requests[0]["form"]
    assert form["query"] == ["m_total[1h]"] and form["time"] == ["3600.000"]


def test_429_honours_retry_after_and_gives_up_after_bounded_attempts():
    sleeps = []
    with FakePrometheus([(429, b"slow down", {"Retry-After": "2"})]) as fake:
        client = prom.PrometheusClient(fake.url, max_retries=2, backoff_s=0.1, max_backoff_s=5, sleep=sleeps.append)
        with pytest.raises(prom.PrometheusError) as e:
            client.query('{__name__="m_total"}[1h]', 0, what="meter proxy_bytes (metric m_total)")
    assert sleeps == [2.0, 2.0] and len(fake.requests) == 3
    msg = str(e.value)
    assert "meter proxy_bytes" in msg and fake.url in msg and "HTTP 429" in msg and "after 3 attempts" in msg
    assert 'query: {__name__="m_total"}[1h]' in msg


def test_bad_promql_fails_at_once_naming_meter_query_and_server():
    sleeps = []
    with FakePrometheus([(400, BAD, None)]) as fake:
        client = prom.PrometheusClient(fake.url, sleep=sleeps.append)
        with pytest.raises(prom.PrometheusError) as e:
            client.query("m_total{", 0, what="meter proxy_bytes (metric m_total)")
    msg = str(e.value)
    assert not sleeps and len(fake.requests) == 1
    assert "meter proxy_bytes" in msg and fake.url in msg and "HTTP 400" in msg and "bad_data" in msg and "m_total{" in msg


def test_warnings_fail_unless_allowed():
    warned = {**OK, "warnings": ["partial response: store gateway unavailable"]}
    with FakePrometheus([(200, warned, None)]) as fake:
        with pytest.raises(prom.PrometheusError, match=r"warnings.*store gateway"):
            prom.PrometheusClient(fake.url).query("m", 0, what="meter m")
        client = prom.PrometheusClient(fake.url, fail_on_warnings=False)
        client.query("m", 0)
        assert client.warnings == ["partial response: store gateway unavailable"]


def test_non_json_and_error_status_fail():
    with FakePrometheus([(200, b"<html>proxy login</html>", None)]) as fake, pytest.raises(prom.PrometheusError, match="not JSON"):
        prom.PrometheusClient(fake.url).query("m", 0, what="meter m")
    with FakePrometheus([(200, {"status": "error", "error": "boom"}, None)]) as fake, pytest.raises(prom.PrometheusError, match="boom"):
        prom.PrometheusClient(fake.url).query("m", 0, what="meter m")


def test_unreachable_server_names_the_server_and_the_query():
    port = free_port()
    client = prom.PrometheusClient(f"http://127.0.0.1:{port}", max_retries=1, sleep=lambda s: None, connect_timeout_s=1)
    with pytest.raises(prom.PrometheusError) as e:
        client.query("m_total[1h]", 0, what="meter k8s_network (metric m_total)")
    msg = str(e.value)
    assert f"127.0.0.1:{port}" in msg and "unreachable" in msg and "meter k8s_network" in msg and "m_total[1h]" in msg


def test_auth_tenant_and_extra_headers_are_sent_and_never_printed():
    with FakePrometheus([(200, OK, None)]) as fake:
        prom.PrometheusClient(fake.url, bearer_token="tok123", tenant="team-a", headers={"X-Extra": "1"}).query("m", 0)
        prom.PrometheusClient(fake.url.replace("http://", "http://alice:pw@")).query("m", 0)
        h1, h2 = fake.requests[0]["headers"], fake.requests[1]["headers"]
    assert h1["Authorization"] == "Bearer tok123" and h1["X-Scope-OrgID"] == "team-a" and h1["X-Extra"] == "1"
    assert h2["Authorization"] == "Basic " + base64.b64encode(b"alice:pw").decode()
    with FakePrometheus([(400, BAD, None)]) as fake, pytest.raises(prom.PrometheusError) as e:
        prom.PrometheusClient(fake.url.replace("http://", "http://alice:pw@"), password="pw", username="alice").query("m", 0)
    assert "pw" not in str(e.value).replace("alice", "") and "alice" not in str(e.value)


def test_client_rejects_bad_configuration():
    with pytest.raises(prom.PrometheusError, match="not an http"):
        prom.PrometheusClient("localhost:9090")
    with pytest.raises(prom.PrometheusError, match="not both"):
        prom.PrometheusClient("http://x", bearer_token="t", username="u")


def test_query_range_refuses_more_than_11000_points():
    client = prom.PrometheusClient("http://127.0.0.1:1")
    with pytest.raises(prom.PrometheusError, match="11000 points"):
        client.query_range("m", 0, 2 * raw.DAY_MS, 15_000, what="meter m")


# --------------------------------------------------------------------------- resource wiring


def test_resource_defaults_to_simulation_and_wires_env(monkeypatch):
    import dagster as dg

    from billing_dags.defs.ingest.sources import PrometheusSamples, SimulatedSamples, usage_sources

    for var in ("PROMETHEUS_URL", "PROMETHEUS_BEARER_TOKEN", "PROMETHEUS_TENANT", "PROMETHEUS_HEADERS"):
        monkeypatch.delenv(var, raising=False)
    assert isinstance(usage_sources()["sample_source"], SimulatedSamples)
    monkeypatch.setenv("PROMETHEUS_URL", "http://127.0.0.1:9090")
    monkeypatch.setenv("PROMETHEUS_TENANT", "tenant-1")
    monkeypatch.setenv("PROMETHEUS_BEARER_TOKEN", "secret")
    monkeypatch.setenv("PROMETHEUS_TLS_VERIFY", "false")
    r = usage_sources()["sample_source"]
    assert isinstance(r, PrometheusSamples)
    assert r.url == dg.EnvVar("PROMETHEUS_URL") and r.tenant == dg.EnvVar("PROMETHEUS_TENANT")
    assert r.bearer_token == dg.EnvVar("PROMETHEUS_BEARER_TOKEN") and r.verify_tls is False
    client = PrometheusSamples(url="http://127.0.0.1:9090", tenant="t", headers="X-A: 1", verify_tls=False).client()
    assert client.session.headers["X-Scope-OrgID"] == "t" and client.session.headers["X-A"] == "1"
    assert client.session.verify is False


def test_ingest_day_writes_nothing_when_a_query_fails(tmp_path):
    from billing_dags.core.settings import resolve_paths

    paths = resolve_paths(tmp_path / "data", tmp_path)
    meters = [{"meter_id": "m", "metrics": "m_total", "customer_label": "client_id"}]
    series_ok = {"status": "success", "data": [{"__name__": "m_total", "client_id": "c1"}]}
    with FakePrometheus([(200, series_ok, None), (200, series_ok, None), (200, OK, None), (400, BAD, None)]) as fake:
        client = prom.PrometheusClient(fake.url)
        with pytest.raises(prom.PrometheusError, match="meter m"):
            prom.ingest_day(client, paths, raw.day_of_ms(0), meters, ["c1"])
    assert not raw.sample_files(paths, raw.day_of_ms(0))


# --------------------------------------------------------------------------- remote read


@pytest.mark.parametrize("value", TRICKY)
@pytest.mark.parametrize(("op", "kind"), [("=", prom.EQ), ("!=", prom.NEQ), ("=~", prom.RE), ("!~", prom.NRE)])
def test_parse_matchers_reads_what_promql_string_writes(value, op, kind):
    text = f"job={prom.promql_string(value)}, x{op}{prom.promql_string(value + 'z')} ,"
    assert prom.parse_matchers(text) == [(prom.EQ, "job", value), (kind, "x", value + "z")]


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30))
@settings(max_examples=200, deadline=None)
def test_parse_matchers_round_trips_any_text(value):
    assert prom.parse_matchers(f"a={prom.promql_string(value)}") == [(prom.EQ, "a", value)]


def test_parse_matchers_other_quotes_and_errors():
    assert prom.parse_matchers("a=`x\\y`, b='it\\'s', c=\"\\x41\\101\\u00fc\"") == [(prom.EQ, "a", "x\\y"), (prom.EQ, "b", "it's"), (prom.EQ, "c", "AAü")]
    assert prom.parse_matchers("  ") == []
    for bad in ("job", 'job="x" cluster="y"', "job=x", '1a="x"', 'a="\\q"', 'a="x'):
        with pytest.raises(ValueError, match=r"cannot read label matchers|bad escape"):
            prom.parse_matchers(bad)


def test_selector_matchers_select_what_its_promql_selects():
    sel = prom.Selector("m", "m_total", "client_id", ("a.b", "c"), (), 'job="x"')
    assert sel.matchers() == [(prom.EQ, "__name__", "m_total"), (prom.RE, "client_id", "a\\.b|c"), (prom.EQ, "job", "x")]
    one = prom.Selector("m", "m_total", "client_id", ('q"',))
    assert one.matchers() == [(prom.EQ, "__name__", "m_total"), (prom.EQ, "client_id", 'q"')]
    rest = prom.Selector("m", "m_total", "client_id", None, ("a", "b|c"))
    assert rest.matchers() == [(prom.EQ, "__name__", "m_total"), (prom.NRE, "client_id", "a|b\\|c")]


STALE = float(np.frombuffer(np.uint64(prom.STALE_NAN_BITS).tobytes(), np.float64)[0])
ODD_NAN = float(np.frombuffer(np.uint64(0x7FF8000000000001).tobytes(), np.float64)[0])  # Go's math.NaN()


def read_response(series, histogram: bool = False) -> bytes:
    """A snappy-compressed ReadResponse with one QueryResult of ``series`` [(labels, [(ts, value)])]."""
    import cramjam

    from billing_dags.ingest.remote_write.proto import ReadResponse

    resp = ReadResponse()
    result = resp.results.add()
    for labels, samples in series:
        ts = result.timeseries.add()
        for k, v in sorted(labels.items()):
            ts.labels.add(name=k, value=v)
        for t, v in samples:
            ts.samples.add(timestamp=t, value=v)
        if histogram:
            ts.histograms.add(timestamp=samples[0][0])
    return bytes(cramjam.snappy.compress_raw(resp.SerializeToString()))


PB = {"Content-Type": "application/x-protobuf", "Content-Encoding": "snappy"}
SEL = prom.Selector("m", "m_total", "client_id", ("c1",), (), 'job="j"')


@pytest.mark.parametrize("histogram", [False, True])  # the compiled reader, and the protobuf runtime behind it
def test_remote_read_rows_are_the_query_apis_rows(histogram):
    """[a, b) (remote read's end is inclusive), no stale markers, a NaN with float('nan')'s bits, as the JSON path."""
    import cramjam

    from billing_dags.ingest.remote_write.proto import ReadRequest

    a, b = 1_000_000, 2_000_000
    series = [
        (
            {"__name__": "m_total", "client_id": "c1", "job": "j"},
            [(a - 1, 1.0), (a, 2.0), (a + 10, STALE), (a + 20, ODD_NAN), (a + 30, 2.5), (b - 1, 3.0), (b, 4.0)],
        ),
        ({"__name__": "m_total", "client_id": "c1", "job": "j", "pool": "x"}, [(a + 5, STALE)]),  # only a stale marker
        ({"__name__": "m_total", "client_id": "c1", "job": "j", "bad-name": "x"}, [(a + 5, 1.0)]),
    ]
    with FakePrometheus([(200, read_response(series, histogram), PB)]) as fake:
        client = prom.PrometheusClient(fake.url, read_api="remote_read", tenant="t1", bearer_token="tok")
        refused: dict = {}
        rows = list(prom._fetch_exact(client, SEL, a, b, refused))
    assert len(rows) == 1
    sid, metric, labels, ts, values = rows[0]
    assert (metric, labels) == ("m_total", (("client_id", "c1"), ("job", "j")))
    assert sid == raw.series_id("m_total", {"client_id": "c1", "job": "j"})
    assert ts.tolist() == [a, a + 20, a + 30, b - 1]
    assert values.view(np.uint64).tolist() == np.array([2.0, np.nan, 2.5, 3.0]).view(np.uint64).tolist()
    # the invalid series refused; with native histogram samples, each valid series named for them too
    assert [r for r in refused if "native histogram samples" not in r] == [next(r for r in refused if "bad-name" in r)]
    assert sum("native histogram samples" in r for r in refused) == (2 if histogram else 0)
    req = fake.requests[0]
    assert req["path"] == "/api/v1/read"
    h = req["headers"]
    assert h["Content-Encoding"] == "snappy" and h["X-Prometheus-Remote-Read-Version"] == "0.1.0"
    assert h["X-Scope-OrgID"] == "t1" and h["Authorization"] == "Bearer tok"
    q = ReadRequest.FromString(bytes(cramjam.snappy.decompress_raw(req["body"]))).queries[0]
    assert (q.start_timestamp_ms, q.end_timestamp_ms) == (a, b - 1)
    assert [(m.type, m.name, m.value) for m in q.matchers] == SEL.matchers()


def test_auto_falls_back_when_remote_read_is_refused_and_logs_why():
    logs = []
    for refusal in [(404, b"404 page not found", None), (405, b"", None), (200, b"<html>", {"Content-Type": "text/html"})]:
        with FakePrometheus([refusal, (200, OK, None)]) as fake:
            client = prom.PrometheusClient(fake.url, read_api="auto", log=logs.append)
            rows = list(prom._fetch_exact(client, SEL, 100_000, 200_000))
            rows += list(prom._fetch_exact(client, SEL, 100_000, 200_000))
        assert [r["path"] for r in fake.requests] == ["/api/v1/read", "/api/v1/query", "/api/v1/query"]
        assert client.remote_read_ok is False and len(rows) == 2 and rows[0][3].tolist() == [100_000, 160_000]
    assert len(logs) == 3 and all("no remote read" in m and "query API" in m for m in logs)
    assert "HTTP 404" in logs[0] and "HTTP 405" in logs[1] and "text/html" in logs[2]


def test_remote_read_errors_name_meter_query_and_server():
    with (
        FakePrometheus([(400, b"invalid regular expression", None)]) as fake,
        pytest.raises(prom.PrometheusError, match=r"meter m .*HTTP 400 \(invalid regular expression\).*query: remote read"),
    ):
        list(prom._fetch_exact(prom.PrometheusClient(fake.url, read_api="auto"), SEL, 0, 1000))
    with FakePrometheus([(200, b"not snappy at all", PB)]) as fake:
        with pytest.raises(prom.PrometheusError, match="cannot be decoded") as err:
            list(prom._fetch_exact(prom.PrometheusClient(fake.url, read_api="remote_read"), SEL, 0, 1000))
        assert fake.url in str(err.value)
    with FakePrometheus([(404, b"404 page not found", None)]) as fake, pytest.raises(prom.PrometheusError, match=r"HTTP 404.*read_api"):
        list(prom._fetch_exact(prom.PrometheusClient(fake.url, read_api="remote_read"), SEL, 0, 1000))
    # once remote read worked, a refusal is an error, not a silent switch
    good = read_response([({"__name__": "m_total", "client_id": "c1"}, [(5, 1.0)])])
    with FakePrometheus([(200, good, PB), (404, b"gone", None)]) as fake:
        client = prom.PrometheusClient(fake.url, read_api="auto")
        assert len(list(prom._fetch_exact(client, SEL, 0, 1000))) == 1
        with pytest.raises(prom.PrometheusError, match="HTTP 404"):
            list(prom._fetch_exact(client, SEL, 0, 1000))
    # extra matchers remote read cannot express: auto uses the query API, remote_read says why
    odd = prom.Selector("m", "m_total", "client_id", ("c1",), (), "job")
    with FakePrometheus([(200, OK, None)]) as fake:
        client = prom.PrometheusClient(fake.url, read_api="auto")
        list(prom._fetch_exact(client, odd, 0, 1000))  # Prometheus itself judges the PromQL (this stub does not)
        assert client.remote_read_ok is False and "extra matchers" in client.fallback_reason
        assert [r["path"] for r in fake.requests] == ["/api/v1/query"]
    with pytest.raises(prom.PrometheusError, match=r"extra matchers 'job'.*read_api"):
        list(prom._fetch_exact(prom.PrometheusClient("http://127.0.0.1:1", read_api="remote_read"), odd, 0, 1000))
    with pytest.raises(prom.PrometheusError, match="read_api"):
        prom.PrometheusClient("http://127.0.0.1:1", read_api="grpc")


def test_resource_read_api_defaults_to_auto_and_reads_the_environment(monkeypatch):
    from billing_dags.defs.ingest.sources import PrometheusSamples, usage_sources

    assert PrometheusSamples(url="http://127.0.0.1:9090").client().read_api == "auto"
    monkeypatch.setenv("PROMETHEUS_URL", "http://127.0.0.1:9090")
    monkeypatch.setenv("PROMETHEUS_READ_API", "query")
    assert usage_sources()["sample_source"].read_api == "query"
