"""`billing dispute`: how a customer's invoice follows from their raw samples."""

from __future__ import annotations

from pathlib import Path

from billing_dags.cli.common import CliError, console, emit, month_hint, paths_of, require_customer
from billing_dags.core.calendar import month_days, next_month, parse_month, utc_today
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
    usage_so_far = f"`billing usage {args.customer} --month {month:%Y-%m}`"
    if month > utc_today():
        raise CliError(f"no dispute for {args.customer} in {month:%Y-%m}: {month_hint(month, paths.seeds_dir)}")
    if not seeds_materialized(paths):
        raise CliError(f"nothing is computed for {month:%Y-%m} in {paths.data_dir} yet; {month_hint(month, paths.seeds_dir, then=usage_so_far)}")
    try:
        dispute = build_dispute(paths, args.customer, month, meter_id=args.meter, by=args.by)
    except DisputeError as e:
        raise CliError(str(e)) from None
    if not len(dispute.evidence):
        raise CliError(no_evidence(paths, args.customer, month, dispute.invoice is not None, usage_so_far))
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
        columns = {
            "line_number": "#",
            "line_type": "type",
            "meter_id": "meter",
            "dimension": "dimension",
            "quantity": "quantity",
            "unit": "unit",
            "included_quantity": "included",
            "billable_quantity": "billable",
            "unit_price": "unit price",
            "amount": "amount",
        }
        emit(
            [{name: l.get(k) for k, name in columns.items()} for l in dispute.lines],
            "table",
            title=f"Invoice {dispute.invoice['invoice_number']} ({dispute.invoice['status']}) lines: quantity - included = billable, x unit price = amount",
        )
        if any(l.get("line_type") == "usage" and l.get("billable_quantity") is None for l in dispute.lines):
            console.print("A usage line without included and billable quantities bills other figures than the recomputed month; its formula:", highlight=False)
            for l in dispute.lines:
                if l.get("line_type") == "usage" and l.get("billable_quantity") is None and l.get("formula"):
                    console.print(f"  line {l['line_number']}: {l['formula']}", highlight=False)
    elif dispute.invoice is None:
        console.print(f"No invoice for {args.customer} in {month:%Y-%m} yet: {month_hint(month, paths.seeds_dir, then=usage_so_far)}.", highlight=False)
    tie = dispute.tie_out
    if tie.get("meters") and not tie.get("month_computed"):
        console.print(
            f"Raw samples vs the recomputed month: {month:%Y-%m} is not computed yet (no fct_usage_by_month partition), "
            f"so there is nothing to tie out against; {month_hint(month, paths.seeds_dir, then=usage_so_far)}.",
            highlight=False,
        )
    elif tie.get("meters"):
        console.print("Raw samples vs the recomputed month (fct_usage_by_month):")
    for meter, t in tie.get("meters", {}).items() if tie.get("month_computed") else ():
        mark = "ties out" if t["ties_out"] else "DOES NOT TIE OUT"
        recomputed = _fmt(t["recomputed"]) if t["recomputed"] is not None else "nothing"
        console.print(f"  {meter}: raw {_fmt(t['raw'])} vs recomputed month {recomputed} — {mark}", highlight=False)
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


def seeds_materialized(paths) -> bool:
    """Whether the data dir holds the seed snapshots every computed month is built from."""
    from billing_dags.models.sqlmodels import seed_snapshot_path

    return seed_snapshot_path(paths, "customers").exists()


def no_evidence(paths, customer: str, month, invoiced: bool, usage_so_far: str) -> str:
    """Why a customer has no raw samples in a month, and what to do: a month not ended or never ingested, a month
    whose raw data retention removed (the invoice manifest still lists what it was billed from), or raw data
    that holds other customers' series only."""
    days = [d for d in month_days(month) if (paths.raw_samples / f"date={d}").exists()]
    where = f"no raw samples for {customer} in {month:%Y-%m} under {paths.raw_samples}"
    if days:
        return (
            f"{where}, though {len(days)} days of it hold other series; check which series bill to {customer}: "
            f"billing sql \"select series_id, metric, labels from dim_series where customer_id = '{customer}'\""
        )
    if invoiced and next_month(month) <= utc_today():
        return (
            f"{where}: the month's raw data is gone (retention removes raw days after their retention period); "
            "the invoice manifest lists the hashes it was billed from"
        )
    return f"{where}; {month_hint(month, paths.seeds_dir, then=usage_so_far)}"
