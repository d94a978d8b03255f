"""The ad-hoc query surface: data/warehouse.duckdb with a view per model, source and seed."""

import dagster as dg

from billing_dags.defs.shared.resources import WarehouseResource
from billing_dags.operations.warehouse import refresh_views


@dg.asset(group_name="warehouse", kinds={"duckdb"})
def warehouse_views(warehouse: WarehouseResource) -> dg.MaterializeResult:
    """Views over every Parquet partition in data/warehouse.duckdb, for support staff's DuckDB queries."""
    figures = refresh_views(warehouse.paths())
    return dg.MaterializeResult(
        metadata={
            "views": len(figures["views"]),
            "names": ", ".join(figures["views"]),
            "path": dg.MetadataValue.path(figures["path"]),
        }
    )
