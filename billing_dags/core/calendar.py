"""Months and days in UTC: parsing ``YYYY-MM``, the next month, a month's days, the last complete month."""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone

from billing_dags.core.errors import InputError

_MONTH_RE = re.compile(r"^(\d{4})-(\d{2})$")


def utc_today() -> date:
    return datetime.now(timezone.utc).date()


def parse_month(value: str) -> date:
    """``YYYY-MM`` as the month's first day; an InputError naming the value otherwise."""
    m = _MONTH_RE.match(value or "")
    if not m or not 1 <= int(m.group(2)) <= 12:
        raise InputError(f"month {value!r} is not YYYY-MM; give e.g. --month 2026-10")
    return date(int(m.group(1)), int(m.group(2)), 1)


def next_month(month: date) -> date:
    """The first day of the month after ``month``'s."""
    return (month.replace(day=28) + timedelta(days=4)).replace(day=1)


def month_days(month: date) -> list[date]:
    """Every day of ``month``, in order."""
    end = next_month(month)
    return [month + timedelta(days=i) for i in range((end - month).days)]


def last_complete_month(today: date | None = None) -> date:
    """The first day of the latest month that has ended before ``today`` (default: today, UTC)."""
    today = today or utc_today()
    return (today.replace(day=1) - timedelta(days=1)).replace(day=1)
