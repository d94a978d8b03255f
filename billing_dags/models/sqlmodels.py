"""SQL models: one DuckDB file per model under sql_models/, dependencies read from the SQL.

The tree reads in data-flow order, each layer grouped by subject (the subject folder is the
model's Dagster group):

    sql_models/staging/<source>/stg_<source>__<entity>.sql   renamed and cast sources (views)
    sql_models/intermediate/<subject>/int_<what>_by_<grain>.sql  building blocks of the marts
    sql_models/marts/<subject>/fct_<what>_by_<grain>.sql, dim_<what>.sql
    sql_models/<layer>/<subject>/audits/<model>__<audit>.sql  queries returning a model's failing rows
    sql_models/macros/*.sql (loaded first), sql_models/analyses/*.sql (queries for people, not models)

A model file starts with a one-line ``--`` comment (its description, shown in the Dagster UI)
and a ``/* config ... */`` block in YAML:

    -- Exact counter usage per customer, meter and UTC day.
    /* config
    materialized: table          # table (a Parquet partition per run) or view (inlined)
    partitioned_by: billing_daily  # billing_daily | billing_monthly | none
    time_column: day             # every output row must fall in the partition window
    grain: [day, customer_id, meter_id, dimension]   # unique key, checked
    lookback_days: 35            # earlier days it reads: $lookback_start_date / $lookback_start_ms
    require_complete_lookback: true  # fail if one of those days has raw data but no partition
    require_complete_days: true  # a longer period's model: fail if a day of it has raw data but no partition
    */

Every table the SQL reads is either another model (a dependency) or a source (raw samples,
seeds). Nothing else declares dependencies. Partition bounds reach the SQL only as bound
parameters ($start_ms, $end_ms, $start_date, $end_date, $staleness_ms), and so does the
lookback: ``lookback_days`` in the config is its only declaration, the SQL reads it as
$lookback_start_date (the window's start less that many days) or $lookback_start_ms.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import cache
from graphlib import TopologicalSorter
from itertools import pairwise
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import sqlglot
import yaml
from sqlglot import exp

from billing_dags.core import durable
from billing_dags.core.duck import connect, session  # noqa: F401 - the models' connections (re-exported)
from billing_dags.core.errors import InputError
from billing_dags.core.settings import SQL_MODELS_DIR, STALENESS_MS, Paths
from billing_dags.core.shards import Shard, shard_of_dir
from billing_dags.ingest import raw

PARTITIONINGS = {"billing_daily", "billing_monthly", "none"}
#: the folders of the tree, in data-flow order
LAYERS = ("staging", "intermediate", "marts")
#: folders whose SQL files are not models (anywhere in the tree)
NOT_MODELS = {"macros", "analyses", "audits"}
#: the parameters a model with ``lookback_days`` reads its earlier days by
LOOKBACK_PARAMS = {"lookback_start_date", "lookback_start_ms"}


class ModelError(InputError, RuntimeError):
    """A model that cannot be parsed or run; the message names the model and the fix."""


class UseSQLEngine(Exception):
    """Raised by a Python engine for input it does not handle: the model's SQL runs instead."""


@dataclass(frozen=True)
class Model:
    name: str
    path: Path
    sql: str
    description: str
    materialized: str
    partitioned_by: str
    time_column: str | None
    grain: tuple[str, ...]
    lookback_days: int
    group: str
    refs: frozenset[str]
    params: frozenset[str]
    config: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def layer(self) -> str:
        """staging, intermediate or marts: the layer folder the model sits in."""
        return next((p for p in reversed(self.path.parent.parts) if p in LAYERS), self.path.parent.name)


@dataclass(frozen=True)
class Window:
    """A half-open UTC window [start, end) in dates; the partition being computed.

    ``shard``: the shard of customers a daily partition covers when the warehouse is sharded
    (BILLING_SHARDS > 1, core/shards.py); None is the whole day (unsharded, or every shard concatenated)."""

    start: date
    end: date
    shard: Shard | None = None

    @property
    def start_ms(self) -> int:
        return raw.day_bounds_ms(self.start)[0]

    @property
    def end_ms(self) -> int:
        return raw.day_bounds_ms(self.end)[0]

    def params(self, lookback_days: int = 0) -> dict:
        """The bound parameters of a model's SQL for this window; ``lookback_days`` is the model's
        (its config's ``lookback_days``): the earlier days it reads start at $lookback_start_date."""
        return {
            "start_ms": self.start_ms,
            "end_ms": self.end_ms,
            "start_date": self.start,
            "end_date": self.end,
            "lookback_start_date": date.fromordinal(self.start.toordinal() - lookback_days),
            "lookback_start_ms": self.start_ms - lookback_days * raw.DAY_MS,
            "staleness_ms": STALENESS_MS,
        }


