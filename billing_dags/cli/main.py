"""The `billing` command: demo, simulate, run, invoice(s), usage, plans, sql.

Every command meets bad input with an error that names the input and the fix, and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from billing_dags.billing.listing import invoice_rows
from billing_dags.cli import customer, disputes, flags, metrics, notifications, reports, retention, stripe, worker
from billing_dags.cli import remote_write as remote_write_cli
from billing_dags.cli.common import (
    CliError,
    Parser,
    add_global_options,
    check_billable_month,
    check_options,
    console,
    emit,
    err_console,
    month_hint,
    paths_of,
    print_table,
    require_customer,
    seeds_of,
    subparsers_of,
    table,
)
from billing_dags.cli.projection import emit_usage_report
from billing_dags.cli.runs import run_invoices, run_month
from billing_dags.core.calendar import days_in_month, last_complete_month, next_month, parse_month
from billing_dags.core.errors import InputError
from billing_dags.core.settings import Paths

# --- commands ----------------------------------------------------------------------------------


def cmd_run(args) -> int:
    paths = paths_of(args)
    month = parse_month(args.month)
    check_billable_month(month, seeds_dir=paths.seeds_dir)
    if args.customers is not None and args.customers < 1:
        raise CliError(f"--customers {args.customers} must be at least 1")
    as_of = None
    if args.as_of is not None:
        from billing_dags.stripe.sender import as_of as parse_as_of

        as_of = parse_as_of(args.as_of, "--as-of").isoformat()
    figures = run_month(paths, month, ingest=not args.no_ingest, seed=args.seed, customers=args.customers, interval_s=args.interval, as_of=as_of)
    rows = invoice_rows(paths, month)
    emit(rows, "table", title=f"Invoices {month:%Y-%m}")
    console.print(f"{figures['days']} days and the month in {figures['seconds']:.1f}s")
    return 0


def cmd_demo(args) -> int:
    from billing_dags.ingest.usage_reports import ReportSchema, demo_report_token
    from billing_dags.operations.reports import event_billed_lines
    from billing_dags.stripe.outbox import outbox_summary

    paths = paths_of(args)
    month = parse_month(args.month) if args.month else last_complete_month()
    check_billable_month(month, seeds_dir=paths.seeds_dir)
    console.print(f"[bold]billing_dags demo[/]: simulated usage for {month:%Y-%m}, Stripe dry-run, data in {paths.data_dir}")
    # the lifecycle as the schedules run it: drafts on the 1st of the next month, while late data
    # may still arrive; then finalization once the grace period has passed (here: now)
    on_the_first = datetime.combine(next_month(month), datetime.min.time(), tzinfo=UTC) + timedelta(hours=2)
    figures = run_month(paths, month, seed=args.seed, customers=args.customers, interval_s=args.interval, as_of=on_the_first.isoformat())
    drafts = invoice_rows(paths, month)
    example = next((r for r in drafts if not r["total"].startswith("0.00")), drafts[0] if drafts else None)
    console.print(
        f"\nOn {on_the_first:%Y-%m-%d %H:%M} UTC the month's invoices are drafts "
        f"({sum(r['status'] == 'draft' for r in drafts)} of {len(drafts)}), e.g. {example['invoice']} {example['total']}."
        if drafts
        else "\nNo invoices."
    )
    run_invoices(paths, month)
    rows = invoice_rows(paths, month)
    emit(rows, "table", title=f"Invoices {month:%Y-%m} as of now ({len(rows)} customers)")
    for line in event_billed_lines(paths, month, args.customers):
        console.print(line, highlight=False)
    schema = ReportSchema.from_seeds(paths.seeds_dir)
    for cid in sorted(c for c in schema.tokens if schema.authorized(c, demo_report_token(c))):
        console.print(
            f"{cid} may POST usage reports (billing remote-write serve) with Authorization: Bearer {demo_report_token(cid)} "
            "(its demo token, derived now; the seeds hold only its SHA-256)",
            highlight=False,
        )
    _print_usage_api_example(paths, month)
    console.print(f"\nRan {figures['days']} daily partitions and the month in {figures['seconds']:.1f}s.")
    console.print(f"Invoices (JSON, CSV, HTML; PDF once finalized): {paths.invoices / f'{month:%Y-%m}'}")
    if example is not None and (paths.invoices / f"{month:%Y-%m}" / f"{example['customer']}.pdf").exists():
        pdf = paths.invoices / f"{month:%Y-%m}" / f"{example['customer']}.pdf"
        console.print(f"PDF of one invoice, as its customer receives it ({example['customer']}): {pdf}", highlight=False)
    elif example is not None:
        console.print(
            f"Drafts have no PDF file until finalized; a preview: billing invoice {example['customer']} --month {month:%Y-%m} "
            f"--format pdf > {example['customer']}.pdf",
            highlight=False,
        )
    console.print(f'DuckDB warehouse (views): duckdb {paths.warehouse_db}   or   billing sql "select * from fct_invoice_lines limit 5"')
    console.print(f"Stripe outbox (dry-run): {paths.outbox} — {outbox_summary(paths, month)}")
    console.print("Dagster UI: make dev, then http://127.0.0.1:3000 (the runs above are in .dagster/)")
    return 0


def _print_usage_api_example(paths: Paths, month) -> None:
    """The customer usage API call of one demo customer (its key derived now; the seeds hold its SHA-256)."""
    from billing_dags.seeds.api_keys import demo_api_key, load_api_keys

    keys = load_api_keys(paths.seeds_dir)
    customer = next((c for c in sorted(keys.customers()) if keys.customer_of(demo_api_key(c)) == c), None)
    if customer is None:
        return
    end = next_month(month) - timedelta(days=1)
    console.print(
        f"{customer} may read its usage (billing remote-write serve): curl -H 'Authorization: Bearer {demo_api_key(customer)}' "
        f"'http://127.0.0.1:9201/v1/billing/usage?start_date={month.isoformat()}&end_date={end.isoformat()}'",
        highlight=False,
        soft_wrap=True,
    )


def cmd_simulate(args) -> int:
    from billing_dags.ingest import simulate

    paths = paths_of(args)
    month = parse_month(args.month)
    if args.interval <= 0:
        raise CliError(f"--interval {args.interval} must be a positive number of seconds (e.g. 60)")
    customers = seeds_of(paths)["customers"]
    n = args.customers
    if n is not None and not 1 <= n <= customers.num_rows:
        raise CliError(
            f"--customers {n}: seeds have {customers.num_rows} customers; give 1..{customers.num_rows} or add customers to {paths.seeds_dir / 'customers.csv'}"
        )
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err_console) as progress:
        task = progress.add_task(f"simulating {month:%Y-%m}", total=days_in_month(month))
        figures = simulate.simulate_month(
            paths,
            month,
            customers,
            seed=args.seed,
            interval_s=args.interval,
            n_customers=n,
            progress=lambda day: progress.advance(task),
        )
    console.print(f"wrote {figures['samples']:,} samples of {figures['series']:,} series over {figures['days']} days to {paths.raw_samples}")
    return 0


def _load_invoice(paths: Paths, customer_id: str, month: date) -> dict:
    require_customer(paths, customer_id)
    f = paths.invoices / f"{month:%Y-%m}" / f"{customer_id}.json"
    if not f.exists():
        raise CliError(
            f"no invoice for {customer_id} in {month:%Y-%m} under {f.parent}; "
            + month_hint(month, paths.seeds_dir, then=f"`billing usage {customer_id} --month {month:%Y-%m}`")
        )
    return json.loads(f.read_text())


def cmd_invoice(args) -> int:
    from billing_dags.billing.render import document_title, render_invoice, total_label

    paths = paths_of(args)
    month = parse_month(args.month)
    doc = _load_invoice(paths, args.customer, month)
    if args.format == "pdf":
        from billing_dags.billing.store import invoice_pdf

        pdf, data = invoice_pdf(paths, month, args.customer)
        if sys.stdout.isatty() and pdf is None:  # a draft: no file, and PDF bytes would garble a terminal
            console.print(f"{document_title(doc)} {doc['invoice_number']} is a draft: it has no PDF file until it is finalized.", highlight=False)
            console.print(f"(redirect to save a preview: billing invoice {args.customer} --month {month:%Y-%m} --format pdf > preview.pdf)", highlight=False)
        elif sys.stdout.isatty():  # PDF bytes would garble a terminal: say where the file is
            console.print(f"{document_title(doc)} {doc['invoice_number']} ({doc['status']}) as PDF: {pdf}", highlight=False, soft_wrap=True)
            console.print(f"(redirect to save a copy: billing invoice {args.customer} --month {month:%Y-%m} --format pdf > invoice.pdf)", highlight=False)
        else:
            sys.stdout.flush()
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        return 0
    if args.format == "table":
        rows: list[list] = [
            [line["line_number"], line["description"], line["quantity"], line["unit"], line["unit_price"], line["amount"]] for line in doc["lines"]
        ]
        rows.append(["", Text(total_label(doc).lower(), style="bold"), "", "", "", Text(f"{doc['total']} {doc['currency'].upper()}", style="bold")])
        title = f"{document_title(doc)} {doc['invoice_number']} ({doc['status']}) {doc['customer_id']} {doc['period_start']}..{doc['period_end']}"
        cols = ["#", "description", "quantity", "unit", "unit price", "amount"]
        print_table(table(cols, rows, title, right={"#", "quantity", "unit price", "amount"}))
    else:
        sys.stdout.write(render_invoice(doc, args.format))
    return 0


def cmd_invoices(args) -> int:
    paths = paths_of(args)
    month = parse_month(args.month)
    rows = invoice_rows(paths, month)
    if not rows:
        raise CliError(f"no invoices for {month:%Y-%m} under {paths.invoices}; {month_hint(month, paths.seeds_dir)}")
    emit(rows, args.format, title=f"Invoices {month:%Y-%m}")
    return 0


def usage_rows(paths: Paths, customer_id: str, month: date) -> list[dict]:
    """The month's billable quantities of a customer, per subscription period, as the invoice rates them
    (fct_billable_usage_by_subscription_period), with the month's sample counts beside them."""
    from billing_dags.operations.warehouse import open_warehouse

    con = open_warehouse(paths)
    try:
        try:
            result = con.execute(
                """
                select b.period_start, b.meter_id, b.dimension, m.kind, b.aggregation, b.quantity, b.unit,
                       b.base_quantity, b.base_unit, b.days_with_data, u.samples, u.resets, u.dropped_samples
                from fct_billable_usage_by_subscription_period b
                join seed_meters m using (meter_id)
                left join fct_usage_by_month u
                    on u.month = b.month and u.customer_id = b.customer_id
                    and u.meter_id = b.meter_id and u.dimension = b.dimension
                where b.customer_id = $customer and b.month = $month
                order by b.period_start, b.meter_id, b.dimension
                """,
                {"customer": customer_id, "month": month},
            ).fetchall()
        except Exception:
            raise CliError(f"no usage computed for {month:%Y-%m} in {paths.data_dir}; {month_hint(month, paths.seeds_dir)}") from None
    finally:
        con.close()
    return [
        {
            "period_start": period.isoformat(),
            "meter": meter,
            "dimension": dim,
            "kind": kind,
            "aggregation": agg,
            "quantity": f"{qty.normalize():f}",
            "unit": unit,
            "base_quantity": f"{base.normalize():f}",
            "base_unit": base_unit,
            "days": days,
            "samples": samples,
            "resets": resets,
            "dropped_samples": dropped,
        }
        for (period, meter, dim, kind, agg, qty, unit, base, base_unit, days, samples, resets, dropped) in result
    ]


