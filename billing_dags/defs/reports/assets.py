"""The daily summary report (Markdown + HTML) for each UTC day."""

import dagster as dg

from billing_dags.core.settings import launched_settings_tags
from billing_dags.defs.shared.partitions import SINGLE_RUN, billing_daily, materialize_each
from billing_dags.defs.shared.resources import WarehouseResource
from billing_dags.operations.reports import build_daily_summary, write_daily_summary


@dg.asset(
    partitions_def=billing_daily,
    group_name="reports",
    kinds={"html", "markdown"},
    # after the day's meter events are sent: the summary lists the events Stripe no longer accepts
    deps=["fct_usage_by_day", "fct_anomaly_flags_by_day", "seed_meters", "stripe_meter_events"],
    backfill_policy=SINGLE_RUN,
)
def daily_summary(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
    """Daily summary: active customers, bytes, shares accepted/rejected, top 10 by bytes, anomalies, meter events too old for Stripe."""
    paths = warehouse.paths()

    def one_day(key, window) -> dict:
        summary = build_daily_summary(paths, window.start)
        written = write_daily_summary(paths, summary)
        return {
            "active_customers": summary.active_customers,
            "bytes_total": str(summary.bytes_total),
            "anomalies": len(summary.flags),
            "markdown": dg.MetadataValue.path(str(written[0])),
            "html": dg.MetadataValue.path(str(written[1])),
        }

    return materialize_each(context, one_day)


@dg.asset(group_name="reports", kinds={"prometheus"}, deps=["fct_usage_by_day", "invoices"])
def billing_metrics_textfile(warehouse: WarehouseResource) -> dg.MaterializeResult:
    """Billing aggregates in Prometheus exposition format (data/metrics/billing.prom) for a textfile collector."""
    from billing_dags.operations.metrics_export import export_metrics

    paths = warehouse.paths()
    dest = paths.data_dir / "metrics" / "billing.prom"
    dest.parent.mkdir(parents=True, exist_ok=True)
    text = export_metrics(paths, None, dest)
    return dg.MaterializeResult(metadata={"bytes": len(text), "series": text.count(b"\n") - text.count(b"\n#"), "path": dg.MetadataValue.path(str(dest))})


metrics_job = dg.define_asset_job(
    "billing_metrics_job", selection=[billing_metrics_textfile], description="Refresh data/metrics/billing.prom.", tags=launched_settings_tags()
)
metrics_schedule = dg.ScheduleDefinition(
    name="billing_metrics_schedule",
    job=metrics_job,
    cron_schedule="15 * * * *",
    execution_timezone="UTC",
    description="Every hour: refresh the billing metrics Grafana reads (month to date and projected).",
)