def read_header(path: Path, block: str, keys: str) -> tuple[str, str, dict]:
    """A model's or an audit's text, its description (the first ``--`` line) and the YAML of its
    ``/* <block> ... */`` comment (``keys`` names what goes there, for the error message)."""
    text = path.read_text()
    first = text.lstrip().splitlines()[0] if text.strip() else ""
    if not first.startswith("--"):
        raise ModelError(f"{path}: the first line must be a '-- description' comment")
    m = re.search(r"/\*\s*" + block + r"\s*\n(.*?)\*/", text, re.S)
    if not m:
        raise ModelError(f"{path}: missing the /* {block} ... */ block ({keys})")
    try:
        config = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError as e:
        raise ModelError(f"{path}: {block} block is not valid YAML: {e}") from None
    return text, first.lstrip("-").strip(), config


def parse_sql(path: Path, text: str) -> tuple[frozenset[str], frozenset[str]]:
    """The tables a model's or an audit's SQL reads (its CTEs aside) and the bound parameters it uses."""
    try:
        tree = sqlglot.parse_one(text, read="duckdb")
    except sqlglot.errors.ParseError as e:
        raise ModelError(f"{path}: SQL does not parse: {e}") from None
    ctes = {c.alias_or_name for c in tree.find_all(exp.CTE)}
    refs = frozenset(t.name for t in tree.find_all(exp.Table) if t.name and t.name not in ctes)
    params = frozenset(p.name for p in tree.find_all(exp.Placeholder) if p.name)
    return refs, params


def parse_model(path: Path) -> Model:
    name = path.stem
    text, description, config = read_header(path, "config", "materialized, partitioned_by, ...")
    materialized = config.get("materialized", "table")
    partitioned_by = config.get("partitioned_by", "none")
    if materialized not in {"table", "view"}:
        raise ModelError(f"{path}: materialized must be table or view, not {materialized!r}")
    if partitioned_by not in PARTITIONINGS:
        raise ModelError(f"{path}: partitioned_by must be one of {sorted(PARTITIONINGS)}, not {partitioned_by!r}")
    if partitioned_by != "none" and not config.get("time_column"):
        raise ModelError(f"{path}: a partitioned model needs time_column (the column that must fall in the window)")
    refs, params = parse_sql(path, text)
    lookback_days = config.get("lookback_days", 0)
    if not isinstance(lookback_days, int) or lookback_days < 0:
        raise ModelError(f"{path}: lookback_days must be a whole number of days >= 0, not {lookback_days!r}")
    if lookback_days and not params & LOOKBACK_PARAMS:
        raise ModelError(
            f"{path}: declares lookback_days: {lookback_days} but its SQL reads no earlier day; bound what it "
            "reads with $lookback_start_date (or $lookback_start_ms), or drop lookback_days"
        )
    if params & LOOKBACK_PARAMS and not lookback_days:
        raise ModelError(
            f"{path}: reads ${' and $'.join(sorted(params & LOOKBACK_PARAMS))} but declares no lookback_days; "
            "add lookback_days: N (the earlier days it reads) to its config"
        )
    return Model(
        name=name,
        path=path,
        sql=text,
        description=description,
        materialized=materialized,
        partitioned_by=partitioned_by,
        time_column=config.get("time_column"),
        grain=tuple(config.get("grain") or ()),
        lookback_days=lookback_days,
        group=config.get("group", path.parent.name),
        refs=refs,
        params=params,
        config=config,
    )


def is_model_file(path: Path, models_dir: Path) -> bool:
    """A .sql file of the tree that is a model (not a macro, an analysis or an audit)."""
    return not NOT_MODELS & set(path.relative_to(models_dir).parts[:-1])


# --- sources: what models read that is not a model -------------------------------------------


@dataclass(frozen=True)
class Source:
    name: str
    assets: tuple[str, ...]  # the Dagster assets that produce it
    register: Callable[[duckdb.DuckDBPyConnection, Paths, Window | None], None]
    #: earlier daily partitions of its assets a window reads too (raw_events: yesterday's gauge levels)
    lookback_days: int = 0
    #: what it holds depends on the window (else every window sees the same files)
    windowed: bool = False


def _view_over(con: duckdb.DuckDBPyConnection, name: str, files: list[Path], what: str, fix: str) -> None:
    if not files:
        raise ModelError(f"no {what} found; {fix}")
    con.execute(f"create or replace view {name} as select * from read_parquet($files, hive_partitioning = false)".replace("$files", _sql_list(files)))


