"""`billing dispute` ties out twice: raw samples vs the recomputed month, and the recomputed month vs the
invoice as it was finalized; when they differ it says why (late data after finalization -> a pending
adjustment on the next invoice)."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pyarrow.parquet as pq
import pytest

from billing_dags import raw
from billing_dags.cli import main
from billing_dags.defs.seeds.assets import write_seed_snapshots
from billing_dags.invoices import build_invoices, code_version, invoice_manifest, write_invoice_files
from billing_dags.sqlmodels import Window, load_project, partition_file, run_model, seed_snapshot_path
from sql_helpers import ms, samples_table, series_table

FEB, MAR = date(2026, 2, 1), date(2026, 3, 1)
D3, D4 = date(2026, 2, 3), date(2026, 2, 4)
GIB = 2**30
AFTER_GRACE = datetime(2026, 3, 10, tzinfo=timezone.utc)  # February is final


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
    assert ("The recomputed month differs from finalized invoice INV-2026-000004 because of late data after finalization; "
            "a finalized invoice is never edited: 0.50 USD is pending as an adjustment on mp-001's next invoice") in out
    assert "proxy_bytes: raw 16106127360 vs recomputed month 16106127360 — ties out" in out
