"""IoT usage reports: the reports of one UTC day (POST /api/usage/report, seed 001) turned into raw events."""

import time
from datetime import date

import dagster as dg

from billing_dags.core.settings import LANDING_OP_TAGS
from billing_dags.defs.ingest.compaction import partition_days, pending_days_sensor
from billing_dags.defs.ingest.sources import ReportSource
from billing_dags.defs.shared.metadata import materialize_raw_each
from billing_dags.defs.shared.partitions import SINGLE_RUN, billing_daily
from billing_dags.defs.shared.resources import WarehouseResource


@dg.asset(
    partitions_def=billing_daily,
    group_name="ingest",
    kinds={"sqlite", "parquet"},
    backfill_policy=SINGLE_RUN,
    metadata={"source": "usage_reports", "layout": "data/raw/events/date=YYYY-MM-DD/part-usage_reports.parquet"},
    op_tags=LANDING_OP_TAGS,  # on Celery, a worker of the landing's machine (settings.CELERY_LANDING_QUEUE)
)
def usage_reports(context: dg.AssetExecutionContext, warehouse: WarehouseResource, report_source: ReportSource) -> dg.MaterializeResult:
    """Usage reports of each UTC day from the report store (data/landing/reports; simulated ones first when simulating) as raw events."""
    from billing_dags.ingest import usage_reports as ur
    from billing_dags.ingest.events import EventsLayoutError
    from billing_dags.seeds.catalog import SeedError

    paths = warehouse.paths()

    def one_day(key, window) -> dict:
        t0 = time.perf_counter()
        source = report_source.deliver_day(paths, window.start)
        try:
            figures = ur.compact_day(paths, window.start)
        except (ur.ReportError, EventsLayoutError, SeedError) as e:
            raise dg.Failure(description=f"usage_reports {window.start}: {e}; nothing was written for this day") from None
        if figures["unknown_customers"]:
            context.log.warning(
                f"{window.start}: reports of customers no longer in seeds/customers.csv are kept but not billed: " + ", ".join(figures["unknown_customers"])
            )
        return {
            **source,
            "reports": figures["reports"],
            "customers": figures["customers"],
            "events": figures["events"],
            "bytes": figures["bytes"],
            "seconds": round(time.perf_counter() - t0, 3),
            "store": dg.MetadataValue.path(str(ur.store_path(paths))),
            "path": dg.MetadataValue.path(figures["path"]),
        }

    return materialize_raw_each(context, paths, one_day, "raw_events", ("usage_reports",))


def report_run_requests(paths, today: date | None = None) -> tuple[list[dg.RunRequest], list[str]]:
    """One run request per partition day with reports accepted after its last compaction; and days waiting."""
    from billing_dags.ingest.usage_reports import ReportStore

    first, last = partition_days(today)
    with ReportStore.open(paths, readonly=True) as store:
        pending = store.pending_days()
    requests, waiting = [], []
    for day, entry in pending.items():
        if not first <= date.fromisoformat(day) <= last:
            waiting.append(day)
            continue
        requests.append(
            dg.RunRequest(
                # a newer report for the day makes a new key; the same pending state never runs twice
                run_key=f"usage-reports-{day}-{entry['max_rowid']}",
                partition_key=day,
                tags={"billing/reason": "usage reports received", "billing/reports": str(entry["reports"])},
            )
        )
    return requests, waiting


usage_reports_sensor = pending_days_sensor(
    "usage_reports_sensor",
    usage_reports,
    "Turns newly accepted usage reports into raw events: requests usage_reports for exactly the UTC days "
    "with reports received since their last run (late_raw_data_sensor then reruns usage for those days).",
    report_run_requests,
    idle="no usage report waits to become events",
    waiting_why="reports only for days that are not partitions yet (today): {days}",
)
