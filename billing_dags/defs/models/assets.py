"""One Dagster asset per table model in sql_models/; dependencies come from the SQL itself."""

import dagster as dg

from billing_dags.defs.models.checks import check_specs, evaluate, evaluate_published
from billing_dags.defs.shared.metadata import data_version, model_code_version, model_metadata
from billing_dags.defs.shared.partitions import (
    BY_NAME,
    SINGLE_RUN,
    billing_daily_shards,
    combined_check_result,
    materialize_each,
    partition_check_evaluations,
    partitions_of,
)
from billing_dags.defs.shared.resources import WarehouseResource
from billing_dags.models import late_data
from billing_dags.models.completeness import require_computed_inputs
from billing_dags.models.sqlmodels import (
    Model,
    Project,
    Window,
    iter_model_days,
    load_project,
    run_model,
    session,
    sources,
)


def _partition_mapping(model: Model, upstream: Model) -> dg.PartitionMapping | None:
    if upstream.partitioned_by == "billing_daily" and model.partitioned_by == "billing_daily" and model.lookback_days:
        days = dg.TimeWindowPartitionMapping(start_offset=-model.lookback_days, end_offset=0, allow_nonexistent_upstream_partitions=True)
        if billing_daily_shards is None:
            return days
        # (day, shard) reads the earlier days of its own shard
        return dg.MultiPartitionMapping(
            {"day": dg.DimensionPartitionMapping("day", days), "shard": dg.DimensionPartitionMapping("shard", dg.IdentityPartitionMapping())}
        )
    return None  # monthly models read every (day, shard) of their month: Dagster infers it (MultiToSingleDimensionPartitionMapping)


def _source_mapping(model: Model, lookback_days: int) -> dg.PartitionMapping | None:
    """A daily model that reads earlier days of a source depends on those days of its assets (sharded: on
    the day of its (day, shard), the mapping Dagster infers; the day before stays an input, not a dependency)."""
    if lookback_days and model.partitioned_by == "billing_daily" and billing_daily_shards is None:
        return dg.TimeWindowPartitionMapping(start_offset=-lookback_days, end_offset=0, allow_nonexistent_upstream_partitions=True)
    return None


def metadata_text(metadata: dict) -> str:
    """Asset check metadata as one line of text (for failure messages)."""
    return ", ".join(f"{k}: {getattr(v, 'value', v)}" for k, v in metadata.items())