def _sql_list(files: list[Path]) -> str:
    return "[" + ", ".join("'" + str(f).replace("'", "''") + "'" for f in files) + "]"


def _register_day_samples(con, name: str, root: Path, files_of: Callable[[date], list[Path]], window: Window | None, paths: Paths) -> None:
    """View ``name`` (series_id, ts, value) over the day files of ``root``: the window's days, or all."""
    if window is None:
        files = [f for p in sorted(root.glob("date=*")) for f in raw.day_files(paths, p)]
    else:
        files = []
        d = window.start
        while d < window.end:
            files += files_of(d)
            d = date.fromordinal(d.toordinal() + 1)
    if not files:
        con.execute(f"create or replace view {name} as select * from (select 0::bigint as series_id, 0::bigint as ts, 0::double as value) where false")
        return
    con.execute(f"create or replace view {name} as select series_id, ts, value from read_parquet({_sql_list(files)}, hive_partitioning = false)")


def _register_raw_samples(con, paths: Paths, window: Window | None) -> None:
    shard = window.shard if window else None
    _register_day_samples(con, "raw_samples", paths.raw_samples, lambda d: raw.sample_files(paths, d, shard), window, paths)


def _register_raw_carry_in(con, paths: Paths, window: Window | None) -> None:
    shard = window.shard if window else None
    _register_day_samples(con, "raw_carry_in", paths.raw_carry_in, lambda d: raw.carry_in_files(paths, d, shard), window, paths)


def _register_raw_series(con, paths: Paths, window: Window | None) -> None:
    # a shard's days read the series of that shard only (a series is always in its customer's shard)
    files = raw.series_files(paths, window.shard if window else None)
    if not files:
        con.execute(
            "create or replace view raw_series as select * from (select 0::bigint as series_id, ''::varchar as metric, "
            "map([]::varchar[], []::varchar[]) as labels, 0::bigint as first_seen) where false"
        )
        return
    con.execute(
        f"create or replace view raw_series as select series_id, metric, labels, first_seen from read_parquet({_sql_list(files)}, hive_partitioning = false)"
    )


EVENTS_EMPTY_SQL = (
    "select * from (select ''::varchar as event_id, 0::bigint as ts, ''::varchar as customer_key, ''::varchar as meter_id, "
    "''::varchar as dimension, ''::varchar as kind, 0::decimal(38, 9) as quantity, 0::bigint as hold_ms, "
    "map([]::varchar[], []::varchar[]) as attributes) where false"
)


def _register_raw_events(con, paths: Paths, window: Window | None) -> None:
    from billing_dags.ingest import events

    if window is None:
        files = [f for p in sorted(events.events_root(paths).glob("date=*")) for f in raw.day_files(paths, p)]
    else:
        # the window's days plus the day before: a gauge event of yesterday holds into today (up to
        # hold_ms <= one day), so its carry-in needs it. Models bill delta events, and gauge time,
        # only inside [$start_ms, $end_ms): the extra day is never billed twice.
        files = []
        d = date.fromordinal(window.start.toordinal() - 1)
        while d < window.end:
            files += events.event_files(paths, d, window.shard)
            d = date.fromordinal(d.toordinal() + 1)
    if not files:
        con.execute(f"create or replace view raw_events as {EVENTS_EMPTY_SQL}")
        return
    con.execute(
        "create or replace view raw_events as select event_id, ts, customer_key, meter_id, dimension, kind, quantity, "
        f"hold_ms, attributes from read_parquet({_sql_list(files)}, hive_partitioning = false)"
    )


def pool_shares_dir(paths: Paths) -> Path:
    """Pool-reported accepted shares (seed 000's correlation check), when an operator supplies them."""
    return paths.data_dir / "external" / "pool_shares"


def _register_pool_shares(con, paths: Paths, window: Window | None) -> None:
    files = sorted(pool_shares_dir(paths).glob("*.csv"))
    if not files:
        con.execute(
            "create or replace view external_pool_shares as select * from (select null::date as day, "
            "null::varchar as customer_id, null::decimal(38, 9) as accepted_shares) where false"
        )
        return
    con.execute(
        "create or replace view external_pool_shares as select * from read_csv("
        f"{_sql_list(files)}, header = true, "
        "columns = {'day': 'DATE', 'customer_id': 'VARCHAR', 'accepted_shares': 'DECIMAL(38, 9)'})"
    )


def _seed_source(name: str) -> Source:
    def register(con, paths: Paths, window: Window | None) -> None:
        path = seed_snapshot_path(paths, name)
        if not path.exists():
            raise ModelError(f"seed snapshot {path} is missing; materialize the seed_{name} asset (or run `billing run`)")
        con.execute(f"create or replace view seed_{name} as select * from read_parquet({_sql_list([path])}, hive_partitioning = false)")

    return Source(f"seed_{name}", (f"seed_{name}",), register)


