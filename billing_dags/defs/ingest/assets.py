"""Raw samples: one UTC day per partition, in the raw layout every source writes."""

import dagster as dg

from billing_dags.defs.ingest.sources import SampleSource
from billing_dags.defs.shared.metadata import materialize_raw_each
from billing_dags.defs.shared.partitions import SINGLE_RUN, billing_daily
from billing_dags.defs.shared.resources import WarehouseResource


@dg.asset(
    partitions_def=billing_daily,
    group_name="ingest",
    kinds={"prometheus", "parquet"},
    backfill_policy=SINGLE_RUN,
)
def raw_samples(context: dg.AssetExecutionContext, warehouse: WarehouseResource, sample_source: SampleSource) -> dg.MaterializeResult:
    """Raw samples of each UTC day (series_id, ts, value) and their series: pulled from PROMETHEUS_URL, else simulated."""
    paths = warehouse.paths()
    return materialize_raw_each(context, paths, lambda key, window: sample_source.write_day(context, paths, window.start))
