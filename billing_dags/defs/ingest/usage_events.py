"""LLM usage events: one UTC day of PostgreSQL usage_events (seed 003), or simulated rows, copied into raw/events."""

import time

import dagster as dg

from billing_dags.defs.shared.metadata import materialize_raw_each
from billing_dags.defs.shared.partitions import SINGLE_RUN, billing_daily
from billing_dags.defs.shared.resources import (
    PrometheusResource,
    SimulationResource,
    UsageEventsResource,
    WarehouseResource,
)
from billing_dags.models.sqlmodels import Window

#: where this asset's rows land (a part per source; standard metadata: defs/shared/metadata.py)
EVENTS = ("raw_events", ("postgres", "simulate"))


@dg.asset(
    partitions_def=billing_daily,
    group_name="ingest",
    kinds={"postgres", "parquet"},
    backfill_policy=SINGLE_RUN,
    metadata={"source": "postgres", "layout": "data/raw/events/date=YYYY-MM-DD/part-postgres.parquet (part-simulate.parquet when simulated)"},
)
def usage_events(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    usage_events: UsageEventsResource,
    simulation: SimulationResource,
    prometheus: PrometheusResource,
) -> dg.MaterializeResult:
    """Billable usage_events rows of each UTC day (tokens per model, API keys as SHA-256) from BILLING_USAGE_EVENTS_DSN, else simulated."""
    from billing_dags.ingest import postgres_events as pg
    from billing_dags.ingest.events import EventsLayoutError
    from billing_dags.seeds.catalog import SeedError

    if not usage_events.enabled:
        if simulation.applies(prometheus):
            return materialize_raw_each(context, warehouse.paths(), lambda key, window: _simulate(window, warehouse, usage_events, simulation), *EVENTS)
        context.log.info("no source configured (BILLING_USAGE_EVENTS_DSN is unset, simulation off): nothing written")
        return materialize_raw_each(context, warehouse.paths(), lambda key, window: {"source": "no source configured", "events": 0}, *EVENTS)
    paths = warehouse.paths()
    cfg = usage_events.source_table()

    def one_day(key, window) -> dict:
        t0 = time.perf_counter()
        try:
            figures = pg.ingest_day(usage_events.dsn, paths, window.start, cfg, batch_rows=usage_events.batch_rows)
        except (pg.PostgresEventsError, EventsLayoutError, SeedError) as e:
            raise dg.Failure(description=f"usage_events {window.start}: {e}; nothing was written for this day") from None
        return {
            "source": "postgres",
            "table": cfg.table,
            "billable_statuses": ", ".join(cfg.billable_statuses),
            "events": figures["events"],
            "duplicates_dropped": figures["duplicates_dropped"],
            "bytes": figures["bytes"],
            "seconds": round(time.perf_counter() - t0, 3),
            "path": dg.MetadataValue.path(figures["path"]),
        }

    return materialize_raw_each(context, paths, one_day, *EVENTS)


def _simulate(
    window: Window,
    warehouse: WarehouseResource,
    usage_events: UsageEventsResource,
    simulation: SimulationResource,
) -> dict:
    """Simulated seed-003 rows of the day's usage_events customers, converted exactly as PostgreSQL rows are."""
    from billing_dags.ingest import postgres_events as pg
    from billing_dags.ingest import simulate
    from billing_dags.ingest.events import EventsLayoutError
    from billing_dags.seeds.catalog import SeedError, read_seed

    paths = warehouse.paths()
    cfg = usage_events.source_table()
    t0 = time.perf_counter()
    try:
        customers = read_seed(paths.seeds_dir, "customers")
        figures = simulate.write_simulated_usage_events(
            paths, window.start, customers, seed=simulation.seed, n_customers=simulation.customers, cfg=cfg
        )
    except (pg.PostgresEventsError, EventsLayoutError, SeedError, ValueError) as e:
        raise dg.Failure(description=f"usage_events {window.start} (simulated): {e}; nothing was written for this day") from None
    return {
        "source": "simulate",
        "seed": simulation.seed,
        "customers": figures["customers"],
        "rows": figures["rows"],
        "unbilled_rows": figures["unbilled_rows"],
        "billable_statuses": ", ".join(cfg.billable_statuses),
        "events": figures["events"],
        "bytes": figures["bytes"],
        "seconds": round(time.perf_counter() - t0, 3),
        "path": dg.MetadataValue.path(figures["path"]),
    }
