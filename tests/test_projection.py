"""The open month: month-to-date usage, projected month-end quantities and the projected bill.

Fixture fct_usage_by_day partitions (10 computed days of October 2026, 31 days) are written to a
tmp data dir; the real seeds price them. Every expected figure is worked out by hand.
"""

from __future__ import annotations

import json
from datetime import date, timedelta
from decimal import Decimal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sql_helpers import USAGE_BY_DAY_SCHEMA as DAY_SCHEMA

from billing_dags.billing import projection
from billing_dags.cli.main import main
from billing_dags.core.settings import PROJECT_ROOT, resolve_paths

GIB = 2**30
OCT = date(2026, 10, 1)
TODAY = date(2026, 10, 11)  # days 1..10 computed: E = 10, D = 31
DAYS = [OCT + timedelta(days=i) for i in range(10)]


def day_row(day, customer, meter, *, usage=None, peak=None, integral=None, covered=None, dimension=""):
    gauge = usage is None
    return {
        "day": day,
        "customer_id": customer,
        "meter_id": meter,
        "dimension": dimension,
        "kind": "gauge" if gauge else "counter",
        "usage": None if gauge else Decimal(usage),
        "gauge_integral": Decimal(integral or 0) if gauge else None,
        "gauge_covered_ms": (covered or 0) if gauge else None,
        "gauge_peak": Decimal(peak or 0) if gauge else None,
        "series": 1,
        "samples": 1,
        "dropped_samples": 0,
        "resets": 0,
        "reappeared_series": 0,
        "max_gap_ms": 0,
        "events": 0,
        "duplicate_conflicts": 0,
        "gauge_held_ms": (covered or 0) if gauge else None,
    }


def write_days(paths, rows_by_day: dict) -> None:
    for day, rows in rows_by_day.items():
        f = paths.models / "fct_usage_by_day" / f"day={day.isoformat()}" / "data.parquet"
        f.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=DAY_SCHEMA), f)


