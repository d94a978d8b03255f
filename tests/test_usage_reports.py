"""Usage reports (seed 001): parsing, the durable store, events, and the real HTTP endpoint."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from contextlib import contextmanager
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest
import requests
from servers import serve_app

from billing_dags.core.settings import PROJECT_ROOT, resolve_paths
from billing_dags.ingest import usage_reports as ur
from billing_dags.ingest.remote_write.server import REPORT_PATH, ReceiverConfig, create_app

SEEDS = PROJECT_ROOT / "seeds"
TOKEN = ur.demo_report_token("iot-010")  # its SHA-256 is in seeds/report_tokens.csv
NOW = datetime(2026, 11, 21, 14, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp()) * 1000


@pytest.fixture(scope="module")
def schema() -> ur.ReportSchema:
    return ur.ReportSchema.from_seeds(SEEDS)


def body(**over) -> dict:
    doc = {
        "report_id": "r-2026-11-21T13",
        "customer_id": "iot-010",
        "reported_at": "2026-11-21T13:00:00Z",
        "active_devices": 42,
        "total_devices": 50,
        "mqtt_messages_published": 1000,
        "mqtt_messages_received": 250,
        "mqtt_bytes_sent": 123_456,
        "mqtt_bytes_received": 654_321,
        "mqtt_connections": 7,
        "http_requests": 321,
        "http_bytes_sent": 1_000,
        "http_bytes_received": 2_000,
        "postgres_size_mb": 812.25,
        "influxdb_size_mb": 100.5,
        "influxdb_points": 9000,
    }
    doc.update(over)
    return {k: v for k, v in doc.items() if v is not ...}


def parse(doc, schema, **kw):
    raw = json.dumps(doc).encode() if not isinstance(doc, bytes) else doc
    return ur.parse_report(ur.decode_body(raw), schema, now_ms=NOW_MS, **kw)


def test_a_seed_001_report_parses_exactly(schema):
    r = parse(body(), schema)
    assert (r.customer_id, r.report_id, r.interval_s) == ("iot-010", "r-2026-11-21T13", 3600)
    assert r.reported_at_ms == int(datetime(2026, 11, 21, 13, tzinfo=UTC).timestamp()) * 1000
    assert r.values["postgres_size_mb"] == Decimal("812.25")  # not the float 812.25000000000003...
    assert r.day == date(2026, 11, 21)
    # an offset is converted to UTC
    assert parse(body(reported_at="2026-11-21T14:00:00+01:00"), schema).reported_at_ms == r.reported_at_ms


@pytest.mark.parametrize(
    ("doc", "field", "words"),
    [
        (b"[1, 2]", "body", "JSON object"),
        (b"{not json", "body", "not valid JSON"),
        (b'{"customer_id": "iot-010", "x": NaN}', "body", "NaN is not a number"),
        (b"\xff\xfe", "body", "UTF-8"),
        (body(customer_id=...), "customer_id", "missing"),
        (body(customer_id=7), "customer_id", "not a string"),
        (body(report_id=...), "report_id", "missing"),
        (body(report_id="has space"), "report_id", "letters, digits"),
        (body(reported_at=...), "reported_at", "missing"),
        (body(reported_at="2026-11-21T13:00:00"), "reported_at", "no time zone"),
        (body(reported_at="yesterday"), "reported_at", "not an RFC 3339 time"),
        (body(reported_at=1763730000), "reported_at", "RFC 3339 string"),
        (body(reported_at="2026-11-21T14:30:00Z"), "reported_at", "in the future"),
        (body(reported_at="2026-08-01T00:00:00Z"), "reported_at", "older than the 90-day retention"),
        (body(interval_seconds=0), "interval_seconds", "whole number of seconds"),
        (body(interval_seconds=90.5), "interval_seconds", "whole number of seconds"),
        (body(websocket_hours=3), "websocket_hours", "unknown field"),
        (body(mqtt_bytes_sent=-1), "mqtt_bytes_sent", "negative"),
        (body(mqtt_bytes_sent=1.5), "mqtt_bytes_sent", "not a whole number"),
        (body(mqtt_bytes_sent="100"), "mqtt_bytes_sent", "must be a JSON number"),
        (body(active_devices=True), "active_devices", "must be a JSON number"),
        (body(http_requests=10**19), "http_requests", "too large"),
        (body(postgres_size_mb=0.0000000001), "postgres_size_mb", "more decimals"),
    ],
)
def test_bad_reports_name_the_field(schema, doc, field, words):
    with pytest.raises(ur.ReportError) as e:
        parse(doc, schema)
    assert e.value.field == field and words in str(e.value)


def test_missing_fields_and_null_gauges_are_not_zero_readings(schema):
    r = parse(body(active_devices=None, postgres_size_mb=..., influxdb_size_mb=...), schema)
    assert "active_devices" not in r.values and "postgres_size_mb" not in r.values
    ev = ur.report_events([r], schema).to_pylist()
    assert {e["meter_id"] for e in ev} == {
        "iot_devices_total",
        "iot_mqtt_messages",
        "iot_mqtt_bytes",
        "iot_mqtt_connections",
        "iot_http_requests",
        "iot_http_bytes",
        "iot_influxdb_series",
    }


def test_tokens_are_per_customer_and_compared_by_hash(schema):
    assert schema.authorized("iot-010", TOKEN)
    assert not schema.authorized("iot-010", TOKEN + "x")
    assert not schema.authorized("iot-001", TOKEN)  # another customer's token
    assert not schema.authorized("iot-010", None)
    assert hashlib.sha256(TOKEN.encode()).hexdigest() in (SEEDS / "report_tokens.csv").read_text()


def test_no_report_token_is_written_in_clear_in_seeds_or_docs():
    """Only hashes: no word of a seed file (snapshotted into every data dir) or of the docs hashes to a token hash."""
    hashes = {h for per_customer in ur.ReportSchema.from_seeds(SEEDS).tokens.values() for h in per_customer}
    files = [*sorted(SEEDS.glob("*.csv")), PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
    for f in files:
        for word in set(re.findall(r"[A-Za-z0-9._~+/=-]{8,}", f.read_text())):
            assert hashlib.sha256(word.encode()).hexdigest() not in hashes, f"a report token in clear in {f.name}"


def test_report_events_sum_fields_per_meter_and_scale_mb_to_bytes(schema):
    r = parse(body(), schema)
    events = {e["meter_id"]: e for e in ur.report_events([r], schema).to_pylist()}
    # independent: seed 001 sums sent + received, and computes MB as bytes / 1024 / 1024
    assert events["iot_mqtt_bytes"]["quantity"] == Decimal(123_456 + 654_321)
    assert events["iot_mqtt_messages"]["quantity"] == Decimal(1250)
    assert events["iot_http_bytes"]["quantity"] == Decimal(3000)
    assert events["iot_storage"]["quantity"] == (Decimal("812.25") + Decimal("100.5")) * 1024 * 1024
    assert events["iot_devices"]["quantity"] == 42
    assert {m: e["kind"] for m, e in events.items()}["iot_mqtt_bytes"] == "delta"
    assert events["iot_storage"]["kind"] == "gauge" and events["iot_storage"]["hold_ms"] == 3600_000 + 300_000
    assert events["iot_mqtt_bytes"]["hold_ms"] == 0
    assert events["iot_storage"]["event_id"] == "iot-010/r-2026-11-21T13:iot_storage"
    assert dict(events["iot_storage"]["attributes"]) == {
        "report_id": "r-2026-11-21T13",
        "influxdb_size_mb": "100.5",
        "postgres_size_mb": "812.25",
    }
    assert events["iot_storage"]["customer_key"] == "iot-010"


def test_the_store_is_idempotent_on_report_id_and_refuses_a_changed_report(tmp_path, schema):
    path = tmp_path / "reports.sqlite"
    r = parse(body(), schema)
    with ur.ReportStore(path) as store:
        assert store.accept(r) == "accepted"
        # the same report with keys in another order and 812.250 instead of 812.25: a retry
        text = json.dumps(dict(reversed(list(body().items())))).replace("812.25", "812.250")
        same = parse(text.encode(), schema)
        assert store.accept(same) == "duplicate"
        with pytest.raises(ur.ReportConflict, match="different contents"):
            store.accept(parse(body(mqtt_bytes_sent=1), schema))
        # the same id of another customer is another report
        other = ur.Report(r.report_id, "iot-001", r.reported_at_ms, 3600, {"active_devices": Decimal(1)})
        assert store.accept(other) == "accepted"
    # durable: a fresh connection sees both, with the original contents
    with ur.ReportStore(path, readonly=True) as again:
        reports = again.reports_of_day(date(2026, 11, 21))
    assert [(x.customer_id, x.values.get("mqtt_bytes_sent")) for x in reports] == [("iot-001", None), ("iot-010", Decimal(123_456))]


def test_compact_day_writes_events_and_marks_the_day(tmp_path, schema):
    paths = resolve_paths(tmp_path / "data", SEEDS)
    day = date(2026, 11, 21)
    with ur.ReportStore.open(paths) as store:
        for h in range(3):
            store.accept(parse(body(report_id=f"h{h}", reported_at=f"2026-11-21T{10 + h:02d}:00:00Z"), schema))
        assert list(store.pending_days()) == ["2026-11-21"]
    fig = ur.compact_day(paths, day, schema)
    assert (fig["reports"], fig["events"]) == (3, 3 * 9)
    with ur.ReportStore.open(paths) as store:
        assert store.pending_days() == {}
        store.accept(parse(body(report_id="h9", reported_at="2026-11-21T12:30:00Z"), schema))
        assert list(store.pending_days()) == ["2026-11-21"]  # a late report makes the day pending again
    before = Path(fig["path"]).read_bytes()
    ur.compact_day(paths, day, schema)
    ur.compact_day(paths, day, schema)
    assert Path(fig["path"]).read_bytes() != before  # the late report is in
    again = Path(fig["path"]).read_bytes()
    ur.compact_day(paths, day, schema)
    assert Path(fig["path"]).read_bytes() == again  # idempotent


# --- the real endpoint ----------------------------------------------------------------------


@contextmanager
def receiver(tmp_path: Path, **overrides):
    config = ReceiverConfig(landing_dir=tmp_path / "landing", seeds_dir=SEEDS, min_free_bytes=0, **overrides)
    with serve_app(create_app(config)) as url:
        yield url + REPORT_PATH


def recent(hours_ago: int = 1) -> str:
    t = datetime.now(UTC).replace(minute=0, second=0, microsecond=0).timestamp() - hours_ago * 3600
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def send(url, doc, token=TOKEN, **headers):
    h = {"Content-Type": "application/json", **headers}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    data = doc if isinstance(doc, bytes) else json.dumps(doc)
    return requests.post(url, data=data, headers=h, timeout=10)


def test_endpoint_answers_201_only_once_the_report_is_committed_then_200_for_a_retry(tmp_path):
    db = tmp_path / "landing" / "reports" / "reports.sqlite"
    with receiver(tmp_path) as url:
        doc = body(reported_at=recent())
        r = send(url, doc)
        assert r.status_code == 201, r.text
        assert r.json()["status"] == "accepted"
        # committed before the answer: another connection reads it now
        with sqlite3.connect(db) as con:
            assert con.execute("select customer_id, report_id from reports").fetchall() == [("iot-010", doc["report_id"])]
        r2 = send(url, doc)
        assert (r2.status_code, r2.json()["status"]) == (200, "duplicate")
        r3 = send(url, {**doc, "http_requests": 1})
        assert r3.status_code == 409 and r3.json()["field"] == "report_id"
        metrics = requests.get(url.replace(REPORT_PATH, "/metrics"), timeout=10).text
        assert "billing_usage_reports_total 1.0" in metrics and "billing_usage_report_duplicates_total 1.0" in metrics
    with sqlite3.connect(db) as con:
        assert con.execute("select count(*) from reports").fetchall() == [(1,)]


@pytest.mark.parametrize(
    ("token", "doc", "code", "field"),
    [
        (None, body(), 401, None),
        ("wrong", body(), 401, None),
        (TOKEN, body(customer_id="iot-001"), 401, None),  # a token of iot-010 cannot report for iot-001
        (TOKEN, body(customer_id="nobody"), 401, None),
        (TOKEN, body(mqtt_bytes_sent=-5), 400, "mqtt_bytes_sent"),
        (TOKEN, body(reported_at="2026-13-01T00:00:00Z"), 400, "reported_at"),
        (TOKEN, body(colour="blue"), 400, "colour"),
        (TOKEN, b"{", 400, "body"),
    ],
)
def test_endpoint_refuses_bad_reports_and_stores_nothing(tmp_path, token, doc, code, field):
    if isinstance(doc, dict) and doc.get("reported_at") == "2026-11-21T13:00:00Z":
        doc["reported_at"] = recent()
    with receiver(tmp_path) as url:
        r = send(url, doc, token=token)
        assert r.status_code == code, r.text
        if field:
            assert r.json()["field"] == field and field in r.json()["error"]
        if code == 401:
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
    with sqlite3.connect(tmp_path / "landing" / "reports" / "reports.sqlite") as con:
        assert con.execute("select count(*) from reports").fetchall() == [(0,)]


def test_endpoint_415_and_413(tmp_path):
    with receiver(tmp_path, max_report_bytes=2048) as url:
        assert send(url, body(reported_at=recent()), **{"Content-Type": "text/plain"}).status_code == 415
        big = body(reported_at=recent(), report_id="x" * 100)
        big_bytes = json.dumps(big).encode() + b" " * 4096
        assert send(url, big_bytes).status_code == 413


def test_endpoint_503_when_the_store_cannot_commit(tmp_path, monkeypatch):
    def broken(self, report, **kw):
        raise sqlite3.OperationalError("database or disk is full")

    with receiver(tmp_path) as url:
        monkeypatch.setattr(ur.ReportStore, "accept", broken)
        r = send(url, body(reported_at=recent()))
        assert r.status_code == 503 and "retry" in r.json()["error"]


def test_endpoint_without_seeds_answers_503(tmp_path):
    with serve_app(create_app(ReceiverConfig(landing_dir=tmp_path / "landing", min_free_bytes=0))) as url:
        r = send(url + REPORT_PATH, body(reported_at=recent()))
        assert r.status_code == 503 and "not configured" in r.json()["error"]


def test_endpoint_503_over_the_in_flight_limit(tmp_path, monkeypatch):
    import threading

    inside, gate = threading.Event(), threading.Event()
    accept = ur.ReportStore.accept

    def slow(self, report, **kw):
        inside.set()
        gate.wait(10)
        return accept(self, report, **kw)

    monkeypatch.setattr(ur.ReportStore, "accept", slow)
    with receiver(tmp_path, max_in_flight=1) as url:
        first: list = []
        t = threading.Thread(target=lambda: first.append(send(url, body(report_id="a", reported_at=recent()))))
        t.start()
        assert inside.wait(10)  # the first report holds the only slot while its commit waits
        r = send(url, body(report_id="b", reported_at=recent()))
        gate.set()
        t.join(10)
    assert r.status_code == 503 and "in-flight" in r.json()["error"]
    assert first[0].status_code == 201


def test_json_numbers_out_of_range_never_pass_as_ids():
    doc = ur.decode_body(b'{"report_id": 1e99, "customer_id": 1e40}')
    with pytest.raises(ur.ReportError) as e:
        ur.parse_customer_id(doc)
    assert e.value.field == "customer_id"


def test_an_unterminated_string_is_refused_in_bounded_time():
    # a 64 KB body of escaped quotes with no closing quote: the nesting scan must stay linear (it took
    # 24 s, holding the receiver's event loop); run apart, with a bound far above the linear time
    import subprocess
    import sys

    code = (
        "from billing_dags.ingest import usage_reports as ur\ntry:\n    ur.decode_body(b'\"' + b'\\\\\"' * 32000)\nexcept ur.ReportError as e:\n    "
        "print(e.field)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=10, cwd=PROJECT_ROOT)
    assert out.stdout.strip() == "body", out.stderr
