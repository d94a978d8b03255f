"""LLM usage events: one UTC day of PostgreSQL usage_events (seed 003), or simulated rows, copied into raw/events."""

import dagster as dg

from billing_dags.defs.ingest.sources import EventSource
from billing_dags.defs.shared.metadata import materialize_raw_each
from billing_dags.defs.shared.partitions import SINGLE_RUN, billing_daily
from billing_dags.defs.shared.resources import WarehouseResource

#: where this asset's rows land (a part per source; standard metadata: defs/shared/metadata.py)
EVENTS = ("raw_events", ("postgres", "simulate"))


@dg.asset(
    partitions_def=billing_daily,
    group_name="ingest",
    kinds={"postgres", "parquet"},
    backfill_policy=SINGLE_RUN,
    metadata={"source": "postgres", "layout": "data/raw/events/date=YYYY-MM-DD/part-postgres.parquet (part-simulate.parquet when simulated)"},
)
def usage_events(context: dg.AssetExecutionContext, warehouse: WarehouseResource, event_source: EventSource) -> dg.MaterializeResult:
    """Billable usage_events rows of each UTC day (tokens per model, API keys as SHA-256) from BILLING_USAGE_EVENTS_DSN, else simulated."""
    paths = warehouse.paths()
    return materialize_raw_each(context, paths, lambda key, window: event_source.write_day(context, paths, window.start), *EVENTS)
