"""Series identity: a series id is a hash of an injective encoding of the label set, and no writer
trusts the hash alone (two label sets with one id are refused, never merged)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import remote_write_corpus as corpus
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from servers import free_port, receiver_command, serve_app

from billing_dags.core.settings import PROJECT_ROOT, resolve_paths
from billing_dags.defs.seeds.assets import write_seed_snapshots
from billing_dags.ingest import prometheus as prom
from billing_dags.ingest import raw, simulate
from billing_dags.ingest.compaction import compact
from billing_dags.ingest.remote_write.decode import BadRequest, Decoder
from billing_dags.ingest.remote_write.landing import (
    FILE_MAGIC,
    OPEN_SUFFIX,
    SegmentWriter,
    encode_record,
    read_segment,
    recover_orphans,
    sealed_segments,
)
from billing_dags.ingest.remote_write.server import WRITE_PATH, ReceiverConfig, create_app
from billing_dags.models.sqlmodels import Window, run_model
from billing_dags.seeds.catalog import read_seed

DAY = date(2026, 5, 28)
T0 = raw.day_bounds_ms(DAY)[0] + 3_600_000
HEADERS = {"Content-Type": "application/x-protobuf", "Content-Encoding": "snappy", "X-Prometheus-Remote-Write-Version": "0.1.0"}
VICTIM = {"__name__": "stratum_bytes_sent_total", "client_id": "miner-002", "instance": "x"}


# --- the attack through the real receiver process, then compaction and the usage models ----------


class ReceiverProcess:
    """``billing remote-write serve`` as its own process on a free 127.0.0.1 port."""

    def __init__(self, data_dir: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = receiver_command(data_dir, PROJECT_ROOT / "seeds", self.port)
        with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, f"the receiver exited: {log.read_text()[-2000:]}"
            try:
                if requests.get(self.url + "/-/ready", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the receiver did not become ready"
            time.sleep(0.1)

    def post(self, series) -> requests.Response:
        return requests.post(self.url + WRITE_PATH, data=corpus.body(series), headers=HEADERS, timeout=10)

    def stop(self) -> None:
        """SIGTERM: the receiver seals its open segment on the way out."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def _raw_series(paths) -> dict[int, tuple[str, tuple]]:
    """Every series of data/raw/series: id -> (metric, labels), one label set per id."""
    out: dict[int, tuple[str, tuple]] = {}
    for f in raw.series_files(paths):
        for r in pq.read_table(f).to_pylist():
            assert out.setdefault(r["series_id"], (r["metric"], tuple(r["labels"]))) == (r["metric"], tuple(r["labels"]))
    return out


def _proxy_usage(paths) -> dict[str, object]:
    """The day's proxy_bytes usage per customer, computed by the real models."""
    write_seed_snapshots(paths)
    w = Window(DAY, date.fromordinal(DAY.toordinal() + 1))
    run_model(paths, "int_series_edges_by_day", w)
    run_model(paths, "int_gauge_peaks_by_day", w)
    rows = run_model(paths, "fct_usage_by_day", w).table.to_pylist()
    return {r["customer_id"]: r["usage"] for r in rows if r["meter_id"] == "proxy_bytes"}


@pytest.mark.integration
def test_a_crafted_metric_name_does_not_merge_into_another_customers_series(tmp_path):
    data_dir = tmp_path / "data"
    paths = resolve_paths(data_dir, PROJECT_ROOT / "seeds")
    victim = [(VICTIM, [(T0, 100.0), (T0 + 1000, 200.0), (T0 + 2000, 300.0)])]
    # the old encoding joined name \x00 value \x01: this metric name hashed like the victim's labels
    crafted = "stratum_bytes_sent_total\x01client_id\x00miner-002\x01instance\x00x"
    # a label VALUE may hold any UTF-8, \x00 and \x01 included: it must still be another series
    crafted_value = {"__name__": "stratum_bytes_sent_total", "client_id": "miner-002\x01instance\x00x"}
    rx = ReceiverProcess(data_dir, tmp_path / "receiver.log")
    try:
        assert rx.post(victim).status_code == 204
        by_name = rx.post([({"__name__": crafted}, [(T0 + 1500, 1e15)])])
        by_value = rx.post([(crafted_value, [(T0 + 1500, 1e15)])])
    finally:
        rx.stop()
    compact(paths)
    usage = _proxy_usage(paths)
    assert usage["mp-002"] == 300  # the victim's own counter: 100 (a new series) + 100 + 100
    series = _raw_series(paths)
    assert series[raw.series_id("stratum_bytes_sent_total", {"client_id": "miner-002", "instance": "x"})] == (
        "stratum_bytes_sent_total",
        (("client_id", "miner-002"), ("instance", "x")),
    )
    assert by_name.status_code == 400 and "series 0" in by_name.text and "metric name" in by_name.text
    assert by_value.status_code == 204  # its own series, billed to nobody (no customer has that label value)
    assert series[raw.series_id(crafted_value["__name__"], {"client_id": crafted_value["client_id"]})][1] == (("client_id", "miner-002\x01instance\x00x"),)
    assert len(series) == 2


