"""Stripe meter events through an outbox (DESIGN rule 9).

One event per customer, meter and UTC day; its value is the day's usage as a whole number in the
meter's base unit. Every event is first written to ``data/outbox/date=YYYY-MM-DD/outbox.parquet``;
the sender then posts pending rows and records what Stripe acknowledged. The identifier (and the
Idempotency-Key) is derived from (customer, meter, day, revision): a recomputed day with a new value
gets a new revision, which the meter's daily event window keeps instead of the old one. No API key
means dry-run. Events older than the Stripe horizon (35 days) are flagged ``too_old`` and never
sent; events more than 5 minutes ahead are flagged ``future`` and sent once due.

Statuses: ``pending`` (built, not sent), ``sent`` (Stripe acknowledged it; final), ``dry_run`` (no
key; sent once one is configured), ``too_old`` (final), ``future``, ``failed`` (``last_error`` holds
Stripe's message, never a key; retried on the next run with the same identifier).
"""

from __future__ import annotations

import calendar
import hashlib
from collections.abc import Iterable, Mapping
from datetime import date, datetime, timedelta
from fractions import Fraction
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from billing_dags.core import durable
from billing_dags.core.calendar import month_start, next_month
from billing_dags.core.errors import InputError
from billing_dags.core.settings import Paths
from billing_dags.models.sqlmodels import Window, billable_quantities

STATUSES = ("pending", "sent", "dry_run", "too_old", "future", "failed")
IDENTIFIER_MAX = 100

