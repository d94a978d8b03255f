"""Month arithmetic (billing_dags/core/calendar.py) against every month of four years, leap years included."""

from __future__ import annotations

import calendar as stdlib
from datetime import date, timedelta

from billing_dags.core.calendar import (
    days,
    days_in_month,
    last_complete_month,
    month_days,
    month_ms,
    month_start,
    next_month,
    previous_month,
)


def test_every_day_of_four_years():
    day = date(2023, 1, 1)
    while day < date(2027, 1, 1):
        n = stdlib.monthrange(day.year, day.month)[1]
        first = date(day.year, day.month, 1)
        assert month_start(day) == first
        assert next_month(day) == first + timedelta(days=n)
        assert previous_month(day) == (first - timedelta(days=1)).replace(day=1)
        assert days_in_month(day) == n and month_ms(day) == n * 86_400_000
        assert month_days(day) == [first + timedelta(days=i) for i in range(n)] == days(first, next_month(day))
        assert days(day, day) == [] and days(next_month(day), day) == []
        assert last_complete_month(day) == previous_month(day)
        day += timedelta(days=1)


def test_year_ends():
    assert next_month(date(2026, 12, 31)) == date(2027, 1, 1)
    assert previous_month(date(2027, 1, 15)) == date(2026, 12, 1)
    assert days_in_month(date(2024, 2, 10)) == 29 and days_in_month(date(2025, 2, 10)) == 28
