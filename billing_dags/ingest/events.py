"""The raw events layout: usage that is not a Prometheus series (LLM usage_events rows, usage reports).

``raw/events/date=YYYY-MM-DD/part-<source>.parquet``, one row per (event, meter):

- ``event_id`` (string): unique per source; a usage_events row with input and output tokens
  becomes two rows, ``<id>:in`` and ``<id>:out``
- ``ts`` (int64 ms UTC): inside the day's window [00:00, 24:00)
- ``customer_key`` (string): the value of the meter's customer label (``api_key_hash`` for the
  LLM meters), matched against ``customers.label_value`` by the models (unknown keys are billed
  to nobody)
- ``meter_id`` (string): a meter of seeds/meters.csv; ``dimension`` (string, '' if none)
- ``kind``: ``delta`` (an increment of a ``counter`` meter) or ``gauge`` (a level of a ``gauge``
  meter); any other pairing of kind and meter is refused
- ``quantity`` (decimal128(38, 9)): exact, never negative (an increment, or a level)
- ``hold_ms`` (int64): 0 for a delta. For a gauge, how long the level holds at most: it holds
  until the next gauge event of the same (customer_key, meter_id, dimension) or ``ts + hold_ms``,
  whichever is first (DESIGN rule 5: e.g. the report interval plus the 5-minute staleness
  limit); 1 ms .. 86,400,000 ms (one day). A gauge event near midnight holds into the next
  day: the models read the day before each window for that carry-in. An input without the
  column is all deltas (hold_ms 0).
- ``attributes`` (map<string, string>): provider, status, ...

A source writes a whole day at a time, through :func:`write_events_day` only: the rows are
validated, de-duplicated on ``event_id`` (the last row of an id wins), sorted by (ts, event_id)
and published durably (temporary name, fsync, rename, fsync of the folder), so a reader sees the old day or the new
day, never half of one, and rewriting a day with the same events gives the same bytes. Input is
streamed (record batches) through a spill file and DuckDB, so memory stays bounded.

De-duplication is per source and day only: :func:`cross_day_duplicates` finds event ids of a
source's day that the same source also wrote on another day (an event the source moved to another
day; both copies would be billed until the other day is rerun).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterable
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from billing_dags.core import durable
from billing_dags.core.errors import InputError
from billing_dags.core.settings import Paths
from billing_dags.core.shards import Shard, all_shards, shard_of
from billing_dags.ingest import raw

EVENTS_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("ts", pa.int64(), nullable=False),
        pa.field("customer_key", pa.string(), nullable=False),
        pa.field("meter_id", pa.string(), nullable=False),
        pa.field("dimension", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("quantity", pa.decimal128(38, 9), nullable=False),
        pa.field("hold_ms", pa.int64(), nullable=False),
        pa.field("attributes", pa.map_(pa.string(), pa.string()), nullable=False),
    ]
)
KINDS = {"delta", "gauge"}
#: the meter kind (seeds/meters.csv) each event kind needs
METER_KIND = {"delta": "counter", "gauge": "gauge"}
#: a gauge level holds at most one day (so a day's carry-in comes from the day before only)
MAX_HOLD_MS = raw.DAY_MS
#: columns an input may leave out: their defaults
_OPTIONAL = ("dimension", "hold_ms", "attributes")
_SOURCE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,40}$")
_BATCH_ROWS = 65_536


class EventsLayoutError(InputError):
    """Events that do not fit the raw events layout (wrong day, unknown meter, bad types)."""


def events_root(paths: Paths) -> Path:
    return paths.data_dir / "raw" / "events"


def events_day_dir(paths: Paths, day: date) -> Path:
    return events_root(paths) / f"date={day.isoformat()}"


def event_files(paths: Paths, day: date, shard: Shard | None = None) -> list[Path]:
    """The day's event files: ``shard``'s, or the whole day's (every shard's when sharded; raw.day_files)."""
    return raw.day_files(paths, events_day_dir(paths, day), shard)


def _meter_kinds(paths: Paths) -> dict[str, str]:
    from billing_dags.seeds.catalog import read_seed

    meters = read_seed(paths.seeds_dir, "meters")
    return dict(zip(meters["meter_id"].to_pylist(), meters["kind"].to_pylist()))


def _as_batches(events: pa.Table | pa.RecordBatch | Iterable[pa.RecordBatch]) -> Iterable[pa.RecordBatch]:
    if isinstance(events, pa.Table):
        yield from events.to_batches(max_chunksize=_BATCH_ROWS)
    elif isinstance(events, pa.RecordBatch):
        yield events
    else:
        yield from events


def _conform(batch: pa.RecordBatch | pa.Table, day: date, source: str, meter_kinds: dict[str, str]) -> pa.Table:
    """One input batch checked and cast to EVENTS_SCHEMA; raises EventsLayoutError naming the problem."""
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    where = f"events for {day} from source {source!r}"
    missing = [n for n in EVENTS_SCHEMA.names if n not in table.column_names and n not in _OPTIONAL]
    if missing:
        raise EventsLayoutError(f"{where}: missing columns {missing}; the layout is {EVENTS_SCHEMA.names}")
    n = len(table)
    if "dimension" not in table.column_names:
        table = table.append_column("dimension", pa.array([""] * n, pa.string()))
    if "hold_ms" not in table.column_names:  # an input without hold_ms is all deltas
        table = table.append_column("hold_ms", pa.array([0] * n, pa.int64()))
    if "attributes" not in table.column_names:
        table = table.append_column("attributes", pa.array([[]] * n, pa.map_(pa.string(), pa.string())))
    table = table.select(EVENTS_SCHEMA.names)
    table = table.set_column(table.schema.get_field_index("dimension"), "dimension", pc.fill_null(table["dimension"], ""))
    try:
        table = table.cast(pa.schema([f.with_nullable(True) for f in EVENTS_SCHEMA]))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise EventsLayoutError(f"{where}: columns do not cast to the events layout ({e})") from None
    for name in EVENTS_SCHEMA.names:
        if name != "attributes" and table[name].null_count:
            raise EventsLayoutError(f"{where}: column {name} has {table[name].null_count} null values")
    if table["attributes"].null_count:
        table = table.set_column(
            table.schema.get_field_index("attributes"),
            "attributes",
            pc.if_else(pc.is_null(table["attributes"]), pa.scalar([], EVENTS_SCHEMA.field("attributes").type), table["attributes"]),
        )
    if not n:
        return table.cast(EVENTS_SCHEMA)
    start_ms, end_ms = raw.day_bounds_ms(day)
    lo, hi = pc.min(table["ts"]).as_py(), pc.max(table["ts"]).as_py()
    if lo < start_ms or hi >= end_ms:
        raise EventsLayoutError(f"{where}: timestamps {lo}..{hi} ms outside [{start_ms}, {end_ms}); split events by UTC day before writing")
    bad_kinds = set(pc.unique(table["kind"]).to_pylist()) - KINDS
    if bad_kinds:
        raise EventsLayoutError(f"{where}: kind {sorted(bad_kinds)} is not one of {sorted(KINDS)}")
    pairs = pa.table({"meter_id": table["meter_id"], "kind": table["kind"]}).group_by(["meter_id", "kind"]).aggregate([])
    for meter, kind in sorted(zip(pairs["meter_id"].to_pylist(), pairs["kind"].to_pylist())):
        meter_kind = meter_kinds.get(meter)
        if meter_kind is None:
            raise EventsLayoutError(f"{where}: meter_id {meter!r} is not in seeds/meters.csv; add the meter or fix the source")
        if meter_kind != METER_KIND[kind]:
            fix = "send its increments as kind 'delta' (hold_ms 0)" if meter_kind == "counter" else "send its levels as kind 'gauge' with a hold_ms"
            raise EventsLayoutError(f"{where}: meter {meter!r} is a {meter_kind}; {kind} events need a {METER_KIND[kind]} meter ({fix}, or fix meter_id)")
    negative = pc.less(table["quantity"], pa.scalar(0, pa.decimal128(38, 9)))
    if pc.any(negative).as_py():
        first = table.filter(negative).slice(0, 1).to_pylist()[0]
        why = "a delta never decreases usage" if first["kind"] == "delta" else "a gauge level is never below zero"
        raise EventsLayoutError(f"{where}: event {first['event_id']!r} has a negative quantity; {why}")
    is_gauge = pc.equal(table["kind"], "gauge")
    bad_hold = pc.if_else(
        is_gauge,
        pc.or_(pc.less(table["hold_ms"], 1), pc.greater(table["hold_ms"], MAX_HOLD_MS)),
        pc.not_equal(table["hold_ms"], 0),
    )
    if pc.any(bad_hold).as_py():
        first = table.filter(bad_hold).slice(0, 1).to_pylist()[0]
        if first["kind"] == "gauge":
            raise EventsLayoutError(
                f"{where}: gauge event {first['event_id']!r} has hold_ms {first['hold_ms']}; give how long the level "
                f"holds at most, 1..{MAX_HOLD_MS} ms (one day), e.g. the report interval plus the 5-minute staleness limit"
            )
        raise EventsLayoutError(
            f"{where}: delta event {first['event_id']!r} has hold_ms {first['hold_ms']}; hold_ms is 0 for a delta "
            "(only a gauge level holds): set it to 0, or send the event as kind 'gauge' of a gauge meter"
        )
    if pc.any(pc.equal(table["event_id"], "")).as_py():
        raise EventsLayoutError(f"{where}: an event has an empty event_id")
    return table


def write_events_day(paths: Paths, day: date, table: pa.Table | pa.RecordBatch | Iterable[pa.RecordBatch], source: str) -> dict:
    """Replace one source's raw events partition of ``day`` with ``table`` (or a stream of batches).

    Every event must lie in the day's window. Duplicates of ``event_id`` are dropped, the last
    one in input order kept. On any error nothing is written (the old partition stays). Returns
    figures for asset metadata.
    """
    if not _SOURCE_RE.match(source):
        raise EventsLayoutError(f"source name {source!r} must match {_SOURCE_RE.pattern}")
    meter_kinds = _meter_kinds(paths)
    day_dir = events_day_dir(paths, day)
    dest = day_dir / f"part-{source}.parquet"
    if paths.shards > 1:
        day_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".events-", dir=day_dir) as work:
            whole = Path(work) / "day.parquet"
            rows_in, rows_out = _write_whole_day(whole, work, day, table, source, meter_kinds)
            written = _split_by_shard(paths, day, pq.read_table(whole), source)
        size = sum(f.stat().st_size for f in written)
        return {"events_in": rows_in, "events": rows_out, "duplicates_dropped": rows_in - rows_out, "bytes": size, "path": str(day_dir)}
    with durable.staged(dest) as tmp, tempfile.TemporaryDirectory(prefix=".events-", dir=dest.parent) as work:
        rows_in, rows_out = _write_whole_day(tmp, work, day, table, source, meter_kinds)
    return {
        "events_in": rows_in,
        "events": rows_out,
        "duplicates_dropped": rows_in - rows_out,
        "bytes": dest.stat().st_size,
        "path": str(dest),
    }


def _write_whole_day(tmp: Path, work: str, day: date, table, source: str, meter_kinds: dict[str, str]) -> tuple[int, int]:
    """The day's events, checked, de-duplicated and sorted, written to ``tmp``; (rows in, rows out)."""
    rows_in = 0
    # 1. stream the input, checked, to a spill file with its input order (last write wins)
    spill = Path(work) / "spill.parquet"
    spill_schema = pa.schema([*[f.with_nullable(True) for f in EVENTS_SCHEMA], pa.field("_seq", pa.int64())])
    with pq.ParquetWriter(spill, spill_schema, compression="zstd") as writer:
        for batch in _as_batches(table):
            t = _conform(batch, day, source, meter_kinds)
            t = t.append_column("_seq", pa.array(range(rows_in, rows_in + len(t)), pa.int64()))
            rows_in += len(t)
            writer.write_table(t.cast(spill_schema))
    # 2. de-duplicate and sort, write the day: a day that fits one batch in memory, else out of
    # core (DuckDB spills to the work folder)
    if rows_in <= _BATCH_ROWS:
        out = _latest_per_id_in_order(pq.read_table(spill))
        rows_out = len(out)
        with pq.ParquetWriter(tmp, EVENTS_SCHEMA, compression="zstd") as writer:
            if rows_out:
                writer.write_table(out.cast(EVENTS_SCHEMA))
    else:
        rows_out = _latest_per_id_out_of_core(spill, work, tmp)
    return rows_in, rows_out