def cmd_usage(args) -> int:
    paths = paths_of(args)
    month = parse_month(args.month)
    require_customer(paths, args.customer)
    from billing_dags.billing import projection

    if projection.month_state(month) != "closed":  # the current month: month-to-date and projected (seed 000)
        return emit_usage_report(paths, args.customer, month, args.format)
    rows = usage_rows(paths, args.customer, month)
    if not rows:
        raise CliError(f"no usage for {args.customer} in {month:%Y-%m}; check the month, or {month_hint(month, paths.seeds_dir)}")
    emit(rows, args.format, title=f"Usage of {args.customer} in {month:%Y-%m}")
    return 0


def cmd_plans(args) -> int:
    paths = paths_of(args)
    t = seeds_of(paths)
    prices: dict[tuple, list[dict]] = {}
    for p in t["prices"].to_pylist():
        prices.setdefault((p["plan_id"], p["version"]), []).append(p)
    rows = []
    for plan in t["plans"].to_pylist():
        if args.plan and plan["plan_id"] != args.plan:
            continue
        lines = prices.get((plan["plan_id"], plan["version"]), [])
        rows.append(
            {
                "plan": plan["plan_id"],
                "version": plan["version"],
                "from": str(plan["effective_from"]),
                "name": plan["name"],
                "currency": plan["currency"],
                "base_fee": f"{plan['base_fee'].normalize():f}",
                "risk_multiplier": f"{plan['risk_multiplier'].normalize():f}",
                "prices": "; ".join(p["description"] for p in lines)
                if args.format == "table"
                else [{k: (f"{v.normalize():f}" if isinstance(v, Decimal) else v) for k, v in p.items()} for p in lines],
            }
        )
    if args.plan and not rows:
        raise CliError(f"unknown plan {args.plan!r}; plans: {', '.join(sorted({p['plan_id'] for p in t['plans'].to_pylist()}))}")
    emit(rows, args.format, title="Plans")
    return 0


