"""Remote-write compaction: landing segments -> raw day partitions, and the sensor that runs it."""

import json
from datetime import UTC, date, datetime, timedelta

import dagster as dg

from billing_dags.core.settings import LANDING_OP_TAGS
from billing_dags.defs.shared.metadata import raw_metadata
from billing_dags.defs.shared.partitions import PARTITIONS_START, SINGLE_RUN, billing_daily, partitions_of, record
from billing_dags.defs.shared.resources import WarehouseResource


@dg.asset(
    partitions_def=billing_daily,
    group_name="ingest",
    kinds={"prometheus", "parquet"},
    backfill_policy=SINGLE_RUN,
    metadata={"source": "remote_write", "landing": "data/landing/seg-*.seg"},
    op_tags=LANDING_OP_TAGS,  # on Celery, a worker of the landing's machine (settings.CELERY_LANDING_QUEUE)
)
def remote_write_samples(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
    """Remote-write landing segments of each UTC day merged into its raw partition, deduplicated on (series, ts)."""
    from billing_dags.ingest.compaction import compact

    paths = warehouse.paths()
    parts = partitions_of(context)
    # one call for every day of the run: segments are read once however many days they hold
    result = compact(paths, days=[window.start.isoformat() for _, window in parts])
    per_day = result["days"]
    for r in result["recovered_segments"]:
        context.log.warning(f"sealed landing segment {r} left open by a stopped receiver (torn tail dropped)")
    for r in per_day:
        context.log.info(
            f"{r['day']}: {r['landing_samples']} landing samples from {r['segments']} segments, "
            f"{r['new_samples']} new, {r['duplicates']} duplicates, {r['samples']} in the partition"
        )
        for q in r.get("quarantined", []):
            context.log.warning(
                f"{r['day']}: {q['samples']} samples of {q['series']} from {q['segment']} quarantined in {q['file']}, not merged and not billed: {q['reason']}"
            )
        if r.get("unknown_customer"):
            context.log.warning(
                f"{r['day']}: {r['unknown_customer']} samples name no customer in the seeds "
                f"(customer label values: {', '.join(map(str, r['unknown_customers']))}); add them to seeds/customers.csv"
            )
    by_day = {r["day"]: r for r in per_day}
    versions = []
    for key, window in parts:
        day = window.start.isoformat()
        standard, version = raw_metadata(paths, window)
        versions.append(version)
        record(context, key, {**_figures([by_day[day]] if day in by_day else [], result["seconds"]), **standard})
    # the raw files' version when the run has one partition (a range run records one version for all)
    return dg.MaterializeResult(data_version=versions[0] if len(versions) == 1 else None)


def _figures(per_day: list[dict], seconds: float) -> dict:
    """The metadata of one partition's compaction (``seconds``: the whole step's)."""
    total = lambda key: sum(r.get(key, 0) for r in per_day)  # noqa: E731
    metadata = {
        "landing_segments": total("segments"),
        "landing_samples": total("landing_samples"),
        "new_samples": total("new_samples"),
        "duplicates_dropped": total("duplicates"),
        "samples_in_partition": total("samples"),
        "series": total("series"),
        "staleness_markers": total("stale"),
        "nonfinite_samples": total("nonfinite"),
        "unknown_customer_samples": total("unknown_customer"),
        "quarantined_samples": total("quarantined_samples"),
        "segments_removed": total("segments_removed"),
        "rewritten": any(r["written"] for r in per_day),
        "seconds": seconds,
    }
    paths_written = [r["path"] for r in per_day if r.get("path")]
    if paths_written:
        metadata["path"] = dg.MetadataValue.path(paths_written[0])
    unknown = {k: v for r in per_day for k, v in r.get("unknown_customers", {}).items()}
    if unknown:
        metadata["unknown_customers"] = dg.MetadataValue.json(unknown)
    return metadata


def partition_days(today: date | None = None) -> tuple[date, date]:
    """The first and last day that are billing_daily partitions (today is one once it has ended)."""
    today = today or datetime.now(UTC).date()
    return date.fromisoformat(PARTITIONS_START), today - timedelta(days=1)


def landing_run_requests(paths, today: date | None = None) -> tuple[list[dg.RunRequest], list[str]]:
    """One run request per partition day with landing samples not yet compacted; and days waiting."""
    from billing_dags.ingest.compaction import pending_days

    first, last = partition_days(today)
    requests, waiting = [], []
    for day, entry in pending_days(paths).items():
        d = date.fromisoformat(day)
        if not first <= d <= last:
            waiting.append(day)
            continue
        segments = sorted(entry["segments"])
        figures = entry["figures"]
        requests.append(
            dg.RunRequest(
                # a new segment for the same day makes a new key; the same pending set never runs twice
                run_key=f"remote-write-{day}-{segments[-1]}-{len(segments)}",
                partition_key=day,
                tags={
                    "billing/reason": "remote-write landing data",
                    "billing/landing_segments": str(len(segments)),
                    "billing/landing_samples": str(figures.get("samples", 0)),
                    "billing/newest_segment": segments[-1],
                },
            )
        )
    return requests, waiting


def pending_days_sensor(name: str, asset, description: str, run_requests, idle: str, waiting_why: str) -> dg.SensorDefinition:
    """A sensor that requests ``asset`` for the partition days ``run_requests(paths)`` returns.

    ``run_requests`` gives (run requests, days with data that are not partitions yet); ``idle``
    and ``waiting_why`` (formatted with ``days``) explain a skip in the UI.
    """

    @dg.sensor(
        asset_selection=[asset],
        minimum_interval_seconds=60,
        name=name,
        description=description,
        default_status=dg.DefaultSensorStatus.STOPPED,
    )
    def _sensor(context: dg.SensorEvaluationContext, warehouse: WarehouseResource):
        requests, waiting = run_requests(warehouse.paths())
        context.update_cursor(json.dumps({"requested": [r.partition_key for r in requests], "waiting": waiting}))
        if not requests:
            return dg.SkipReason(waiting_why.format(days=", ".join(waiting)) if waiting else idle)
        return requests

    return _sensor


remote_write_landing_sensor = pending_days_sensor(
    "remote_write_landing_sensor",
    remote_write_samples,
    "Compacts remote-write landing segments: requests remote_write_samples for exactly the UTC days "
    "the new sealed segments hold (late_raw_data_sensor then reruns usage for those days).",
    landing_run_requests,
    idle="no sealed landing segment waits for compaction",
    waiting_why=f"landing data only for days that are not partitions yet (today) or before {PARTITIONS_START}: {{days}}",
)
