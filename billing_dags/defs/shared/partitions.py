"""The two partitions of billing_dags, defined once and imported everywhere."""

from datetime import date, datetime

import dagster as dg

from billing_dags.settings import partitions_start
from billing_dags.sqlmodels import Window

#: the first day of both partitions (YYYY-MM-DD): BILLING_PARTITIONS_START, else the first month of the
#: earliest subscription in the seeds (settings.partitions_start); read once, when the code location loads
PARTITIONS_START = partitions_start().isoformat()

#: UTC days; today is not a partition until it has ended
billing_daily = dg.DailyPartitionsDefinition(start_date=PARTITIONS_START, timezone="UTC")
#: calendar months (UTC); the current month is not a partition until it has ended
billing_monthly = dg.MonthlyPartitionsDefinition(start_date=PARTITIONS_START, timezone="UTC")

BY_NAME: dict[str, dg.PartitionsDefinition | None] = {
    "billing_daily": billing_daily,
    "billing_monthly": billing_monthly,
    "none": None,
}


def window_of(context: dg.AssetExecutionContext) -> Window | None:
    """The half-open [start, end) window of the partition being materialized."""
    if not context.has_partition_key:
        return None
    tw = context.partition_time_window
    return Window(_as_date(tw.start), _as_date(tw.end))


def _as_date(d: datetime) -> date:
    return date(d.year, d.month, d.day)