# --- the encoding is injective ---------------------------------------------------------------------

# around the separator bytes: 0x00, 0x01, 0xFF as code points, their UTF-8 neighbours, non-BMP
TRICKY = st.sampled_from(
    ["\x00", "\x01", "\x7f", "\x80", "\xfe", "\xff", "\u0100", "\u07ff", "\u0800", "\uffff", "\U00010000", "\U0010ffff", "=", ",", "{", "a", "_"]
)
TEXT = st.lists(st.one_of(TRICKY, st.characters(blacklist_categories=("Cs",))), max_size=6).map("".join)
LABELS = st.dictionaries(TEXT.filter(lambda k: k != "__name__"), TEXT, max_size=4)


def _decode_key(key: bytes) -> list[tuple[str, str]]:
    """series_key's inverse: the label set back from the key (so the key is injective)."""
    parts = key.split(b"\xff")
    assert parts[-1] == b"" and len(parts) % 2 == 1
    return [(parts[i].decode(), parts[i + 1].decode()) for i in range(0, len(parts) - 1, 2)]


@settings(max_examples=500, deadline=None)
@given(TEXT, LABELS)
def test_the_series_key_decodes_back_to_the_label_set(metric, labels):
    assert _decode_key(raw.series_key(metric, labels)) == sorted({**labels, "__name__": metric}.items())


@settings(max_examples=500, deadline=None)
@given(TEXT, LABELS, TEXT, LABELS)
def test_two_label_sets_never_share_a_key(m1, l1, m2, l2):
    same = {**l1, "__name__": m1} == {**l2, "__name__": m2}
    assert (raw.series_key(m1, l1) == raw.series_key(m2, l2)) == same
    if same:
        assert raw.series_id(m1, l1) == raw.series_id(m2, l2)


def test_the_attack_label_sets_get_different_ids():
    victim = raw.series_id("stratum_bytes_sent_total", {"client_id": "miner-002", "instance": "x"})
    assert raw.series_id("stratum_bytes_sent_total\x01client_id\x00miner-002\x01instance\x00x", {}) != victim
    assert raw.series_id("stratum_bytes_sent_total", {"client_id": "miner-002\x01instance\x00x"}) != victim


@pytest.mark.parametrize(
    ("metric", "labels", "problem"),
    [
        ("up", {}, None),
        ("a:b_c9", {"_x": "any \x00\x01 value \U0010ffff", "Y9": ""}, None),
        ("up\x01client_id\x00x", {}, "metric name"),
        ("9up", {}, "metric name"),
        ("", {}, "metric name"),
        ("up", {"client\x00id": "x"}, "label name"),
        ("up", {"a:b": "x"}, "label name"),
        ("up", {"__name__": "x"}, "label name"),
        ("up", {"a": "\ud800"}, "not valid UTF-8"),
    ],
)
def test_series_problem_follows_prometheus_names(metric, labels, problem):
    got = raw.series_problem(metric, labels)
    assert got is None if problem is None else problem in got


