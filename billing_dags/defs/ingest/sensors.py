"""Late data: raw day files whose content changed after a model computed from them get that model,
and everything daily downstream of it, recomputed in one run over the affected days.

The run never includes an ingest asset: the raw files are already what changed (pulling the day
from Prometheus again could lose samples it has since dropped). Later days are recomputed in the
same run, not one a minute: a day's usage reads the days before it (last samples, yesterday's
gauge levels, rolling 30-day sums, anomaly baselines), so a late day changes the days after it.

Sharded (BILLING_SHARDS > 1), only the (day, shard) partitions of the shards whose raw files changed are
recomputed (with the later days of those shards), and the daily assets after the models for those days:
one asset backfill per evaluation, which the daemon runs in dependency order (the models of each shard,
then the days' Stripe hand-off and summaries, which read every shard of their day).
"""

import hashlib
import json
from datetime import date, timedelta

import dagster as dg
from dagster._core.execution.backfill import BulkActionsFilter, BulkActionStatus

from billing_dags.defs.jobs import daily_usage
from billing_dags.defs.shared.partitions import billing_daily, billing_daily_shards, day_shard_key
from billing_dags.defs.shared.resources import WarehouseResource

INGEST_ASSETS = ("raw_samples", "remote_write_samples", "usage_events", "usage_reports")
#: the tag holding a backfill request's key (the same late state, the same key)
LATE_KEY = "billing/late_key"


def _daily_assets(asset_graph) -> set:
    """The materializable assets partitioned by day, or by (day, shard) when sharded."""
    by_day = [p for p in (billing_daily, billing_daily_shards) if p is not None]
    return {k for k in asset_graph.materializable_asset_keys if asset_graph.get(k).partitions_def in by_day}


def rerun_plan(paths, asset_graph, hashes: dict | None = None) -> tuple[list[dg.RunRequest], dict, list]:
    """The run requests for the late model days of ``paths`` (see billing_dags.models.late_data), the hashes
    to keep for the next evaluation, and the late model days found."""
    from billing_dags.models.late_data import computed_days, late_model_days, rerun_ranges
    from billing_dags.models.sqlmodels import load_project, sources

    project = load_project()
    late, used = late_model_days(paths, hashes, project)
    if not late:
        return [], used, late
    late_models = sorted({d.model for d in late})
    selected = dg.AssetSelection.assets(*late_models).downstream().resolve(asset_graph) & _daily_assets(asset_graph)
    selected -= {dg.AssetKey(a) for a in INGEST_ASSETS}
    models = [project.models[k.to_user_string()] for k in selected if k.to_user_string() in project.models]
    # later days read a late one through the lookback of every daily model (edges, usage) and of the sources
    follow = max([m.lookback_days for m in models] + [s.lookback_days for s in sources().values()] + [1])
    if billing_daily_shards is not None:
        return _sharded_requests(paths, asset_graph, late, selected, models, follow), used, late
    requests = []
    for start, end in rerun_ranges({d.day for d in late}, computed_days(paths, models), follow):
        days = [d for d in late if start <= d.day <= end]
        # the same late state makes the same key: an evaluation while its run is under way requests nothing new
        state = json.dumps([[d.model, d.day.isoformat(), d.why, d.inputs] for d in days])
        key = hashlib.sha256(state.encode()).hexdigest()[:16]
        tags = {
            "billing/reason": "late raw data",
            "billing/late_days": ",".join(sorted({d.day.isoformat() for d in days})),
            "billing/late_example": f"{days[0].model} {days[0].day}: {days[0].why}"[:200],
        }
        if start == end:
            requests.append(dg.RunRequest(run_key=f"late-{start}-{key}", partition_key=start.isoformat(), asset_selection=sorted(selected), tags=tags))
        else:
            tags["dagster/asset_partition_range_start"] = start.isoformat()
            tags["dagster/asset_partition_range_end"] = end.isoformat()
            requests.append(dg.RunRequest(run_key=f"late-{start}-{end}-{key}", asset_selection=sorted(selected), tags=tags))
    return requests, used, late


def _sharded_requests(paths, asset_graph, late: list, selected: set, models: list, follow: int) -> list[dg.RunRequest]:
    """Sharded: one asset backfill of the late shards' (day, shard) partitions of ``selected`` (each shard from
    its first late day through its computed days that read it) and of the daily assets after them for those days."""
    from billing_dags.models.late_data import computed_days, rerun_ranges

    cells: set[tuple] = set()  # (day, shard) to recompute
    for shard in sorted({d.shard for d in late if d.shard is not None}):
        for start, end in rerun_ranges({d.day for d in late if d.shard == shard}, computed_days(paths, models, shard), follow):
            cells |= {(start + timedelta(days=i), shard) for i in range((end - start).days + 1)}
    days = sorted({day for day, _ in cells})
    if not days:
        return []
    state = json.dumps(sorted([d.model, d.day.isoformat(), d.shard.key if d.shard else "", d.why, d.inputs] for d in late))
    key = hashlib.sha256(state.encode()).hexdigest()[:16]
    late_cells = sorted({f"{d.day}|{d.shard.key}" for d in late if d.shard is not None})
    tags = {
        "billing/reason": "late raw data",
        "billing/late_days": ",".join(sorted({d.day.isoformat() for d in late})),
        "billing/late_partitions": ",".join(late_cells)[:200],
        "billing/late_example": f"{late[0].model} {late[0].day}: {late[0].why}"[:200],
    }
    # a backfill request keeps no run key: the key is a tag, remembered in the cursor as a run's key is
    tags[LATE_KEY] = f"late-{days[0]}-{days[-1]}-{key}"
    return [backfill_of_cells(asset_graph, selected, cells, tags)]