def october_rows() -> dict:
    """mp-003 (proxy_hybrid v2 from 2026-10: $6, 12 GiB + 12,000 shares included, $0.05/GiB, $0.00005/share),
    iot-001 (iot_starter: $29, 10 devices included then $2 per device at peak),
    k8s-001 (k8s memory GiB-hours, an additive gauge)."""
    out = {}
    for i, d in enumerate(DAYS):
        rows = [
            # 20 GiB in 10 days, unevenly
            day_row(d, "mp-003", "proxy_bytes", usage=(i + 1) * GIB * 2 // 11 if i < 9 else 20 * GIB - sum((j + 1) * GIB * 2 // 11 for j in range(9))),
            # 10,001 shares in 10 days
            day_row(d, "mp-003", "proxy_accepted_shares", usage=1000 + (1 if i == 0 else 0)),
            day_row(d, "iot-001", "iot_devices", peak=12 if i == 2 else 7),
            # 1 GiB held the whole day = 24 GiB-hours a day (integral in byte-ms)
            day_row(d, "k8s-001", "k8s_memory", integral=GIB * 86_400_000, covered=86_400_000, peak=GIB),
        ]
        out[d] = rows
    return out


@pytest.fixture
def oct_paths(tmp_path, monkeypatch):
    paths = resolve_paths(tmp_path / "data", PROJECT_ROOT / "seeds")
    monkeypatch.setenv("BILLING_DATA_DIR", str(paths.data_dir))
    monkeypatch.setenv("BILLING_SEEDS_DIR", str(paths.seeds_dir))
    write_days(paths, october_rows())
    return paths


def _files(root):
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_projection_math_by_hand(oct_paths):
    before = _files(oct_paths.data_dir)
    p = projection.project_month(oct_paths, OCT, TODAY)
    assert (p.days_elapsed, p.days_in_month) == (10, 31)
    u = {(r["customer_id"], r["meter_id"]): r for r in p.usage}
    # additive: month-to-date x 31 / 10
    assert u["mp-003", "proxy_bytes"]["month_to_date"] == 20
    assert u["mp-003", "proxy_bytes"]["projected"] == 62  # GiB
    assert u["mp-003", "proxy_accepted_shares"]["month_to_date"] == 10001
    assert u["mp-003", "proxy_accepted_shares"]["projected"] == Decimal("31003.1")
    assert u["k8s-001", "k8s_memory"]["month_to_date"] == 240  # GiB-hours
    assert u["k8s-001", "k8s_memory"]["projected"] == 744  # 24 x 31
    # level: the month-to-date peak
    assert u["iot-001", "iot_devices"]["month_to_date"] == u["iot-001", "iot_devices"]["projected"] == 12
    # mp-003: base $6.00; bytes (62 - 12) x $0.05 = $2.50; shares (31,003.1 - 12,000) x $0.00005 = $0.950155 -> $0.95
    # a US customer: VAT out of scope, a tax line of 0.00 that says so (as on its invoice)
    lines = {(l["line_type"], l["meter_id"]): l["amount_minor"] for l in p.lines if l["customer_id"] == "mp-003"}
    assert lines == {("base_fee", None): 600, ("usage", "proxy_bytes"): 250, ("usage", "proxy_accepted_shares"): 95, ("tax", None): 0}
    assert p.totals["mp-003"] == {"currency": "usd", "amount_minor": 945, "exponent": 2, "tax_minor": 0}
    # iot-001: base $29.00 + (12 - 10) devices x $2 = $33.00 (other meters: no usage, $0), + 19% VAT $6.27
    assert p.totals["iot-001"]["amount_minor"] == 3927
    # a projection never writes: data/ is exactly as before
    assert _files(oct_paths.data_dir) == before
    assert not (oct_paths.models / "fct_invoice_lines").exists()


def test_the_projected_bill_has_the_tax_line_its_invoice_would_have(oct_paths, capsys, monkeypatch):
    """One tax rule: the projection's tax line is billing.tax's line at the customer's rate (seeds/customer_billing.csv,
    tax_rates.csv), on the projected charges, after the charge lines, in the total."""
    from billing_dags.billing import tax
    from billing_dags.seeds.catalog import load_invoice_profile

    p = projection.project_month(oct_paths, OCT, TODAY, customer_id="iot-001")
    lines = [l for l in p.lines if l["customer_id"] == "iot-001"]
    charges = sum(int(l["amount_minor"]) for l in lines if l["line_type"] != "tax")
    assert charges == 3300
    rate = tax.customer_rate(load_invoice_profile(oct_paths.seeds_dir), "iot-001")
    expected = tax.tax_line(len(lines), tax.tax_block(rate, charges, 2), "usd")
    (line,) = [l for l in lines if l["line_type"] == "tax"]
    assert line == {**line, **{k: expected[k] for k in ("line_number", "line_type", "description", "amount_minor", "formula")}}
    assert line["line_number"] == max(l["line_number"] for l in lines) and line["amount_minor"] == 627  # 33.00 x 19%
    assert p.totals["iot-001"]["amount_minor"] == 3927 and p.totals["iot-001"]["tax_minor"] == 627
    monkeypatch.setattr(projection, "utc_today", lambda: TODAY)
    assert main(["usage", "iot-001", "--month", "2026-10", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["projected_lines"][-1]["type"] == "tax" and doc["projected_lines"][-1]["amount"] == "6.27"
    assert doc["projected_total"] == "39.27" and "VAT 19%" in doc["projected_lines"][-1]["description"]


def test_projected_days_sum_exactly_to_the_projection():
    rows = [r for d, rs in october_rows().items() for r in rs]
    actual = pa.Table.from_pylist(rows, schema=DAY_SCHEMA)
    out = projection.project_days(actual, OCT, DAYS, {"proxy_bytes": "sum", "proxy_accepted_shares": "sum", "iot_devices": "max", "k8s_memory": "unit_hours"})
    shares = [r for r in out.to_pylist() if r["meter_id"] == "proxy_accepted_shares"]
    assert len(shares) == 31 and {r["day"] for r in shares} == {OCT + timedelta(days=i) for i in range(31)}
    # 10,001 x 31 / 10 = 31,003.1 exactly, spread over 21 days in 1e-9 steps: no float, no drift
    assert sum(r["usage"] for r in shares) == Decimal("31003.1")
    assert all(isinstance(r["usage"], Decimal) for r in shares)
    devices = [r["gauge_peak"] for r in out.to_pylist() if r["meter_id"] == "iot_devices" and r["day"] > DAYS[-1]]
    assert devices == [12] * 21


def test_rounding_of_the_projection_is_half_up_in_nano_units():
    # 1 share in 3 of 31 days: 31/3 = 10.333333333(3) -> 10.333333333 shares
    d = [OCT, OCT + timedelta(days=1), OCT + timedelta(days=2)]
    actual = pa.Table.from_pylist([day_row(OCT, "mp-003", "proxy_accepted_shares", usage=1)], schema=DAY_SCHEMA)
    out = projection.project_days(actual, OCT, d, {"proxy_accepted_shares": "sum"})
    assert sum(r["usage"] for r in out.to_pylist()) == Decimal("10.333333333")
    # 2 in 3 days: 20.666666666(6) -> 20.666666667
    actual = pa.Table.from_pylist([day_row(OCT, "mp-003", "proxy_accepted_shares", usage=2)], schema=DAY_SCHEMA)
    out = projection.project_days(actual, OCT, d, {"proxy_accepted_shares": "sum"})
    assert sum(r["usage"] for r in out.to_pylist()) == Decimal("20.666666667")


def test_usage_command_for_the_open_month_prints_the_projected_total(oct_paths, capsys, monkeypatch):
    monkeypatch.setattr(projection, "utc_today", lambda: TODAY)
    assert main(["usage", "mp-003", "--month", "2026-10"]) == 0
    out = capsys.readouterr().out
    assert "Projected total: 9.45 USD" in out and "projected, not an invoice" in out
    assert "10 of 31 days computed" in out
    assert main(["usage", "mp-003", "--month", "2026-10", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["projected_total"] == "9.45" and doc["projected_total_minor"] == 945 and doc["status"] == "open"
    assert {u["meter"]: u["projected"] for u in doc["usage"]} == {"proxy_accepted_shares": "31003.1", "proxy_bytes": "62"}
    assert main(["usage", "mp-003", "--month", "2026-10", "--format", "csv"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith('projected_total,"projected, not an invoice",,,9.45,usd')


def test_usage_command_rejects_a_month_after_the_current_one(oct_paths, capsys, monkeypatch):
    monkeypatch.setattr(projection, "utc_today", lambda: TODAY)
    assert main(["usage", "mp-003", "--month", "2026-11"]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "2026-11 has not started yet" in err and "current month 2026-10" in err


def test_open_month_without_computed_days_names_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BILLING_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(projection, "utc_today", lambda: TODAY)
    assert main(["usage", "mp-003", "--month", "2026-10"]) == 2
    assert "no daily usage computed for 2026-10 yet" in capsys.readouterr().err.replace("\n", " ")


def test_plan_change_in_the_rest_of_the_month_rates_each_part(tmp_path):
    # iot-003: iot_starter until 2026-10-16, iot_professional from then. 10 GiB MQTT in 10 days ->
    # 31 GiB projected, 1 GiB a day: days 1-15 (15 GiB) in the starter part, 16-31 (16 GiB) professional.
    # starter: pooled allowance 10 x 15/31 GiB; over: 15 - 150/31 = 315/31 GiB x $0.10 = $1.0161.. -> $1.02
    paths = resolve_paths(tmp_path / "data", PROJECT_ROOT / "seeds")
    write_days(paths, {d: [day_row(d, "iot-003", "iot_mqtt_bytes", usage=GIB)] for d in DAYS})
    p = projection.project_month(paths, OCT, TODAY)
    by = {(l["line_plan_id"], l["line_type"], l["meter_id"]): l["amount_minor"] for l in p.lines if l["customer_id"] == "iot-003"}
    assert by[("iot_starter", "usage", "iot_mqtt_bytes")] == 102
    assert by[("iot_professional", "usage", "iot_mqtt_bytes")] == 0
    assert by[("iot_starter", "base_fee", None)] == 1403 and by[("iot_professional", "base_fee", None)] == 5110


def test_month_state():
    assert projection.month_state(date(2026, 9, 1), TODAY) == "closed"
    assert projection.month_state(OCT, TODAY) == "open"
    assert projection.month_state(OCT, date(2026, 10, 31)) == "open"
    assert projection.month_state(OCT, date(2026, 11, 1)) == "closed"
    assert projection.month_state(date(2026, 11, 1), TODAY) == "future"
