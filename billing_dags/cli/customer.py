"""`billing customer ID` and `billing customers`: one customer at a glance for support, and who the customers are."""

from __future__ import annotations

import json

from billing_dags.cli.common import CliError, console, emit, paths_of, print_table, require_customer, seeds_of, table


def register(sub) -> None:
    p = sub.add_parser("customer", help="one customer for support: plan, usage to date and projected bill, flags, invoices, credits")
    p.add_argument("customer")
    p.add_argument("--invoices", type=int, default=6, help="how many of the latest invoices to show (default 6)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_customer)
    p = sub.add_parser("customers", help="every customer in the seeds with their plan today")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.set_defaults(func=cmd_customers)


def cmd_customers(args) -> int:
    from billing_dags.operations.customers import customer_list

    paths = paths_of(args)
    emit(customer_list(seeds_of(paths)), args.format, title=f"Customers ({paths.seeds_dir / 'customers.csv'})")
    return 0


def cmd_customer(args) -> int:
    from billing_dags.operations.customers import customer_summary

    paths = paths_of(args)
    require_customer(paths, args.customer)
    if args.invoices < 1:
        raise CliError(f"--invoices {args.invoices} must be at least 1")
    doc = customer_summary(paths, args.customer, invoices=args.invoices)
    if args.format == "json":
        print(json.dumps(doc, indent=2, default=str))
        return 0
    c = doc["customer"]
    console.print(
        f"[bold]{c['customer_id']}[/] {c['name']} — {c['setup']} set-up, billed in {c['currency'].upper()}, usage from {c['usage_source']}, "
        f"Stripe {c['stripe_customer_id'] or '(none)'}; as of {doc['as_of']} (UTC)",
        highlight=False,
    )
    subs = doc["subscriptions"]
    if subs:
        rows = [[s["plan_id"], s["plan_name"], s["start_date"], s["end_date"] or "open-ended", s["status"]] for s in subs]
        print_table(table(["plan", "name", "from", "until (exclusive)", "status"], rows, "Subscriptions"))
    else:
        console.print("No subscription in seeds/subscriptions.csv: usage is flagged, not billed.")

    cur = doc["current_month"]
    if cur.get("usage") is None:
        console.print(cur["note"], highlight=False)
    else:
        title = f"Usage to date, {cur['month']} (open: {cur['days_elapsed']} of {cur['days_in_month']} days computed, through {cur['last_computed_day']})"
        rows = [[u["meter"], u["dimension"], u["month_to_date"], u["projected"], u["unit"]] for u in cur["usage"]]
        if rows:
            print_table(table(["meter", "dimension", "to date", "projected", "unit"], rows, title))
        else:
            console.print(f"No usage in {cur['month']} so far ({cur['days_elapsed']} days computed).")
        if cur["projected_total"] is not None:
            console.print(
                f"Projected bill for {cur['month']}: [bold]{cur['projected_total']} {cur['currency'].upper()}[/] "
                "(projected, not an invoice; before prepaid credits and adjustments)",
                highlight=False,
            )

    flags = [f for f in doc["open_flags"] if f["severity"] != "info"]
    info = len(doc["open_flags"]) - len(flags)
    more = f" ({info} info flags besides: billing flags list --month YYYY-MM --customer {c['customer_id']})" if info else ""
    if flags:
        rows = [
            [f["day"], f["meter"], f["rule"], f"{f['severity']}: holds the invoice" if f["holds_invoice"] else f["severity"], f["quantity"], f["detail"]]
            for f in flags
        ]
        print_table(table(["day", "meter", "rule", "severity", "quantity", "detail"], rows, "Open flags (not acknowledged, last three months)"))
        console.print(f"Acknowledge one: billing flags ack {c['customer_id']} --month YYYY-MM --rule RULE --by WHO --reason WHY{more}", highlight=False)
    else:
        console.print(f"No open warning or critical flags in the last three months{more}.", highlight=False)

    invoices = doc["invoices"]
    if invoices:
        fields = {
            "month": lambda i: i["month"],
            "invoice": lambda i: i["invoice"],
            "status": lambda i: i["status"],
            "total": lambda i: f"{i['total']} {i['currency'].upper()}",
            "credits used": lambda i: i["credits_used"],
            "finalized on": lambda i: i["finalized_on"] or "",
            "due": lambda i: i["due_date"] or "",
            "pending adjustment": lambda i: i["pending_adjustment"] or "",
        }
        if not any(i["due_date"] for i in invoices):  # invoices written before they carried a due date
            del fields["due"]
        cols = list(fields)
        rows = [[get(i) for get in fields.values()] for i in invoices]
        print_table(table(cols, rows, f"Last invoices ({len(invoices)})"))
        cid, latest = c["customer_id"], invoices[0]["month"]
        console.print(f"In full: billing invoice {cid} --month {latest}; how it follows from usage: billing dispute {cid} --month {latest}", highlight=False)
    else:
        console.print(f"No invoices yet under {paths.invoices}. {doc['next_invoice']}.", highlight=False)

    grants = doc["credits"]
    if grants:
        rows = [
            [g["grant_id"], g["description"], f"{g['amount']} {g['currency'].upper()}", g["balance"] or "", g["expires_on"] or "never", "yes" * g["expired"]]
            for g in grants
        ]
        print_table(table(["grant", "description", "amount", "left", "expires on", "expired"], rows, "Prepaid credits (left after the stored invoices)"))
    else:
        console.print("No prepaid credits.")
    return 0