def backfill_of_cells(asset_graph, selected: set, cells: set | list, tags: dict) -> dg.RunRequest:
    """One asset backfill: the (day, shard) partitions ``cells`` of the sharded assets of ``selected``, and their
    days of its daily assets (after the models: they read every shard of their day)."""
    from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset
    from dagster._core.definitions.events import AssetKeyPartitionKey

    days = sorted({day for day, _ in cells})
    wanted = set()
    for key in selected:
        if asset_graph.get(key).partitions_def == billing_daily_shards:
            wanted |= {AssetKeyPartitionKey(key, day_shard_key(day.isoformat(), shard.key)) for day, shard in cells}
        else:
            wanted |= {AssetKeyPartitionKey(key, day.isoformat()) for day in days}
    return dg.RunRequest.for_asset_graph_subset(AssetGraphSubset.from_asset_partition_set(wanted, asset_graph), tags)


def request_key(request: dg.RunRequest) -> str:
    """What identifies a request of the sensor: its run key, or a backfill request's key tag."""
    return request.run_key or request.tags[LATE_KEY]


UNFINISHED = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def runs_under_way(instance, asset_graph, job_name: str) -> list[str]:
    """Unfinished runs that write raw days or the daily assets computed from them (the job's own
    runs, ingest runs, backfills of those assets): ids (short) of each."""
    ingest = dg.AssetSelection.assets(*(k for k in INGEST_ASSETS if asset_graph.has(dg.AssetKey(k))))
    relevant = ingest.downstream().resolve(asset_graph)
    out = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=UNFINISHED), limit=200):
        keys = run.asset_selection
        if (keys is None and run.job_name == job_name) or (keys and set(keys) & relevant):
            out.append(run.run_id[:8])
    # an asset backfill of those assets still under way (between its runs, or before its first one)
    for backfill in instance.get_backfills(filters=BulkActionsFilter(statuses=[BulkActionStatus.REQUESTED, BulkActionStatus.CANCELING]), limit=50):
        if set(backfill.asset_selection or ()) & relevant:
            out.append(f"backfill {backfill.backfill_id}")
    return out


#: what the sensor requests: runs of daily_usage; sharded, asset backfills of the assets downstream of the ingest
#: (a sensor launches a backfill only over an asset selection; it requests (day, shard) and day partitions of them)
_TARGET = (
    {"job": daily_usage}
    if billing_daily_shards is None
    else {"asset_selection": dg.AssetSelection.assets(*INGEST_ASSETS).downstream() - dg.AssetSelection.assets(*INGEST_ASSETS)}
)


@dg.sensor(
    **_TARGET,
    minimum_interval_seconds=60,
    name="late_raw_data_sensor",
    description=(
        "Recomputes the daily models (and Stripe hand-off, summaries) downstream of raw day files whose content "
        "changed after they were computed, in one run from the first late day through the days that read it "
        "(sharded: one asset backfill of the changed shards' (day, shard) partitions, then their days' Stripe hand-off); "
        "never re-ingests. A file only touched, or rewritten with the same bytes, requests nothing."
    ),
    default_status=dg.DefaultSensorStatus.STOPPED,
)
def late_raw_data_sensor(context: dg.SensorEvaluationContext, warehouse: WarehouseResource):
    cursor = json.loads(context.cursor) if context.cursor else {}
    # raw days being written, or models being computed, are looked at once their runs end: a
    # rerun next to them would race them (and find their half-written days late)
    busy = runs_under_way(context.instance, context.repository_def.asset_graph, daily_usage.name)
    if busy:
        return dg.SkipReason(f"waiting for {len(busy)} run(s) writing raw days or daily usage to finish: {', '.join(busy[:5])}")
    requests, used, late = rerun_plan(warehouse.paths(), context.repository_def.asset_graph, cursor.get("hashes"))
    requested = set(cursor.get("requested", []))
    context.update_cursor(json.dumps({"hashes": used, "requested": sorted(request_key(r) for r in requests)}, sort_keys=True))
    if not requests:
        return dg.SkipReason("no raw day file changed by content since the models computed from it")
    new = [r for r in requests if request_key(r) not in requested]
    if not new:
        return dg.SkipReason(
            "the late days are requested already (their run has not finished, or failed: rerun it from the UI): "
            + "; ".join(r.tags["billing/late_days"] for r in requests)
        )
    for d in late[:20]:
        context.log.info(f"late: {d.model} {d.day}: {d.why}")
    return new


