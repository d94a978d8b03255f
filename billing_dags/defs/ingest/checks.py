"""Asset checks on the raw events a source writes (billing_dags/ingest/events.py), one factory per rule."""

from datetime import date

import dagster as dg

from billing_dags.defs.shared.partitions import billing_daily, partitions_of
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
        """Every day of the run's partitions (one, or each day of a range), in order."""
        from billing_dags.ingest.events import cross_day_duplicates

        paths = warehouse.paths()
        duplicates, failed = [], []
        for _, window in partitions_of(context, billing_daily):
            found = cross_day_duplicates(paths, window.start, source)
            duplicates += [(window.start, event_id, other) for event_id, other in found]
            if found:
                failed.append(_day_problem(asset_key_name, source, window.start, found))
        examples = [{"event_id": event_id, "other_day": other} for _, event_id, other in duplicates[:EXAMPLES]]
        metadata = {
            "source": source,
            "duplicates": len(duplicates),
            "examples": dg.MetadataValue.json(examples),
        }
        if not duplicates:
            return dg.AssetCheckResult(passed=True, metadata=metadata)
        metadata["days_with_duplicates"] = dg.MetadataValue.json(sorted({str(day) for day, _, _ in duplicates}))
        return dg.AssetCheckResult(passed=False, metadata=metadata, description=" ".join(failed))

    return _check


def _day_problem(asset_key_name: str, source: str, day: date, duplicates: list[tuple[str, str]]) -> str:
    """What is wrong with ``day`` and how to fix it."""
    examples = duplicates[:EXAMPLES]
    days = sorted({other for _, other in duplicates})
    shown = ", ".join(f"{event_id} (also on {other})" for event_id, other in examples)
    more = f" and {len(duplicates) - EXAMPLES} more" if len(duplicates) > EXAMPLES else ""
    return (
        f"{len(duplicates)} event ids of {source} on {day} are also in its partition of {', '.join(days)}: "
        f"{shown}{more}. The source moved these events to another day, so both days would bill them; "
        f"rerun {asset_key_name} for {', '.join(days)} so those days drop them (and check the source's timestamps)."
    )


#: the ingest domain's checks (billing_dags/definitions.py registers them)
INGEST_CHECKS = [
    event_ids_unique_across_days_check("usage_events", "postgres"),
    event_ids_unique_across_days_check("usage_reports", "usage_reports"),
]
