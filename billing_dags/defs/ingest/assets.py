"""Raw samples: one UTC day per partition, in the raw layout every source writes."""

import time

import dagster as dg

from billing_dags.defs.shared.metadata import materialize_raw_each
from billing_dags.defs.shared.partitions import SINGLE_RUN, billing_daily
from billing_dags.defs.shared.resources import PrometheusResource, SimulationResource, WarehouseResource
from billing_dags.seeds.catalog import read_seed


@dg.asset(
    partitions_def=billing_daily,
    group_name="ingest",
    kinds={"prometheus", "parquet"},
    backfill_policy=SINGLE_RUN,
)
def raw_samples(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    prometheus: PrometheusResource,
    simulation: SimulationResource,
) -> dg.MaterializeResult:
    """Raw samples of each UTC day (series_id, ts, value) and their series: pulled from PROMETHEUS_URL, else simulated."""
    from billing_dags.ingest import simulate

    paths = warehouse.paths()
    if prometheus.enabled:
        return materialize_raw_each(context, paths, lambda key, window: _pull_from_prometheus(context, paths, window.start, prometheus))
    customers = read_seed(paths.seeds_dir, "customers")

    def one_day(key, window) -> dict:
        t0 = time.perf_counter()
        figures = simulate.write_simulated_day(
            paths,
            window.start,
            customers,
            seed=simulation.seed,
            interval_s=simulation.interval_s,
            n_customers=simulation.customers,
        )
        return {
            "source": "simulate",
            "series": figures["series"],
            "samples": figures["samples"],
            "bytes": figures["bytes"],
            "bytes_per_sample": round(figures["bytes"] / max(figures["samples"], 1), 2),
            "seconds": round(time.perf_counter() - t0, 3),
            "path": dg.MetadataValue.path(figures["path"]),
        }

    return materialize_raw_each(context, paths, one_day)


def _pull_from_prometheus(context: dg.AssetExecutionContext, paths, day, prometheus: PrometheusResource) -> dict:
    """Exact raw samples of ``day`` for every meter of seeds/meters.csv (billing_dags.ingest.prometheus)."""
    from billing_dags.ingest import prometheus as prom
    from billing_dags.ingest.raw import RawLayoutError
    from billing_dags.seeds.catalog import SeedError

    try:
        meters, label_values = prom.meters_and_label_values(paths.seeds_dir)
        with prometheus.client() as client:
            report = prom.ingest_day(client, paths, day, meters, label_values, prometheus.options(), log=context.log.info)
    except (prom.PrometheusError, SeedError, RawLayoutError) as e:
        raise dg.Failure(description=f"raw_samples {day}: {e}; nothing was written for this day") from None
    if report.refused_series:
        context.log.warning(
            f"{report.refused_series} series of {day} were refused (not written, not billed; fix them at the exporter or "
            f"in Prometheus, then rerun the day): " + "; ".join(report.refused_examples)
        )
    if report.unmatched_series:
        context.log.warning(
            f"{report.unmatched_series} series of {day} match no customer in customers.csv (billed to nobody): "
            + ", ".join(report.unmatched_examples)
        )
    meta = report.metadata()
    meta["bytes_per_sample"] = round(report.bytes / max(report.samples, 1), 2)
    meta["path"] = dg.MetadataValue.path(report.path)
    meta["server"] = prom.redact_url(prometheus.url or "")
    meta["unmatched_examples"] = dg.MetadataValue.json(report.unmatched_examples)
    meta["refused_examples"] = dg.MetadataValue.json(report.refused_examples)
    meta["warnings"] = dg.MetadataValue.json(report.warnings)
    return meta