def seed_snapshot_path(paths: Paths, name: str) -> Path:
    return paths.data_dir / "seeds" / f"{name}.parquet"


RAW_ASSETS = ("raw_samples", "remote_write_samples")
#: the assets that write the raw events layout (billing_dags/ingest/events.py)
EVENT_ASSETS = ("usage_events", "usage_reports")


def sources() -> dict[str, Source]:
    from billing_dags.seeds.catalog import SPECS

    out = {
        # every ingestion source writes the raw layout: Prometheus pull or simulation, and remote write
        "raw_samples": Source("raw_samples", RAW_ASSETS, _register_raw_samples, windowed=True),
        "raw_series": Source("raw_series", RAW_ASSETS, _register_raw_series),
        # each series' last sample before the day, recorded by the day's own ingest (raw.write_carry_in)
        "raw_carry_in": Source("raw_carry_in", RAW_ASSETS, _register_raw_carry_in, windowed=True),
        # usage that is not a Prometheus counter (raw/events: PostgreSQL usage_events, ...)
        "raw_events": Source("raw_events", EVENT_ASSETS, _register_raw_events, lookback_days=1, windowed=True),
        # CSV files an operator drops in data/external/pool_shares/ (day, customer_id, accepted_shares)
        "external_pool_shares": Source("external_pool_shares", (), _register_pool_shares),
    }
    for name in SPECS:
        out[f"seed_{name}"] = _seed_source(name)
    return out


# --- the project: every model, its dependencies, its order -------------------------------------


@dataclass(frozen=True)
class Project:
    models: dict[str, Model]

    def upstream_models(self, name: str) -> set[str]:
        return {r for r in self.models[name].refs if r in self.models}

    def upstream_sources(self, name: str) -> set[str]:
        return {r for r in self.models[name].refs if r not in self.models}

    def table_deps(self, name: str) -> tuple[set[str], set[str]]:
        """Tables and sources a model needs, seen through view models (which are inlined)."""
        return self.reads_deps(self.models[name].refs)

    def reads_deps(self, refs: frozenset[str] | set[str]) -> tuple[set[str], set[str]]:
        """Tables and sources a query reading ``refs`` needs, seen through view models."""
        tables, srcs = set(), {r for r in refs if r not in self.models}
        for up in {r for r in refs if r in self.models}:
            if self.models[up].materialized == "table":
                tables.add(up)
            else:
                t, s = self.table_deps(up)
                tables |= t
                srcs |= s
        return tables, srcs

    def views_needed(self, name: str) -> list[str]:
        """View models needed by ``name``, in dependency order."""
        return self.views_read(self.models[name].refs)

    def views_read(self, refs: frozenset[str] | set[str]) -> list[str]:
        """View models a query reading ``refs`` needs, in dependency order."""
        needed: dict[str, set[str]] = {}

        def visit(ups: set[str]) -> None:
            for up in ups:
                if self.models[up].materialized == "view" and up not in needed:
                    needed[up] = {u for u in self.upstream_models(up) if self.models[u].materialized == "view"}
                    visit(self.upstream_models(up))

        visit({r for r in refs if r in self.models})
        return list(TopologicalSorter(needed).static_order())

    def order(self) -> list[str]:
        return list(TopologicalSorter({n: self.upstream_models(n) for n in self.models}).static_order())


@cache
def _load_project_cached(models_dir: str, stamp: tuple) -> Project:
    known = sources()
    models: dict[str, Model] = {}
    for path in sorted(Path(models_dir).rglob("*.sql")):
        if not is_model_file(path, Path(models_dir)):
            continue  # macros are loaded first; analyses are queries for people (disputes); audits check models
        model = parse_model(path)
        if model.name in models:
            raise ModelError(f"{path}: model name {model.name} also used by {models[model.name].path}")
        models[model.name] = model
    for model in models.values():
        unknown = {r for r in model.refs if r not in models and r not in known}
        if unknown:
            raise ModelError(
                f"{model.path}: reads {', '.join(sorted(unknown))}, which is neither a model in {models_dir} "
                f"nor a source ({', '.join(sorted(known))}); fix the table name or add the model"
            )
    project = Project(models)
    try:
        project.order()
    except Exception as e:  # graphlib.CycleError
        raise ModelError(f"models in {models_dir} depend on each other in a cycle: {e}") from None
    return project


