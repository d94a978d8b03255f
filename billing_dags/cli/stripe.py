"""`billing stripe sync-meters|send|reconcile`: create the Stripe meters, send the outbox, compare Stripe with the invoices."""

from __future__ import annotations

import os
import sys
from datetime import date

from billing_dags.cli.common import CliError, billable, console, emit, month_hint, paths_of
from billing_dags.core.calendar import month_days, parse_month
from billing_dags.stripe.meters import StripeMeterError, send_days, sync_meters


def days_of(day: str | None, month: str | None) -> list[date]:
    """The UTC days of ``--day YYYY-MM-DD`` or ``--month YYYY-MM``."""
    if bool(day) == bool(month):
        raise CliError("give exactly one of --day YYYY-MM-DD or --month YYYY-MM")
    if day:
        try:
            return [date.fromisoformat(day)]
        except ValueError:
            raise CliError(f"day {day!r} is not YYYY-MM-DD; give e.g. --day 2026-10-03") from None
    return month_days(parse_month(month))


def _client_from_env():
    from billing_dags.stripe.sender import make_client

    retries = os.environ.get("STRIPE_MAX_NETWORK_RETRIES") or "3"
    if not retries.isdigit():
        raise CliError(f"STRIPE_MAX_NETWORK_RETRIES={retries!r} is not a whole number; unset it or give e.g. 3")
    return make_client(os.environ.get("STRIPE_API_KEY"), os.environ.get("STRIPE_API_BASE"), int(retries))


def cmd_sync_meters(args) -> int:
    from billing_dags.seeds.catalog import load_seeds

    paths = paths_of(args)
    seeds = load_seeds(paths.seeds_dir)
    try:
        report = sync_meters(_client_from_env(), seeds["meters"].to_pylist(), seeds["prices"].to_pylist(), seeds["units"].to_pylist())
    except StripeMeterError as e:
        raise CliError(str(e)) from None
    rows = [
        {"event_name": i.event_name, "meter": i.meter_id, "action": i.action, "stripe_meter": i.stripe_meter_id or "", "detail": i.detail} for i in report.items
    ]
    emit(rows, args.format, title=f"Stripe meters ({report.mode})")
    customers = seeds["customers"].to_pylist()
    without = [c["customer_id"] for c in customers if not c.get("stripe_customer_id")]
    if args.format == "table":
        console.print(
            f"{report.by_action()}; {len(customers) - len(without)} of {len(customers)} customers have a stripe_customer_id"
            + (f" (not sent to Stripe: {', '.join(without[:10])}{' ...' if len(without) > 10 else ''})" if without else "")
        )
        if report.mode == "dry_run":
            console.print("dry-run: set STRIPE_API_KEY (and STRIPE_API_BASE for a proxy or test server) to create them")
    return 0 if report.ok else 1


def cmd_send(args) -> int:
    paths = paths_of(args)
    days = days_of(args.day, args.month)
    from billing_dags.stripe.outbox import OutboxError
    from billing_dags.stripe.sender import as_of, sender_options

    try:
        now = as_of(args.as_of)
        options = sender_options(args.api, args.concurrency, args.rate_limit)
    except OutboxError as e:
        raise CliError(str(e)) from None
    client = _client_from_env()
    summary, sender = send_days(paths, days, client, now=now, log=lambda m: print(m, file=sys.stderr), **options)
    if not summary:
        month = days[0].replace(day=1)
        how = (
            f"billing run --month {month:%Y-%m}"
            if billable(month, paths.seeds_dir)
            else "the daily schedule builds it after each UTC day ends; or materialize it for those days in the Dagster UI"
        )
        console.print(f"no outbox for {days[0]}{'' if len(days) == 1 else f' .. {days[-1]}'} in {paths.outbox}; run the stripe_outbox asset ({how}) first")
        return 0
    emit(summary, args.format, title=f"Stripe meter events ({sender.mode})")
    if args.format == "table":
        console.print(f"{sender.mode} ({sender.api}): {sender.stats}")
        if sender.stats["failed"]:
            from billing_dags.stripe import outbox as ob

            for d in days:
                for r in ob.read_outbox(paths, d):
                    if r["status"] == "failed":
                        console.print(f"failed {r['identifier']}: {r['last_error']}", highlight=False, soft_wrap=True)
    return 1 if sender.stats["failed"] or sender.aborted else 0


def cmd_reconcile(args) -> int:
    from billing_dags.seeds.catalog import load_seeds
    from billing_dags.stripe.reconcile import ReconcileError, reconcile_with_client, summary

    paths = paths_of(args)
    month = parse_month(args.month)
    if not billable(month, paths.seeds_dir):  # a month with no invoices to reconcile, whatever is in the data dir
        raise CliError(f"no invoices for {month:%Y-%m} to reconcile: {month_hint(month, paths.seeds_dir)}")
    client = _client_from_env()
    try:
        if client is None:
            raise ReconcileError(
                "no STRIPE_API_KEY: reconciling reads Stripe's meter event summaries; set STRIPE_API_KEY (and STRIPE_API_BASE for a test server)"
            )
        checks = reconcile_with_client(paths, month, load_seeds(paths.seeds_dir), client)
    except ReconcileError as e:
        raise CliError(str(e)) from None
    emit([c.as_row() for c in checks], args.format, title=f"Stripe against the invoices of {month:%Y-%m}")
    counts = summary(checks)
    if args.format == "table":
        for c in checks:
            if c.status != "equal":
                console.print(f"{c.customer_id} {c.event_name} from {c.period_start}: {'; '.join(c.causes)}", highlight=False, soft_wrap=True)
        console.print(f"{len(checks)} invoice lines billed through Stripe: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"))
    return 0 if all(c.status == "equal" for c in checks) else 1


def register(sub) -> None:
    """Adds `billing stripe sync-meters` and `billing stripe send` to the `billing` parser."""
    p = sub.add_parser("stripe", help="Stripe: create the meters, send the outbox (dry-run without STRIPE_API_KEY)")
    ssub = p.add_subparsers(dest="stripe_command", required=True, metavar="SUBCOMMAND")

    s = ssub.add_parser("sync-meters", help="create the Stripe meters the seeds need (one per priced dimension, sum or last, daily window); report conflicts")
    s.add_argument("--format", choices=["table", "json", "csv"], default="table")
    s.set_defaults(func=cmd_sync_meters)

    s = ssub.add_parser("reconcile", help="compare Stripe's meter event summaries with the month's invoice lines; name each difference's cause")
    s.add_argument("--month", required=True, help="YYYY-MM")
    s.add_argument("--format", choices=["table", "json", "csv"], default="table")
    s.set_defaults(func=cmd_reconcile)

    s = ssub.add_parser("send", help="send the outbox of a day or a month; already sent events are never sent again")
    s.add_argument("--day", help="YYYY-MM-DD")
    s.add_argument("--month", help="YYYY-MM")
    s.add_argument("--api", help="v1 (meter events, validated one by one; the default) or v2 (meter event stream, 100 per request) [STRIPE_METER_API]")
    s.add_argument("--concurrency", help="requests in flight at once, at most one per customer and meter with v1 (default 16) [STRIPE_CONCURRENCY]")
    s.add_argument("--rate-limit", help="at most this many requests per second, all threads together (default: none) [STRIPE_RATE_LIMIT]")
    s.add_argument("--as-of", help="judge Stripe's 35-day limit as of this time (ISO 8601, default now): replays and tests")
    s.add_argument("--format", choices=["table", "json", "csv"], default="table")
    s.set_defaults(func=cmd_send)