# --- remote write: control characters in names get 400 ------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ({"__name__": "stratum_bytes_sent_total\x01client_id\x00miner-002"}, "metric name"),
        ({"__name__": "up\n"}, "metric name"),
        ({"__name__": "up", "client\x00id": "x"}, "label name"),
        ({"__name__": "up", "bad-name": "x"}, "label name"),
    ],
)
def test_control_characters_in_names_get_400_naming_the_series(tmp_path, labels, message):
    config = ReceiverConfig(landing_dir=tmp_path / "landing", min_free_bytes=0)
    good = ({"__name__": "up", "job": "a"}, [(T0, 1.0)])
    with serve_app(create_app(config)) as url:
        r = requests.post(url + WRITE_PATH, data=corpus.body([good, (labels, [(T0, 1.0)])]), headers=HEADERS, timeout=10)
        assert r.status_code == 400 and "series 1:" in r.text and message in r.text
        assert requests.post(url + WRITE_PATH, data=corpus.body([good]), headers=HEADERS, timeout=10).status_code == 204
    [seg] = sealed_segments(tmp_path / "landing")
    assert read_segment(seg.path).records == 1  # nothing of the refused request landed


# --- forced collisions: every writer refuses, none merges ---------------------------------------------

SID = 4242


@pytest.fixture
def one_id(monkeypatch):
    """Every label set hashes to SID: a collision on demand (a real 64-bit one cannot be found)."""
    monkeypatch.setattr(raw, "series_id", lambda metric, labels: SID)


def _series(client, instance="a"):
    return {"__name__": "stratum_bytes_sent_total", "client_id": client, "instance": instance}


def test_decoder_refuses_a_second_label_set_with_one_id(one_id):
    dec = Decoder()
    with pytest.raises(BadRequest, match=r"series 1: series id 4242 of stratum_bytes_sent_total\{client_id, instance\} is already"):
        dec.decode(corpus.body([(_series("miner-001"), [(T0, 1.0)]), (_series("miner-002"), [(T0, 1e15)])]))
    dec.decode(corpus.body([(_series("miner-001"), [(T0, 1.0)])]))
    with pytest.raises(BadRequest, match="series 0: series id 4242"):  # in a later request too
        dec.decode(corpus.body([(_series("miner-002"), [(T0 + 1000, 1e15)])]))


def test_landing_writer_refuses_a_batch_whose_id_the_segment_holds_with_other_labels(tmp_path, one_id):
    w = SegmentWriter(tmp_path, max_segment_age_s=3600)
    try:
        w.submit(Decoder().decode(corpus.body([(_series("miner-001"), [(T0, 1.0)])]))).result(5)
        # another decoder (a cleared series cache) takes the other label set: the writer is the last gate
        fut = w.submit(Decoder().decode(corpus.body([(_series("miner-002"), [(T0 + 1000, 1e15)])])))
        with pytest.raises(BadRequest, match="is already stratum_bytes_sent_total"):
            fut.result(5)
        w.submit(Decoder().decode(corpus.body([(_series("miner-001"), [(T0 + 2000, 2.0)])]))).result(5)
    finally:
        w.close()
    [seg] = sealed_segments(tmp_path)
    data = read_segment(seg.path)
    assert data.ts.tolist() == [T0, T0 + 2000] and data.series == {SID: ("stratum_bytes_sent_total", {"client_id": "miner-001", "instance": "a"})}


def test_the_receiver_answers_400_when_the_landing_writer_refuses(tmp_path, one_id):
    config = ReceiverConfig(landing_dir=tmp_path / "landing", min_free_bytes=0)
    app = create_app(config)
    with serve_app(app) as url:
        post = lambda s: requests.post(url + WRITE_PATH, data=corpus.body(s), headers=HEADERS, timeout=10)  # noqa: E731
        assert post([(_series("miner-001"), [(T0, 1.0)])]).status_code == 204
        app.state.receiver["decoder"] = Decoder()  # as after the cache is cleared
        r = post([(_series("miner-002"), [(T0 + 1000, 1e15)])])
        assert r.status_code == 400 and "series id 4242" in r.text


def _land(paths, *requests):
    """Each request through its own decoder and its own landing segment (as two receivers)."""
    for req in requests:
        w = SegmentWriter(paths.landing, max_segment_age_s=3600)
        w.submit(Decoder().decode(corpus.body(req))).result(5)
        w.close()


def _part(paths, source="remote_write", day=DAY):
    f = raw.samples_day_dir(paths, day) / f"part-{source}.parquet"
    return pq.read_table(f).to_pylist() if f.exists() else []