def load_project(models_dir: Path = SQL_MODELS_DIR) -> Project:
    files = sorted(Path(models_dir).rglob("*.sql"))
    stamp = tuple((str(f), f.stat().st_mtime_ns) for f in files)
    return _load_project_cached(str(models_dir), stamp)


def macros_sql(models_dir: Path = SQL_MODELS_DIR) -> list[str]:
    return [p.read_text() for p in sorted((Path(models_dir) / "macros").glob("*.sql"))]


# --- running ---------------------------------------------------------------------------------


def create_table(con: duckdb.DuckDBPyConnection, name: str, table: pa.Table) -> None:
    """Replace table ``name`` in ``con`` with the rows of an Arrow table (fixtures, projections)."""
    tmp = f"__arrow_{name}"
    con.register(tmp, table)
    try:
        con.execute(f"create or replace table {name} as select * from {tmp}")
    finally:
        con.unregister(tmp)


def partition_dir(paths: Paths, model: Model) -> Path:
    return paths.models / model.name


def partition_file(paths: Paths, model: Model, window: Window | None) -> Path:
    """The file of one partition: of a (day, shard) for a daily model of a sharded window."""
    base = partition_dir(paths, model)
    if model.partitioned_by == "billing_daily":
        return raw.shard_dir(base / f"day={window.start.isoformat()}", window.shard) / "data.parquet"
    if model.partitioned_by == "billing_monthly":
        return base / f"month={window.start.strftime('%Y-%m')}" / "data.parquet"
    return base / "data.parquet"


def model_files(paths: Paths, model: Model, shard: Shard | None = None) -> list[Path]:
    """Every partition file of ``model``; of a daily model when sharded: ``shard``'s, else every shard's
    (of the configured number of shards: a day's shards concatenate to the day), by day then shard."""
    base = partition_dir(paths, model)
    if model.partitioned_by != "billing_daily" or paths.shards == 1:
        return sorted(base.rglob("data.parquet"))
    pattern = f"day=*/{shard.dirname}/data.parquet" if shard is not None else f"day=*/shard=*-of-{paths.shards}/data.parquet"
    return sorted(base.glob(pattern))


def day_partition_files(paths: Paths, model: Model, window: Window) -> list[Path]:
    """The files holding a daily model's rows of ``window`` (one day): the window's shard's, or the
    whole day's (every shard's when sharded), existing ones only."""
    if window.shard is not None or paths.shards == 1:
        f = partition_file(paths, model, window)
        return [f] if f.exists() else []
    return sorted((partition_dir(paths, model) / f"day={window.start.isoformat()}").glob(f"shard=*-of-{paths.shards}/data.parquet"))


def read_day_partition(paths: Paths, model: Model, window: Window) -> pa.Table | None:
    """A daily model's rows of ``window`` (the shards of a sharded day concatenated in shard order), or None
    when the day has no partition."""
    files = day_partition_files(paths, model, window)
    if not files:
        return None
    return pa.concat_tables([pq.read_table(f, partitioning=None) for f in files]) if len(files) > 1 else pq.read_table(files[0], partitioning=None)


def partition_day(path: Path) -> date:
    """The day of a daily model's partition file (``day=D/data.parquet`` or ``day=D/shard=K-of-N/data.parquet``)."""
    folder = path.parent.parent if shard_of_dir(path.parent.name) else path.parent
    return date.fromisoformat(folder.name.split("=", 1)[1])


def prepare(
    con: duckdb.DuckDBPyConnection,
    project: Project,
    name: str,
    paths: Paths | None,
    window: Window | None,
    *,
    models_dir: Path = SQL_MODELS_DIR,
) -> None:
    """Create in ``con`` everything model ``name`` reads: macros, sources, upstream tables, views.

    With ``paths=None`` the caller has already created the sources and upstream tables (tests do
    this with fixture rows); only macros and view models are created.
    """
    prepare_reads(con, project, project.models[name].refs, paths, window, models_dir=models_dir)


def prepare_reads(
    con: duckdb.DuckDBPyConnection,
    project: Project,
    refs: frozenset[str] | set[str],
    paths: Paths | None,
    window: Window | None,
    *,
    models_dir: Path = SQL_MODELS_DIR,
) -> None:
    """``prepare`` for any query of the project (a model, an audit) that reads the tables ``refs``."""
    for sql in macros_sql(models_dir):
        con.execute(sql)
    tables, srcs = project.reads_deps(refs)
    if paths is not None:
        known = sources()
        for s in sorted(srcs):
            known[s].register(con, paths, window)
        for t in sorted(tables):
            m = project.models[t]
            # a shard's day reads its own shard of the daily models it reads; anything else every shard
            shard = window.shard if window is not None and m.partitioned_by == "billing_daily" else None
            _view_over(
                con,
                t,
                model_files(paths, m, shard),
                f"materialized partitions of {t} under {partition_dir(paths, m)}",
                f"materialize {t} first (its partitions for the window this run reads)",
            )
    for v in project.views_read(refs):
        con.execute(f"create or replace view {v} as {_strip_trailing(project.models[v].sql)}")


