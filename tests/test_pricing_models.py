"""Pricing models beyond per-unit, and subscriptions with dates, each with a worked example by hand.

Usage enters as fct_usage_by_day fixture rows; the real seeds decide plans, prices and tiers;
the models dim_subscription_periods_by_month -> fct_usage_by_subscription_period -> fct_billable_usage_by_subscription_period ->
fct_rated_usage_by_subscription_period -> fct_invoice_lines run in an in-memory DuckDB.
"""

from __future__ import annotations

import csv
import shutil
from datetime import date
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pytest
from sql_helpers import SEEDS_DIR, Runner, seed_tables
from sql_helpers import USAGE_BY_DAY_SCHEMA as DAY_SCHEMA

from billing_dags.models.sqlmodels import Window

GIB = 2**30
OCT = Window(date(2026, 10, 1), date(2026, 11, 1))  # 31 days
APR = Window(date(2025, 4, 1), date(2025, 5, 1))  # 30 days


def day_row(day, customer, meter, *, usage=None, peak=None, kind="counter"):
    return {
        "day": day,
        "customer_id": customer,
        "meter_id": meter,
        "dimension": "",
        "kind": kind,
        "usage": None if usage is None else Decimal(usage),
        "gauge_integral": None if peak is None else Decimal(0),
        "gauge_covered_ms": None if peak is None else 0,
        "gauge_peak": None if peak is None else Decimal(peak),
        "series": 1,
        "samples": 1,
        "dropped_samples": 0,
        "resets": 0,
        "reappeared_series": 0,
        "max_gap_ms": 0,
        "events": 0,
        "duplicate_conflicts": 0,
        "gauge_held_ms": None if peak is None else 86_400_000,
    }


def bill(rows, window, seeds=None) -> list[dict]:
    with Runner(seeds) as r:
        r.set_table("fct_usage_by_day", pa.Table.from_pylist(rows, schema=DAY_SCHEMA))
        for model in (
            "dim_subscription_periods_by_month",
            "fct_usage_by_subscription_period",
            "fct_billable_usage_by_subscription_period",
            "fct_rated_usage_by_subscription_period",
            "fct_invoice_lines",
        ):
            out = r.run(model, window)
        return out.to_pylist()


def lines_of(lines, customer):
    return [(l["line_type"], l["meter_id"], l["amount_minor"]) for l in lines if l["customer_id"] == customer]


def total(lines, customer) -> int:
    return sum(l["amount_minor"] for l in lines if l["customer_id"] == customer)


# mp-009 is on proxy_tiered (graduated GiB, volume shares); k8s-010 on k8s_enterprise


def test_graduated_tiers_price_each_slice():
    # 65 GiB: 10 x $0.10 + 40 x $0.08 + 15 x $0.05 = 1.00 + 3.20 + 0.75 = $4.95
    lines = bill([day_row(date(2025, 4, 3), "mp-009", "proxy_bytes", usage=65 * GIB)], APR)
    line = next(l for l in lines if l["customer_id"] == "mp-009" and l["meter_id"] == "proxy_bytes")
    assert line["amount_minor"] == 495
    assert line["tier_formula"] == "10 x 0.1 + 40 x 0.08 + 15 x 0.05"


@pytest.mark.parametrize(
    ("shares", "cents"),
    [
        (100_000, 1000),  # exactly at the top of tier 1: 100,000 x $0.0001 = $10.00
        (250_000, 2000),  # tier 2 prices every unit: 250,000 x $0.00008 = $20.00
        (2_000_000, 12000),  # tier 3: 2,000,000 x $0.00006 = $120.00
        (0, 0),
    ],
)
def test_volume_tiers_price_every_unit_at_the_reached_tier(shares, cents):
    lines = bill([day_row(date(2025, 4, 3), "mp-009", "proxy_accepted_shares", usage=shares)], APR)
    line = next(l for l in lines if l["customer_id"] == "mp-009" and l["meter_id"] == "proxy_accepted_shares")
    assert line["amount_minor"] == cents


@pytest.mark.parametrize(("requests", "packages"), [(2_500_000, 3), (2_499_999, 2), (400_000, 0), (500_000, 1)])
def test_package_rounding_half_up(requests, packages):
    # k8s_enterprise: $0.40 per 1M requests, rounded to the nearest million (half up)
    lines = bill([day_row(date(2025, 4, 3), "k8s-010", "k8s_http_requests", usage=requests)], APR)
    line = next(l for l in lines if l["customer_id"] == "k8s-010" and l["meter_id"] == "k8s_http_requests")
    assert (line["packages"], line["amount_minor"]) == (packages, 40 * packages)


