"""`billing flags list|ack`: anomaly flags of a month, and acknowledging a critical one."""

from __future__ import annotations

from billing_dags.cli.common import CliError, console, emit, paths_of, require_customer
from billing_dags.core.calendar import next_month, parse_month, utc_today
from billing_dags.operations.flags import _ack_key, _quantity, acknowledge, month_flags, read_acks


def register(sub) -> None:
    p = sub.add_parser("flags", help="anomaly flags: list them, acknowledge critical ones")
    fsub = p.add_subparsers(dest="flags_command", required=True, metavar="ACTION")
    lp = fsub.add_parser("list", help="flags raised in a month")
    lp.add_argument("--month", required=True, help="YYYY-MM")
    lp.add_argument("--severity", choices=["info", "warning", "critical"], help="only this severity")
    lp.add_argument("--customer", help="only this customer")
    lp.add_argument("--format", choices=["table", "json", "csv"], default="table")
    lp.set_defaults(func=cmd_list)
    ap = fsub.add_parser("ack", help="acknowledge a flag so the customer's invoice can finalize")
    ap.add_argument("customer")
    ap.add_argument("--month", required=True, help="YYYY-MM")
    ap.add_argument("--rule", required=True)
    ap.add_argument("--meter", default="", help="only this meter (default: every meter the rule flagged)")
    ap.add_argument("--by", required=True, help="who acknowledges")
    ap.add_argument("--reason", required=True, help="why the flag is not a billing problem")
    ap.set_defaults(func=cmd_ack)


def cmd_list(args) -> int:
    paths = paths_of(args)
    month = parse_month(args.month)
    if args.customer:
        require_customer(paths, args.customer)
    acked = {_ack_key(a) for a in read_acks(paths)}
    rows = []
    for f in month_flags(paths, month):
        if args.severity and f["severity"] != args.severity:
            continue
        if args.customer and f["customer_id"] != args.customer:
            continue
        rows.append(
            {
                "day": f["day"],
                "customer": f["customer_id"] or "(none)",
                "meter": f["meter_id"],
                "rule": f["rule"],
                "severity": f["severity"],
                "value": f"{f['value'].normalize():f}",
                "threshold": f"{f['threshold'].normalize():f}",
                "quantity": _quantity(f),
                "acknowledged": (f["customer_id"], f"{month:%Y-%m}", f["meter_id"], f["rule"]) in acked,
                "detail": f["detail"],
            }
        )
    if not rows:
        console.print(f"no flags in {month:%Y-%m}" + (" (fct_anomaly_flags_by_day not materialized yet?)" if not month_flags(paths, month) else ""))
        return 0
    emit(rows, args.format, title=f"Anomaly flags {month:%Y-%m}")
    return 0


def cmd_ack(args) -> int:
    paths = paths_of(args)
    month = parse_month(args.month)
    require_customer(paths, args.customer)
    try:
        result = acknowledge(paths, args.customer, month, args.rule, args.meter, args.by, args.reason)
    except ValueError as e:
        raise CliError(str(e)) from None
    for a in result["acknowledged"]:
        console.print(f"acknowledged {a['rule']} on {a['meter_id']} for {a['customer_id']} {a['month']} by {a['by']}: {a['reason']}")
    if next_month(month) <= utc_today():
        console.print(f"rerun the month's invoices to finalize: billing run --month {month:%Y-%m} --no-ingest (or the invoices asset in the UI)")
    else:
        console.print(f"{month:%Y-%m} has not ended: its invoice, drafted after the month ends, finalizes with this acknowledgement")
    return 0