def _prepare_range(con: duckdb.DuckDBPyConnection, project: Project, name: str, paths: Paths, windows: list[Window]) -> list[str]:
    """``prepare`` for several windows of a model at once: the macros, the view models, the upstream
    tables' views and the sources that do not depend on the window are created once (over the same
    files as ``prepare``: the same plans, so the same rows in the same order). Returns the sources
    to register again for each window."""
    prepare(con, project, name, paths, windows[0])
    _, srcs = project.table_deps(name)
    known = sources()
    return [s for s in sorted(srcs) if known[s].windowed]


def _strip_trailing(sql: str) -> str:
    return sql.strip().rstrip(";")


def bound_params(what: str, path: Path, used: frozenset[str], window: Window | None, lookback_days: int) -> dict:
    """The values of the bound parameters ``used`` by a model's or an audit's SQL (``what`` names it)."""
    if not used:
        return {}
    if window is None:
        raise ModelError(f"{what} uses parameters {sorted(used)} and needs a partition window")
    available = window.params(lookback_days)
    missing = used - set(available)
    if missing:
        raise ModelError(f"{path}: unknown parameters {sorted(missing)}; available: {sorted(available)}")
    return {k: available[k] for k in used}


def query(con: duckdb.DuckDBPyConnection, model: Model, window: Window | None) -> pa.Table:
    params = bound_params(f"model {model.name}", model.path, model.params, window, model.lookback_days)
    try:
        return con.sql(_strip_trailing(model.sql), params=params or None).to_arrow_table()
    except duckdb.Error as e:
        raise ModelError(f"model {model.name} ({model.path}) failed for window {window}: {e}") from None


def check_window(model: Model, table: pa.Table, window: Window | None) -> None:
    """Every output row of a partitioned model falls in its half-open window [start, end)."""
    if model.partitioned_by == "none" or len(table) == 0:
        return
    col = table[model.time_column]
    lo, hi = pc.min(col).as_py(), pc.max(col).as_py()
    if isinstance(lo, datetime):
        lo, hi = lo.date(), hi.date()
    if lo < window.start or hi >= window.end:
        raise ModelError(
            f"model {model.name}: {model.time_column} ranges {lo}..{hi}, outside its partition [{window.start}, {window.end}); "
            "filter on the bound parameters $start_date/$end_date (half-open: >= start and < end)"
        )


def check_grain(model: Model, table: pa.Table) -> None:
    """One output row per grain key (the model config's ``grain``)."""
    if not model.grain or len(table) < 2:
        return
    counts = table.group_by(list(model.grain), use_threads=False).aggregate([([], "count_all")])
    dupes = counts.filter(pc.greater(counts["count_all"], 1))
    if len(dupes):
        shown = "; ".join(", ".join(f"{c}={r[c]}" for c in model.grain) for r in dupes.slice(0, 3).to_pylist())
        raise ModelError(
            f"model {model.name}: {len(dupes)} keys of its grain ({', '.join(model.grain)}) have more than one row, e.g. {shown}; "
            f"nothing was written (the previous partition stays). Fix {model.path} so it returns one row per key"
        )


def write_partition(paths: Paths, model: Model, window: Window | None, table: pa.Table, validate: Callable[[pa.Table], None] | None = None) -> Path:
    """Delete-window-then-insert: the partition's file is replaced whole, durably, once it is valid.

    The window and grain are checked, then ``validate`` (e.g. the asset's blocking checks, raising to
    refuse the rows), all before the new file is published: a partition that fails a check is never
    visible, and the previous one stays.
    """
    check_window(model, table, window)
    check_grain(model, table)
    if validate is not None:
        validate(table)
    if model.grain and len(table):
        # deterministic bytes: DuckDB's parallel aggregation returns rows in any order
        table = table.sort_by([(c, "ascending") for c in model.grain])
    dest = partition_file(paths, model, window)
    with durable.staged(dest) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return dest


@dataclass
class RunResult:
    model: str
    window: Window | None
    rows: int
    path: Path
    seconds: float
    table: pa.Table


def python_engine(model: Model) -> Callable:
    """The function named by ``python: module:function`` in a model's config (``engine: python``)."""
    import importlib

    target = model.config.get("python") or ""
    module, _, func = target.partition(":")
    try:
        return getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError, ValueError) as e:
        raise ModelError(f"{model.path}: engine python needs `python: module:function`, got {target!r} ({e})") from None


