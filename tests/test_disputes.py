"""`billing dispute` ties out twice: raw samples vs the recomputed month, and the recomputed month vs the
invoice as it was finalized; when they differ it says why (late data after finalization -> a pending
adjustment on the next invoice)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pyarrow.parquet as pq
import pytest
from sql_helpers import ms, samples_table, series_table

from billing_dags.billing.build import build_invoices
from billing_dags.billing.manifest import code_version, invoice_manifest
from billing_dags.billing.store import write_invoice_files
from billing_dags.cli.main import main
from billing_dags.defs.seeds.assets import write_seed_snapshots
from billing_dags.ingest import raw
from billing_dags.models.sqlmodels import Window, load_project, partition_file, run_model, seed_snapshot_path

FEB, MAR = date(2026, 2, 1), date(2026, 3, 1)
D3, D4 = date(2026, 2, 3), date(2026, 2, 4)
GIB = 2**30
AFTER_GRACE = datetime(2026, 3, 10, tzinfo=UTC)  # February is final


def _samples(paths, day: date, start_gib: int, end_gib: int) -> None:
    """mp-001's proxy_bytes counter (client_id miner-001) climbing from start_gib to end_gib GiB over the day."""
    sid = raw.series_id("stratum_bytes_sent_total", {"client_id": "miner-001"})
    series = series_table({sid: ("stratum_bytes_sent_total", {"client_id": "miner-001"}, ms(D3, 1))})
    raw.write_day(paths, day, samples_table({sid: [(ms(day, 1), start_gib * GIB), (ms(day, 20), end_gib * GIB)]}), series, "sim")


def _run_models(paths, days: list[date]) -> None:
    project = load_project()
    for name in project.order():
        model = project.models[name]
        if model.materialized != "table":
            continue
        if model.partitioned_by == "billing_daily":
            for day in days:
                run_model(paths, name, Window(day, day + timedelta(days=1)), project=project)
        else:
            run_model(paths, name, Window(FEB, MAR) if model.partitioned_by == "billing_monthly" else None, project=project)


def _bill(paths) -> None:
    lines = pq.read_table(partition_file(paths, load_project().models["fct_invoice_lines"], Window(FEB, MAR))).to_pylist()
    seeds = {n: pq.read_table(seed_snapshot_path(paths, n)).to_pylist() for n in ("customers", "plans", "currencies")}
    manifest = invoice_manifest(paths, FEB, paths.seeds_dir, code_version())
    docs = build_invoices(lines, seeds["customers"], seeds["plans"], seeds["currencies"], FEB, now=AFTER_GRACE, manifest=manifest, paths=paths)
    write_invoice_files(paths, docs)


def dispute(capsys, paths) -> str:
    assert main(["--data-dir", str(paths.data_dir), "--seeds-dir", str(paths.seeds_dir), "dispute", "mp-001", "--month", "2026-02"]) == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.fixture
def finalized(paths):
    """February finalized for mp-001 with 10 GiB of proxy_bytes (raw samples of Feb 3)."""
    write_seed_snapshots(paths)
    _samples(paths, D3, 0, 10)
    _run_models(paths, [D3])
    _bill(paths)
    return paths


def test_dispute_shows_raw_recomputed_and_finalized_figures_that_tie_out(finalized, capsys):
    out = dispute(capsys, finalized)
    assert "proxy_bytes: raw 10737418240 vs recomputed month 10737418240 — ties out" in out
    assert "usage proxy_bytes: invoice INV-2026-000004 (finalized) 10 gib, 1.00 vs recomputed 10 gib, 1.00 — same" in out, out
    assert "The finalized invoice bills the recomputed month." in out


def test_late_data_after_finalization_shows_the_difference_and_the_pending_adjustment(finalized, capsys):
    paths = finalized
    invoice_before = (paths.invoices / "2026-02" / "mp-001.json").read_bytes()
    _samples(paths, D4, 10, 15)  # arrives after February was finalized: 5 GiB more
    _run_models(paths, [D4])
    _bill(paths)
    assert (paths.invoices / "2026-02" / "mp-001.json").read_bytes() == invoice_before  # never edited
    out = dispute(capsys, paths)
    # raw and the recomputed month agree, but the finalized invoice bills what was known when it was finalized
    assert "usage proxy_bytes: invoice INV-2026-000004 (finalized) 10 gib, 1.00 vs recomputed 15 gib, 1.50 — DIFFERS" in out, out
    assert (
        "The recomputed month differs from finalized invoice INV-2026-000004 because of late data after finalization; "
        "a finalized invoice is never edited: 0.50 USD is pending as an adjustment on mp-001's next invoice"
    ) in out
    assert "proxy_bytes: raw 16106127360 vs recomputed month 16106127360 — ties out" in out


