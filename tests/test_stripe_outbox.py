"""Stripe outbox (rule 9): exact integer values, revisions, identifiers, dry-run, age limit, and a
real HTTP round trip through the stripe library against a server on 127.0.0.1."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from servers import HandlerServer
from sql_helpers import USAGE_BY_DAY_SCHEMA as DAY_SCHEMA

from billing_dags.core.settings import Paths
from billing_dags.stripe.outbox import (
    OUTBOX_SCHEMA,
    OutboxError,
    build_outbox,
    day_quantities,
    day_timestamp,
    event_identifier,
    read_outbox,
    round_half_up,
    write_outbox,
)
from billing_dags.stripe.sender import make_client, send_outbox

UTC = UTC
DAY = date(2025, 3, 10)
NOW = datetime(2025, 3, 11, 0, 30, tzinfo=UTC)
API_KEY = "sk_test_51SECRETkeyDoNotLeak0123456789"
GIB = 1073741824

METERS = {
    "bytes": {"meter_id": "bytes", "kind": "counter", "aggregation": "sum", "stripe_event_name": "bytes_evt"},
    "peak": {"meter_id": "peak", "kind": "gauge", "aggregation": "max", "stripe_event_name": "peak_evt"},
    "avg": {"meter_id": "avg", "kind": "gauge", "aggregation": "avg", "stripe_event_name": "avg_evt"},
    "mem": {"meter_id": "mem", "kind": "gauge", "aggregation": "unit_hours", "stripe_event_name": "mem_evt"},
    "disk": {"meter_id": "disk", "kind": "gauge", "aggregation": "unit_months", "stripe_event_name": "disk_evt"},
    "quiet": {"meter_id": "quiet", "kind": "counter", "aggregation": "sum", "stripe_event_name": None},
}
CUSTOMERS = [
    {"customer_id": "acme", "stripe_customer_id": "cus_A"},
    {"customer_id": "beta", "stripe_customer_id": "cus_B"},
    {"customer_id": "nostripe", "stripe_customer_id": None},
]


#: the seed tables the billable-quantity model reads for the meters above (base unit = billing unit)
SEEDS = {
    "meters": pa.Table.from_pylist(
        [
            {
                "meter_id": m["meter_id"],
                "metrics": m["meter_id"],
                "kind": m["kind"],
                "aggregation": m["aggregation"],
                "unit": "u",
                "billing_unit": "u",
                "customer_label": "customer_id",
                "dimension_label": "",
                "stripe_event_name": m["stripe_event_name"],
                "description": m["meter_id"],
            }
            for m in METERS.values()
        ]
    ),
    "units": pa.Table.from_pylist([{"unit": "u", "billing_unit": "u", "divisor": 1}]),
}


def counter(cid, mid, usage, dimension="", day=DAY):
    return {
        "day": day,
        "customer_id": cid,
        "meter_id": mid,
        "dimension": dimension,
        "kind": "counter",
        "usage": Decimal(usage),
        "gauge_integral": None,
        "gauge_covered_ms": None,
        "gauge_peak": None,
        "samples": 1,
        "events": 0,
    }


def gauge(cid, mid, *, integral="0", covered=0, peak="0", dimension="", day=DAY):
    return {
        "day": day,
        "customer_id": cid,
        "meter_id": mid,
        "dimension": dimension,
        "kind": "gauge",
        "usage": None,
        "gauge_integral": Decimal(integral),
        "gauge_covered_ms": covered,
        "gauge_peak": Decimal(peak),
        "samples": 1,
        "events": 0,
    }


def outbox_of(day, rows, customers, meters, previous):
    """build_outbox over the billable quantities of fixture fct_usage_by_day rows (as the asset builds it)."""
    return build_outbox(day, day_quantities(day, pa.Table.from_pylist(rows, schema=DAY_SCHEMA), SEEDS), customers, meters, previous)


def event_value(row, meter, day):
    """The meter event value of one usage row."""
    out = outbox_of(day, [row], CUSTOMERS, list(METERS.values()), [])
    return next(r["value"] for r in out if r["meter_id"] == meter["meter_id"])


# --------------------------------------------------------------------------- values


def test_event_value_counter_half_up():
    assert event_value(counter("acme", "bytes", "12.5"), METERS["bytes"], DAY) == 13
    assert event_value(counter("acme", "bytes", "12.499999999"), METERS["bytes"], DAY) == 12
    assert event_value(counter("acme", "bytes", "1073741824.000000000"), METERS["bytes"], DAY) == GIB
    assert event_value(counter("acme", "bytes", "0"), METERS["bytes"], DAY) == 0


def test_event_value_gauges_by_aggregation():
    # max: the peak, rounded half-up
    assert event_value(gauge("acme", "peak", peak="7.5"), METERS["peak"], DAY) == 8
    assert event_value(gauge("acme", "peak", peak="7.4"), METERS["peak"], DAY) == 7
    # avg: 10 for 60 s then 20 for 30 s -> (600000 + 600000) / 90000 = 13.33 -> 13
    assert event_value(gauge("acme", "avg", integral="1200000", covered=90_000), METERS["avg"], DAY) == 13
    # avg exactly halfway: 25 / 10 = 2.5 -> 3
    assert event_value(gauge("acme", "avg", integral="25", covered=10), METERS["avg"], DAY) == 3
    # avg with no coverage is 0, not a division error
    assert event_value(gauge("acme", "avg", integral="0", covered=0), METERS["avg"], DAY) == 0
    # unit_hours: 2 GiB held for 1.5 h = 3 GiB-hours in byte-hours
    integral = 2 * GIB * 5_400_000
    assert event_value(gauge("acme", "mem", integral=str(integral)), METERS["mem"], DAY) == 3 * GIB
    # 1 byte for 30 min = 0.5 byte-hours -> 1 (half-up); 29 min 59.999 s -> 0
    assert event_value(gauge("acme", "mem", integral="1800000"), METERS["mem"], DAY) == 1
    assert event_value(gauge("acme", "mem", integral="1799999"), METERS["mem"], DAY) == 0
    # unit_months: divided by the milliseconds of the day's calendar month
    feb25, feb24 = date(2025, 2, 10), date(2024, 2, 10)
    assert event_value(gauge("acme", "disk", integral="3628800000", day=feb25), METERS["disk"], feb25) == 2  # 3628800000 / 2419200000 = 1.5
    assert event_value(gauge("acme", "disk", integral="3628800000", day=feb24), METERS["disk"], feb24) == 1  # / 2505600000 = 1.448
    assert event_value(gauge("acme", "disk", integral=str(1000 * 31 * 86_400_000)), METERS["disk"], DAY) == 1000  # March: 31 days


def test_round_half_up_is_symmetric():
    assert round_half_up(Fraction(5, 2)) == 3
    assert round_half_up(Fraction(-5, 2)) == -3
    assert round_half_up(Fraction(-7, 3)) == -2
    assert round_half_up(Fraction(0)) == 0


# --------------------------------------------------------------------------- building


def test_build_outbox_sums_dimensions_and_skips_non_stripe():
    rows = [
        counter("acme", "bytes", "10.4", "a"),
        counter("acme", "bytes", "10.4", "b"),  # summed exactly first: 20.8 -> 21 (not 10 + 10)
        counter("beta", "bytes", "5"),
        counter("nostripe", "bytes", "99"),  # no stripe_customer_id
        counter("acme", "quiet", "7"),  # meter without a stripe event name
        gauge("beta", "peak", peak="3"),
    ]
    out = outbox_of(DAY, rows, CUSTOMERS, list(METERS.values()), [])
    assert [(r["customer_id"], r["meter_id"], r["value"]) for r in out] == [("acme", "bytes", 21), ("beta", "bytes", 5), ("beta", "peak", 3)]
    first = out[0]
    assert first == {
        "customer_id": "acme",
        "stripe_customer_id": "cus_A",
        "meter_id": "bytes",
        "event_name": "bytes_evt",
        "day": DAY,
        "value": 21,
        "revision": 1,
        "identifier": "acme-bytes-20250310-r1",
        "timestamp": 1741564800,  # 2025-03-10T00:00:00Z
        "status": "pending",
        "attempts": 0,
        "last_error": None,
        "stripe_response_id": None,
        "dimension": "",
        "unit_decimals": 0,
        "stripe_value": None,
        "formula": "sum",
    }
    assert day_timestamp(DAY) == int(datetime(2025, 3, 10, tzinfo=UTC).timestamp())
    # deterministic whatever the input order
    assert outbox_of(DAY, list(reversed(rows)), CUSTOMERS, list(METERS.values()), []) == out


def test_build_outbox_rejects_bad_input():
    with pytest.raises(OutboxError, match="unknown customer 'ghost'"):
        outbox_of(DAY, [counter("ghost", "bytes", "1")], CUSTOMERS, list(METERS.values()), [])
    with pytest.raises(OutboxError, match="unknown meter 'nope'"):
        outbox_of(DAY, [counter("acme", "nope", "1")], CUSTOMERS, list(METERS.values()), [])
    with pytest.raises(OutboxError, match="not the outbox day"):
        outbox_of(DAY, [counter("acme", "bytes", "1", day=DAY + timedelta(days=1))], CUSTOMERS, list(METERS.values()), [])


def test_revision_bumps_only_when_value_changes():
    meters = list(METERS.values())
    first = outbox_of(DAY, [counter("acme", "bytes", "100"), counter("beta", "bytes", "5")], CUSTOMERS, meters, [])
    stored = [{**r, "status": "sent", "attempts": 1, "stripe_response_id": r["identifier"]} for r in first]

    same = outbox_of(DAY, [counter("acme", "bytes", "100.2"), counter("beta", "bytes", "5")], CUSTOMERS, meters, stored)
    assert same == stored  # 100.2 rounds to the same 100: rows kept, status included

    changed = outbox_of(DAY, [counter("acme", "bytes", "101"), counter("beta", "bytes", "5")], CUSTOMERS, meters, stored)
    acme, beta = changed
    assert (acme["value"], acme["revision"], acme["status"], acme["attempts"]) == (101, 2, "pending", 0)
    assert acme["identifier"] == "acme-bytes-20250310-r2" and acme["stripe_response_id"] is None
    assert beta == stored[1]

    # beta's usage vanished (e.g. a corrected customer mapping): a zero event undoes what was sent
    gone = outbox_of(DAY, [counter("acme", "bytes", "101")], CUSTOMERS, meters, changed)
    assert [(r["customer_id"], r["value"], r["revision"], r["status"]) for r in gone] == [("acme", 101, 2, "pending"), ("beta", 0, 2, "pending")]
    again = outbox_of(DAY, [counter("acme", "bytes", "101")], CUSTOMERS, meters, gone)
    assert again == gone


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,62}", fullmatch=True), min_size=1, max_size=6, unique=True),
    st.lists(st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,62}", fullmatch=True), min_size=1, max_size=4, unique=True),
    st.integers(min_value=1, max_value=10**6),
)
def test_identifiers_unique_and_at_most_100_chars(customer_ids, meter_ids, revision):
    days = [DAY, DAY + timedelta(days=1)]
    idents = [event_identifier(c, m, d, r) for c in customer_ids for m in meter_ids for d in days for r in (revision, revision + 1)]
    assert all(len(i) <= 100 for i in idents)
    assert len(set(idents)) == len(idents)


def test_identifier_for_long_ids_stays_within_stripe_limit():
    cid, mid = "c" * 63, "m" * 63
    ident = event_identifier(cid, mid, DAY, 12)
    assert len(ident) <= 100 and ident.endswith("-20250310-r12")
    assert ident != event_identifier(cid, "m" * 62, DAY, 12)
    assert event_identifier("acme", "bytes", DAY, 3) == "acme-bytes-20250310-r3"


def test_outbox_parquet_round_trip_is_atomic_and_deterministic(tmp_path):
    paths = Paths(tmp_path / "data", tmp_path / "seeds")
    assert read_outbox(paths, DAY) == []
    rows = outbox_of(DAY, [counter("beta", "bytes", "5"), counter("acme", "bytes", "7")], CUSTOMERS, list(METERS.values()), [])
    dest = write_outbox(paths, DAY, rows)
    assert dest == paths.outbox / "date=2025-03-10" / "outbox.parquet"
    assert read_outbox(paths, DAY) == rows
    first = dest.read_bytes()
    write_outbox(paths, DAY, list(reversed(rows)))
    assert dest.read_bytes() == first
    assert [f.name for f in dest.parent.iterdir()] == ["outbox.parquet"]
    import pyarrow.parquet as pq

    assert pq.read_schema(dest).remove_metadata() == OUTBOX_SCHEMA
    with pytest.raises(OutboxError, match="not 2025-03-11"):
        write_outbox(paths, DAY + timedelta(days=1), rows)


# --------------------------------------------------------------------------- sending without Stripe


def test_dry_run_without_a_key():
    assert make_client(None) is None and make_client("") is None
    rows = outbox_of(DAY, [counter("acme", "bytes", "7")], CUSTOMERS, list(METERS.values()), [])
    out = send_outbox(rows, None, now=NOW)
    assert [r["status"] for r in out] == ["dry_run"]
    assert out[0]["attempts"] == 0 and rows[0]["status"] == "pending"  # input untouched


def test_too_old_rows_are_flagged_never_sent():
    class Exploding:
        class v1:
            class billing:
                class meter_events:
                    @staticmethod
                    def create(**kwargs):
                        raise AssertionError("a too-old event must not be sent")

    now = datetime(2025, 3, 11, 12, 0, tzinfo=UTC)
    old_day = date(2025, 2, 1)  # 38 days before
    edge_day = (now - timedelta(days=35)).date()  # starts 35 days 12 h before now
    rows = []
    for d in (old_day, edge_day):
        rows += outbox_of(d, [counter("acme", "bytes", "7", day=d)], CUSTOMERS, list(METERS.values()), [])
    out = send_outbox(rows, Exploding(), now=now)
    assert [r["status"] for r in out] == ["too_old", "too_old"]
    assert all(r["attempts"] == 0 for r in out)
    # also in dry-run
    assert [r["status"] for r in send_outbox(rows, None, now=now)] == ["too_old", "too_old"]
    # 34 days back is still within the horizon
    ok_day = (now - timedelta(days=34)).date()
    ok = outbox_of(ok_day, [counter("acme", "bytes", "7", day=ok_day)], CUSTOMERS, list(METERS.values()), [])
    assert [r["status"] for r in send_outbox(ok, None, now=now)] == ["dry_run"]


def test_send_requires_an_aware_now():
    with pytest.raises(OutboxError, match="timezone-aware"):
        send_outbox([], None, now=datetime(2025, 3, 11))


# --------------------------------------------------------------------------- real HTTP round trip


class FakeStripe(HandlerServer):
    """A tiny Stripe stand-in on 127.0.0.1: POST /v1/billing/meter_events, scripted failures."""

    def __init__(self, fail_once_500=(), fail_once_429=(), reject_400=()):
        self.requests: list[dict] = []
        self.fail_once_500, self.fail_once_429, self.reject_400 = set(fail_once_500), set(fail_once_429), set(reject_400)
        self.failed: set[tuple[str, int]] = set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                form = {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}
                outer.requests.append(
                    {
                        "path": self.path,
                        "form": form,
                        "raw": raw,
                        "idempotency_key": self.headers.get("Idempotency-Key"),
                        "authorization": self.headers.get("Authorization"),
                        "content_type": self.headers.get("Content-Type"),
                    }
                )
                ident = form.get("identifier")
                if self.path != "/v1/billing/meter_events":
                    return self.reply(404, {"error": {"type": "invalid_request_error", "message": "Unrecognized request URL"}})
                if ident in outer.fail_once_500 and (ident, 500) not in outer.failed:
                    outer.failed.add((ident, 500))
                    return self.reply(500, {"error": {"type": "api_error", "message": "An unknown error occurred"}})
                if ident in outer.fail_once_429 and (ident, 429) not in outer.failed:
                    outer.failed.add((ident, 429))
                    return self.reply(429, {"error": {"type": "invalid_request_error", "code": "rate_limit", "message": "Too many requests"}})
                if ident in outer.reject_400:
                    return self.reply(400, {"error": {"type": "invalid_request_error", "message": "No active meter found for event_name"}})
                # shaped like the 'billing.meter_event' object of Stripe's fixtures
                return self.reply(
                    200,
                    {
                        "created": 1234567890,
                        "event_name": form["event_name"],
                        "identifier": ident,
                        "livemode": False,
                        "object": "billing.meter_event",
                        "payload": {"stripe_customer_id": form["payload[stripe_customer_id]"], "value": form["payload[value]"]},
                        "timestamp": int(form["timestamp"]),
                    },
                )

            def reply(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Request-Id", f"req_test{len(outer.requests)}")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        super().__init__(Handler)


def test_http_round_trip_retries_with_the_same_idempotency_key(no_proxy):
    meters = list(METERS.values())
    usage = [counter("acme", "bytes", "1048576.5"), gauge("acme", "peak", peak="12"), counter("beta", "bytes", "42"), gauge("beta", "peak", peak="1")]
    rows = outbox_of(DAY, usage, CUSTOMERS, meters, [])
    by_id = {r["identifier"]: r for r in rows}
    assert set(by_id) == {"acme-bytes-20250310-r1", "acme-peak-20250310-r1", "beta-bytes-20250310-r1", "beta-peak-20250310-r1"}
    # one row was already acknowledged and must not be sent again
    rows = [{**r, "status": "sent", "attempts": 1} if r["identifier"] == "beta-peak-20250310-r1" else r for r in rows]
    sleeps: list[float] = []
    with FakeStripe(fail_once_500={"acme-bytes-20250310-r1"}, fail_once_429={"acme-peak-20250310-r1"}, reject_400={"beta-bytes-20250310-r1"}) as fake:
        client = make_client(API_KEY, fake.url, max_network_retries=2)
        out = send_outbox(rows, client, now=NOW, sleep=sleeps.append)

    status = {r["identifier"]: r for r in out}
    assert status["acme-bytes-20250310-r1"]["status"] == "sent"
    assert status["acme-bytes-20250310-r1"]["stripe_response_id"] == "acme-bytes-20250310-r1"
    assert status["acme-bytes-20250310-r1"]["attempts"] == 1 and status["acme-bytes-20250310-r1"]["last_error"] is None
    assert status["acme-peak-20250310-r1"]["status"] == "sent"
    assert status["beta-peak-20250310-r1"]["status"] == "sent" and status["beta-peak-20250310-r1"]["attempts"] == 1
    failed = status["beta-bytes-20250310-r1"]
    assert failed["status"] == "failed" and failed["attempts"] == 1
    assert "No active meter found" in failed["last_error"] and "400" in failed["last_error"]
    assert len(sleeps) == 1  # the 429 was retried by the sender after a backoff

    sent_idents = [r["form"]["identifier"] for r in fake.requests]
    # the 500 was retried by the library, the 429 by the sender; the sent row was not posted
    assert sorted(sent_idents) == sorted(["acme-bytes-20250310-r1"] * 2 + ["acme-peak-20250310-r1"] * 2 + ["beta-bytes-20250310-r1"])
    for req in fake.requests:
        ident = req["form"]["identifier"]
        row = by_id[ident]
        assert req["path"] == "/v1/billing/meter_events"
        assert req["content_type"].startswith("application/x-www-form-urlencoded")
        assert req["idempotency_key"] == ident  # on every attempt, retries included
        assert req["form"] == {
            "event_name": row["event_name"],
            "payload[stripe_customer_id]": row["stripe_customer_id"],
            "payload[value]": str(row["value"]),
            "identifier": ident,
            "timestamp": str(day_timestamp(DAY)),
        }
        assert API_KEY not in req["raw"]  # the key travels only in the Authorization header
        assert req["authorization"] == f"Bearer {API_KEY}"
    assert {r["form"]["payload[value]"] for r in fake.requests if r["form"]["identifier"].startswith("acme-bytes")} == {"1048577"}
    assert all(API_KEY not in (r["last_error"] or "") for r in out)


def test_connection_errors_mark_rows_failed_without_the_key(no_proxy):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    rows = outbox_of(DAY, [counter("acme", "bytes", "7")], CUSTOMERS, list(METERS.values()), [])
    out = send_outbox(rows, make_client(API_KEY, f"http://127.0.0.1:{port}", max_network_retries=0), now=NOW)
    assert out[0]["status"] == "failed" and out[0]["attempts"] == 1
    assert out[0]["last_error"] and API_KEY not in out[0]["last_error"]
    # failed rows are retried on the next run, with the same identifier
    with FakeStripe() as fake:
        again = send_outbox(out, make_client(API_KEY, fake.url), now=NOW)
    assert again[0]["status"] == "sent" and again[0]["attempts"] == 2 and again[0]["last_error"] is None
    assert [r["idempotency_key"] for r in fake.requests] == ["acme-bytes-20250310-r1"]
