"""LLM usage from PostgreSQL: one UTC day of a ``usage_events`` table (seed 003) into raw events.

For each row with ``created_at`` in [day 00:00, next day 00:00) UTC and a billable ``status``
(default ``success``, ``completed``), read through a server-side cursor (bounded memory, psycopg 3):

- ``tokens_input`` > 0 -> event ``<id>:in``, meter ``llm_input_tokens``
- ``tokens_output`` > 0 -> event ``<id>:out``, meter ``llm_output_tokens``

with customer_key = ``api_key_hash``, dimension = ``model``, attributes provider and status.
``api_key_hash`` must be a SHA-256 hex digest (64 lowercase hex characters): anything else may
be a raw API key, so the day fails naming the row id and the column (never the value) and
nothing is written. A ``timestamp without time zone`` column is read as UTC.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pyarrow as pa

from billing_dags.core.settings import Paths
from billing_dags.ingest import events

SOURCE = "postgres"
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
METERS = {"tokens_input": ("llm_input_tokens", "in"), "tokens_output": ("llm_output_tokens", "out")}


class PostgresEventsError(RuntimeError):
    """A usage_events day that cannot be copied; the message names the row, column and fix."""


@dataclass(frozen=True)
class UsageEventsTable:
    """Where the usage_events rows are: table (optionally schema.table) and column names."""

    table: str = "usage_events"
    id: str = "id"
    created_at: str = "created_at"
    api_key_hash: str = "api_key_hash"
    model: str = "model"
    provider: str = "provider"
    status: str = "status"
    tokens_input: str = "tokens_input"
    tokens_output: str = "tokens_output"
    billable_statuses: tuple[str, ...] = field(default=("success", "completed"))


def _query(cfg: UsageEventsTable):
    from psycopg import sql

    col = lambda name: sql.Identifier(name)  # noqa: E731
    return sql.SQL(
        "select {id}::text, floor(extract(epoch from {ts}) * 1000)::bigint, {key}::text, "
        "coalesce({model}::text, ''), coalesce({provider}::text, ''), {status}::text, "
        "{tin}::numeric::text, {tout}::numeric::text "
        "from {table} where {ts} >= %(start)s and {ts} < %(end)s and {status} = any(%(statuses)s) "
        "order by {ts}, {id}"
    ).format(
        id=col(cfg.id),
        ts=col(cfg.created_at),
        key=col(cfg.api_key_hash),
        model=col(cfg.model),
        provider=col(cfg.provider),
        status=col(cfg.status),
        tin=col(cfg.tokens_input),
        tout=col(cfg.tokens_output),
        table=sql.Identifier(*cfg.table.split(".")),
    )


def rows_to_batch(rows: list[tuple], cfg: UsageEventsTable) -> pa.RecordBatch:
    """usage_events rows ``(id, created_at ms, api_key_hash, model, provider, status, tokens_input, tokens_output)``
    (numbers as text or Decimal) as a raw-events batch: the one conversion of every usage_events source.

    Rows whose status is not billable are skipped (the PostgreSQL query already leaves them out;
    simulated rows carry them).
    """
    billable = set(cfg.billable_statuses)
    cols: dict[str, list] = {n: [] for n in events.EVENTS_SCHEMA.names}
    for rid, ts, key, model, provider, status, tin, tout in rows:
        if status not in billable:
            continue
        if key is None or not SHA256_HEX.match(key):
            raise PostgresEventsError(
                f"{cfg.table} row id={rid}: column {cfg.api_key_hash} is not a SHA-256 hex digest (64 lowercase hex "
                "characters) and may be a raw API key; store sha256(api_key) there, never the key itself"
            )
        for column, value in (("tokens_input", tin), ("tokens_output", tout)):
            if value is None:
                continue
            q = Decimal(value)
            if q < 0:
                raise PostgresEventsError(f"{cfg.table} row id={rid}: column {getattr(cfg, column)} is negative ({q})")
            if q == 0:
                continue
            meter, suffix = METERS[column]
            cols["event_id"].append(f"{rid}:{suffix}")
            cols["ts"].append(ts)
            cols["customer_key"].append(key)
            cols["meter_id"].append(meter)
            cols["dimension"].append(model)
            cols["kind"].append("delta")
            cols["quantity"].append(q)
            cols["hold_ms"].append(0)  # a delta holds nothing
            cols["attributes"].append([("provider", provider), ("status", status)])
    return pa.RecordBatch.from_pydict(cols, schema=events.EVENTS_SCHEMA)


def read_day(conn, day: date, cfg: UsageEventsTable, *, batch_rows: int = 10_000) -> Iterator[pa.RecordBatch]:
    """The day's billable rows as raw-events record batches (a server-side cursor, ``batch_rows`` at a time)."""
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    params = {"start": start, "end": start + timedelta(days=1), "statuses": list(cfg.billable_statuses)}
    with conn.transaction():
        conn.execute("set local time zone 'UTC'")
        with conn.cursor(name=f"usage_events_{day:%Y%m%d}") as cur:
            cur.itersize = batch_rows
            cur.execute(_query(cfg), params)
            while rows := cur.fetchmany(batch_rows):
                yield rows_to_batch(rows, cfg)


def ingest_day(dsn: str, paths: Paths, day: date, cfg: UsageEventsTable | None = None, *, batch_rows: int = 10_000) -> dict:
    """Copy one UTC day of usage_events into raw/events/date=<day>/part-postgres.parquet (replacing it)."""
    import psycopg

    cfg = cfg or UsageEventsTable()
    try:
        with psycopg.connect(dsn, connect_timeout=10, client_encoding="UTF8") as conn:
            return events.write_events_day(paths, day, read_day(conn, day, cfg, batch_rows=batch_rows), SOURCE)
    except psycopg.Error as e:
        raise PostgresEventsError(f"reading {cfg.table} for {day}: {type(e).__name__}: {str(e).strip()}") from None
