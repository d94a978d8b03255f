"""Monthly invoicing: drafts on the 1st for the previous month, finalization after the grace period."""

import dagster as dg

from billing_dags.core.calendar import last_complete_month
from billing_dags.core.settings import DEFAULT_GRACE_DAYS
from billing_dags.defs.jobs import monthly_invoicing

monthly_invoice_draft_schedule = dg.build_schedule_from_partitioned_job(
    monthly_invoicing,
    day_of_month=1,
    hour_of_day=2,
    minute_of_hour=0,
    name="monthly_invoice_draft_schedule",
    description=(
        "On the 1st at 02:00 UTC: last month's partition of monthly_invoicing (monthly usage, rating, draft "
        f"invoices; late data may still arrive for {DEFAULT_GRACE_DAYS} days)."
    ),
)


@dg.schedule(
    job=monthly_invoicing,
    cron_schedule=f"0 3 {DEFAULT_GRACE_DAYS + 1} * *",
    execution_timezone="UTC",
    name="monthly_invoice_finalization_schedule",
    description=f"Finalizes last month's invoices once the {DEFAULT_GRACE_DAYS}-day grace period for late data has passed.",
)
def monthly_invoice_finalization_schedule(context: dg.ScheduleEvaluationContext):
    """On the day the grace period has passed, rerun the previous month so its invoices finalize."""
    today = context.scheduled_execution_time.date()
    previous = last_complete_month(today)
    key = previous.isoformat()
    return dg.RunRequest(run_key=f"finalize-{key}", partition_key=key, tags={"billing/reason": "finalize"})
