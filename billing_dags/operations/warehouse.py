"""data/warehouse.duckdb: views over the Parquet partitions, for ad-hoc DuckDB queries.

The file holds views only (partition outputs stay in Parquet), so concurrent partition runs never
contend for it. ``open_warehouse`` gives the same views in memory without touching the file;
``open_read_only`` locks that connection down for `billing sql` and ``query_statements`` admits
queries only.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import duckdb

from billing_dags.core import durable
from billing_dags.core.errors import InputError
from billing_dags.core.settings import Paths
from billing_dags.ingest.events import events_root
from billing_dags.models.sqlmodels import connect, load_project, macros_sql, model_files, partition_dir


def _lit(path: Path | str) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def view_statements(paths: Paths) -> list[str]:
    """CREATE VIEW statements for sources, seeds, view models and every materialized table model."""
    project = load_project()
    stmts = list(macros_sql())
    # the files of a day folder: its own, or (sharded) every shard's of the configured number of shards
    in_day = "*.parquet" if paths.shards == 1 else f"shard=*-of-{paths.shards}/*.parquet"
    if any(paths.raw_samples.glob(f"date=*/{in_day}")):
        stmts.append(
            "create or replace view raw_samples as select series_id, ts, value, date::date as date "
            f"from read_parquet({_lit(paths.raw_samples / 'date=*' / in_day)}, hive_partitioning = true)"
        )
    if any(paths.raw_series.glob(f"date=*/{in_day}")):
        stmts.append(
            "create or replace view raw_series as select series_id, metric, labels, first_seen "
            f"from read_parquet({_lit(paths.raw_series / 'date=*' / in_day)}, hive_partitioning = false)"
        )
    if any(paths.raw_carry_in.glob(f"date=*/{in_day}")):
        stmts.append(
            "create or replace view raw_carry_in as select series_id, ts, value, date::date as date "
            f"from read_parquet({_lit(paths.raw_carry_in / 'date=*' / in_day)}, hive_partitioning = true)"
        )
    else:  # no pulled day yet: an empty carry-in, so the dispute evidence SQL runs on any warehouse
        stmts.append(
            "create or replace view raw_carry_in as select * from "
            "(select 0::bigint as series_id, 0::bigint as ts, 0::double as value, null::date as date) where false"
        )
    events = events_root(paths)
    if any(events.glob(f"date=*/{in_day}")):
        stmts.append(
            "create or replace view raw_events as select event_id, ts, customer_key, meter_id, dimension, kind, "
            "quantity, hold_ms, attributes, date::date as date, "
            "regexp_extract(filename, 'part-(.*)\\.parquet$', 1) as source "
            f"from read_parquet({_lit(events / 'date=*' / in_day)}, hive_partitioning = true, filename = true)"
        )
    for seed in sorted((paths.data_dir / "seeds").glob("*.parquet")):
        stmts.append(f"create or replace view seed_{seed.stem} as select * from read_parquet({_lit(seed)})")
    for name in project.order():
        model = project.models[name]
        if model.materialized == "table":
            files = partition_dir(paths, model) / "**" / "data.parquet"
            if model.partitioned_by == "billing_daily" and paths.shards > 1:
                files = partition_dir(paths, model) / "day=*" / f"shard=*-of-{paths.shards}" / "data.parquet"
            if model_files(paths, model):
                # union_by_name: partitions computed before a column was added read it as null
                stmts.append(f"create or replace view {name} as select * from read_parquet({_lit(files)}, hive_partitioning = false, union_by_name = true)")
        else:
            stmts.append(f"create or replace view {name} as {model.sql.strip().rstrip(';')}")
    return stmts


def _apply(con: duckdb.DuckDBPyConnection, stmts: list[str]) -> list[str]:
    created, failed = [], []
    for stmt in stmts:
        try:
            con.execute(stmt)
            created.append(stmt)
        except duckdb.Error:
            failed.append(stmt)  # a view over a source that is not there yet
    return failed


def open_warehouse(paths: Paths) -> duckdb.DuckDBPyConnection:
    """An in-memory connection with every warehouse view; nothing on disk is locked."""
    con = connect()
    _apply(con, view_statements(paths))
    return con


class RefusedStatement(InputError):
    """A statement `billing sql` does not run (anything but a query); the message names it."""


#: the statement types `billing sql` runs: DuckDB parses WITH, VALUES, FROM-first, SHOW, DESCRIBE,
#: SUMMARIZE as SELECT. EXPLAIN is left out (EXPLAIN ANALYZE runs the statement it explains), and so is
#: PIVOT (a MULTI statement: it creates a type first).
QUERY_STATEMENTS = frozenset({"SELECT"})


def open_read_only(paths: Paths, spill_dir: Path) -> duckdb.DuckDBPyConnection:
    """``open_warehouse`` locked down for ad-hoc queries.

    Files are readable only under the data dir (and DuckDB's own spill files go to ``spill_dir``),
    no extension is installed or loaded, no network, and the configuration is locked so no query
    can undo it. Nothing here stops a write statement inside the data dir: ``query_statements``
    does, before anything runs.
    """
    con = open_warehouse(paths)
    con.execute("set temp_directory = ?", [str(spill_dir)])
    con.execute("set allowed_directories = ?", [[f"{paths.data_dir}{os.sep}"]])
    for setting in ("autoinstall_known_extensions", "autoload_known_extensions", "allow_community_extensions", "enable_external_access"):
        con.execute(f"set {setting} = false")
    con.execute("set lock_configuration = true")
    return con


def query_statements(con: duckdb.DuckDBPyConnection, sql: str) -> list[duckdb.Statement]:
    """The statements of ``sql`` when every one is a query; else RefusedStatement naming the first that is not."""
    statements = con.extract_statements(sql)  # a syntax error raises duckdb.ParserException
    for number, statement in enumerate(statements, 1):
        try:
            kind = statement.type.name
        except ValueError:  # a statement type the Python client does not know (e.g. UPDATE EXTENSIONS)
            kind = "an unknown statement type"
        if kind not in QUERY_STATEMENTS:
            text = " ".join(statement.query.split())
            raise RefusedStatement(
                f"statement {number} refused ({kind}): {text[:120]!r}; billing sql runs queries only (SELECT, WITH, SHOW, DESCRIBE, SUMMARIZE) and ran nothing"
            )
    return statements


def refresh_views(paths: Paths, retries: int = 20) -> dict:
    """Rewrite data/warehouse.duckdb with the current views (retrying while another process holds it)."""
    paths.data_dir.mkdir(parents=True, exist_ok=True)
    stmts = view_statements(paths)
    tmp = durable.temp_path(paths.warehouse_db)
    tmp.unlink(missing_ok=True)
    con = duckdb.connect(str(tmp), config={"autoinstall_known_extensions": False})
    try:
        failed = _apply(con, stmts)
        views = [r[0] for r in con.execute("select view_name from duckdb_views() where not internal order by 1").fetchall()]
    finally:
        con.close()
    for attempt in range(retries):
        try:
            durable.publish(tmp, paths.warehouse_db)
            break
        except OSError:
            time.sleep(0.25 * (attempt + 1))
    return {"views": views, "skipped": len(failed), "path": str(paths.warehouse_db)}
