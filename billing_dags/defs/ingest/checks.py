"""Asset checks on the raw events a source writes (billing_dags/events.py), one factory per rule."""

from datetime import date

import dagster as dg

from billing_dags.defs.shared.partitions import billing_daily
from billing_dags.defs.shared.resources import WarehouseResource

#: the duplicate ids shown in a check's metadata and message
EXAMPLES = 20


def event_ids_unique_across_days_check(asset_key_name: str, source: str) -> dg.AssetChecksDefinition:
    """A blocking check that ``source``'s events of a day use no event_id it also wrote on another day (35 days around)."""

    @dg.asset_check(
        asset=asset_key_name,
        name="event_ids_unique_across_days",
        blocking=True,
        partitions_def=billing_daily,
        description=f"No event_id of this day's part-{source} events is also in part-{source} of another day (35 days either side).",
        metadata={"source": source},
    )
    def _check(context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource) -> dg.AssetCheckResult:
        from billing_dags.events import cross_day_duplicates

        day = date.fromisoformat(context.partition_key)
        duplicates = cross_day_duplicates(warehouse.paths(), day, source)
        examples = [{"event_id": event_id, "other_day": other} for event_id, other in duplicates[:EXAMPLES]]
        metadata = {
            "source": source,
            "duplicates": len(duplicates),
            "examples": dg.MetadataValue.json(examples),
        }
        if not duplicates:
            return dg.AssetCheckResult(passed=True, metadata=metadata)
        days = sorted({other for _, other in duplicates})
        shown = ", ".join(f"{e['event_id']} (also on {e['other_day']})" for e in examples)
        more = f" and {len(duplicates) - EXAMPLES} more" if len(duplicates) > EXAMPLES else ""
        return dg.AssetCheckResult(
            passed=False,
            metadata=metadata,
            description=(
                f"{len(duplicates)} event ids of {source} on {day} are also in its partition of {', '.join(days)}: "
                f"{shown}{more}. The source moved these events to another day, so both days would bill them; "
                f"rerun {asset_key_name} for {', '.join(days)} so those days drop them (and check the source's timestamps)."
            ),
        )

    return _check


#: the ingest domain's checks (billing_dags/definitions.py registers them)
INGEST_CHECKS = [
    event_ids_unique_across_days_check("usage_events", "postgres"),
    event_ids_unique_across_days_check("usage_reports", "usage_reports"),
]
