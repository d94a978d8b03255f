"""Daily: yesterday's usage, shortly after midnight UTC."""

import dagster as dg


def daily_usage_schedule(job) -> dg.ScheduleDefinition:
    return dg.build_schedule_from_partitioned_job(
        job,
        hour_of_day=0,
        minute_of_hour=30,
        name="daily_usage_schedule",
        description=(
            "Every day at 00:30 UTC: yesterday's partition of daily_usage (ingest the UTC day, compute its usage, "
            "send it to Stripe)."
        ),
    )
