"""`billing usage` for the open month: month-to-date, projected, projected total."""

from __future__ import annotations

from datetime import date

from billing_dags.billing.projection import NOTE, _error, usage_report
from billing_dags.cli.common import console, emit
from billing_dags.core.settings import Paths


def emit_usage_report(paths: Paths, customer_id: str, month: date, fmt_name: str) -> int:
    """`billing usage CUSTOMER --month <current month>`: month-to-date, projected, projected total."""
    import json

    report = usage_report(paths, customer_id, month)
    if not report["usage"] and not report["projected_lines"]:
        raise _error(
            f"no usage and no subscription for {customer_id} in {month:%Y-%m} so far "
            f"({report['days_elapsed']} days computed); check the customer and seeds/subscriptions.csv"
        )
    total = f"{report['projected_total']} {report['currency'].upper()}" if report["currency"] else "none"
    if fmt_name == "json":
        print(json.dumps(report, indent=2))
    elif fmt_name == "csv":
        rows = [{**u, "days_elapsed": report["days_elapsed"], "days_in_month": report["days_in_month"]} for u in report["usage"]]
        rows.append(
            {
                "meter": "projected_total",
                "dimension": NOTE,
                "aggregation": "",
                "month_to_date": "",
                "projected": report["projected_total"] or "",
                "unit": report["currency"] or "",
                "days": "",
                "days_elapsed": report["days_elapsed"],
                "days_in_month": report["days_in_month"],
            }
        )
        emit(rows, "csv")
    else:
        title = (
            f"Usage of {customer_id} in {month:%Y-%m} (open: {report['days_elapsed']} of "
            f"{report['days_in_month']} days computed, through {report['last_computed_day']})"
        )
        emit(report["usage"], "table", title=title)
        lines = [{k: l[k] for k in ("line", "type", "description", "quantity", "unit", "amount")} for l in report["projected_lines"]]
        emit(lines, "table", title=f"Projected charges for {month:%Y-%m} ({NOTE})")
        console.print(f"[bold]Projected total: {total}[/] ({NOTE}; before prepaid credits and adjustments)")
    return 0
