"""One asset per seed file: validated CSV -> Parquet snapshot the SQL models read."""

import hashlib

import dagster as dg
import pyarrow.parquet as pq

from billing_dags.core import durable
from billing_dags.defs.shared.metadata import table_metadata
from billing_dags.defs.shared.resources import WarehouseResource
from billing_dags.models.sqlmodels import seed_snapshot_path
from billing_dags.seeds.catalog import SPECS, load_seeds


def write_seed_snapshots(paths, names=None) -> dict[str, dict]:
    """Validate every seed (with cross-references) and snapshot ``names`` (default all) to Parquet."""
    tables = load_seeds(paths.seeds_dir)
    out = {}
    for name, table in tables.items():
        if names is not None and name not in names:
            continue
        dest = seed_snapshot_path(paths, name)
        with durable.staged(dest) as tmp:
            pq.write_table(table, tmp)
        src = paths.seeds_dir / SPECS[name].file
        out[name] = {"rows": table.num_rows, "path": dest, "source": src, "sha256": hashlib.sha256(src.read_bytes()).hexdigest()}
    return out


def _seed_asset(name: str) -> dg.AssetsDefinition:
    spec = SPECS[name]

    @dg.asset(
        name=f"seed_{name}",
        group_name="seeds",
        kinds={"csv", "parquet"},
        description=f"Validated snapshot of seeds/{spec.file} (columns documented in seeds/README.md).",
        metadata={"columns": ", ".join(c.name for c in spec.columns)},
    )
    def _asset(warehouse: WarehouseResource) -> dg.MaterializeResult:
        info = write_seed_snapshots(warehouse.paths(), {name})[name]
        return dg.MaterializeResult(
            metadata={
                "rows": info["rows"],
                "sha256": info["sha256"],
                "source": dg.MetadataValue.path(str(info["source"])),
                "snapshot": dg.MetadataValue.path(str(info["path"])),
                **table_metadata(pq.read_schema(info["path"]), f"seed_{name}", rows=info["rows"]),
            },
            # the CSV's hash: re-snapshotting an unchanged seed leaves the models that read it synced
            data_version=dg.DataVersion(info["sha256"][:16]),
        )

    return _asset


seed_assets = [_seed_asset(name) for name in SPECS]