def cmd_sql(args) -> int:
    """Queries only, on a locked-down connection (billing_dags.operations.warehouse.open_read_only)."""
    import tempfile

    import duckdb

    from billing_dags.operations.warehouse import RefusedStatement, open_read_only, query_statements

    paths = paths_of(args)
    empty = 'empty query; give SQL, e.g. billing sql "select * from fct_invoice_lines limit 5"'
    if not args.query.strip():
        raise CliError(empty)
    if args.limit < 1:
        raise CliError(f"--limit {args.limit} must be at least 1 (rows to print; default 1000)")
    with tempfile.TemporaryDirectory(prefix="billing-sql-") as spill_dir:
        con = open_read_only(paths, Path(spill_dir))
        try:
            try:
                statements = query_statements(con, args.query)
                if not statements:
                    raise CliError(empty)
                for statement in statements:
                    cur = con.execute(statement)
                cols = [d[0] for d in cur.description]
                rows = [dict(zip(cols, r)) for r in cur.fetchmany(args.limit)]
            except RefusedStatement as e:
                raise CliError(str(e)) from None
            except duckdb.PermissionException as e:
                raise CliError(f"query refused: {str(e).splitlines()[0]}; billing sql reads only the warehouse's files under {paths.data_dir}") from None
            except duckdb.Error as e:
                raise CliError(f'query failed: {str(e).splitlines()[0]}; list views with billing sql "show tables"') from None
        finally:
            con.close()
    emit(rows, args.format)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="billing", description="Prometheus-native usage billing: exact usage, invoices, Stripe meter events.")
    add_global_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def sim_args(p):
        p.add_argument("--seed", type=int, default=42, help="simulation seed (default 42)")
        p.add_argument("--customers", type=int, default=None, help="simulate the first N customers of the seeds (default all)")
        p.add_argument("--interval", type=int, default=60, help="scrape interval in seconds (default 60)")

    p = sub.add_parser("demo", help="simulate a month for every seeded customer, bill it, print the invoices")
    p.add_argument("--month", help="YYYY-MM (default: the last complete month)")
    sim_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("simulate", help="write deterministic simulated raw samples for a month")
    p.add_argument("--month", required=True, help="YYYY-MM")
    sim_args(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("run", help="materialize every asset for a month (steps in process, or as BILLING_EXECUTOR says)")
    p.add_argument("--month", required=True, help="YYYY-MM")
    p.add_argument("--no-ingest", action="store_true", help="use the raw samples already in the data dir")
    p.add_argument(
        "--as-of",
        help="judge the month as of this time (ISO 8601, default now): the invoices' grace period and Stripe's 35-day limit; replays and tests",
    )
    sim_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("invoice", help="show one customer's invoice for a month")
    p.add_argument("customer")
    p.add_argument("--month", required=True, help="YYYY-MM")
    p.add_argument(
        "--format",
        choices=["table", "json", "csv", "html", "pdf"],
        default="table",
        help="pdf: a finalized invoice's stored PDF (stored first if missing) or a draft's preview (not stored), to stdout; on a terminal its path",
    )
    p.set_defaults(func=cmd_invoice)

    p = sub.add_parser("invoices", help="list every invoice of a month with status and total")
    p.add_argument("--month", required=True, help="YYYY-MM")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.set_defaults(func=cmd_invoices)

    p = sub.add_parser("usage", help="one customer's usage for a month, per meter")
    p.add_argument("customer")
    p.add_argument("--month", required=True, help="YYYY-MM")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.set_defaults(func=cmd_usage)

    p = sub.add_parser("plans", help="the plans and prices in the seeds")
    p.add_argument("--plan", help="only this plan id")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.set_defaults(func=cmd_plans)

    p = sub.add_parser("sql", help="run an ad-hoc DuckDB query over the warehouse views")
    p.add_argument("query")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument("--limit", type=int, default=1000, help="rows to print at most (default 1000)")
    p.set_defaults(func=cmd_sql)
    for commands in (customer, stripe, remote_write_cli, disputes, retention, flags, reports, metrics, notifications, worker):
        commands.register(sub)
    for child in subparsers_of(parser):  # --data-dir and --seeds-dir after the command as well as before it
        add_global_options(child, top=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    check_options(parser, sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except InputError as e:
        err_console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        return e.exit_code if isinstance(e, CliError) else 2
    except BrokenPipeError:  # `billing ... | head`: the reader has gone, nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
