"""Late data: a raw day rewritten after its usage was computed gets its day partitions rerun."""

import json
from datetime import date

import dagster as dg

from billing_dags.defs.shared.resources import WarehouseResource
from billing_dags.sqlmodels import load_project, partition_file
from billing_dags.sqlmodels import Window


def late_days(paths) -> list[tuple[str, float]]:
    """Days whose newest raw file is newer than the first model that reads it for that day.

    Raw samples feed fct_series_edges_by_day; raw usage events feed fct_usage_by_day directly, of
    their own day and of the next (a gauge level carries over midnight).
    A day never computed is not "late" (the schedule or a backfill will compute it).
    """
    from billing_dags.events import events_root

    models = load_project().models
    # (raw root, the first model reading it, how many later days read a raw day too: the next day's
    # usage reads today's last gauge event level)
    readers = [(paths.raw_samples, models["fct_series_edges_by_day"], 0), (events_root(paths), models["fct_usage_by_day"], 1)]
    newest_by_day: dict[date, float] = {}
    for root, model, later_days in readers:
        for day_dir in sorted(root.glob("date=*")):
            files = list(day_dir.glob("*.parquet"))
            if not files:
                continue
            raw_day = date.fromisoformat(day_dir.name[5:])
            newest = max(f.stat().st_mtime for f in files)
            for day in (date.fromordinal(raw_day.toordinal() + i) for i in range(later_days + 1)):
                computed = partition_file(paths, model, Window(day, date.fromordinal(day.toordinal() + 1)))
                if computed.exists() and computed.stat().st_mtime < newest:
                    newest_by_day[day] = max(newest, newest_by_day.get(day, 0.0))
    return [(day.isoformat(), mtime) for day, mtime in sorted(newest_by_day.items())]


def late_raw_data_sensor(job) -> dg.SensorDefinition:
    @dg.sensor(
        job=job,
        minimum_interval_seconds=60,
        name="late_raw_data_sensor",
        description="Reruns the day partitions whose raw samples or usage events changed after their usage was computed.",
        default_status=dg.DefaultSensorStatus.STOPPED,
    )
    def _sensor(context: dg.SensorEvaluationContext, warehouse: WarehouseResource):
        seen = json.loads(context.cursor) if context.cursor else {}
        requests = []
        for day, mtime in late_days(warehouse.paths()):
            if seen.get(day, 0) >= mtime:
                continue
            seen[day] = mtime
            requests.append(
                dg.RunRequest(
                    run_key=f"late-{day}-{int(mtime)}",
                    partition_key=day,
                    tags={"billing/reason": "late raw data"},
                )
            )
        context.update_cursor(json.dumps(seen, sort_keys=True))
        if not requests:
            return dg.SkipReason("no raw day changed after its usage was computed")
        return requests

    return _sensor
