"""Daily: yesterday's usage, shortly after midnight UTC."""

from datetime import timedelta

import dagster as dg

from billing_dags.defs.jobs import daily_usage
from billing_dags.defs.shared.partitions import SHARDS

if SHARDS == 1:
    daily_usage_schedule = dg.build_schedule_from_partitioned_job(
        daily_usage,
        hour_of_day=0,
        minute_of_hour=30,
        name="daily_usage_schedule",
        description=("Every day at 00:30 UTC: yesterday's partition of daily_usage (ingest the UTC day, compute its usage, send it to Stripe)."),
    )
else:

    @dg.schedule(
        job=daily_usage,
        cron_schedule="30 0 * * *",
        execution_timezone="UTC",
        name="daily_usage_schedule",
        description=(
            "Sharded (BILLING_SHARDS > 1): every day at 00:30 UTC, yesterday's ingest only (every shard of the day). "
            "sharded_days_sensor then computes its (day, shard) models and the Stripe hand-off in one asset backfill."
        ),
    )
    def daily_usage_schedule(context: dg.ScheduleEvaluationContext):
        from billing_dags.defs.ingest.sensors import INGEST_ASSETS

        day = (context.scheduled_execution_time - timedelta(days=1)).date().isoformat()
        return dg.RunRequest(run_key=f"ingest-{day}", partition_key=day, asset_selection=[dg.AssetKey(k) for k in INGEST_ASSETS])