def run_model(
    paths: Paths,
    name: str,
    window: Window | None,
    *,
    project: Project | None = None,
    engine: str | None = None,
    threads: int | None = None,
    validate: Callable[[pa.Table], None] | None = None,
) -> RunResult:
    """Compute one partition of a table model and write it (replacing the old partition).

    ``engine`` overrides the model's configured engine: "sql" runs the SQL even where a model
    names a Python implementation (tests and benchmarks compare the two). ``threads`` caps the
    threads of this partition's work (DuckDB's pool, the Python engine's readers); None uses
    every core, which is right for one partition at a time, not for several in parallel.
    ``validate`` runs on the rows before they are published (see ``write_partition``).
    """
    project = project or load_project()
    if name not in project.models:
        raise ModelError(f"unknown model {name!r}; models: {', '.join(sorted(project.models))}")
    model = project.models[name]
    if model.partitioned_by != "none" and window is None:
        raise ModelError(f"model {name} is partitioned by {model.partitioned_by}; give a partition window")
    t0 = time.perf_counter()
    table = None
    if (engine or model.config.get("engine", "sql")) == "python":
        # a faster implementation of the same model; the SQL stays its specification (tests compare)
        try:
            table = python_engine(model)(paths, model, window, threads=threads)
        except UseSQLEngine:
            table = None
    if table is None:
        with session(threads) as con:
            prepare(con, project, name, paths, window)
            table = query(con, model, window)
    path = write_partition(paths, model, window, table, validate)
    return RunResult(name, window, len(table), path, time.perf_counter() - t0, table)


def run_model_days(paths: Paths, name: str, windows: list[Window], **options) -> list[RunResult]:
    """``run_model`` for each of ``windows`` in turn (e.g. every day of a range, in order): each
    partition is computed and written exactly as ``run_model`` alone would (same rows, same bytes),
    and a failure stops at its window (the earlier ones stay written). ``options`` are
    ``iter_model_days``'s (project, engine, threads, validate(window, rows) run on each window's rows
    before they are published, before)."""
    return list(iter_model_days(paths, name, windows, **options))


def iter_model_days(
    paths: Paths,
    name: str,
    windows: list[Window],
    *,
    project: Project | None = None,
    engine: str | None = None,
    threads: int | None = None,
    validate: Callable[[Window, pa.Table], None] | None = None,
    before: Callable[[Window], None] | None = None,
) -> Iterator[RunResult]:
    """``run_model_days`` one window at a time: yields each window's result once it is written, so the
    caller can record it before the next window runs. ``before(window)`` runs before a window is
    computed (e.g. to check its inputs, or take their snapshot); raising stops there.

    Faster than one ``run_model`` per window for a SQL model partitioned by day: one DuckDB
    session for all windows, with the macros, view models, upstream tables' views and the
    sources that do not depend on the window created once (the model does not write its
    upstreams, so their partitions cannot change meanwhile); only the raw sources of each window
    are registered per window. The views read the same files as ``run_model``'s, so DuckDB runs
    the same plans: some SQL (e.g. a ``qualify`` over ties) depends on the order rows arrive in.
    A Python engine gets that session when it says it takes one (``takes_session``); other
    engines and partitionings run window by window.
    """
    project = project or load_project()
    if name not in project.models:
        raise ModelError(f"unknown model {name!r}; models: {', '.join(sorted(project.models))}")
    model = project.models[name]
    windows = list(windows)
    if model.partitioned_by != "none" and any(w is None for w in windows):
        raise ModelError(f"model {name} is partitioned by {model.partitioned_by}; give a partition window")
    shards = list(dict.fromkeys(w.shard for w in windows))
    if len(shards) > 1:
        # one session per shard: the upstream views and the series a window reads are its shard's
        for shard in shards:
            yield from iter_model_days(
                paths, name, [w for w in windows if w.shard == shard], project=project, engine=engine, threads=threads, validate=validate, before=before
            )
        return
    python = (engine or model.config.get("engine", "sql")) == "python"
    fn = python_engine(model) if python else None
    if not python and model.config.get("range_query") and model.partitioned_by == "billing_daily" and len(windows) > 1 and _consecutive(windows):
        yield from _iter_range_query(paths, project, model, windows, threads=threads, validate=validate, before=before)
        return
    if (python and not getattr(fn, "takes_session", False)) or model.partitioned_by != "billing_daily" or len(windows) < 2:
        for w in windows:
            if before is not None:
                before(w)
            yield run_model(paths, name, w, project=project, engine=engine, threads=threads, validate=(lambda t, w=w: validate(w, t)) if validate else None)
        return
    known = sources()
    with session(threads) as con:
        per_window = None
        for window in windows:
            if before is not None:
                before(window)
            t0 = time.perf_counter()
            if per_window is None:
                per_window = _prepare_range(con, project, name, paths, windows)
            for s in per_window:
                known[s].register(con, paths, window)
            table = None
            if fn is not None:
                try:
                    table = fn(paths, model, window, threads=threads, con=con)
                except UseSQLEngine:
                    table = None
            if table is None:
                table = query(con, model, window)
            path = write_partition(paths, model, window, table, (lambda t, w=window: validate(w, t)) if validate else None)
            yield RunResult(name, window, len(table), path, time.perf_counter() - t0, table)


