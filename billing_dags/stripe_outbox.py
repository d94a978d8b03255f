"""Stripe meter events through an outbox (DESIGN rule 9).

One event per customer, meter and UTC day; its value is the day's usage as a whole number in the
meter's base unit. Every event is first written to ``data/outbox/date=YYYY-MM-DD/outbox.parquet``;
the sender then posts pending rows and records what Stripe acknowledged. The identifier (and the
Idempotency-Key) is derived from (customer, meter, day, revision): a recomputed day with a new value
gets a new revision, which the meter's daily event window keeps instead of the old one. No API key
means dry-run. Events older than the Stripe horizon (35 days) are flagged ``too_old``, never sent.
"""

from __future__ import annotations

import calendar
import hashlib
import os
import re
import time
from datetime import date, datetime, timezone
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from .settings import EDGE_LOOKBACK_DAYS, Paths

STATUSES = ("pending", "sent", "dry_run", "too_old", "failed")
#: statuses the sender (re)tries
SENDABLE = ("pending", "failed", "dry_run")
IDENTIFIER_MAX = 100
MS_PER_HOUR = 3_600_000
#: Stripe accepts timestamps at most 5 minutes ahead; keep the same margin at the old end
CLOCK_SLACK_S = 300
_KEY_RE = re.compile(r"\b(?:sk|rk|pk)_(?:test|live)_[A-Za-z0-9]+")

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


class OutboxError(ValueError):
    """Input that cannot become a meter event; the message names the input and the fix."""


# --------------------------------------------------------------------------- values


def _exact(value: Any, what: str) -> Fraction:
    """An exact rational from Decimal, int or a decimal string (floats refused: they are not exact)."""
    if value is None:
        return Fraction(0)
    if isinstance(value, bool):
        raise OutboxError(f"{what}: {value!r} is a boolean, not a number")
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, str):
        try:
            value = Decimal(value.strip())
        except InvalidOperation:
            raise OutboxError(f"{what}: {value!r} is not a decimal number") from None
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise OutboxError(f"{what}: {value!r} is not finite")
        return Fraction(value)
    if isinstance(value, float):
        raise OutboxError(f"{what}: {value!r} is a float; pass a Decimal, int or decimal string")
    raise OutboxError(f"{what}: {value!r} ({type(value).__name__}) is not a number")


def round_half_up(x: Fraction) -> int:
    """Nearest integer, halves away from zero (as Decimal ROUND_HALF_UP and the SQL div_half_up)."""
    n, d = x.numerator, x.denominator  # d > 0
    if n >= 0:
        return (2 * n + d) // (2 * d)
    return -((2 * -n + d) // (2 * d))


def month_ms(day: date) -> int:
    """Milliseconds in the calendar month of ``day``."""
    return calendar.monthrange(day.year, day.month)[1] * 86_400_000


def exact_event_value(row: Mapping, meter: Mapping, day: date) -> Fraction:
    """The day's usage of one fct_usage_by_day row in the meter's base unit, exactly (before rounding)."""
    where = f"usage of {row.get('customer_id')!r}/{row.get('meter_id')!r}/{row.get('dimension')!r} on {day}"
    aggregation = meter.get("aggregation")
    kind = row.get("kind") or meter.get("kind")
    if kind == "counter" or aggregation == "sum":
        return _exact(row.get("usage"), f"{where}: usage")
    integral = _exact(row.get("gauge_integral"), f"{where}: gauge_integral")
    if aggregation == "max":
        return _exact(row.get("gauge_peak"), f"{where}: gauge_peak")
    if aggregation == "avg":
        covered = _exact(row.get("gauge_covered_ms"), f"{where}: gauge_covered_ms")
        return integral / covered if covered > 0 else Fraction(0)
    if aggregation == "unit_hours":
        return integral / MS_PER_HOUR
    if aggregation == "unit_months":
        return integral / month_ms(day)
    raise OutboxError(f"{where}: meter {meter.get('meter_id')!r} has aggregation {aggregation!r}; use sum, max, avg, unit_hours or unit_months")


def event_value(row: Mapping, meter: Mapping, day: date) -> int:
    """The day's usage as an integer in the meter's base unit, rounded half-up: counters -> usage;
    gauges: max -> peak, avg -> integral / covered ms, unit_hours -> integral / 3,600,000,
    unit_months -> integral / milliseconds in the day's calendar month."""
    return round_half_up(exact_event_value(row, meter, day))


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
    usage_rows: list[dict],
    customers: list[dict],
    meters: list[dict],
    previous: list[dict],
) -> list[dict]:
    """The outbox rows of ``day``: one per customer (with a stripe_customer_id) and meter (with a
    stripe_event_name), usage summed exactly over dimensions and rounded once, half-up.

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

    sums: dict[tuple[str, str], Fraction] = {}
    for i, row in enumerate(usage_rows):
        cid, mid = row.get("customer_id"), row.get("meter_id")
        where = f"usage row {i} ({cid!r}, {mid!r}, {row.get('dimension')!r})"
        rd = _row_day(row)
        if rd is not None and rd != day:
            raise OutboxError(f"{where}: day {rd} is not the outbox day {day}; pass only that day's rows of fct_usage_by_day")
        if cid not in customers_by_id:
            raise OutboxError(f"{where}: unknown customer {cid!r}; add it to seeds/customers.csv or rebuild fct_usage_by_day")
        if mid not in meters_by_id:
            raise OutboxError(f"{where}: unknown meter {mid!r}; add it to seeds/meters.csv or rebuild fct_usage_by_day")
        if not eligible(cid, mid):
            continue
        sums[(cid, mid)] = sums.get((cid, mid), Fraction(0)) + exact_event_value(row, meters_by_id[mid], day)

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
    """Replace the outbox of ``day`` with ``rows`` (atomic: temp file, fsync, rename). Same rows, same bytes."""
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
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)
    return dest


# --------------------------------------------------------------------------- sending


def make_client(api_key: str | None, api_base: str | None = None, max_network_retries: int = 3):
    """A StripeClient, or None without an API key (dry-run). ``api_base`` overrides the API address
    (e.g. a local test server); the library retries 409/5xx and connection errors with backoff."""
    import stripe

    stripe.enable_telemetry = False
    if not api_key:
        return None
    kwargs: dict[str, Any] = {"max_network_retries": max_network_retries}
    if api_base:
        kwargs["base_addresses"] = {"api": api_base}
    return stripe.StripeClient(api_key, **kwargs)


def _error_text(e: Exception) -> str:
    """The error's message only (no request body, no headers), with anything key-like redacted."""
    msg = getattr(e, "user_message", None) or type(e).__name__
    status = getattr(e, "http_status", None)
    text = f"{type(e).__name__}" + (f" (HTTP {status})" if status else "") + f": {msg}"
    return _KEY_RE.sub("[redacted]", text)[:500]


