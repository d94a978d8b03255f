"""Dagster's standard metadata for the assets' materializations, built in one place.

Every table an asset publishes reports ``dagster/row_count`` (and ``dagster/partition_row_count`` for a
partition), ``dagster/column_schema`` from its Parquet schema, ``dagster/table_name`` (its view in
data/warehouse.duckdb), totals per meter with the meter's unit (never a sum across units), and a data
version computed from the rows: a rerun that republishes the same rows does not mark downstream
partitions "Unsynced".
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from pathlib import Path

import dagster as dg
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from billing_dags.core.calendar import days

#: owners shown on every asset (Dagster owner strings: an email or team:<name>)
OWNERS = ["team:billing"]

#: quantity columns summed per meter (gauge peaks are maxima, not sums)
_SUMMED = ("usage", "gauge_integral", "quantity", "billable_quantity")
_MAXED = ("gauge_peak",)


def with_owners(spec: dg.AssetSpec) -> dg.AssetSpec:
    """``spec`` with OWNERS, unless it names its own owners."""
    return spec if spec.owners else spec.replace_attributes(owners=OWNERS)


def code_version(*parts: str) -> str:
    """A short, stable hash of the code that computes an asset (e.g. its SQL text)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def model_code_version(project, model) -> str:
    """The model's SQL, the SQL of the views and ephemeral models it reads (transitively), and its Python
    engine's source when it has one: a change to any of them is a new code version."""
    from billing_dags.models.sqlmodels import python_engine

    parts, seen, todo = [], set(), [model.name]
    while todo:
        name = todo.pop()
        if name in seen or name not in project.models:
            continue
        seen.add(name)
        m = project.models[name]
        parts.append(f"{name}\n{m.sql}")
        todo.extend(r for r in m.refs if r in project.models and project.models[r].materialized != "table")
    if model.config.get("engine") == "python" and model.config.get("python"):
        try:
            parts.append(inspect.getsource(python_engine(model)))
        except (OSError, TypeError):
            parts.append(str(model.config["python"]))
    return code_version(*sorted(parts))


def column_schema(schema: pa.Schema) -> dg.TableSchema:
    return dg.TableSchema(
        columns=[dg.TableColumn(name=f.name, type=str(f.type), constraints=None if f.nullable else dg.TableColumnConstraints(nullable=False)) for f in schema]
    )


def data_version(con: duckdb.DuckDBPyConnection, table: pa.Table) -> dg.DataVersion:
    """A version of the rows themselves (order-independent): equal rows, equal version."""
    con.register("_dv", table)
    try:
        rows, digest = con.execute("select count(*), coalesce(bit_xor(hash(_dv)), 0) from _dv").fetchall()[0]
    finally:
        con.unregister("_dv")
    return dg.DataVersion(code_version(str(table.schema), str(rows), str(digest)))


def total_rows(files) -> int:
    """Rows in every published Parquet file (footers only; a file's count is read again only once it changed)."""
    total = 0
    for f in files:
        st = Path(f).stat()
        total += _footer_rows(str(f), st.st_mtime_ns, st.st_size, st.st_ino)
    return total


@functools.lru_cache(maxsize=65536)
def _footer_rows(path: str, mtime_ns: int, size: int, inode: int) -> int:
    """Rows of one Parquet file, by its path and identity (a range run counts every published partition
    after each day: each footer is read once instead of once per later day)."""
    return pq.ParquetFile(path).metadata.num_rows


def per_meter_totals(con: duckdb.DuckDBPyConnection, table: pa.Table, units: dict[str, str] | None = None) -> dict:
    """Totals per meter with its unit (and amounts per currency): quantities in different units are never added.

    ``units`` maps meter_id to the meter's unit, for tables without a unit column.
    """
    names = set(table.column_names)
    out: dict = {}
    if not len(table):
        return out
    con.register("_t", table)
    try:
        if "meter_id" in names:
            summed = [c for c in _SUMMED if c in names]
            maxed = [c for c in _MAXED if c in names]
            unit = "unit" if "unit" in names else None
            cols = ", ".join([f"sum({c})::varchar as {c}" for c in summed] + [f"max({c})::varchar as max_{c}" for c in maxed])
            if cols:
                keys = "meter_id" + (", unit" if unit else "")
                rows = con.execute(f"select {keys}, count(*) as rows, {cols} from _t group by all order by all").fetchall()
                header = ["meter_id", *(["unit"] if unit else []), "rows", *summed, *(f"max_{c}" for c in maxed)]
                records = []
                for row in rows:
                    rec = dict(zip(header, row))
                    rec["meter_id"] = rec["meter_id"] or "(none)"
                    if not unit:
                        rec["unit"] = (units or {}).get(rec["meter_id"], "")
                    records.append({k: ("" if v is None else v) for k, v in rec.items()})
                order = ["meter_id", "unit", "rows", *summed, *(f"max_{c}" for c in maxed)]
                out["totals_by_meter"] = dg.MetadataValue.table(
                    records=[dg.TableRecord({k: r[k] for k in order}) for r in records],
                    schema=dg.TableSchema(columns=[dg.TableColumn(k, "int" if k == "rows" else "string") for k in order]),
                )
        if "currency" in names and "amount_minor" in names:
            rows = con.execute("select currency, sum(amount_minor)::varchar from _t group by all order by all").fetchall()
            out["amount_minor_by_currency"] = dg.MetadataValue.json({c or "(none)": v for c, v in rows})
        elif "samples" in names and "meter_id" not in names:
            # a count (not a quantity in a unit): safe to add up
            out["samples"] = int(con.execute("select coalesce(sum(samples), 0) from _t").fetchall()[0][0])
    finally:
        con.unregister("_t")
    return out


