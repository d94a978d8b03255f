"""Invoice periods and status: a month's period, its finalization date, draft or finalized.

An invoice is a ``draft`` until its period has closed and the grace period for late data has
passed; then it is ``finalized``: it gets a gap-free per-year number (``billing.numbering``) and
its files are never rewritten (``billing.store``).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from billing_dags.billing.errors import InvoiceError
from billing_dags.core import calendar
from billing_dags.core.calendar import next_month
from billing_dags.core.settings import DEFAULT_GRACE_DAYS


def checked_month(month: date) -> date:
    """``month`` if it is a ``datetime.date`` on the first day of a month, else an InvoiceError."""
    if isinstance(month, datetime) or not isinstance(month, date):
        raise InvoiceError(f"month {month!r} must be a datetime.date (the first day of the month)")
    if month.day != 1:
        raise InvoiceError(f"month {month.isoformat()} is not the first day of a month; pass {calendar.month_start(month).isoformat()}")
    return month


def period_end(month_start: date) -> date:
    """The exclusive end of a monthly period: the first day of the next month."""
    return next_month(checked_month(month_start))


def _utc(now: datetime) -> datetime:
    if not isinstance(now, datetime):
        raise InvoiceError(f"now {now!r} must be a datetime")
    if now.tzinfo is None or now.utcoffset() is None:
        raise InvoiceError(f"now {now.isoformat()} has no time zone; pass an aware datetime, e.g. datetime.now(timezone.utc)")
    return now.astimezone(UTC)


def checked_grace(grace_days: int) -> int:
    """``grace_days`` if it is a non-negative int, else an InvoiceError."""
    if isinstance(grace_days, bool) or not isinstance(grace_days, int) or grace_days < 0:
        raise InvoiceError(f"grace_days {grace_days!r} must be a non-negative integer number of days")
    return grace_days


def finalization_date(month_start: date, grace_days: int = DEFAULT_GRACE_DAYS) -> date:
    """The day (00:00 UTC) from which the month's invoices are final: period end + grace days."""
    return period_end(month_start) + timedelta(days=checked_grace(grace_days))


def invoice_status(month_start: date, now: datetime, grace_days: int = DEFAULT_GRACE_DAYS) -> str:
    """``finalized`` once ``now`` >= period end (00:00 UTC of the next month's first day) + grace days, else ``draft``."""
    fin = finalization_date(month_start, grace_days)
    cutoff = datetime(fin.year, fin.month, fin.day, tzinfo=UTC)
    return "finalized" if _utc(now) >= cutoff else "draft"