def _now_ts(now: datetime) -> int:
    if not isinstance(now, datetime) or now.tzinfo is None or now.utcoffset() is None:
        raise OutboxError(f"now {now!r} must be a timezone-aware datetime, e.g. datetime.now(timezone.utc)")
    return calendar.timegm(now.astimezone(timezone.utc).utctimetuple())


def send_outbox(
    rows: list[dict],
    client: Any | None,
    *,
    now: datetime,
    max_age_days: int = EDGE_LOOKBACK_DAYS,
    rate_limit_retries: int = 3,
    sleep: Callable[[float], None] = time.sleep,
) -> list[dict]:
    """Send the pending, failed and dry-run rows; return all rows updated (new dicts, same order).

    Rows whose day starts ``max_age_days`` or more before ``now`` (less 5 minutes of slack) become
    ``too_old`` and are never sent; rows more than 5 minutes in the future wait. Without a client,
    pending rows become ``dry_run``. Each event is posted with its identifier as Idempotency-Key;
    the library retries 5xx with backoff, a 429 is retried here (``rate_limit_retries`` times, same
    key). A Stripe error marks the row ``failed`` with its message; success marks it ``sent``.
    """
    import stripe

    now_ts = _now_ts(now)
    oldest_ok = now_ts - max_age_days * 86_400 + CLOCK_SLACK_S
    out: list[dict] = []
    for row in rows:
        r = dict(row)
        out.append(r)
        if r["status"] not in SENDABLE:
            continue
        ts = int(r["timestamp"])
        if ts < oldest_ok:
            r["status"] = "too_old"
            continue
        if ts > now_ts + CLOCK_SLACK_S:
            continue
        if client is None:
            if r["status"] == "pending":
                r["status"] = "dry_run"
            continue
        params = {
            "event_name": r["event_name"],
            "payload": {"stripe_customer_id": r["stripe_customer_id"], "value": str(int(r["value"]))},
            "identifier": r["identifier"],
            "timestamp": ts,
        }
        r["attempts"] = int(r.get("attempts") or 0) + 1
        for attempt in range(rate_limit_retries + 1):
            try:
                event = client.v1.billing.meter_events.create(params=params, options={"idempotency_key": r["identifier"]})
            except stripe.RateLimitError as e:
                if attempt < rate_limit_retries:
                    sleep(min(0.5 * 2**attempt, 8.0))
                    continue
                r["status"], r["last_error"] = "failed", _error_text(e)
            except stripe.StripeError as e:
                r["status"], r["last_error"] = "failed", _error_text(e)
            else:
                r["status"], r["last_error"] = "sent", None
                r["stripe_response_id"] = getattr(event, "id", None) or getattr(event, "identifier", None) or r["identifier"]
            break
    return out


def summarize(rows: Iterable[Mapping]) -> dict:
    """Counts by status and the total value per event name, for asset metadata."""
    by_status = {s: 0 for s in STATUSES}
    values: dict[str, int] = {}
    for r in rows:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
        values[r["event_name"]] = values.get(r["event_name"], 0) + int(r["value"])
    return {"rows": sum(by_status.values()), "by_status": by_status, "value_by_event": dict(sorted(values.items()))}