def table_metadata(
    table: pa.Table | pa.Schema,
    name: str,
    *,
    partition_rows: int | None = None,
    files=None,
    rows: int | None = None,
) -> dict:
    """Row counts, column schema and table name of a published table.

    For a partition give ``partition_rows`` and the ``files`` of every published partition (the table's
    total row count is read from their footers); otherwise ``rows``.
    """
    schema = table if isinstance(table, pa.Schema) else table.schema
    meta: dict = {
        "dagster/column_schema": column_schema(schema),
        "dagster/table_name": f"warehouse.main.{name}",
    }
    if partition_rows is not None:
        meta["dagster/partition_row_count"] = int(partition_rows)
        if files is not None:
            meta["dagster/row_count"] = total_rows(files)
    elif rows is not None:
        meta["dagster/row_count"] = int(rows)
    elif isinstance(table, pa.Table):
        meta["dagster/row_count"] = table.num_rows
    return meta


def meter_units(seeds_dir: Path) -> dict[str, str]:
    """meter_id -> its unit, from seeds/meters.csv ({} when it cannot be read)."""
    import csv

    try:
        with (Path(seeds_dir) / "meters.csv").open(newline="") as f:
            return {r["meter_id"]: r.get("unit", "") for r in csv.DictReader(f)}
    except (OSError, KeyError):
        return {}


def model_metadata(con: duckdb.DuckDBPyConnection, paths, project, model, table: pa.Table, partitioned: bool) -> dict:
    """Everything above for one published model table (or partition of it)."""
    from billing_dags.models.sqlmodels import model_files

    meta = table_metadata(
        table,
        model.name,
        partition_rows=table.num_rows if partitioned else None,
        files=model_files(paths, model) if partitioned else None,
    )
    meta.update(per_meter_totals(con, table, meter_units(paths.seeds_dir)))
    return meta


def files_data_version(files) -> dg.DataVersion:
    """A version of the bytes of ``files`` (names and contents): rewriting the same data keeps it."""
    h = hashlib.sha256()
    for f in sorted(Path(p) for p in files):
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return dg.DataVersion(h.hexdigest()[:16])


def raw_metadata(paths, window, table: str = "raw_samples", sources=None) -> tuple[dict, dg.DataVersion]:
    """The standard metadata of the raw files an ingest asset wrote for ``window``, and their data version.

    ``table`` is raw_samples (the day's sample files) or raw_events (the day's event files of ``sources``,
    e.g. ``["postgres", "simulate"]``: each source writes its own part-<source>.parquet).
    """
    from billing_dags.ingest import raw
    from billing_dags.ingest.events import event_files, events_root

    if table == "raw_samples":
        files = [f for d in days(window.start, window.end) for f in raw.sample_files(paths, d)]
        every = sorted(paths.raw_samples.glob("date=*/*.parquet"))
    else:
        parts = {f"part-{s}.parquet" for s in sources or ()}
        files = [f for d in days(window.start, window.end) for f in event_files(paths, d) if f.name in parts]
        every = sorted(f for f in events_root(paths).glob("date=*/*.parquet") if f.name in parts)
    meta = {}
    if files:
        meta = table_metadata(pq.read_schema(files[0]), table, partition_rows=total_rows(files), files=every)
    return meta, files_data_version(files)


def materialize_raw_each(context, paths, compute, table: str = "raw_samples", sources=None) -> dg.MaterializeResult:
    """``partitions.materialize_each`` for an ingest asset: each partition's metadata gets the standard
    metadata of its raw files; a one-partition run also reports their data version (Dagster records one
    data version for all partitions of a range run, so a range keeps Dagster's default)."""
    from billing_dags.defs.shared.partitions import materialize_each

    versions = {}

    def with_standard(key, window) -> dict:
        meta = compute(key, window)
        standard, versions[key] = raw_metadata(paths, window, table, sources)
        return {**meta, **standard}

    result = materialize_each(context, with_standard)
    if len(versions) == 1:
        return dg.MaterializeResult(metadata=result.metadata, data_version=next(iter(versions.values())))
    return result