def test_discount_then_minimum_charge_top_up():
    # k8s_enterprise: 100 core-hours (volume tier 1) = 100 x $0.05 = $5.00; 10% discount -$0.50;
    # the $300 minimum tops up by $300 - $4.50 = $295.50; total $300.00
    lines = bill([day_row(date(2025, 4, 3), "k8s-010", "k8s_cpu", usage=100 * 3600)], APR)
    mine = lines_of(lines, "k8s-010")
    assert ("usage", "k8s_cpu", 500) in mine
    assert ("discount", None, -50) in mine
    assert ("minimum_charge", None, 29550) in mine
    assert total(lines, "k8s-010") == 30000


def test_discount_alone_when_above_minimum():
    # 8,000 core-hours: volume tier 2 at $0.04 = $320.00; discount -$32.00 -> $288.00 < $300: top-up $12.00
    # 9,000 core-hours: $360.00; discount -$36.00 = $324.00 >= $300: no top-up
    for hours, top_up, expected in [(8000, 1200, 30000), (9000, None, 32400)]:
        lines = bill([day_row(date(2025, 4, 3), "k8s-010", "k8s_cpu", usage=hours * 3600)], APR)
        mine = lines_of(lines, "k8s-010")
        assert [a for t, _, a in mine if t == "minimum_charge"] == ([top_up] if top_up else [])
        assert total(lines, "k8s-010") == expected


def test_plan_change_mid_month_prorates_base_fees_and_rates_each_part():
    # iot-003: iot_starter 2026-10-01..16 (15 days), iot_professional 2026-10-16..11-01 (16 days).
    # base fees: $29 x 15/31 = 14.0322.. -> $14.03; $99 x 16/31 = 51.0967.. -> $51.10
    # MQTT: 10 GiB on the 5th (starter: allowance 10 x 15/31 = 4.8387.. GiB pooled; over 5.1612.. x $0.10
    #   = 0.51612.. -> $0.52) and 10 GiB on the 20th (professional: 100 x 16/31 = 51.6 GiB, inside: $0)
    # devices: peak 12 in the starter part (2 over x $2 x 15/31 = 1.9354.. -> $1.94), peak 12 later (inside 50)
    rows = [
        day_row(date(2026, 10, 5), "iot-003", "iot_mqtt_bytes", usage=10 * GIB),
        day_row(date(2026, 10, 20), "iot-003", "iot_mqtt_bytes", usage=10 * GIB),
        day_row(date(2026, 10, 5), "iot-003", "iot_devices", peak=12, kind="gauge"),
        day_row(date(2026, 10, 20), "iot-003", "iot_devices", peak=12, kind="gauge"),
    ]
    lines = [l for l in bill(rows, OCT) if l["customer_id"] == "iot-003"]
    by = {(l["line_plan_id"], l["line_type"], l["meter_id"]): l["amount_minor"] for l in lines}
    assert by[("iot_starter", "base_fee", None)] == 1403
    assert by[("iot_professional", "base_fee", None)] == 5110
    assert by[("iot_starter", "usage", "iot_mqtt_bytes")] == 52
    assert by[("iot_professional", "usage", "iot_mqtt_bytes")] == 0
    assert by[("iot_starter", "usage", "iot_devices")] == 194
    assert by[("iot_professional", "usage", "iot_devices")] == 0
    # the invoice is headed with the plan in force at the end of the month
    assert {(l["plan_id"], l["plan_version"]) for l in lines} == {("iot_professional", 1)}
    assert [l["period_start"] for l in lines] == sorted(l["period_start"] for l in lines)


def test_joiner_and_leaver_pay_for_their_days_only():
    # tb-004 joins testbed_basic on 2026-10-10: 22 days -> $50 x 22/31 = 35.4838.. -> $35.48;
    #   its usage on the 5th (before joining) is not billed.
    # k8s-005 leaves k8s_starter on 2026-10-21 (end exclusive): 20 days -> $29 x 20/31 = 18.7096.. -> $18.71;
    #   usage on the 25th is not billed.
    rows = [
        day_row(date(2026, 10, 5), "tb-004", "testbed_api_calls", usage=1_000_000),
        day_row(date(2026, 10, 25), "k8s-005", "k8s_network", usage=10_000 * GIB),
    ]
    lines = bill(rows, OCT)
    assert lines_of(lines, "tb-004")[0] == ("base_fee", None, 3548)
    assert total(lines, "tb-004") == 3548
    assert lines_of(lines, "k8s-005")[0] == ("base_fee", None, 1871)
    assert total(lines, "k8s-005") == 1871


