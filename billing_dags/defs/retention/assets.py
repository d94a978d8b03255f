"""Retention of raw samples and landing segments (90 days by default), scheduled daily."""

import dagster as dg

from billing_dags.core.settings import launched_settings_tags
from billing_dags.defs.shared.resources import WarehouseResource
from billing_dags.operations import retention


class RetentionConfig(dg.Config):
    retention_days: int = retention.DEFAULT_RETENTION_DAYS
    dry_run: bool = False


@dg.asset(group_name="retention", kinds={"parquet"})
def raw_retention(context: dg.AssetExecutionContext, config: RetentionConfig, warehouse: WarehouseResource) -> dg.MaterializeResult:
    """Removes raw days and landing files older than the retention period, never behind a draft invoice."""
    paths = warehouse.paths()
    candidates = retention.plan(paths, retention_days=config.retention_days)
    if config.dry_run:
        for c in candidates:
            context.log.info(f"would {c.action} {c.path}: {c.reason}")
        figures = {"removed": 0, "kept": sum(c.action == "keep" for c in candidates), "bytes_freed": 0}
    else:
        figures = retention.apply(candidates, log=context.log.info)
    return dg.MaterializeResult(
        metadata={
            **figures,
            "dry_run": config.dry_run,
            "retention_days": config.retention_days,
            "would_remove": sum(c.action == "remove" for c in candidates),
            "kept_days": dg.MetadataValue.json(sorted({str(c.day) for c in candidates if c.action == "keep"})),
        }
    )


retention_job = dg.define_asset_job("raw_retention_job", selection=[raw_retention], description="Daily retention of raw data.", tags=launched_settings_tags())
retention_schedule = dg.ScheduleDefinition(
    name="raw_retention_schedule",
    job=retention_job,
    cron_schedule="0 1 * * *",
    execution_timezone="UTC",
    description="Every day at 01:00 UTC: remove raw data past the retention period.",
)