def test_compaction_quarantines_the_later_label_set_of_an_id(paths, one_id):
    _land(paths, [(_series("miner-001"), [(T0, 1.0), (T0 + 2000, 3.0)])], [(_series("miner-002"), [(T0 + 1000, 1e15)])])
    [r] = compact(paths)["days"]
    assert [(x["ts"], x["value"]) for x in _part(paths)] == [(T0, 1.0), (T0 + 2000, 3.0)]  # nothing merged
    assert _raw_series(paths) == {SID: ("stratum_bytes_sent_total", (("client_id", "miner-001"), ("instance", "a")))}
    [q] = r["quarantined"]
    assert r["quarantined_samples"] == 1 and q["samples"] == 1 and "an earlier landing segment" in q["reason"]
    rows = pq.read_table(q["file"]).to_pylist()  # kept, with its labels: nothing acknowledged is lost
    assert [(x["ts"], x["value"], dict(x["labels"])["client_id"]) for x in rows] == [(T0 + 1000, 1e15, "miner-002")]
    assert sealed_segments(paths.landing) == []


def test_compaction_quarantines_a_series_whose_id_raw_series_holds_with_other_labels(paths, one_id):
    other = date(2026, 5, 1)
    start = raw.day_bounds_ms(other)[0]
    labels = [("client_id", "miner-001"), ("instance", "a")]
    raw.write_day(
        paths,
        other,
        pa.table({"series_id": [SID], "ts": [start], "value": [5.0]}),
        pa.table({"series_id": [SID], "metric": ["stratum_bytes_sent_total"], "labels": [labels], "first_seen": [start]}, schema=raw.SERIES_SCHEMA),
        "test",
    )
    _land(paths, [(_series("miner-002"), [(T0, 1e15)])])
    [r] = compact(paths)["days"]
    assert _part(paths) == [] and r["quarantined_samples"] == 1
    assert "raw/series/date=2026-05-01/part-test.parquet" in r["quarantined"][0]["reason"]


def test_compaction_quarantines_an_id_its_segment_defines_twice(paths, one_id):
    first = Decoder().decode(corpus.body([(_series("miner-001"), [(T0, 1.0)])]))
    second = Decoder().decode(corpus.body([(_series("miner-002"), [(T0 + 1000, 1e15)])]))
    paths.landing.mkdir(parents=True)
    path = paths.landing / f"seg-20260528T000000000000Z-1-000001{OPEN_SUFFIX}"
    path.write_bytes(FILE_MAGIC + encode_record(first, [SID]) + encode_record(second, [SID]))
    recover_orphans(paths.landing)
    [r] = compact(paths)["days"]
    assert _part(paths) == [] and r["quarantined_samples"] == 2
    assert "defines its id with two label sets" in r["quarantined"][0]["reason"]


def test_compaction_recomputes_ids_from_labels(paths, monkeypatch):
    """A segment's stored ids are not trusted (a segment landed before the encoding changed)."""
    real = raw.series_id
    monkeypatch.setattr(raw, "series_id", lambda metric, labels: SID)
    _land(paths, [(_series("miner-001"), [(T0, 1.0)])])
    monkeypatch.setattr(raw, "series_id", real)
    compact(paths)
    sid = raw.series_id("stratum_bytes_sent_total", {"client_id": "miner-001", "instance": "a"})
    assert [x["series_id"] for x in _part(paths)] == [sid] and list(_raw_series(paths)) == [sid]


def test_compaction_quarantines_invalid_names_landed_before_they_were_refused(paths, monkeypatch):
    monkeypatch.setattr(raw, "series_problem", lambda metric, labels: None)  # a receiver that did not check names
    _land(paths, [({"__name__": "up\x01x"}, [(T0, 1.0)]), (_series("miner-001"), [(T0, 2.0)])])
    monkeypatch.undo()
    [r] = compact(paths)["days"]
    assert [x["value"] for x in _part(paths)] == [2.0] and r["quarantined_samples"] == 1
    assert "metric name" in r["quarantined"][0]["reason"]


class StubPrometheus:
    """What ingest_day asks of a client: every query answers ``result`` (cut to its window by the ingest)."""

    requests, request_seconds, warnings = 0, 0.0, []

    def __init__(self, result):
        self.result = result

    def series(self, match, start_ms, end_ms, what=""):
        return [item["metric"] for item in self.result]

    def query(self, promql, time_ms, what=""):
        return prom.QueryResult("matrix", self.result, [], 0.0)

    def query_range(self, promql, start_ms, end_ms, step_ms, what=""):  # the carry-in's search: nothing earlier
        return prom.QueryResult("matrix", [], [], 0.0)