def _prepare(paths, samples: list[tuple[int, float]], carry_in: tuple[int, float] | None = None) -> None:
    """February for mp-001 from the given proxy_bytes samples of Feb 3 (and a carry-in before it), finalized."""
    write_seed_snapshots(paths)
    labels = ("stratum_bytes_sent_total", {"client_id": "miner-001"})
    sid = raw.series_id(*labels)
    series = series_table({sid: (*labels, ms(D3, 1))})
    if carry_in is not None:
        raw.write_carry_in(paths, D3, samples_table({sid: [carry_in]}), series, "prometheus", 35)
    raw.write_day(paths, D3, samples_table({sid: samples}), series, "prometheus")
    _run_models(paths, [D3])
    _bill(paths)


def test_a_duplicate_timestamp_ties_out_with_the_larger_value(paths, capsys):
    # a new counter at 5 GiB, then at 10:00 both 8 GiB and a stray 3 GiB, then 10 GiB: the models keep
    # the larger (5 + 3 + 2 = 10 GiB); keeping the smaller would make up a reset (5 + 3 + 7 = 15 GiB)
    _prepare(paths, [(ms(D3, 1), 5 * GIB), (ms(D3, 10), 8 * GIB), (ms(D3, 10), 3 * GIB), (ms(D3, 20), 10 * GIB)])
    out = dispute(capsys, paths)
    assert "proxy_bytes: raw 10737418240 vs recomputed month 10737418240 — ties out" in out, out


def test_a_pulled_first_month_ties_out_with_its_carry_in(paths, capsys):
    # the first day pulled from Prometheus records the counter's last sample before it (4 GiB on Feb 2,
    # a day never ingested): February's usage is 10 - 4 = 6 GiB, and the evidence must count the same
    _prepare(paths, [(ms(D3, 1), 5 * GIB), (ms(D3, 20), 10 * GIB)], carry_in=(ms(date(2026, 2, 2), 23), 4 * GIB))
    out = dispute(capsys, paths)
    assert "proxy_bytes: raw 6442450944 vs recomputed month 6442450944 — ties out" in out, out


@pytest.mark.parametrize("carry_in", [None, (ms(date(2026, 2, 2), 23), 4 * GIB)], ids=["simulated", "pulled"])
def test_the_exported_sql_reproduces_the_evidence_in_the_warehouse(paths, capsys, tmp_path, carry_in):
    from billing_dags.operations.disputes import build_dispute, export_evidence
    from billing_dags.operations.warehouse import open_warehouse

    _prepare(paths, [(ms(D3, 1), 5 * GIB), (ms(D3, 20), 10 * GIB)], carry_in=carry_in)
    d = build_dispute(paths, "mp-001", FEB)
    sql = next(f for f in export_evidence(d, tmp_path / "pack") if f.name == "reproduce.sql").read_text()
    con = open_warehouse(paths)
    try:
        got = con.execute(sql).to_arrow_table()
    finally:
        con.close()
    assert got.select(["series_id", "ts_ms", "increase"]).to_pylist() == d.evidence.select(["series_id", "ts_ms", "increase"]).to_pylist()
    assert sum(r["increase"] for r in got.to_pylist()) == (6 if carry_in else 10) * GIB


def test_lines_of_two_subscription_periods_are_all_compared(paths):
    # a plan change mid-month gives a usage line per period for one meter: a difference in the first
    # period must show, not be hidden behind the second period's line
    from billing_dags.operations.disputes import invoice_vs_recomputed

    def line(quantity, amount):
        return {"line_type": "usage", "meter_id": "proxy_bytes", "dimension": "", "unit": "gib", "quantity": quantity, "amount_minor": amount}

    invoice = {"invoice_number": "DRAFT-2026-02-mp-001", "status": "draft", "period_start": "2026-02-01", "customer_id": "mp-001", "minor_unit_exponent": 2}
    out = invoice_vs_recomputed(paths, invoice, [line("4", 40), line("6", 60)], [line(Decimal(5), 50), line(Decimal(6), 60)])
    assert not out["same"]
    assert [(r["invoiced_quantity"], r["invoiced_amount_minor"], r["recomputed_quantity"], r["recomputed_amount_minor"]) for r in out["lines"]] == [
        (Decimal(10), 100, Decimal(11), 110)
    ]
