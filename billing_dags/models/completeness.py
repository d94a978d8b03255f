"""Days a model would read that were never computed: an earlier or same-period partition of a daily upstream
missing where raw input exists. Reading past such a day computes a wrong answer without an error: a daily
model would bill a counter's whole value as new (``require_complete_lookback``), a monthly one would bill the
day as zero (``require_complete_days``). Both are refused before the model runs, naming the days and the fix.
"""

from __future__ import annotations

from datetime import date, timedelta

from billing_dags.core.calendar import days
from billing_dags.core.settings import Paths
from billing_dags.core.shards import Shard, all_shards, shard_of_dir
from billing_dags.ingest import events, raw
from billing_dags.models.sqlmodels import Model, ModelError, Project, Window, model_files, partition_day


def raw_input_cells(paths: Paths, start: date, end: date) -> set[tuple[date, Shard | None]]:
    """The (day, shard) of [start, end) with raw samples or raw events: what daily models compute from (shard
    None when unsharded). One listing per day and kind, whatever the number of shards."""
    out = set()
    for day in days(start, end):
        for folder in (raw.samples_day_dir(paths, day), events.events_day_dir(paths, day)):
            if paths.shards == 1:
                if any(folder.glob("*.parquet")):
                    out.add((day, None))
                continue
            for f in folder.glob(f"shard=*-of-{paths.shards}/*.parquet"):
                out.add((day, shard_of_dir(f.parent.name)))
    return out


def missing_lookback_days(paths: Paths, project: Project, model: Model, window: Window) -> dict[str, list[str]]:
    """``require_complete_lookback`` (a daily model): the days of its lookback and window with raw samples and
    no partition of a daily upstream, but for earlier days the window's own carry-in covers. {upstream: days}."""
    if not model.lookback_days or not model.config.get("require_complete_lookback"):
        return {}
    tables, _ = project.table_deps(model.name)
    raw_present = set(raw.raw_days(paths))
    carried = {p.name for p in raw.carry_in_files(paths, window.start, window.shard)}
    out = {}
    for name in sorted(tables):
        up = project.models[name]
        if up.partitioned_by != "billing_daily":
            continue
        have = {partition_day(p) for p in model_files(paths, up, window.shard)}
        missing = [
            day.isoformat()
            for day in days(window.start - timedelta(days=model.lookback_days), window.end)
            if day in raw_present and day not in have and not (day < window.start and {p.name for p in raw.sample_files(paths, day, window.shard)} <= carried)
        ]
        if missing:
            out[name] = missing
    return out


def uncomputed_cells(paths: Paths, model: Model, start: date, end: date, raw_cells: set | None = None) -> list[tuple[date, Shard | None]]:
    """The (day, shard) of [start, end) with raw input and no partition of the daily ``model`` (shard None
    when unsharded), by day then shard. ``raw_cells``: ``raw_input_cells`` of the same days, when known."""
    shards = all_shards(paths.shards) if paths.shards > 1 else [None]
    cells = raw_input_cells(paths, start, end) if raw_cells is None else raw_cells
    have = {shard: {partition_day(p) for p in model_files(paths, model, shard)} for shard in shards}
    return [(day, shard) for day in days(start, end) for shard in shards if (day, shard) in cells and day not in have[shard]]


def missing_period_days(paths: Paths, project: Project, model: Model, window: Window) -> dict[str, list[str]]:
    """``require_complete_days`` (a model of a longer period, e.g. a month): the days of the window with raw
    input and no partition of a daily upstream, per shard when sharded ("DAY|SHARD"). {upstream: days}."""
    if not model.config.get("require_complete_days"):
        return {}
    tables, _ = project.table_deps(model.name)
    out = {}
    for name in sorted(tables):
        if project.models[name].partitioned_by != "billing_daily":
            continue
        cells = uncomputed_cells(paths, project.models[name], window.start, window.end)
        if cells:
            out[name] = [day.isoformat() + (f"|{shard.key}" if shard is not None else "") for day, shard in cells]
    return out


def _listed(missing: list[str]) -> str:
    return ", ".join(missing[:5]) + ("..." if len(missing) > 5 else "")


def require_computed_inputs(paths: Paths, project: Project, model: Model, window: Window) -> None:
    """Raise ModelError naming the missing days (and the fix) when ``model`` would read a day never computed."""
    problems = [
        f"{model.name} for {window.start} reads {name} for the {model.lookback_days} days before it, but {len(missing)} of those "
        f"days have raw samples and no {name} partition ({_listed(missing)}); materialize {name} for them first (a backfill "
        "of the whole range runs them in order)"
        for name, missing in missing_lookback_days(paths, project, model, window).items()
    ] + [
        f"{model.name} for {window.start} to {window.end - timedelta(days=1)} sums {name} over every day, but {len(missing)} "
        f"day(s) with raw input have no {name} partition ({_listed(missing)}): they would be billed as zero. Materialize "
        f"{name} for them first (a backfill of those days, or of the month: docs/runs-and-backfills.md), then rerun this partition"
        for name, missing in missing_period_days(paths, project, model, window).items()
    ]
    if problems:
        raise ModelError("; ".join(problems))