#: the most days one query of a ``range_query`` model computes (a longer range runs in several queries)
RANGE_QUERY_DAYS = 31


def _consecutive(windows: list[Window]) -> bool:
    return all(a.end == b.start for a, b in pairwise(windows))


def _iter_range_query(
    paths: Paths,
    project: Project,
    model: Model,
    windows: list[Window],
    *,
    threads: int | None,
    validate: Callable[[Window, pa.Table], None] | None,
    before: Callable[[Window], None] | None,
) -> Iterator[RunResult]:
    """``iter_model_days`` for a model whose SQL computes every day of its window at once (config
    ``range_query: true``: each day d of [$start_date, $end_date) from its own lookback only, so a
    day's rows are those a run of that day alone gives). Up to RANGE_QUERY_DAYS consecutive days
    run as one query (planned once instead of once per day); the result is split by day, and each
    day is validated, written and yielded in order as ``run_model`` would. ``before`` runs for
    each day of a query before it is computed; when it raises, the days before that one are still
    computed and written, then the error propagates."""
    known = sources()
    with session(threads) as con:
        per_window = None
        for i in range(0, len(windows), RANGE_QUERY_DAYS):
            chunk, ready, stop = windows[i : i + RANGE_QUERY_DAYS], [], None
            for window in chunk:
                if before is not None:
                    try:
                        before(window)
                    except BaseException as e:
                        stop = e
                        break
                ready.append(window)
            if ready:
                t0 = time.perf_counter()
                if per_window is None:
                    per_window = _prepare_range(con, project, model.name, paths, windows)
                span = Window(ready[0].start, ready[-1].end, ready[0].shard)
                for s in per_window:
                    known[s].register(con, paths, span)
                table = query(con, model, span)
                check_window(model, table, span)
                shared = (time.perf_counter() - t0) / len(ready)
                days = table[model.time_column]
                for window in ready:
                    t1 = time.perf_counter()
                    rows = table.filter(pc.equal(days, pa.scalar(window.start, days.type)))
                    path = write_partition(paths, model, window, rows, (lambda t, w=window: validate(w, t)) if validate else None)
                    yield RunResult(model.name, window, len(rows), path, shared + time.perf_counter() - t1, rows)
            if stop is not None:
                raise stop


# --- the billable quantity outside the monthly job ------------------------------------------------

BILLABLE_MODEL = "fct_billable_usage_by_subscription_period"


def billable_quantities(
    daily: pa.Table,
    seeds: dict[str, pa.Table],
    window: Window,
    period: Window | None = None,
    *,
    project: Project | None = None,
) -> list[dict]:
    """The billable quantity of ``daily`` (fct_usage_by_day rows) per customer, meter and dimension,
    computed by the models the invoices use (fct_usage_by_subscription_period ->
    fct_billable_usage_by_subscription_period) with every customer in one period, ``period`` (default
    the whole window): the days of the period are summed, then each meter's aggregation applies.
    ``window`` is the month the quantity belongs to (unit-months divide by its length). In memory;
    nothing is written. Rows as the model returns them, sorted by customer, meter and dimension."""
    project = project or load_project()
    period = period or window
    with session(1) as con:
        for name, table in seeds.items():
            create_table(con, f"seed_{name}", table)
        create_table(con, "fct_usage_by_day", daily)
        con.execute(
            "create or replace table dim_subscription_periods_by_month as select distinct "
            "$month::date as month, customer_id, $start::date as period_start, $end::date as period_end "
            "from fct_usage_by_day",
            {"month": window.start, "start": period.start, "end": period.end},
        )
        for name in ("fct_usage_by_subscription_period", BILLABLE_MODEL):
            prepare(con, project, name, None, window)
            create_table(con, name, query(con, project.models[name], window))
        rows = con.sql(f"select * from {BILLABLE_MODEL} order by customer_id, meter_id, dimension").to_arrow_table()
    return rows.to_pylist()
