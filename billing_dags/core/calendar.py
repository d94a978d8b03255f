"""Calendar months in UTC dates: the one place month arithmetic is written."""

from __future__ import annotations

from datetime import date, timedelta

DAY_MS = 86_400_000


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


def month_days(day: date) -> list[date]:
    """Every day of the month of ``day``, in order."""
    start = month_start(day)
    return [start + timedelta(days=i) for i in range(days_in_month(day))]


def month_ms(day: date) -> int:
    """Milliseconds in the month of ``day``."""
    return days_in_month(day) * DAY_MS


def last_complete_month(today: date) -> date:
    """The first day of the last month that has ended before ``today``."""
    return previous_month(today)
