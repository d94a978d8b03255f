"""Late data: a raw day rewritten after its usage was computed gets its day partitions rerun."""

import json
from datetime import date

import dagster as dg

from billing_dags.defs.shared.resources import WarehouseResource
from billing_dags.sqlmodels import load_project, partition_file
from billing_dags.sqlmodels import Window


def late_days(paths) -> list[tuple[str, float]]:
    """Days whose newest raw file is newer than their fct_series_edges_by_day partition."""
    edges = load_project().models["fct_series_edges_by_day"]
    out = []
    for day_dir in sorted(paths.raw_samples.glob("date=*")):
        files = list(day_dir.glob("*.parquet"))
        if not files:
            continue
        day = date.fromisoformat(day_dir.name[5:])
        newest = max(f.stat().st_mtime for f in files)
        edge = partition_file(paths, edges, Window(day, date.fromordinal(day.toordinal() + 1)))
        if edge.exists() and edge.stat().st_mtime < newest:
            out.append((day.isoformat(), newest))
    return out


def late_raw_data_sensor(job) -> dg.SensorDefinition:
    @dg.sensor(
        job=job,
        minimum_interval_seconds=60,
        name="late_raw_data_sensor",
        description="Reruns the day partitions whose raw samples changed after their usage was computed.",
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
