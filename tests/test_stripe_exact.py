"""Stripe bills what the invoice bills (rule 9): level meters as period-to-date values with a `last`
meter, one meter per priced dimension, nothing outside a subscription, revisions of later days when
a day is recomputed, exact units; the local server's event summaries as Stripe documents them; the
reconciliation's named causes."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pytest
from sql_helpers import USAGE_BY_DAY_SCHEMA as DAY_SCHEMA
from stripe_server import StripeServer
from test_stripe_outbox import counter as outbox_counter
from test_stripe_outbox import gauge as outbox_gauge

from billing_dags.core.settings import Paths
from billing_dags.seeds.catalog import load_seeds
from billing_dags.stripe import outbox as ob
from billing_dags.stripe.meters import desired_meters, sync_meters
from billing_dags.stripe.reconcile import explain
from billing_dags.stripe.sender import make_client, send_outbox

SEEDS_DIR = Path(__file__).resolve().parent.parent / "seeds"
MONTH = date(2026, 11, 1)
NOW = datetime(2026, 12, 1, 2, 0, tzinfo=UTC)
API_KEY = "sk_test_51exactMeters0123456789"
GIB = 2**30


@pytest.fixture(scope="module")
def seeds():
    return load_seeds(SEEDS_DIR)


def _day(i: int) -> date:
    return MONTH + timedelta(days=i - 1)


def counter(cid, mid, day, usage, dimension=""):
    return {**outbox_counter(cid, mid, usage, dimension, day=day), "samples": 10}


def gauge(cid, mid, day, *, peak="0", integral="0", covered=0):
    return {**outbox_gauge(cid, mid, peak=peak, integral=integral, covered=covered, day=day), "samples": 10}


def usage_rows(last_day: int, bump: dict | None = None) -> list[dict]:
    """A month of usage up to ``last_day``: iot-001 devices (max) and storage (max), k8s-001 storage
    (unit_months), memory (unit_hours) and CPU (seconds with milliseconds), llm-001 input tokens of a
    priced and an unpriced model, tb-004 calls before and after its subscription starts (11-10... no:
    its plan starts 2026-10-10, so tb-004 is billed all month); k8s-005 after its subscription ended (10-21)."""
    bump = bump or {}
    rows = []
    for i in range(1, last_day + 1):
        d = _day(i)
        peak = bump.get(i, 5 + (i * 7) % 12)  # daily peaks 5..16: the month's peak is 16, their sum far more
        rows.append(gauge("iot-001", "iot_devices", d, peak=str(peak)))
        rows.append(gauge("iot-001", "iot_storage", d, peak=str(3 * GIB + i * 1000)))
        rows.append(gauge("k8s-001", "k8s_storage", d, integral=str(86_400_000 * (5 * GIB + i)), covered=86_400_000))
        rows.append(gauge("k8s-001", "k8s_memory", d, integral=str(86_400_000 * (GIB + 7 * i)), covered=86_400_000))
        rows.append(counter("k8s-001", "k8s_cpu", d, f"{1000 + i}.{i:03d}"))
        rows.append(counter("llm-001", "llm_input_tokens", d, 1_000_000 + i, "gpt-4o"))
        rows.append(counter("llm-001", "llm_input_tokens", d, 2_000_000 + i, "claude-3-5-sonnet"))
        rows.append(counter("llm-001", "llm_input_tokens", d, 500, "unpriced-model"))
        rows.append(counter("k8s-005", "k8s_cpu", d, "10"))
    return rows


def table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=DAY_SCHEMA)


def build(paths: Paths, seeds, last_day: int, bump: dict | None = None) -> dict[date, list[dict]]:
    through = _day(last_day)
    previous = {d: ob.read_outbox(paths, d) for d in (_day(i) for i in range(1, last_day + 1))}
    built = ob.build_month_outbox(MONTH, through, table(usage_rows(last_day, bump)), seeds, previous)
    for d, rows in built.items():
        ob.write_outbox(paths, d, rows)
    return built


def all_rows(paths: Paths) -> list[dict]:
    return [r for i in range(1, 31) for r in ob.read_outbox(paths, _day(i))]


def send_all(paths: Paths, client) -> None:
    for i in range(1, 31):
        rows = ob.read_outbox(paths, _day(i))
        if rows:
            ob.write_outbox(paths, _day(i), send_outbox(rows, client, now=NOW, sleep=lambda s: None))


@pytest.fixture
def no_proxy(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")


@pytest.fixture
def stripe_env(no_proxy, seeds):
    with StripeServer(now=NOW, api_key=API_KEY) as server:
        client = make_client(API_KEY, server.url, max_network_retries=0)
        report = sync_meters(client, seeds["meters"].to_pylist(), seeds["prices"].to_pylist(), seeds["units"].to_pylist())
        assert report.ok, report.items
        yield server, client


def stripe_quantity(server, event_name, customer, start: date, end: date, divisor: int, decimals: int) -> Decimal:
    value = server.summary_value(event_name, customer, ob.day_timestamp(start), ob.day_timestamp(end))
    return Decimal(ob.stripe_to_billing_nano(value, divisor, decimals)) / 10**9


# --------------------------------------------------------------------------- pure functions


def test_formula_and_unit_per_aggregation():
    assert [ob.stripe_formula(a) for a in ("sum", "unit_hours", "max", "avg", "unit_months")] == ["sum", "sum", "last", "last", "last"]
    assert ob.unit_decimals("sum", "byte", GIB) == 0  # bytes: whole
    assert ob.unit_decimals("max", "device", 1) == 0
    assert ob.unit_decimals("sum", "second", 3600) == 6  # CPU seconds in microseconds
    assert ob.unit_decimals("avg", "device", 1) == 9  # average devices in 1e-9 devices
    assert ob.unit_decimals("unit_months", "byte", GIB) == 0  # byte-months: finer than 1e-9 GiB-month


def test_stripe_units_round_trip_to_the_invoice_figure():
    # a whole number of Stripe units is sent as it is
    assert ob.to_stripe_units(12 * 10**9, 1, 0) == 12
    assert ob.to_stripe_units(123_456_789 * 10**9, GIB, 0) == 123_456_789
    # a fraction: the invoice's 9-decimal billing quantity, in Stripe units, comes back exactly
    for base_nano, divisor, d in [(1_234_567_891_234, 3600, 6), (7_777_777_777, 1, 9), (5 * GIB * 10**9 + 123_456_789, GIB, 0)]:
        invoice_nano = ob.round_half_up(ob.Fraction(base_nano, divisor))
        assert ob.stripe_to_billing_nano(ob.to_stripe_units(base_nano, divisor, d), divisor, d) == invoice_nano


def test_event_names_one_per_priced_dimension_deterministic_and_distinct():
    assert ob.stripe_event_name("llm_input_tokens", "") == "llm_input_tokens"
    assert ob.stripe_event_name("llm_input_tokens", "gpt-4o") == "llm_input_tokens__gpt-4o"
    odd = ob.stripe_event_name("llm_input_tokens", "GPT 4o/2024")
    assert odd.startswith("llm_input_tokens__gpt_4o_2024_") and odd != ob.stripe_event_name("llm_input_tokens", "gpt_4o_2024")
    assert len(ob.stripe_event_name("m", "x" * 300)) <= 100


def test_desired_meters_follow_the_prices(seeds):
    wanted = {d["event_name"]: d for d in desired_meters(seeds["meters"].to_pylist(), seeds["prices"].to_pylist(), seeds["units"].to_pylist())}
    # per-model meters, no whole-meter LLM meter (every LLM price names a model)
    assert {"llm_input_tokens__gpt-4o", "llm_input_tokens__claude-3-5-sonnet", "llm_input_tokens__gpt-4o-mini"} <= set(wanted)
    assert "llm_input_tokens" not in wanted
    # unpriced meters get no Stripe meter
    assert "proxy_rejected_shares" not in wanted and "iot_devices_total" not in wanted
    assert wanted["iot_devices"]["default_aggregation"] == {"formula": "last"}
    assert wanted["k8s_storage"]["default_aggregation"] == {"formula": "last"}
    assert wanted["k8s_memory"]["default_aggregation"] == {"formula": "sum"}
    assert "1e-6 second" in wanted["k8s_cpu"]["display_name"] and "byte-month" in wanted["k8s_storage"]["display_name"]


# --------------------------------------------------------------------------- the month, through Stripe


def test_stripe_period_totals_equal_the_invoice_quantities(tmp_path, seeds, stripe_env):
    """Levels end the period at the invoice's quantity (not a sum of daily peaks); tokens of models
    priced differently go to their own meters; unpriced usage and usage outside a subscription are
    not sent."""
    server, client = stripe_env
    paths = Paths(tmp_path, SEEDS_DIR)
    build(paths, seeds, 30)
    send_all(paths, client)
    rows = all_rows(paths)
    assert {r["status"] for r in rows} == {"sent"}
    assert not [r for r in rows if r["customer_id"] == "k8s-005"]  # its subscription ended in October
    assert not [r for r in rows if "unpriced" in r["event_name"]]
    end = _day(30) + timedelta(days=1)
    # invoice quantities, by hand: peak 16 devices; storage peak in GiB; unit-months; tokens per model
    assert stripe_quantity(server, "iot_devices", "cus_demoIOT001", MONTH, end, 1, 0) == 16
    storage_peak_nano = ob.round_half_up(ob.Fraction((3 * GIB + 30_000) * 10**9, GIB))
    assert stripe_quantity(server, "iot_storage", "cus_demoIOT001", MONTH, end, GIB, 0) == Decimal(storage_peak_nano) / 10**9
    integral = sum(86_400_000 * (5 * GIB + i) for i in range(1, 31))
    month_ms = 30 * 86_400_000
    gib_months_nano = ob.round_half_up(ob.Fraction(ob.round_half_up(ob.Fraction(integral * 10**9, month_ms)), GIB))
    assert stripe_quantity(server, "k8s_storage", "cus_demoK8S001", MONTH, end, GIB, 0) == Decimal(gib_months_nano) / 10**9
    cpu_s = sum(Decimal(f"{1000 + i}.{i:03d}") for i in range(1, 31))
    cpu_h_nano = ob.round_half_up(ob.Fraction(cpu_s) * 10**9 / 3600)
    assert stripe_quantity(server, "k8s_cpu", "cus_demoK8S001", MONTH, end, 3600, 6) == Decimal(cpu_h_nano) / 10**9
    gpt = sum(1_000_000 + i for i in range(1, 31))
    assert server.summary_value("llm_input_tokens__gpt-4o", "cus_demoLLM001", ob.day_timestamp(MONTH), ob.day_timestamp(end)) == gpt
    claude = sum(2_000_000 + i for i in range(1, 31))
    assert server.summary_value("llm_input_tokens__claude-3-5-sonnet", "cus_demoLLM001", ob.day_timestamp(MONTH), ob.day_timestamp(end)) == claude


def test_a_recomputed_day_revises_every_later_day_and_the_period_ends_right(tmp_path, seeds, stripe_env):
    server, client = stripe_env
    paths = Paths(tmp_path, SEEDS_DIR)
    build(paths, seeds, 20)
    send_all(paths, client)
    end = _day(20) + timedelta(days=1)
    assert stripe_quantity(server, "iot_devices", "cus_demoIOT001", MONTH, end, 1, 0) == 16
    posted = len(server.events)
    # a rerun sends nothing
    build(paths, seeds, 20)
    send_all(paths, client)
    assert len(server.events) == posted
    # day 3 recomputed with a peak of 40: every later day's period-to-date peak becomes 40
    build(paths, seeds, 20, bump={3: 40})
    devices = [r for r in all_rows(paths) if r["event_name"] == "iot_devices"]
    assert {r["day"] for r in devices if r["revision"] == 2} == {_day(i) for i in range(3, 21)}
    assert {r["value"] for r in devices if r["day"] >= _day(3)} == {40}
    # the CPU deltas of later days stay as they were (a sum meter's days are independent here)
    send_all(paths, client)
    assert stripe_quantity(server, "iot_devices", "cus_demoIOT001", MONTH, end, 1, 0) == 40
    identifiers = [e.identifier for e in server.events]
    assert len(identifiers) == len(set(identifiers))
    # back to the old peak: new revisions again, and Stripe ends at 16
    build(paths, seeds, 20)
    send_all(paths, client)
    assert stripe_quantity(server, "iot_devices", "cus_demoIOT001", MONTH, end, 1, 0) == 16


def test_values_fit_fifteen_digits():
    with pytest.raises(ob.OutboxError, match="15 digits"):
        ob.check_digits(10**15, "x")
    assert ob.check_digits(10**15 - 1, "x") == 10**15 - 1


# --------------------------------------------------------------------------- the local server's summaries


def test_server_summaries_follow_the_formula_and_the_window(no_proxy):
    with StripeServer(now=NOW, api_key=API_KEY) as server:
        server.add_meter("lvl", formula="last")
        server.add_meter("cnt", formula="sum")
        client = make_client(API_KEY, server.url, max_network_retries=0)
        t0 = ob.day_timestamp(_day(20))

        def post(ev, value, ts, ident):
            client.v1.billing.meter_events.create(
                params={"event_name": ev, "payload": {"stripe_customer_id": "cus_X", "value": str(value)}, "identifier": ident, "timestamp": ts}
            )

        post("lvl", 7, t0, "a")
        post("lvl", 9, t0 + 86_400, "b")
        post("lvl", 3, t0 + 86_400 + 60, "c")  # same day window, newer: replaces 9
        post("lvl", 5, t0, "d")  # newer but an earlier day: the last day still wins
        post("cnt", 4, t0, "e")
        post("cnt", 6, t0 + 86_400, "f")
        meter = {m.event_name: m.id for m in client.v1.billing.meters.list().auto_paging_iter()}
        whole = client.v1.billing.meters.event_summaries.list(meter["lvl"], params={"customer": "cus_X", "start_time": t0, "end_time": t0 + 2 * 86_400})
        assert [s.aggregated_value for s in whole.data] == [3]
        per_day = client.v1.billing.meters.event_summaries.list(
            meter["lvl"], params={"customer": "cus_X", "start_time": t0, "end_time": t0 + 2 * 86_400, "value_grouping_window": "day"}
        )
        assert [s.aggregated_value for s in per_day.data] == [5, 3]
        total = client.v1.billing.meters.event_summaries.list(meter["cnt"], params={"customer": "cus_X", "start_time": t0, "end_time": t0 + 2 * 86_400})
        assert [s.aggregated_value for s in total.data] == [10]
        import stripe

        with pytest.raises(stripe.InvalidRequestError, match="minute"):
            client.v1.billing.meters.event_summaries.list(meter["cnt"], params={"customer": "cus_X", "start_time": t0 + 1, "end_time": t0 + 86_400})


# --------------------------------------------------------------------------- causes


def _row(day, value, status, **kw):
    row = {"day": day, "value": value, "status": status, "customer_id": "c", "event_name": "ev", "unit_decimals": 0, "stripe_value": None, "last_error": None}
    return {**row, **kw}


def test_explain_names_each_cause():
    a, b = _day(1), _day(2)
    assert explain([_row(a, 5, "sent"), _row(b, 3, "pending")], "sum", 5, 8 * 10**9, 1, 0, a, b)[0].startswith("not yet sent: 1 events")
    rejected = explain([_row(a, 5, "sent"), _row(b, 3, "failed", last_error="InvalidRequestError (HTTP 400): nope")], "sum", 5, 8 * 10**9, 1, 0, a, b)
    assert rejected[0].startswith("rejected: 1 events") and "nope" in rejected[0]
    old = explain([_row(a, 5, "too_old"), _row(b, 3, "sent")], "sum", 3, 8 * 10**9, 1, 0, a, b)
    assert old[0].startswith("too old") and "invoice item" in old[0] and "difference of 5" in old[0]
    rounding = explain([_row(a, 5, "sent")], "sum", 5, 5_000_000_400, 1, 0, a, b)
    assert rounding[0].startswith("rounding of a fraction")
    stale = explain([_row(a, 5, "sent")], "sum", 5, 9 * 10**9, 1, 0, a, b)
    assert stale[0].startswith("not yet sent: the outbox does not hold")
