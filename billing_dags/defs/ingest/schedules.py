"""Daily: yesterday's usage, shortly after midnight UTC."""

import dagster as dg

from billing_dags.defs.jobs import daily_usage

daily_usage_schedule = dg.build_schedule_from_partitioned_job(
    daily_usage,
    hour_of_day=0,
    minute_of_hour=30,
    name="daily_usage_schedule",
    description=("Every day at 00:30 UTC: yesterday's partition of daily_usage (ingest the UTC day, compute its usage, send it to Stripe)."),
)
