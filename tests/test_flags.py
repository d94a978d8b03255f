"""Critical anomaly flags hold a customer's invoice in draft until someone acknowledges them."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_invoices import CURRENCIES, CUSTOMERS, JAN, JAN_FINAL, MANIFEST, PLANS, lines_for, paths_for

from billing_dags.billing.build import build_invoices
from billing_dags.cli.main import main
from billing_dags.operations.flags import acknowledge, read_acks, unacknowledged_critical


def _write_flags(paths, day: date, rows: list[dict]) -> None:
    f = paths.models / "fct_anomaly_flags_by_day" / f"day={day}" / "data.parquet"
    f.parent.mkdir(parents=True, exist_ok=True)
    full = [{"day": day, "value": Decimal(1), "threshold": Decimal(0), "rule_description": "", "detail": "", **r} for r in rows]
    pq.write_table(pa.Table.from_pylist(full), f)


def test_critical_flag_holds_finalization_until_acknowledged(tmp_path):
    paths = paths_for(tmp_path)
    _write_flags(
        paths,
        date(2025, 1, 9),
        [
            {"customer_id": "acme", "meter_id": "proxy_bytes", "rule": "reappeared_series", "severity": "critical"},
            {"customer_id": "beta", "meter_id": "proxy_bytes", "rule": "scrape_gap", "severity": "warning"},
        ],
    )
    _write_flags(
        paths,
        date(2025, 2, 1),
        [  # another month: does not hold January
            {"customer_id": "beta", "meter_id": "proxy_bytes", "rule": "reappeared_series", "severity": "critical"},
        ],
    )
    held = unacknowledged_critical(paths, JAN)
    assert list(held) == ["acme"]
    reasons = {c: "held: " + ", ".join(f["rule"] for f in flags) for c, flags in held.items()}
    docs = build_invoices(
        lines_for("acme") + lines_for("beta"),
        CUSTOMERS,
        PLANS,
        CURRENCIES,
        JAN,
        now=JAN_FINAL,
        manifest=MANIFEST,
        paths=paths,
        held=reasons,
    )
    by = {d["customer_id"]: d for d in docs}
    assert by["acme"]["status"] == "draft" and by["acme"]["held_reason"] == "held: reappeared_series"
    assert by["acme"]["invoice_number"] == "DRAFT-2025-01-acme"
    assert by["beta"]["status"] == "finalized" and by["beta"]["invoice_number"].startswith("INV-2025-")

    with pytest.raises(ValueError, match="--by and --reason"):
        acknowledge(paths, "acme", JAN, "reappeared_series", "", " ", "")
    with pytest.raises(ValueError, match="no 'scrape_gap' flag for acme"):
        acknowledge(paths, "acme", JAN, "scrape_gap", "", "ops", "checked")
    acknowledge(paths, "acme", JAN, "reappeared_series", "", "alice", "pod migrated; value verified", now=datetime(2025, 2, 5, tzinfo=UTC))
    assert unacknowledged_critical(paths, JAN) == {}
    assert read_acks(paths)[0]["by"] == "alice"


def test_flags_cli_lists_and_rejects_unknown_flags(paths, capsys):
    _write_flags(
        paths,
        date(2026, 5, 3),
        [
            {"customer_id": "mp-001", "meter_id": "proxy_bytes", "rule": "reappeared_series", "severity": "critical"},
        ],
    )
    assert main(["flags", "list", "--month", "2026-05", "--format", "json"]) == 0
    assert '"rule": "reappeared_series"' in capsys.readouterr().out
    assert main(["flags", "ack", "mp-001", "--month", "2026-05", "--rule", "outlier_mad", "--by", "bob", "--reason", "x"]) == 2
    assert "no 'outlier_mad' flag for mp-001 in 2026-05" in capsys.readouterr().err
    assert main(["flags", "ack", "mp-001", "--month", "2026-05", "--rule", "reappeared_series", "--by", "bob", "--reason", "ok"]) == 0


def test_flags_list_shows_the_quantity_in_billing_units(paths, capsys):
    _write_flags(
        paths,
        date(2026, 5, 10),
        [
            {"customer_id": "mp-001", "meter_id": "proxy_bytes", "rule": "allowance_used", "severity": "info", "quantity": Decimal("9.75"), "unit": "gib"},
            {"customer_id": "mp-001", "meter_id": "proxy_bytes", "rule": "scrape_gap", "severity": "warning", "quantity": None, "unit": None},
        ],
    )
    assert main(["flags", "list", "--month", "2026-05", "--format", "json"]) == 0
    out = capsys.readouterr().out
    assert '"quantity": "9.75 gib"' in out and '"quantity": ""' in out


def test_the_warehouse_view_reads_partitions_computed_before_a_column_was_added(tmp_path):
    """Flags computed before fct_anomaly_flags_by_day had included_quantity sit beside newer ones: `billing sql`
    reads both (the older ones with no value), instead of failing on the schema."""
    from billing_dags.operations.warehouse import open_warehouse

    paths = paths_for(tmp_path)
    flag = {"customer_id": "acme", "meter_id": "proxy_bytes", "rule": "allowance_used", "severity": "info"}
    _write_flags(paths, date(2025, 1, 9), [flag])
    _write_flags(paths, date(2025, 1, 10), [{**flag, "included_quantity": Decimal(12)}])
    con = open_warehouse(paths)
    try:
        got = con.sql("select day, included_quantity from fct_anomaly_flags_by_day order by day").fetchall()
    finally:
        con.close()
    assert got == [(date(2025, 1, 9), None), (date(2025, 1, 10), Decimal(12))]