OUTBOX_SCHEMA = pa.schema(
    [
        pa.field("customer_id", pa.string(), nullable=False),
        pa.field("stripe_customer_id", pa.string(), nullable=False),
        pa.field("meter_id", pa.string(), nullable=False),
        pa.field("event_name", pa.string(), nullable=False),
        pa.field("day", pa.date32(), nullable=False),
        pa.field("value", pa.int64(), nullable=False),
        pa.field("revision", pa.int32(), nullable=False),
        pa.field("identifier", pa.string(), nullable=False),
        pa.field("timestamp", pa.int64(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("attempts", pa.int32(), nullable=False),
        pa.field("last_error", pa.string(), nullable=True),
        pa.field("stripe_response_id", pa.string(), nullable=True),
    ]
)


class OutboxError(InputError):
    """Input that cannot become a meter event; the message names the input and the fix."""


# --------------------------------------------------------------------------- values


def round_half_up(x: Fraction) -> int:
    """Nearest integer, halves away from zero (as Decimal ROUND_HALF_UP and the SQL div_half_up)."""
    n, d = x.numerator, x.denominator  # d > 0
    if n >= 0:
        return (2 * n + d) // (2 * d)
    return -((2 * -n + d) // (2 * d))


def day_quantities(day: date, usage: pa.Table, seeds: Mapping[str, pa.Table]) -> list[dict]:
    """The day's billable quantity per customer, meter and dimension, in the meter's base unit: the
    invoices' model (fct_billable_usage_by_subscription_period) over ``usage`` (the day's
    fct_usage_by_day rows) taken as a one-day period of its month (unit-months divide by the month).
    ``seeds`` holds at least the ``meters`` and ``units`` seed tables."""
    if isinstance(day, datetime) or not isinstance(day, date):
        raise OutboxError(f"day {day!r} must be a datetime.date")
    known = set(seeds["meters"].column("meter_id").to_pylist())
    for i, row in enumerate(usage.select(["day", "customer_id", "meter_id", "dimension"]).to_pylist()):
        where = f"usage row {i} ({row['customer_id']!r}, {row['meter_id']!r}, {row['dimension']!r})"
        if row["day"] != day:
            raise OutboxError(f"{where}: day {row['day']} is not the outbox day {day}; pass only that day's rows of fct_usage_by_day")
        if row["meter_id"] not in known:
            raise OutboxError(f"{where}: unknown meter {row['meter_id']!r}; add it to seeds/meters.csv or rebuild fct_usage_by_day")
    month = Window(month_start(day), next_month(day))
    return billable_quantities(usage, {k: seeds[k] for k in ("meters", "units")}, month, Window(day, day + timedelta(days=1)))


# --------------------------------------------------------------------------- building the outbox


def day_timestamp(day: date) -> int:
    """Epoch seconds of 00:00 UTC of ``day``."""
    return calendar.timegm((day.year, day.month, day.day, 0, 0, 0))


def event_identifier(customer_id: str, meter_id: str, day: date, revision: int) -> str:
    """``<customer>-<meter>-YYYYMMDD-r<revision>``; if that exceeds Stripe's 100 characters, a hash of
    (customer, meter) replaces the readable prefix. Unique per (customer, meter, day, revision)."""
    ident = f"{customer_id}-{meter_id}-{day:%Y%m%d}-r{revision}"
    if len(ident) > IDENTIFIER_MAX:
        h = hashlib.sha256(f"{customer_id}\x00{meter_id}".encode()).hexdigest()[:40]
        ident = f"h{h}-{day:%Y%m%d}-r{revision}"
    assert len(ident) <= IDENTIFIER_MAX, ident
    return ident


def _row_day(row: Mapping) -> date | None:
    d = row.get("day")
    if d is None:
        return None
    if isinstance(d, datetime):
        return d.date()
    if isinstance(d, date):
        return d
    return date.fromisoformat(str(d))


def build_outbox(
    day: date,
    quantities: list[dict],
    customers: list[dict],
    meters: list[dict],
    previous: list[dict],
) -> list[dict]:
    """The outbox rows of ``day``: one per customer (with a stripe_customer_id) and meter (with a
    stripe_event_name), the base-unit quantities of ``quantities`` (``day_quantities``) summed exactly
    over dimensions and rounded once, half-up, to a whole number.

    Against ``previous`` (the rows stored for the day): same customer and meter with the same value,
    Stripe customer and event name -> that row unchanged (status included); otherwise the revision
    goes up by one and the row is pending again. A pair that was in ``previous`` but has no usage
    any more is re-sent as 0 (a corrected mapping must undo what was reported). Sorted by
    (customer_id, meter_id).
    """
    if isinstance(day, datetime) or not isinstance(day, date):
        raise OutboxError(f"day {day!r} must be a datetime.date")
    customers_by_id = {c["customer_id"]: c for c in customers}
    meters_by_id = {m["meter_id"]: m for m in meters}

    def eligible(cid: str, mid: str) -> bool:
        c, m = customers_by_id.get(cid), meters_by_id.get(mid)
        return bool(c and c.get("stripe_customer_id") and m and m.get("stripe_event_name"))

    sums: dict[tuple[str, str], Fraction] = {}  # exact at any size (Decimal arithmetic keeps 28 digits)
    for i, row in enumerate(quantities):
        cid, mid = row.get("customer_id"), row.get("meter_id")
        where = f"usage row {i} ({cid!r}, {mid!r}, {row.get('dimension')!r})"
        rd = row.get("period_start")
        if rd is not None and rd != day:
            raise OutboxError(f"{where}: day {rd} is not the outbox day {day}; pass only that day's rows of fct_usage_by_day")
        if cid not in customers_by_id:
            raise OutboxError(f"{where}: unknown customer {cid!r}; add it to seeds/customers.csv or rebuild fct_usage_by_day")
        if mid not in meters_by_id:
            raise OutboxError(f"{where}: unknown meter {mid!r}; add it to seeds/meters.csv or rebuild fct_usage_by_day")
        if not eligible(cid, mid):
            continue
        sums[(cid, mid)] = sums.get((cid, mid), Fraction(0)) + Fraction(row["base_quantity"])

    prev_by_key: dict[tuple[str, str], dict] = {}
    for p in previous:
        pd = _row_day(p)
        if pd is not None and pd != day:
            raise OutboxError(f"previous outbox row {p.get('identifier')!r} is for {pd}, not {day}; pass the rows stored for {day}")
        prev_by_key[(p["customer_id"], p["meter_id"])] = p

    for key in prev_by_key:
        if key not in sums and eligible(*key):
            sums[key] = Fraction(0)

    ts = day_timestamp(day)
    out: list[dict] = []
    for key in sorted(set(sums) | set(prev_by_key)):
        cid, mid = key
        prev = prev_by_key.get(key)
        if key not in sums:  # no longer eligible (no Stripe id / event name): keep history as it is
            out.append(dict(prev))
            continue
        value = round_half_up(sums[key])
        stripe_customer_id = customers_by_id[cid]["stripe_customer_id"]
        event_name = meters_by_id[mid]["stripe_event_name"]
        if prev is not None and (int(prev["value"]), prev["stripe_customer_id"], prev["event_name"]) == (value, stripe_customer_id, event_name):
            out.append(dict(prev))
            continue
        revision = int(prev["revision"]) + 1 if prev is not None else 1
        out.append(
            {
                "customer_id": cid,
                "stripe_customer_id": stripe_customer_id,
                "meter_id": mid,
                "event_name": event_name,
                "day": day,
                "value": value,
                "revision": revision,
                "identifier": event_identifier(cid, mid, day, revision),
                "timestamp": ts,
                "status": "pending",
                "attempts": 0,
                "last_error": None,
                "stripe_response_id": None,
            }
        )
    return out


# --------------------------------------------------------------------------- storage


def outbox_path(paths: Paths, day: date) -> Path:
    return paths.outbox / f"date={day.isoformat()}" / "outbox.parquet"


def read_outbox(paths: Paths, day: date) -> list[dict]:
    """The stored outbox rows of ``day`` ([] when none), sorted by (customer_id, meter_id)."""
    path = outbox_path(paths, day)
    if not path.exists():
        return []
    table = pq.read_table(path, schema=OUTBOX_SCHEMA)
    return sorted(table.to_pylist(), key=lambda r: (r["customer_id"], r["meter_id"]))


def write_outbox(paths: Paths, day: date, rows: list[dict]) -> Path:
    """Replace the outbox of ``day`` with ``rows`` (durable: temp file, fsync, rename, fsync of the folder). Same rows, same bytes."""
    for r in rows:
        if _row_day(r) != day:
            raise OutboxError(f"outbox row {r.get('identifier')!r} is for {r.get('day')}, not {day}")
        if r.get("status") not in STATUSES:
            raise OutboxError(f"outbox row {r.get('identifier')!r} has status {r.get('status')!r}; use one of {', '.join(STATUSES)}")
    keys = [(r["customer_id"], r["meter_id"]) for r in rows]
    if len(set(keys)) != len(keys):
        raise OutboxError(f"outbox of {day} has more than one row for a (customer, meter); keep one per day")
    ordered = sorted(rows, key=lambda r: (r["customer_id"], r["meter_id"]))
    table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in OUTBOX_SCHEMA} for r in ordered], schema=OUTBOX_SCHEMA)
    dest = outbox_path(paths, day)
    with durable.staged(dest) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return dest


def summarize(rows: Iterable[Mapping]) -> dict:
    """Counts by status and the total value per event name, for asset metadata."""
    by_status = dict.fromkeys(STATUSES, 0)
    values: dict[str, int] = {}
    for r in rows:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
        values[r["event_name"]] = values.get(r["event_name"], 0) + int(r["value"])
    return {"rows": sum(by_status.values()), "by_status": by_status, "value_by_event": dict(sorted(values.items()))}


def outbox_summary(paths: Paths, month: date) -> str:
    """Meter events of the month's days by status, e.g. '1,234 meter events: 900 dry_run, 334 too_old'."""
    from billing_dags.core.calendar import month_days

    summary = summarize(row for day in month_days(month) for row in read_outbox(paths, day))
    return f"{summary['rows']:,} meter events: " + ", ".join(f"{n:,} {status}" for status, n in sorted(summary["by_status"].items()) if n)
