"""Jobs: every daily-partitioned asset, every monthly-partitioned asset, and the seeds + views refresh."""

from collections.abc import Set

import dagster as dg

from billing_dags.core.settings import launched_settings_tags
from billing_dags.defs.shared.partitions import billing_daily, billing_daily_shards, billing_monthly


class PartitionedBy(dg.AssetSelection):
    """Every materializable asset partitioned by ``partitions_def``, wherever in defs/ it is defined.

    A job over a partitions definition then needs no list of assets: an asset added to the daily
    chain joins daily_usage by its partitions alone.
    """

    def __init__(self, partitions_def: dg.PartitionsDefinition):
        self.partitions_def = partitions_def

    def resolve_inner(self, asset_graph, allow_missing: bool) -> Set[dg.AssetKey]:
        return {key for key in asset_graph.materializable_asset_keys if asset_graph.get(key).partitions_def == self.partitions_def}


#: every run of these jobs records the shards and the warehouse it was launched with (its steps check them)
TAGS = launched_settings_tags()

daily_usage = dg.define_asset_job(
    "daily_usage",
    selection=PartitionedBy(billing_daily),
    description="Ingest one UTC day, compute exact usage, and hand it to Stripe.",
    tags=TAGS,
)
#: sharded (BILLING_SHARDS > 1): the daily models per (day, shard); daily_usage keeps the ingest and the
#: daily assets after the models. A backfill of a range of days over every shard runs one run per shard.
daily_shards = (
    dg.define_asset_job(
        "daily_shards",
        selection=PartitionedBy(billing_daily_shards),
        description="The daily models of one (UTC day, shard of customers): exact usage, rolling sums, anomaly flags.",
        tags=TAGS,
    )
    if billing_daily_shards is not None
    else None
)
monthly_invoicing = dg.define_asset_job(
    "monthly_invoicing",
    selection=PartitionedBy(billing_monthly),
    description="Monthly usage, rating, invoice lines and invoice files for one calendar month.",
    tags=TAGS,
)
refresh_seeds_and_views = dg.define_asset_job(
    "refresh_seeds_and_views",
    selection=dg.AssetSelection.groups("seeds") | dg.AssetSelection.assets("warehouse_views"),
    description="Validate and snapshot the seeds, and rebuild the warehouse views.",
    tags=TAGS,
)
