"""Raw samples: one UTC day per partition, in the raw layout every source writes."""

import time

import dagster as dg

from billing_dags.defs.shared.partitions import billing_daily, window_of
from billing_dags.defs.shared.resources import PrometheusResource, SimulationResource, WarehouseResource
from billing_dags.seeds import read_seed


@dg.asset(
    partitions_def=billing_daily,
    group_name="ingest",
    kinds={"prometheus", "parquet"},
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=1),
)
def raw_samples(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    prometheus: PrometheusResource,
    simulation: SimulationResource,
) -> dg.MaterializeResult:
    """Raw samples of one UTC day (series_id, ts, value) and the series they belong to."""
    from billing_dags import simulate

    window = window_of(context)
    paths = warehouse.paths()
    if prometheus.enabled:
        raise dg.Failure(
            description=(
                f"PROMETHEUS_URL is set ({prometheus.url}) but pulling from Prometheus is not built yet "
                "(issue 3); unset PROMETHEUS_URL to use simulated usage"
            )
        )
    t0 = time.perf_counter()
    customers = read_seed(paths.seeds_dir, "customers")
    figures = simulate.write_simulated_day(
        paths,
        window.start,
        customers,
        seed=simulation.seed,
        interval_s=simulation.interval_s,
        n_customers=simulation.customers,
    )
    return dg.MaterializeResult(
        metadata={
            "source": "simulate",
            "series": figures["series"],
            "samples": figures["samples"],
            "bytes": figures["bytes"],
            "bytes_per_sample": round(figures["bytes"] / max(figures["samples"], 1), 2),
            "seconds": round(time.perf_counter() - t0, 3),
            "path": dg.MetadataValue.path(figures["path"]),
        }
    )
