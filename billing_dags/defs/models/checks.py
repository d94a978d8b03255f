"""Asset checks on SQL model partitions. Each runs on the new rows (view ``partition``) before they are published.

Blocking checks stop downstream assets in the same run: money depends on them.
"""

from typing import Callable

import dagster as dg
import pyarrow.parquet as pq

from billing_dags.core.settings import Paths
from billing_dags.models.sqlmodels import Model, Window, load_project, model_files, partition_file, seed_snapshot_path, session


def _blocking(blocking: bool):
    def mark(fn: Callable) -> Callable:
        fn.blocking = blocking
        return fn

    return mark


def grain_is_unique(model: Model, published=None) -> dg.AssetCheckResult:
    """The result of the grain guard: ``sqlmodels.write_partition`` refuses rows with a duplicate key
    before anything runs on them (the asset's other checks included), so new rows that get here passed it.
    With ``published`` (a published partition's rows, when the check runs alone) the keys are counted."""
    meta = {"grain": ", ".join(model.grain)}
    if published is None:
        return dg.AssetCheckResult(
            check_name="grain_is_unique",
            passed=True,
            metadata={"duplicate_keys": 0, **meta},
            description="checked on the new rows before the partition was published (sqlmodels.check_grain)",
        )
    dupes = 0
    if len(published) > 1:
        counts = published.group_by(list(model.grain), use_threads=False).aggregate([([], "count_all")])
        dupes = sum(1 for n in counts["count_all"].to_pylist() if n > 1)
    return dg.AssetCheckResult(
        check_name="grain_is_unique",
        passed=dupes == 0,
        metadata={"duplicate_keys": dupes, **meta},
        description="checked on the published partition",
    )


@_blocking(True)
def no_negative_usage(con, paths: Paths, window: Window) -> dg.AssetCheckResult:
    """Counter usage, gauge integrals and peaks are never negative."""
    bad = con.execute(
        "select count(*) from partition where usage < 0 or gauge_integral < 0 or gauge_peak < 0"
    ).fetchall()[0][0]
    return dg.AssetCheckResult(check_name="no_negative_usage", passed=bad == 0, metadata={"negative_rows": bad})


@_blocking(False)
def scrape_completeness(con, paths: Paths, window: Window) -> dg.AssetCheckResult:
    """Series with a scrape gap longer than 15 minutes in the day (warning: usage is still exact)."""
    total, gappy, dropped = con.execute(
        "select count(*), count(*) filter (where max_gap_ms > 900000), coalesce(sum(dropped_samples), 0) from partition"
    ).fetchall()[0]
    return dg.AssetCheckResult(
        check_name="scrape_completeness",
        passed=gappy == 0,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"series": total, "series_with_gaps_over_15m": gappy, "dropped_nan_or_stale_samples": int(dropped)},
    )


@_blocking(True)
def daily_sum_equals_month(con, paths: Paths, window: Window) -> dg.AssetCheckResult:
    """The month equals the sum of its days, to the unit, for every customer, meter and dimension."""
    daily = load_project().models["fct_usage_by_day"]
    files = [str(p) for p in model_files(paths, daily)]
    days = con.sql(
        "select * from read_parquet($files, hive_partitioning = false) where day >= $start and day < $end",
        params={"files": files, "start": window.start, "end": window.end},
    ).to_arrow_table()
    con.register("days", days)
    mismatches = con.execute(
        """
        with by_days as (
            select customer_id, meter_id, dimension,
                   sum(usage) as usage, sum(gauge_integral) as gauge_integral
            from days group by all
        )
        select count(*) from by_days
        full outer join partition using (customer_id, meter_id, dimension)
        where by_days.usage is distinct from partition.usage
           or by_days.gauge_integral is distinct from partition.gauge_integral
        """
    ).fetchall()[0][0]
    return dg.AssetCheckResult(
        check_name="daily_sum_equals_month", passed=mismatches == 0, metadata={"mismatched_rows": mismatches}
    )


@_blocking(True)
def amounts_are_whole_minor_units(con, paths: Paths, window: Window) -> dg.AssetCheckResult:
    """Every invoice line has an integer amount in minor units; usage and fee quantities are not negative."""
    bad = con.execute(
        "select count(*) from partition where amount_minor is null or (line_type <> 'risk_adjustment' and quantity < 0)"
    ).fetchall()[0][0]
    return dg.AssetCheckResult(check_name="amounts_are_whole_minor_units", passed=bad == 0, metadata={"bad_lines": bad})


@_blocking(False)
def unpriced_usage(con, paths: Paths, window: Window) -> dg.AssetCheckResult:
    """Usage of a meter the plan prices, in a dimension no price row covers (e.g. an unknown model): not billed."""
    models = load_project().models
    rows = con.sql(
        """
        with usage as (select * from read_parquet($usage)),
        plans as (select * from read_parquet($plans)),
        prices as (select * from read_parquet($prices))
        select usage.customer_id, usage.meter_id, usage.dimension
        from usage
        inner join plans on usage.customer_id = plans.customer_id
        where exists (
            select 1 from prices
            where prices.plan_id = plans.plan_id and prices.version = plans.plan_version and prices.meter_id = usage.meter_id
        )
        and not exists (
            select 1 from prices
            where prices.plan_id = plans.plan_id and prices.version = plans.plan_version and prices.meter_id = usage.meter_id
                and (prices.dimension = '' or prices.dimension = usage.dimension)
        )
        order by all
        """,
        params={
            "usage": str(partition_file(paths, models["fct_usage_by_month"], window)),
            "plans": str(partition_file(paths, models["dim_subscription_periods_by_month"], window)),
            "prices": str(seed_snapshot_path(paths, "prices")),
        },
    ).fetchall()
    return dg.AssetCheckResult(
        check_name="unpriced_usage",
        passed=not rows,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"unpriced": dg.MetadataValue.json([f"{c}/{m}/{d}" for c, m, d in rows])},
    )


CHECKS: dict[str, list[Callable]] = {
    "fct_series_edges_by_day": [scrape_completeness],
    "fct_usage_by_day": [no_negative_usage],
    "fct_usage_by_month": [daily_sum_equals_month],
    "fct_rated_usage": [unpriced_usage],
    "fct_invoice_lines": [amounts_are_whole_minor_units],
}


def evaluate(model: Model, paths: Paths, window: Window | None, table, *, published: bool = False) -> list[tuple[dg.AssetCheckResult, bool]]:
    """Every check of ``model`` on ``table`` (its new rows, or with ``published`` its published partition),
    with whether it blocks."""
    with session() as con:
        con.register("partition", table)
        results = [(grain_is_unique(model, table if published else None), True)] if model.grain else []
        results += [(check(con, paths, window), check.blocking) for check in CHECKS.get(model.name, [])]
    return results


def evaluate_published(model: Model, paths: Paths, window: Window | None) -> list[dg.AssetCheckResult]:
    """The checks run alone (from the UI's check page): on the partition as it was published."""
    path = partition_file(paths, model, window)
    if not path.exists():
        what = f"{window.start}" if window else "the table"
        names = (["grain_is_unique"] if model.grain else []) + [c.__name__ for c in CHECKS.get(model.name, [])]
        return [
            dg.AssetCheckResult(
                check_name=name,
                passed=False,
                metadata={"path": dg.MetadataValue.path(str(path))},
                description=f"{model.name} has no published partition for {what}; materialize it first",
            )
            for name in names
        ]
    return [r for r, _ in evaluate(model, paths, window, pq.read_table(path), published=True)]
