"""Stripe hand-off: a daily outbox of meter events, then a sender that records what Stripe acknowledged."""

from datetime import UTC, datetime

import dagster as dg
import pyarrow.parquet as pq

from billing_dags.defs.shared.partitions import SINGLE_RUN, billing_daily, materialize_each
from billing_dags.defs.shared.resources import StripeResource, WarehouseResource
from billing_dags.models.sqlmodels import load_project, partition_file, seed_snapshot_path
from billing_dags.stripe import outbox as ob
from billing_dags.stripe.sender import Sender


def _by_status(rows: list[dict]) -> dict[str, int]:
    """Outbox rows per status, statuses with no rows left out."""
    return {status: n for status, n in ob.summarize(rows)["by_status"].items() if n}


@dg.asset(
    partitions_def=billing_daily,
    group_name="stripe",
    backfill_policy=SINGLE_RUN,
    kinds={"stripe", "parquet"},
    deps=["fct_usage_by_day", "seed_customers", "seed_meters", "seed_units"],
)
def stripe_outbox(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
    """Meter events to send to Stripe: one per customer, meter and day, with a revisioned identifier."""
    paths = warehouse.paths()
    usage_model = load_project().models["fct_usage_by_day"]
    customers = pq.read_table(seed_snapshot_path(paths, "customers")).to_pylist()
    seeds = {name: pq.read_table(seed_snapshot_path(paths, name)) for name in ("meters", "units")}
    meters = seeds["meters"].to_pylist()

    def one_day(key, window) -> dict:
        quantities = ob.day_quantities(window.start, pq.read_table(partition_file(paths, usage_model, window)), seeds)
        rows = ob.build_outbox(window.start, quantities, customers, meters, ob.read_outbox(paths, window.start))
        path = ob.write_outbox(paths, window.start, rows)
        return {
            "events": len(rows),
            "dagster/partition_row_count": len(rows),
            "by_status": dg.MetadataValue.json(_by_status(rows)),
            "path": dg.MetadataValue.path(str(path)),
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
    sender = Sender(stripe.client(), now=datetime.now(UTC), log=context.log.warning, **stripe.sender_options())

    def one_day(key, window) -> dict:
        before = dict(sender.stats)
        rows = sender.send(ob.read_outbox(paths, window.start), on_progress=lambda out, _changed: ob.write_outbox(paths, window.start, out))
        path = ob.outbox_path(paths, window.start)
        now = {k: sender.stats[k] - before[k] for k in sender.stats}
        counts = _by_status(rows)
        if now["failed"]:
            context.log.warning(f"{window.start}: {now['failed']} meter events failed; they are retried on the next run (see last_error in {path})")
        if now["too_old"]:
            context.log.warning(f"{window.start}: {now['too_old']} meter events are older than Stripe accepts (35 days) and were not sent")
        return {
            "mode": sender.mode,
            "api": sender.api,
            "events": len(rows),
            "by_status": dg.MetadataValue.json(counts),
            "sent_now": now["sent"],
            "failed_now": now["failed"],
            "rate_limit_retries": now["retried"],
            "flagged_too_old": counts.get("too_old", 0),
            "flagged_future": counts.get("future", 0),
            "stopped_early": sender.aborted,
            "path": dg.MetadataValue.path(str(path)),
        }

    return materialize_each(context, one_day)