def _split_by_shard(paths: Paths, day: date, events: pa.Table, source: str) -> list[Path]:
    """Publish ``events`` (the day's, sorted) as one file per shard, by the shard of each ``customer_key``
    (core/shards.py: the customer's label value, as for its series); the rows keep their order."""
    keys = pc.unique(events["customer_key"])
    shard_of_key = pa.array([shard_of(k, paths.shards) for k in keys.to_pylist()], pa.int64())
    shard = pc.take(shard_of_key, pc.index_in(events["customer_key"], keys))
    # every shard's file is written first, then all are published: a failure publishes none of them
    staged: list[tuple[Path, Path]] = []  # (temp, destination)
    try:
        for s in all_shards(paths.shards):
            dest = raw.shard_dir(events_day_dir(paths, day), s) / f"part-{source}.parquet"
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = durable.temp_path(dest)
            staged.append((tmp, dest))
            with pq.ParquetWriter(tmp, EVENTS_SCHEMA, compression="zstd") as writer:
                part = events.filter(pc.equal(shard, s.index))
                if len(part):
                    writer.write_table(part.cast(EVENTS_SCHEMA))
        for tmp, dest in staged:
            durable.publish(tmp, dest)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return [dest for _, dest in staged]


def unsharded_event_files(paths: Paths, day: date) -> dict[str, str]:
    """``raw.unsharded_files`` of a day's raw events: each source's rows sorted by (ts, event_id), in one
    row group when the day fits one batch, else in batches of ``_BATCH_ROWS`` (as ``write_events_day`` writes them)."""

    def write(table: pa.Table, path: Path) -> None:
        table = table.cast(EVENTS_SCHEMA).sort_by([("ts", "ascending"), ("event_id", "ascending")])
        with pq.ParquetWriter(path, EVENTS_SCHEMA, compression="zstd") as writer:
            step = len(table) if len(table) <= _BATCH_ROWS else _BATCH_ROWS
            for start in range(0, len(table), step or 1):
                writer.write_table(table.slice(start, step))

    return raw.unsharded_files(paths, events_day_dir(paths, day), write)