def late_days(paths) -> list[str]:
    """The days with a model partition computed from raw files that have changed since."""
    from billing_dags.models.late_data import late_model_days

    late, _ = late_model_days(paths)
    return sorted({d.day.isoformat() for d in late})


# --------------------------------------------------------------------------- sharded: ingested days without usage

#: how far back the sharded-days sensor looks for ingested days without usage (Stripe takes meter events up to 35
#: days old; older days are backfilled by hand: docs/going-live.md)
UNCOMPUTED_LOOKBACK_DAYS = 35
#: the tag holding a sharded-days request's key (the same uncomputed cells, the same key)
UNCOMPUTED_KEY = "billing/uncomputed_key"


def uncomputed_plan(paths, asset_graph, today) -> tuple[list[dg.RunRequest], list]:
    """Sharded: one asset backfill of every (day, shard) of the last UNCOMPUTED_LOOKBACK_DAYS days before
    ``today`` that has raw input and is missing a daily model's partition (the day was ingested, its models
    never ran), with the daily assets after the models for those days; and those cells."""
    from billing_dags.defs.shared.partitions import PARTITIONS_START
    from billing_dags.models.completeness import raw_input_cells, uncomputed_cells
    from billing_dags.models.sqlmodels import load_project

    project = load_project()
    ingest = [dg.AssetKey(a) for a in INGEST_ASSETS if asset_graph.has(dg.AssetKey(a))]
    selected = (dg.AssetSelection.assets(*ingest).downstream().resolve(asset_graph) & _daily_assets(asset_graph)) - set(ingest)
    models = [project.models[k.to_user_string()] for k in selected if asset_graph.get(k).partitions_def == billing_daily_shards]
    start = max(date.fromisoformat(PARTITIONS_START), today - timedelta(days=UNCOMPUTED_LOOKBACK_DAYS))
    raw_cells = raw_input_cells(paths, start, today)
    cells = sorted({c for m in models for c in uncomputed_cells(paths, m, start, today, raw_cells)}, key=lambda c: (c[0], c[1].index))
    if not cells:
        return [], []
    listed = [f"{day}|{shard.key}" for day, shard in cells]
    tags = {
        "billing/reason": "ingested days without usage",
        "billing/days": ",".join(sorted({day.isoformat() for day, _ in cells})),
        "billing/partitions": ",".join(listed)[:200],
        UNCOMPUTED_KEY: "uncomputed-" + hashlib.sha256(",".join(listed).encode()).hexdigest()[:16],
    }
    return [backfill_of_cells(asset_graph, selected, cells, tags)], cells


if billing_daily_shards is not None:

    @dg.sensor(
        asset_selection=_TARGET["asset_selection"],
        minimum_interval_seconds=60,
        name="sharded_days_sensor",
        description=(
            "Sharded (BILLING_SHARDS > 1): once an ingest has finished, computes the days it ingested: one asset backfill of "
            f"every (day, shard) of the last {UNCOMPUTED_LOOKBACK_DAYS} days with raw input and no usage, then those days' Stripe hand-off and "
            "summaries. With daily_usage_schedule (the ingest) it runs each day unattended."
        ),
        default_status=dg.DefaultSensorStatus.STOPPED,
    )
    def sharded_days_sensor(context: dg.SensorEvaluationContext, warehouse: WarehouseResource):
        from billing_dags.core.calendar import utc_today

        busy = runs_under_way(context.instance, context.repository_def.asset_graph, daily_usage.name)
        if busy:
            return dg.SkipReason(f"waiting for {len(busy)} run(s) writing raw days or daily usage to finish: {', '.join(busy[:5])}")
        today = utc_today()  # the days before it: a day is ingested once it has ended
        requests, cells = uncomputed_plan(warehouse.paths(), context.repository_def.asset_graph, today)
        if not requests:
            context.update_cursor(json.dumps({"requested": []}))
            return dg.SkipReason(f"every (day, shard) with raw input of the last {UNCOMPUTED_LOOKBACK_DAYS} days has its usage computed")
        requested = set(json.loads(context.cursor).get("requested", [])) if context.cursor else set()
        keys = [r.tags[UNCOMPUTED_KEY] for r in requests]
        context.update_cursor(json.dumps({"requested": keys}))
        if set(keys) <= requested:
            return dg.SkipReason(
                "these (day, shard) partitions were requested already and are still without usage (their backfill "
                f"failed: see the Backfills page, rerun it): {requests[0].tags['billing/partitions']}"
            )
        context.log.info(f"{len(cells)} (day, shard) partitions with raw input and no usage: {requests[0].tags['billing/partitions']}")
        return requests
