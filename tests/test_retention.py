"""Retention removes old raw days only behind finalized invoices, and logs what it did."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from decimal import Decimal

from billing_dags.cli.main import main
from billing_dags.operations import retention


def _raw_day(paths, day: date, size: int = 10) -> None:
    for root in (paths.raw_samples, paths.raw_series, paths.raw_carry_in):
        d = root / f"date={day}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "part-simulate.parquet").write_bytes(b"x" * size)


def _invoices(paths, month: str, statuses: list[str]) -> None:
    folder = paths.invoices / month
    folder.mkdir(parents=True, exist_ok=True)
    for i, status in enumerate(statuses):
        (folder / f"c{i}.json").write_text(json.dumps({"customer_id": f"c{i}", "status": status}))


def test_old_days_go_only_when_their_month_is_fully_finalized(paths):
    today = date(2026, 11, 22)  # cut-off: 2026-08-24
    for day in (date(2026, 7, 30), date(2026, 8, 2), date(2026, 8, 30), date(2026, 6, 15)):
        _raw_day(paths, day)
    _invoices(paths, "2026-07", ["finalized", "finalized"])
    _invoices(paths, "2026-08", ["finalized", "draft"])
    # June has no invoices at all: never billed, so kept
    plan = {(c.path.parent.name, str(c.day)): c for c in retention.plan(paths, today=today)}
    assert plan[("samples", "2026-07-30")].action == "remove"
    assert plan[("series", "2026-07-30")].action == "remove"
    assert plan[("carry_in", "2026-07-30")].action == "remove"  # the day's carry-in goes with it
    assert plan[("samples", "2026-08-02")].action == "keep" and "draft" in plan[("samples", "2026-08-02")].reason
    assert plan[("samples", "2026-06-15")].action == "keep" and "no invoices" in plan[("samples", "2026-06-15")].reason
    assert ("samples", "2026-08-30") not in plan  # inside the 90 days
    logged: list[str] = []
    figures = retention.apply(list(plan.values()), log=logged.append)
    assert figures["removed"] == 3 and figures["bytes_freed"] == 30
    assert not (paths.raw_samples / "date=2026-07-30").exists()
    assert (paths.raw_samples / "date=2026-08-02").exists() and (paths.raw_samples / "date=2026-08-30").exists()
    assert any("removed" in line and "2026-07-30" in line for line in logged)


def test_dry_run_removes_nothing_and_bad_days_are_rejected(paths, capsys):
    _raw_day(paths, date(2024, 1, 2))
    _invoices(paths, "2024-01", ["finalized"])
    assert main(["retention", "--dry-run"]) == 0
    assert "dry run" in capsys.readouterr().out
    assert (paths.raw_samples / "date=2024-01-02").exists()
    assert main(["retention", "--days", "0"]) == 2
    assert "--days 0" in capsys.readouterr().err
    assert main(["retention"]) == 0
    assert not (paths.raw_samples / "date=2024-01-02").exists()


def test_usage_reports_go_by_day_like_raw_days(paths):
    from billing_dags.ingest.usage_reports import Report, ReportStore, store_path

    today = date(2026, 11, 22)
    ms = lambda d: int(datetime(d.year, d.month, d.day, 12, tzinfo=UTC).timestamp()) * 1000  # noqa: E731
    with ReportStore.open(paths) as store:
        for i, d in enumerate((date(2026, 7, 30), date(2026, 8, 2), date(2026, 11, 1))):
            store.accept(Report(f"r{i}", "iot-001", ms(d), 3600, {"active_devices": Decimal(3)}))
    _invoices(paths, "2026-07", ["finalized"])
    _invoices(paths, "2026-08", ["draft"])
    plan = {str(c.day): c for c in retention.plan(paths, today=today) if c.what == "reports"}
    assert plan["2026-07-30"].action == "remove" and plan["2026-08-02"].action == "keep"
    assert "2026-11-01" not in plan
    # the store itself is never removed as an old landing file
    assert all(c.path != store_path(paths) or c.what == "reports" for c in retention.plan(paths, today=date(2027, 12, 1)))
    logged: list[str] = []
    retention.apply(list(plan.values()), log=logged.append)
    with ReportStore.open(paths, readonly=True) as store:
        assert list(store.day_counts()) == ["2026-08-02", "2026-11-01"]
    assert any("removed 1 usage reports of 2026-07-30" in line for line in logged)