def _latest_per_id_out_of_core(spill: Path, work: str, dest: Path) -> int:
    """``_latest_per_id_in_order`` of a spill file too large for memory, written to ``dest``; returns its rows."""
    import duckdb

    con = duckdb.connect(config={"temp_directory": work, "memory_limit": "512MB", "threads": 2})
    try:
        reader = con.sql(
            f"select {', '.join(EVENTS_SCHEMA.names)} from read_parquet('{spill}') "
            "qualify row_number() over (partition by event_id order by _seq desc) = 1 "
            "order by ts, event_id"
        ).to_arrow_reader(_BATCH_ROWS)
        rows_out = 0
        with pq.ParquetWriter(dest, EVENTS_SCHEMA, compression="zstd") as writer:
            for batch in reader:
                rows_out += batch.num_rows
                writer.write_table(pa.Table.from_batches([batch]).cast(EVENTS_SCHEMA))
    finally:
        con.close()
    return rows_out


def _latest_per_id_in_order(spill: pa.Table) -> pa.Table:
    """The last row (largest ``_seq``) of each event_id, sorted by (ts, event_id), without ``_seq``:
    the out-of-core query's rows, in memory."""
    if not len(spill):
        return spill.drop_columns(["_seq"])
    by_id = spill.sort_by([("event_id", "ascending"), ("_seq", "descending")])
    ids = by_id["event_id"]
    first = pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    keep = pa.concat_arrays([pa.array([True]), *pc.fill_null(first, True).chunks]) if len(ids) > 1 else pa.array([True])
    latest = by_id.filter(keep)
    return latest.sort_by([("ts", "ascending"), ("event_id", "ascending")]).drop_columns(["_seq"])


