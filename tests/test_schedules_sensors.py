"""Schedules and the late-data sensor decide the right partitions."""

from __future__ import annotations

import os
import time
from datetime import UTC, date, datetime

import dagster as dg
import pyarrow as pa

from billing_dags.definitions import defs as load_defs
from billing_dags.defs.ingest.sensors import late_days
from billing_dags.ingest import raw
from billing_dags.models.sqlmodels import Window, load_project, partition_file


def _defs() -> dg.Definitions:
    return load_defs()


def test_finalization_schedule_requests_the_previous_month():
    defs = _defs()
    schedule = defs.resolve_schedule_def("monthly_invoice_finalization_schedule")
    ctx = dg.build_schedule_context(scheduled_execution_time=datetime(2026, 1, 4, 3, 0, tzinfo=UTC), repository_def=defs.get_repository_def())
    requests = list(schedule.evaluate_tick(ctx).run_requests)
    assert [r.partition_key for r in requests] == ["2025-12-01"]
    assert requests[0].tags["billing/reason"] == "finalize"


def test_daily_schedule_runs_yesterday():
    defs = _defs()
    schedule = defs.resolve_schedule_def("daily_usage_schedule")
    ctx = dg.build_schedule_context(scheduled_execution_time=datetime(2026, 3, 1, 0, 30, tzinfo=UTC), repository_def=defs.get_repository_def())
    requests = list(schedule.evaluate_tick(ctx).run_requests)
    assert [r.partition_key for r in requests] == ["2026-02-28"]


def _write_day(paths, day: date) -> None:
    start, _ = raw.day_bounds_ms(day)
    sid = raw.series_id("stratum_submits_total", {"client_id": "miner-001"})
    samples = pa.table({"series_id": [sid], "ts": [start + 1000], "value": [1.0]})
    series = pa.table(
        {"series_id": [sid], "metric": ["stratum_submits_total"], "labels": [[("client_id", "miner-001")]], "first_seen": [start + 1000]},
        schema=raw.SERIES_SCHEMA,
    )
    raw.write_day(paths, day, samples, series, "test")


def test_late_raw_data_is_found_only_for_days_computed_before_it(paths):
    d1, d2, d3 = date(2026, 5, 1), date(2026, 5, 2), date(2026, 5, 3)
    for d in (d1, d2, d3):
        _write_day(paths, d)
    edges = load_project().models["int_series_edges_by_day"]
    past = time.time() - 3600
    for d in (d1, d2):  # d3 never computed: not "late", just not run yet
        f = partition_file(paths, edges, Window(d, date.fromordinal(d.toordinal() + 1)))
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"")
        os.utime(f, (past, past))
    # d1's raw files are newer than its edges; make d2's raw older than its edges
    for f in raw.sample_files(paths, d2):
        os.utime(f, (past - 60, past - 60))
    assert late_days(paths) == [d1.isoformat()]


def test_sensor_requests_each_late_day_once(paths):
    d1 = date(2026, 5, 1)
    _write_day(paths, d1)
    edges = load_project().models["int_series_edges_by_day"]
    f = partition_file(paths, edges, Window(d1, date(2026, 5, 2)))
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(b"")
    os.utime(f, (time.time() - 3600,) * 2)
    defs = _defs()
    sensor = defs.resolve_sensor_def("late_raw_data_sensor")
    instance = dg.DagsterInstance.ephemeral()  # the sensor waits for unfinished runs; it looks them up there
    with dg.build_sensor_context(instance=instance, resources={"warehouse": defs.resources["warehouse"]}, definitions=defs) as ctx:
        first = sensor(ctx)
        assert [r.partition_key for r in first] == ["2026-05-01"]
        ctx.update_cursor(ctx.cursor)
        second = sensor(ctx)
        assert isinstance(second, dg.SkipReason)


def test_late_usage_events_are_found_against_the_usage_partition(paths):
    from billing_dags.ingest.events import events_day_dir

    day = date(2026, 5, 4)
    f = events_day_dir(paths, day) / "part-postgres.parquet"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(b"")
    usage = partition_file(paths, load_project().models["fct_usage_by_day"], Window(day, date(2026, 5, 5)))
    usage.parent.mkdir(parents=True, exist_ok=True)
    usage.write_bytes(b"")
    past = time.time() - 3600
    os.utime(usage, (past, past))
    assert late_days(paths) == ["2026-05-04"]
    os.utime(f, (past - 60, past - 60))
    assert late_days(paths) == []


def test_late_events_also_rerun_the_next_day_which_reads_their_gauge_levels(paths):
    from billing_dags.ingest.events import events_day_dir

    day, nxt = date(2026, 5, 4), date(2026, 5, 5)
    f = events_day_dir(paths, day) / "part-usage_reports.parquet"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(b"")
    past = time.time() - 3600
    for d in (day, nxt, date(2026, 5, 6)):
        usage = partition_file(paths, load_project().models["fct_usage_by_day"], Window(d, date.fromordinal(d.toordinal() + 1)))
        usage.parent.mkdir(parents=True, exist_ok=True)
        usage.write_bytes(b"")
        os.utime(usage, (past, past))
    assert late_days(paths) == ["2026-05-04", "2026-05-05"]  # not the 6th
