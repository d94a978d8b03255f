"""Jobs: every daily-partitioned asset, every monthly-partitioned asset, and the seeds + views refresh."""

import dagster as dg

from billing_dags.defs.shared.partitions import billing_daily, billing_monthly


def _keys(assets: list[dg.AssetsDefinition], partitions_def) -> list[dg.AssetKey]:
    return [key for a in assets if a.partitions_def == partitions_def for key in a.keys]


def build_jobs(assets: list[dg.AssetsDefinition]) -> dict:
    return {
        "daily_usage": dg.define_asset_job(
            "daily_usage",
            selection=dg.AssetSelection.assets(*_keys(assets, billing_daily)),
            description="Ingest one UTC day, compute exact usage, and hand it to Stripe.",
        ),
        "monthly_invoicing": dg.define_asset_job(
            "monthly_invoicing",
            selection=dg.AssetSelection.assets(*_keys(assets, billing_monthly)),
            description="Monthly usage, rating, invoice lines and invoice files for one calendar month.",
        ),
        "refresh_seeds_and_views": dg.define_asset_job(
            "refresh_seeds_and_views",
            selection=dg.AssetSelection.groups("seeds") | dg.AssetSelection.assets("warehouse_views"),
            description="Validate and snapshot the seeds, and rebuild the warehouse views.",
        ),
    }