def cross_day_duplicates(paths: Paths, day: date, source: str, lookback_days: int = 35, lookahead_days: int = 35) -> list[tuple[str, str]]:
    """(event_id, other_day) for each event id of ``source``'s partition of ``day`` that the same
    source also wrote in its partition of another day in [day - lookback_days, day + lookahead_days].

    Such an id is billed once per day it is in: the source moved the event to another day (e.g. a
    corrected timestamp) and the other day was not rewritten. Reads only the event_id column.
    Sorted by (other_day, event_id); empty when ``day`` has no partition of ``source``.
    """
    from billing_dags.core.duck import session

    if not _SOURCE_RE.match(source):
        raise EventsLayoutError(f"source name {source!r} must match {_SOURCE_RE.pattern}")
    if lookback_days < 0 or lookahead_days < 0:
        raise EventsLayoutError(f"lookback_days ({lookback_days}) and lookahead_days ({lookahead_days}) must be >= 0")
    name = f"part-{source}.parquet"
    mine = [str(f) for f in event_files(paths, day) if f.name == name]
    if not mine:
        return []
    others: dict[str, str] = {}
    for offset in range(-lookback_days, lookahead_days + 1):
        other = date.fromordinal(day.toordinal() + offset)
        for f in event_files(paths, other) if offset else []:
            if f.name == name:
                others[str(f)] = other.isoformat()
    if not others:
        return []
    with session() as con:
        rows = con.execute(
            "with mine as (select distinct event_id from read_parquet($mine, hive_partitioning = false)), "
            "others as (select event_id, filename from read_parquet($others, hive_partitioning = false, filename = true)) "
            "select distinct others.event_id, others.filename from others semi join mine on others.event_id = mine.event_id",
            {"mine": mine, "others": list(others)},
        ).fetchall()
    return sorted(((event_id, others[filename]) for event_id, filename in rows), key=lambda r: (r[1], r[0]))