def test_plan_version_in_force_at_period_start():
    # proxy_hybrid v2 (from 2026-10-01): $6 incl. 12 GiB. mp-003 with 13 GiB in October:
    #   $6 + 1 GiB x $0.05 = $6.05. In September (v1: $5 incl. 10 GiB): $5 + 3 x $0.05 = $5.15.
    oct_lines = bill([day_row(date(2026, 10, 2), "mp-003", "proxy_bytes", usage=13 * GIB)], OCT)
    sep_lines = bill([day_row(date(2026, 9, 2), "mp-003", "proxy_bytes", usage=13 * GIB)], Window(date(2026, 9, 1), date(2026, 10, 1)))
    assert total(oct_lines, "mp-003") == 605
    assert total(sep_lines, "mp-003") == 515
    assert {l["plan_version"] for l in oct_lines if l["customer_id"] == "mp-003"} == {2}


def _seeds_with_a_late_plan(tmp_path, start: str) -> Path:
    """The real seeds plus proxy_new (one version, in force from 2026-10-15: $31 a month, $0.10 per GiB)
    and mp-new subscribed to it from ``start``."""
    seeds = tmp_path / "seeds"
    shutil.copytree(SEEDS_DIR, seeds)
    for name, row in (
        ("plans.csv", ["proxy_new", 1, "2026-10-15", "Proxy new", "proxy", "usd", "31.00", "0", "0", "1", "new plan"]),
        ("prices.csv", ["proxy_new", 1, "proxy_bytes", "", "0", "", "per_unit", "0.10", 1, "up", "$0.10 per GiB"]),
        ("customers.csv", ["mp-new", "Miner new", "proxy", "miner-new", "usd", "", "prometheus"]),
        ("subscriptions.csv", ["mp-new", "proxy_new", start, ""]),
    ):
        with (seeds / name).open("a", newline="") as f:
            csv.writer(f).writerow(row)
    return seeds


def test_a_period_with_no_plan_version_in_force_fails_instead_of_vanishing(tmp_path):
    # seed validation rejects such a subscription; read file by file (no cross-checks) the model
    # must still not drop the period silently: it used to return no row (no invoice, no error)
    from billing_dags.models.sqlmodels import ModelError
    from billing_dags.seeds.catalog import SPECS, read_seed

    seeds = _seeds_with_a_late_plan(tmp_path, "2026-10-01")
    unchecked = {name: read_seed(seeds, name) for name in SPECS}
    rows = [day_row(date(2026, 10, 20), "mp-new", "proxy_bytes", usage=10 * GIB)]
    with pytest.raises(ModelError, match=r"mp-new.*proxy_new.*2026-10-01.*no version"):
        bill(rows, OCT, unchecked)


def test_a_subscription_from_its_plans_first_version_is_billed(tmp_path):
    # mp-new on proxy_new from 2026-10-15: 17 of 31 days. Base fee $31 x 17/31 = $17.00;
    # 10 GiB on the 20th x $0.10 = $1.00. Total $18.00.
    seeds = seed_tables(_seeds_with_a_late_plan(tmp_path, "2026-10-15"))
    lines = bill([day_row(date(2026, 10, 20), "mp-new", "proxy_bytes", usage=10 * GIB)], OCT, seeds)
    assert lines_of(lines, "mp-new") == [("base_fee", None, 1700), ("usage", "proxy_bytes", 100)]
    assert total(lines, "mp-new") == 1800


def test_catch_all_price_beside_per_model_prices_is_rejected(tmp_path):
    # with both, 1M gpt-4o input tokens would be billed $2.50 (gpt-4o row) + $1.00 (catch-all row)
    from billing_dags.seeds.catalog import SeedError

    seeds = tmp_path / "seeds"
    shutil.copytree(SEEDS_DIR, seeds)
    with (seeds / "prices.csv").open("a", newline="") as f:
        csv.writer(f).writerow(["llm_payg", 1, "llm_input_tokens", "", "0", "", "per_unit", "1.00", 1, "up", "$1.00 per 1M"])
    line = len((seeds / "prices.csv").read_text().splitlines())
    with pytest.raises(SeedError, match=rf"prices.csv:{line}: .*llm_input_tokens.*billed twice"):
        seed_tables(seeds)
    # the shipped per-model rows alone: 1M gpt-4o input tokens = $2.50
    lines = bill([{**day_row(date(2026, 10, 2), "llm-001", "llm_input_tokens", usage=1_000_000), "dimension": "gpt-4o"}], OCT)
    assert [(l["dimension"], l["amount_minor"]) for l in lines if l["customer_id"] == "llm-001" and l["amount_minor"]] == [("gpt-4o", 250)]