def build_model_asset(project: Project, model: Model) -> dg.AssetsDefinition:
    tables, srcs = project.table_deps(model.name)
    known = sources()
    deps = [dg.AssetDep(t, partition_mapping=_partition_mapping(model, project.models[t])) for t in sorted(tables)]
    lookback = {}
    for s in srcs:
        for a in known[s].assets:
            lookback[a] = max(lookback.get(a, 0), known[s].lookback_days)
    deps += [dg.AssetDep(a, partition_mapping=_source_mapping(model, lookback[a])) for a in sorted(lookback)]

    # a multi-asset of one asset, so that its checks can run alone (can_subset): from a check's page
    # they re-run on the published partition; with the asset they run on the new rows before publishing
    @dg.multi_asset(
        name=model.name,
        specs=[
            dg.AssetSpec(
                model.name,
                description=model.description,
                group_name=model.group,
                kinds={"duckdb", "parquet"},
                deps=deps,
                code_version=model_code_version(project, model),
                metadata={
                    "sql": dg.MetadataValue.path(str(model.path)),
                    "grain": ", ".join(model.grain),
                    "partitioned_by": model.partitioned_by,
                    "lookback_days": model.lookback_days,
                    # engine python: a faster implementation of the same SQL (which stays its tested spec)
                    "engine": model.config.get("engine", "sql"),
                    **({"python": model.config["python"]} if model.config.get("python") else {}),
                },
            )
        ],
        partitions_def=BY_NAME[model.partitioned_by],
        check_specs=check_specs(model, BY_NAME[model.partitioned_by]),
        can_subset=True,
        backfill_policy=SINGLE_RUN if model.partitioned_by != "none" else None,
    )
    def _asset(context: dg.AssetExecutionContext, warehouse: WarehouseResource):
        paths = warehouse.paths()
        selected = {k.name for k in context.selected_asset_check_keys}
        if dg.AssetKey(model.name) not in context.selected_asset_keys:
            # the checks alone (from a check's page): on the partitions as they were published
            published: dict[str, list[tuple[Window | None, dg.AssetCheckResult]]] = {}
            keys = partitions_of(context) or [(None, None)]
            for _, window in keys:
                for r in evaluate_published(model, paths, window):
                    if r.check_name in selected:
                        published.setdefault(r.check_name, []).append((window, r))
            yield from _check_outcomes(context, published, {w: k for k, w in keys})
            return
        threads = warehouse.threads_for(context.run.tags)
        # every partition of the run in order (a range: each day reads the earlier days this step
        # has just written); the checks cover every partition, a blocking one failing stops the
        # step before that partition is published
        by_check: dict[str, list[tuple[Window | None, dg.AssetCheckResult]]] = {}
        versions: dict[str | None, dg.DataVersion] = {}
        done: list = []  # (window, run_model's result) of each partition published

        def run_checks(window: Window | None, table) -> None:
            """The asset checks, on the new rows before they are published; a failed blocking one publishes nothing."""
            results = evaluate(model, paths, window, table)
            failed = [r for r, blocking in results if blocking and not r.passed]
            if failed:
                raise dg.Failure(
                    description=f"{model.name} {_label(window)}: blocking check failed, nothing was published for it "
                    "(its previous partition stays): " + "; ".join(f"{r.check_name} ({metadata_text(r.metadata)})" for r in failed)
                )
            for r, _ in results:
                by_check.setdefault(r.check_name, []).append((window, r))

        inputs: dict = {}

        def before(window: Window) -> None:
            require_computed_inputs(paths, project, model, window)
            inputs[window] = late_data.inputs_before(paths, project, model, window)

        parts = partitions_of(context)
        # a range: the days in order in one DuckDB session (run_model_days), each recorded as it is published
        windows = [w for _, w in parts]
        days = iter_model_days(paths, model.name, windows, project=project, threads=threads, validate=run_checks, before=before) if parts else None

        def one_partition(key: str | None, window: Window | None) -> dict:
            if window is None:
                result = run_model(paths, model.name, None, project=project, threads=threads, validate=lambda t: run_checks(None, t))
            else:
                result = next(days)
                if result.window != window:  # the generator runs the run's partitions in their order
                    raise RuntimeError(f"{model.name}: computed {result.window} for partition {key}")
                if inputs.get(window) is not None:
                    late_data.record_inputs(paths, model, window, inputs.pop(window))
            with session() as con:
                standard = model_metadata(con, paths, project, model, result.table, partitioned=window is not None)
                versions[key] = data_version(con, result.table)
            done.append((window, result))
            return {
                "rows": result.rows,
                "seconds": round(result.seconds, 3),
                "path": dg.MetadataValue.path(str(result.path)),
                **standard,
            }

        try:
            materialize_each(context, one_partition)
        finally:
            if days is not None:
                days.close()  # its DuckDB session
        # one line per step: each log line is an event the instance stores (a range's days have
        # their rows, seconds and path in their own materialization's metadata)
        on = f" on {threads} thread(s) (backfill)" if threads else ""
        if len(done) == 1:
            window, result = done[0]
            context.log.info(f"{model.name} {_label(window)}: {result.rows} rows in {result.seconds:.2f}s{on} -> {result.path}")
        elif done:
            context.log.info(
                f"{model.name} {_label(done[0][0])} to {_label(done[-1][0])}: {len(done)} partitions, "
                f"{sum(r.rows for _, r in done)} rows in {sum(r.seconds for _, r in done):.2f}s{on}"
            )
        outcomes = _check_outcomes(context, {name: results for name, results in by_check.items() if name in selected}, {w: k for k, w in parts})
        yield dg.MaterializeResult(
            asset_key=model.name,
            check_results=[o for o in outcomes if isinstance(o, dg.AssetCheckResult)],
            # the rows' own version, when the run has one partition (Dagster records one data version for
            # every partition of a range run; there the default applies: code version + input versions)
            data_version=next(iter(versions.values())) if len(versions) == 1 else None,
        )
        yield from (o for o in outcomes if isinstance(o, dg.AssetCheckEvaluation))

    return _asset


def _check_outcomes(context, by_check: dict[str, list], key_of: dict) -> list:
    """The checks' results over the run's partitions: a result per check for one partition (or none), else each
    partition's own result recorded against it (a range run's results would have no partition)."""
    if len(key_of) <= 1:
        return [combined_check_result(results) for results in by_check.values()]
    return [e for results in by_check.values() for e in partition_check_evaluations(context, [(key_of[w], r) for w, r in results])]


def _label(window: Window | None) -> str:
    """The partition a window is: its day (with its shard when sharded), or its month."""
    if window is None:
        return "(unpartitioned)"
    if (window.end - window.start).days != 1:
        return f"{window.start:%Y-%m}"
    return window.start.isoformat() + (f"|{window.shard.key}" if window.shard is not None else "")


def build_model_assets() -> list[dg.AssetsDefinition]:
    project = load_project()
    return [build_model_asset(project, m) for m in project.models.values() if m.materialized == "table"]


model_assets = build_model_assets()