PULL_METERS = [{"meter_id": "proxy_bytes", "metrics": "stratum_bytes_sent_total", "customer_label": "client_id"}]


def _matrix(*series):
    s = T0 // 1000
    return [{"metric": labels, "values": [[s + i, str(v)] for i, v in enumerate(values)]} for labels, values in series]


def _pull(paths, result):
    opts = prom.IngestOptions(edge_lookback_days=1)
    return prom.ingest_day(StubPrometheus(result), paths, DAY, PULL_METERS, ["miner-001", "miner-002"], opts)


def test_pull_skips_and_reports_invalid_names(paths):
    report = _pull(paths, _matrix((_series("miner-001"), [1, 2]), ({**_series("miner-002"), "bad\x00name": "x"}, [1e15])))
    assert report.refused_series == 1 and "label name 'bad\\x00name'" in report.refused_examples[0]
    assert [x["value"] for x in _part(paths, "prometheus")] == [1.0, 2.0]


def test_pull_refuses_a_second_label_set_with_one_id(paths, one_id):
    report = _pull(paths, _matrix((_series("miner-001"), [1, 2]), (_series("miner-002"), [1e15])))
    assert report.refused_series == 1 and "series id 4242" in report.refused_examples[0]
    assert [x["value"] for x in _part(paths, "prometheus")] == [1.0, 2.0]
    assert _raw_series(paths)[SID][1] == (("client_id", "miner-001"), ("instance", "a"))


def test_pull_refuses_a_series_whose_id_raw_series_holds_with_other_labels(paths, one_id):
    _land(paths, [(_series("miner-001"), [(T0, 1.0)])])
    compact(paths)
    report = _pull(paths, _matrix((_series("miner-002"), [1e15])))
    assert report.refused_series == 1 and "part-remote_write.parquet" in report.refused_examples[0]
    assert _part(paths, "prometheus") == [] and _part(paths)[0]["value"] == 1.0


def test_simulate_refuses_two_label_sets_with_one_id(paths, one_id):
    customers = read_seed(paths.seeds_dir, "customers")
    with pytest.raises(raw.SeriesCollision, match="series id 4242"):
        simulate.write_simulated_day(paths, DAY, customers, n_customers=1)
    assert raw.sample_files(paths, DAY) == []


def test_write_day_refuses_an_id_raw_series_holds_with_other_labels_and_writes_nothing(paths, one_id):
    start = raw.day_bounds_ms(DAY)[0]

    def tables(client, value):
        return (
            pa.table({"series_id": [SID], "ts": [start], "value": [value]}),
            pa.table(
                {"series_id": [SID], "metric": ["stratum_bytes_sent_total"], "labels": [[("client_id", client)]], "first_seen": [start]},
                schema=raw.SERIES_SCHEMA,
            ),
        )

    raw.write_day(paths, DAY, *tables("miner-001", 1.0), "simulate")
    before = [f.read_bytes() for f in raw.sample_files(paths, DAY)]
    with pytest.raises(raw.SeriesCollision, match=r"part-simulate\.parquet"):
        raw.write_day(paths, DAY, *tables("miner-002", 1e15), "other")
    samples, series = tables("miner-002", 1e15)
    with pytest.raises(raw.SeriesCollision, match="the same write"):
        raw.write_day(paths, DAY, samples, pa.concat_tables([series, tables("miner-003", 0)[1]]), "other")
    assert [f.read_bytes() for f in raw.sample_files(paths, DAY)] == before
    assert not list(paths.raw_samples.glob("date=*/.*tmp*")) and raw.raw_days(paths) == [DAY]


def test_write_day_refuses_ids_not_computed_by_series_id_and_invalid_names(paths):
    start = raw.day_bounds_ms(DAY)[0]
    samples = pa.table({"series_id": [7], "ts": [start], "value": [1.0]})

    def series(sid, metric, labels):
        return pa.table({"series_id": [sid], "metric": [metric], "labels": [labels], "first_seen": [start]}, schema=raw.SERIES_SCHEMA)

    with pytest.raises(raw.RawLayoutError, match="not the id of its labels"):
        raw.write_day(paths, DAY, samples, series(7, "up", [("job", "a")]), "test")
    with pytest.raises(raw.RawLayoutError, match="metric name"):
        raw.write_day(paths, DAY, samples, series(7, "up\x00", []), "test")
    assert raw.raw_days(paths) == []
