"""`billing dispute`: how a customer's invoice follows from their raw samples."""

from __future__ import annotations

from pathlib import Path

from billing_dags.cli.common import CliError, console, emit, paths_of, require_customer
from billing_dags.core.calendar import parse_month
from billing_dags.core.money import format_minor
from billing_dags.operations.disputes import BUCKETS_MS, DisputeError, _fmt, build_dispute, export_evidence


def register(sub) -> None:
    p = sub.add_parser("dispute", help="how a customer's invoice follows from their raw samples (support)")
    p.add_argument("customer")
    p.add_argument("--month", required=True, help="YYYY-MM")
    p.add_argument("--meter", default="", help="only this meter")
    p.add_argument("--by", choices=sorted(BUCKETS_MS), default="day", help="breakdown per hour or day (default day)")
    p.add_argument("--export", metavar="DIR", help="write an evidence pack (Parquet, CSV, SQL) to DIR")
    p.set_defaults(func=cmd_dispute)


def cmd_dispute(args) -> int:
    paths = paths_of(args)
    month = parse_month(args.month)
    require_customer(paths, args.customer)
    try:
        dispute = build_dispute(paths, args.customer, month, meter_id=args.meter, by=args.by)
    except DisputeError as e:
        raise CliError(str(e)) from None
    if not len(dispute.evidence):
        raise CliError(
            f"no raw samples for {args.customer} in {month:%Y-%m} under {paths.raw_samples}; "
            f"raw data older than the retention period is gone — the invoice manifest lists the hashes it was billed from"
        )
    emit(
        [{**r, "increase": _fmt(r["increase"])} for r in dispute.breakdown],
        "table",
        title=f"{args.customer} {month:%Y-%m}: usage by {args.by} from raw samples",
    )
    emit([{**t, "increase": _fmt(t["increase"])} for t in dispute.totals], "table", title="Totals per meter (raw evidence)")
    if dispute.events:
        emit(dispute.events[:200], "table", title=f"Resets, reappearances and gaps over 15 min ({len(dispute.events)})")
    else:
        console.print("No resets, reappearances or gaps over 15 minutes.")
    if dispute.lines:
        emit(
            [
                {
                    k: l.get(k)
                    for k in (
                        "line_number",
                        "line_type",
                        "meter_id",
                        "dimension",
                        "quantity",
                        "unit",
                        "included_quantity",
                        "billable_quantity",
                        "unit_price",
                        "amount",
                    )
                }
                for l in dispute.lines
            ],
            "table",
            title=f"Invoice {dispute.invoice['invoice_number']} ({dispute.invoice['status']}) lines",
        )
    elif dispute.invoice is None:
        console.print(f"No invoice for {args.customer} in {month:%Y-%m} yet (billing run --month {month:%Y-%m}).")
    tie = dispute.tie_out
    console.print("Raw samples vs the recomputed month (fct_usage_by_month):")
    for meter, t in tie.get("meters", {}).items():
        mark = "ties out" if t["ties_out"] else "DOES NOT TIE OUT"
        console.print(f"  {meter}: raw {_fmt(t['raw'])} vs recomputed month {_fmt(t['recomputed'])} — {mark}", highlight=False)
    versus = tie.get("invoice_vs_recomputed")
    if versus:
        exp = int(dispute.invoice["minor_unit_exponent"])
        amount = lambda m: "" if m is None else format_minor(m, exp)  # noqa: E731
        console.print(f"The recomputed month (fct_invoice_lines) vs invoice {versus['invoice_number']} ({versus['status']}):")
        for r in versus["lines"]:
            what = " ".join(x for x in (r["line_type"], r["meter_id"], r["dimension"]) if x)
            console.print(
                f"  {what}: invoice {versus['invoice_number']} ({versus['status']}) {_fmt(r['invoiced_quantity'])} {r['unit']}, "
                f"{amount(r['invoiced_amount_minor'])} vs recomputed {_fmt(r['recomputed_quantity'])} {r['unit']}, "
                f"{amount(r['recomputed_amount_minor'])} — {'same' if r['same'] else 'DIFFERS'}",
                highlight=False,
            )
        console.print(versus.get("explanation") or f"The {versus['status']} invoice bills the recomputed month.", highlight=False)
    if "invoice_total_minor" in tie:
        console.print(f"invoice lines sum to {tie['lines_sum_minor']} minor units; invoice total {tie['invoice_total_minor']}")
    if args.export:
        written = export_evidence(dispute, Path(args.export))
        console.print(f"evidence pack: {', '.join(str(p) for p in written)}")
    return 0
