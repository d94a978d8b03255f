"""`billing report daily`: the daily summary of a UTC day."""

from __future__ import annotations

from datetime import date

from billing_dags.cli.common import CliError, billable, paths_of
from billing_dags.operations.reports import build_daily_summary, to_html, to_markdown, write_daily_summary


def register(sub) -> None:
    p = sub.add_parser("report", help="reports: the daily summary")
    rsub = p.add_subparsers(dest="report_command", required=True, metavar="REPORT")
    dp = rsub.add_parser("daily", help="the daily summary of a UTC day (Markdown)")
    dp.add_argument("--date", required=True, help="YYYY-MM-DD")
    dp.add_argument("--format", choices=["markdown", "html"], default="markdown")
    dp.set_defaults(func=cmd_daily)


def cmd_daily(args) -> int:
    import sys

    try:
        day = date.fromisoformat(args.date)
    except ValueError:
        raise CliError(f"--date {args.date!r} is not YYYY-MM-DD; give e.g. --date 2026-10-15") from None
    paths = paths_of(args)
    try:
        summary = build_daily_summary(paths, day)
    except FileNotFoundError:
        raise CliError(f"no usage computed for {day} under {paths.models / 'fct_usage_by_day'}; {day_hint(paths, day)}") from None
    write_daily_summary(paths, summary)
    sys.stdout.write(to_markdown(summary) if args.format == "markdown" else to_html(summary))
    return 0


def day_hint(paths, day: date) -> str:
    """What computes a day's usage, right for the day: nothing yet (it has not ended), `billing run` for a month it
    accepts, else the daily schedule or the Dagster UI."""
    from billing_dags.core.calendar import utc_today

    today = utc_today()
    if day >= today:
        return f"{day} has not ended yet (today is {today}); its usage is computed after it ends"
    month = day.replace(day=1)
    if not billable(month, paths.seeds_dir, today):
        return f"the daily schedule computes each UTC day after it ends; or materialize fct_usage_by_day for {day} in the Dagster UI"
    return f"materialize it with `billing run --month {month:%Y-%m}` (or fct_usage_by_day for {day} in the Dagster UI)"
