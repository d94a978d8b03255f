"""Stripe hand-off: a daily outbox of meter events, then a sender that records what Stripe acknowledged."""

from datetime import date, timedelta

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from billing_dags.core.calendar import month_days, month_start
from billing_dags.defs.shared.partitions import SINGLE_RUN, billing_daily, materialize_each, partitions_of
from billing_dags.defs.shared.resources import StripeResource, WarehouseResource
from billing_dags.models.sqlmodels import Window, load_project, read_day_partition, seed_snapshot_path
from billing_dags.stripe import outbox as ob
from billing_dags.stripe.sender import Sender


def _by_status(rows: list[dict]) -> dict[str, int]:
    """Outbox rows per status, statuses with no rows left out."""
    return {status: n for status, n in ob.summarize(rows)["by_status"].items() if n}


#: the seed tables the outbox is built from (the invoices' subscription periods and prices included)
OUTBOX_SEEDS = ("meters", "units", "customers", "subscriptions", "plans", "currencies", "prices")


def _month_usage(paths, usage_model, month: date, through: date) -> pa.Table | None:
    """The month's fct_usage_by_day rows up to ``through`` (the days computed so far)."""
    tables = []
    for d in month_days(month):
        if d > through:
            break
        t = read_day_partition(paths, usage_model, Window(d, d + timedelta(days=1)))
        if t is not None:
            tables.append(t)
    return pa.concat_tables(tables, promote_options="default") if tables else None


def _outbox_days(paths, month: date) -> list[date]:
    return [d for d in month_days(month) if ob.outbox_path(paths, d).exists()]


def build_month(paths, month: date, through: date, seeds: dict) -> dict[date, list[dict]]:
    """Rebuild the outbox of ``month`` from its first day up to ``through`` (or the last day already
    built, if later: a recomputed day changes every later day's period-to-date values) and publish
    the days whose rows changed. Returns {day: rows}."""
    usage_model = load_project().models["fct_usage_by_day"]
    through = max([through, *_outbox_days(paths, month)])
    usage = _month_usage(paths, usage_model, month, through)
    if usage is None:
        usage = pa.table({"day": pa.array([], pa.date32())})
    previous = {d: ob.read_outbox(paths, d) for d in month_days(month) if d <= through}
    built = ob.build_month_outbox(month, through, usage, seeds, previous)
    for d, rows in built.items():
        if rows != previous.get(d) or not ob.outbox_path(paths, d).exists():
            ob.write_outbox(paths, d, rows)
    return built


@dg.asset(
    partitions_def=billing_daily,
    group_name="stripe",
    backfill_policy=SINGLE_RUN,
    kinds={"stripe", "parquet"},
    deps=["fct_usage_by_day", *(f"seed_{name}" for name in OUTBOX_SEEDS)],
)
def stripe_outbox(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
    """Meter events to send to Stripe: per customer, priced dimension and day, what the invoice bills (revisioned identifiers)."""
    paths = warehouse.paths()
    seeds = {name: pq.read_table(seed_snapshot_path(paths, name)) for name in OUTBOX_SEEDS}
    parts = partitions_of(context)
    last_of_month: dict[date, date] = {}
    for _, w in parts:
        m = month_start(w.start)
        last_of_month[m] = max(last_of_month.get(m, w.start), w.start)
    built: dict[date, dict[date, list[dict]]] = {}

    def one_day(key, window) -> dict:
        m = month_start(window.start)
        if m not in built:
            built[m] = build_month(paths, m, last_of_month[m], seeds)
        rows = built[m].get(window.start, [])
        return {
            "events": len(rows),
            "dagster/partition_row_count": len(rows),
            "by_status": dg.MetadataValue.json(_by_status(rows)),
            "path": dg.MetadataValue.path(str(ob.outbox_path(paths, window.start))),
        }

    return materialize_each(context, one_day)


@dg.asset(
    partitions_def=billing_daily,
    group_name="stripe",
    backfill_policy=SINGLE_RUN,
    kinds={"stripe"},
    deps=[stripe_outbox],
)
def stripe_meter_events(context: dg.AssetExecutionContext, warehouse: WarehouseResource, stripe: StripeResource) -> dg.MaterializeResult:
    """Sends each day's pending outbox events to Stripe (dry-run without STRIPE_API_KEY) and records acks."""
    paths = warehouse.paths()
    # one sender for every day of the run: a refused key or a down API stops the whole run
    sender = Sender(stripe.client(), now=stripe.now(), log=context.log.warning, **stripe.sender_options())
    sent_months: set[date] = set()

    def one_day(key, window) -> dict:
        m = month_start(window.start)
        if m not in sent_months:
            # a recomputed day revises the later days of its month too: send every day of the month built so far
            sent_months.add(m)
            for d in _outbox_days(paths, m):
                if d != window.start:
                    sender.send(ob.read_outbox(paths, d), on_progress=lambda out, _changed, d=d: ob.write_outbox(paths, d, out))
        before_stats = dict(sender.stats)
        # the day's file is rewritten as Stripe acknowledges its events (a stopped run resends nothing it recorded)
        rows = sender.send(ob.read_outbox(paths, window.start), on_progress=lambda out, _changed: ob.write_outbox(paths, window.start, out))
        path = ob.outbox_path(paths, window.start)
        if not path.exists():
            ob.write_outbox(paths, window.start, rows)
        stats = {k: sender.stats[k] - before_stats[k] for k in sender.stats}
        counts = _by_status(rows)
        if stats["failed"]:
            context.log.warning(f"{window.start}: {stats['failed']} meter events failed; they are retried on the next run (see last_error in {path})")
        if stats["too_old"]:
            context.log.warning(
                f"{window.start}: {stats['too_old']} meter events are older than Stripe accepts (35 days) and were not sent; "
                "bill the difference as an invoice item or credit note (see the daily summary)"
            )
        return {
            "mode": sender.mode,
            "api": sender.api,
            "events": len(rows),
            "by_status": dg.MetadataValue.json(counts),
            "sent_now": stats["sent"],
            "failed_now": stats["failed"],
            "rate_limit_retries": stats["retried"],
            "flagged_too_old": counts.get("too_old", 0),
            "flagged_future": counts.get("future", 0),
            "stopped_early": sender.aborted,
            "path": dg.MetadataValue.path(str(path)),
        }

    return materialize_each(context, one_day)
