"""`billing stripe sync-meters|send`: create the Stripe meters, send the outbox."""

from __future__ import annotations

import os
import sys
from datetime import UTC, date, datetime

from billing_dags.cli.common import CliError, check_billable_month, console, emit, paths_of
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
        report = sync_meters(_client_from_env(), seeds["meters"].to_pylist())
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
    client = _client_from_env()
    summary, sender = send_days(paths, days, client, now=datetime.now(UTC), log=lambda m: print(m, file=sys.stderr))
    if not summary:
        month = days[0].replace(day=1)
        try:
            check_billable_month(month, seeds_dir=paths.seeds_dir)
            how = f"billing run --month {month:%Y-%m}"
        except CliError:
            how = "the daily schedule builds it after each UTC day ends; or materialize it for those days in the Dagster UI"
        console.print(f"no outbox for {days[0]}{'' if len(days) == 1 else f' .. {days[-1]}'} in {paths.outbox}; run the stripe_outbox asset ({how}) first")
        return 0
    emit(summary, args.format, title=f"Stripe meter events ({sender.mode})")
    if args.format == "table":
        console.print(f"{sender.mode}: {sender.stats}")
        if sender.stats["failed"]:
            from billing_dags.stripe import outbox as ob

            for d in days:
                for r in ob.read_outbox(paths, d):
                    if r["status"] == "failed":
                        console.print(f"failed {r['identifier']}: {r['last_error']}", highlight=False, soft_wrap=True)
    return 1 if sender.stats["failed"] or sender.aborted else 0


def register(sub) -> None:
    """Adds `billing stripe sync-meters` and `billing stripe send` to the `billing` parser."""
    p = sub.add_parser("stripe", help="Stripe: create the meters, send the outbox (dry-run without STRIPE_API_KEY)")
    ssub = p.add_subparsers(dest="stripe_command", required=True, metavar="SUBCOMMAND")

    s = ssub.add_parser("sync-meters", help="create the Stripe meters the seeds need (sum, daily window); report conflicts")
    s.add_argument("--format", choices=["table", "json", "csv"], default="table")
    s.set_defaults(func=cmd_sync_meters)

    s = ssub.add_parser("send", help="send the outbox of a day or a month; already sent events are never sent again")
    s.add_argument("--day", help="YYYY-MM-DD")
    s.add_argument("--month", help="YYYY-MM")
    s.add_argument("--format", choices=["table", "json", "csv"], default="table")
    s.set_defaults(func=cmd_send)
