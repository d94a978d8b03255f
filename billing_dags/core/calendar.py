"""Months and days in UTC, the one place month arithmetic is written: parsing ``YYYY-MM``, a month's
start, the next and previous month, a month's days and length, a range of days, the last complete month."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

from billing_dags.core.errors import InputError

_MONTH_RE = re.compile(r"^(\d{4})-(\d{2})$")
DAY_MS = 86_400_000


def utc_today() -> date:
    return datetime.now(UTC).date()


def parse_month(value: str) -> date:
    """``YYYY-MM`` as the month's first day; an InputError naming the value otherwise."""
    m = _MONTH_RE.match(value or "")
    if not m or not 1 <= int(m.group(2)) <= 12:
        raise InputError(f"month {value!r} is not YYYY-MM; give e.g. --month 2026-10")
    return date(int(m.group(1)), int(m.group(2)), 1)


def month_start(day: date) -> date:
    """The first day of the month of ``day``."""
    return day.replace(day=1)


def next_month(day: date) -> date:
    """The first day of the month after the month of ``day``."""
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)


def previous_month(day: date) -> date:
    """The first day of the month before the month of ``day``."""
    return date(day.year - (day.month == 1), (day.month - 2) % 12 + 1, 1)


def days_in_month(day: date) -> int:
    """How many days the month of ``day`` has."""
    return (next_month(day) - month_start(day)).days


def days(start: date, end: date) -> list[date]:
    """Every day of the half-open range [start, end), in order."""
    return [start + timedelta(days=i) for i in range((end - start).days)]


def month_days(day: date) -> list[date]:
    """Every day of the month of ``day``, in order."""
    start = month_start(day)
    return [start + timedelta(days=i) for i in range(days_in_month(day))]


def month_ms(day: date) -> int:
    """Milliseconds in the month of ``day``."""
    return days_in_month(day) * DAY_MS


def last_complete_month(today: date | None = None) -> date:
    """The first day of the latest month that has ended before ``today`` (default: today, UTC)."""
    return previous_month(today or utc_today())
