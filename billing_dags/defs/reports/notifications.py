"""Allowance notifications (80% and 100% of an included allowance) for a mail or webhook sender."""

import dagster as dg

from billing_dags.defs.shared.partitions import SINGLE_RUN, billing_daily, materialize_each
from billing_dags.defs.shared.resources import WarehouseResource
from billing_dags.operations.notifications import build_day, write_day


@dg.asset(
    partitions_def=billing_daily,
    group_name="notifications",
    kinds={"json"},
    deps=["fct_anomaly_flags_by_day", "seed_customers", "seed_meters"],
    backfill_policy=SINGLE_RUN,
    metadata={
        "outbox": "data/notifications/outbox/day=YYYY-MM-DD.jsonl (one JSON object a line)",
        "consumer": "`billing notifications list` / `billing notifications mark-delivered ID... --channel email`",
    },
)
def allowance_notifications(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
    """Notifications outbox: a customer crossed 80% or 100% of an allowance (one per crossing, from the allowance_used flags)."""
    paths = warehouse.paths()

    def one_day(key, window) -> dict:
        notes = build_day(paths, window.start)
        dest = write_day(paths, window.start, notes)
        return {
            "notifications": len(notes),
            "customers": len({n["customer_id"] for n in notes}),
            "thresholds": ", ".join(sorted({f"{n['customer_id']} {n['meter_id']} {n['threshold_percent']}%" for n in notes})) or "none",
            **({"path": dg.MetadataValue.path(str(dest))} if dest else {}),
        }

    return materialize_each(context, one_day)
