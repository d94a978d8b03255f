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
import re
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, date, datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from billing_dags.core import durable
from billing_dags.core.calendar import month_start, next_month
from billing_dags.core.errors import InputError
from billing_dags.core.settings import EDGE_LOOKBACK_DAYS, Paths
from billing_dags.models.sqlmodels import Window, billable_quantities

STATUSES = ("pending", "sent", "dry_run", "too_old", "future", "failed")
#: statuses the sender (re)tries: a failed row is retried, a future one once it is due, a dry-run
#: one once a key is configured; ``sent`` and ``too_old`` are final
SENDABLE = ("pending", "failed", "dry_run", "future")
#: seconds before a request to Stripe times out (the library default is 80)
DEFAULT_TIMEOUT_S = 30.0
IDENTIFIER_MAX = 100
#: Stripe accepts timestamps at most 5 minutes ahead; keep the same margin at the old end
CLOCK_SLACK_S = 300
#: Stripe keys, and the masked form Stripe echoes in errors (sk_test_********1234)
_KEY_RE = re.compile(r"\b(?:sk|rk|pk|whsec)_(?:(?:test|live)_)?[A-Za-z0-9*]+")

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


# --------------------------------------------------------------------------- sending


def make_client(api_key: str | None, api_base: str | None = None, max_network_retries: int = 3, timeout_s: float = DEFAULT_TIMEOUT_S):
    """A StripeClient, or None without an API key (dry-run). ``api_base`` (STRIPE_API_BASE) overrides
    the API address (a local test server, a proxy). The library retries 409/5xx, timeouts and
    connection errors ``max_network_retries`` times with backoff (0.5 s doubling up to 5 s, jittered)
    and keeps the request's Idempotency-Key on every attempt; a request times out after ``timeout_s``."""
    import stripe

    stripe.enable_telemetry = False
    if not api_key:
        return None
    kwargs: dict[str, Any] = {
        "max_network_retries": max_network_retries,
        "http_client": stripe.RequestsClient(timeout=timeout_s),
    }
    if api_base:
        kwargs["base_addresses"] = {"api": api_base.rstrip("/")}
    return stripe.StripeClient(api_key, **kwargs)


def redact(text: str) -> str:
    """Anything that looks like a Stripe key replaced (errors and logs never carry a key)."""
    return _KEY_RE.sub("[redacted]", text)


def _error_text(e: Exception) -> str:
    """The error's message only (no request body, no headers), with anything key-like redacted."""
    msg = getattr(e, "user_message", None) or str(e) or type(e).__name__
    status = getattr(e, "http_status", None)
    code = getattr(e, "code", None)
    text = f"{type(e).__name__}" + (f" (HTTP {status})" if status else "") + (f" [{code}]" if code else "") + f": {msg}"
    return redact(text)[:500]


def _now_ts(now: datetime) -> int:
    if not isinstance(now, datetime) or now.tzinfo is None or now.utcoffset() is None:
        raise OutboxError(f"now {now!r} must be a timezone-aware datetime, e.g. datetime.now(timezone.utc)")
    return calendar.timegm(now.astimezone(UTC).utctimetuple())


def _retry_after(e: Exception) -> float | None:
    """Seconds from a Retry-After header (delta-seconds form), if any."""
    headers = getattr(e, "headers", None) or {}
    for k, v in dict(headers).items():
        if str(k).lower() == "retry-after":
            try:
                return max(0.0, float(v))
            except (TypeError, ValueError):
                return None
    return None


class Sender:
    """Posts outbox rows as v1 meter events and records the outcome; reusable across days of one run.

    Per row: ``sent`` / ``dry_run`` rows that Stripe (or nobody) needs are skipped, rows whose day is
    older than the Stripe horizon become ``too_old``, rows more than 5 minutes ahead become ``future``
    (both flagged, never posted). Each event is posted with its identifier as Idempotency-Key, the
    same key on every attempt. 5xx, timeouts and connection errors are retried by the stripe
    library (``max_network_retries`` of the client); a 429 is retried here up to ``retries`` times
    after ``Retry-After`` (capped at ``retry_after_cap``) or an exponential backoff
    (``backoff_base`` doubling, capped at ``backoff_cap``). A 4xx marks only that row ``failed``
    with Stripe's message; a retryable error that outlives the retries marks it ``failed`` too,
    and after ``max_consecutive_errors`` such rows in a row the sender stops posting for this run
    (the API is down or throttling hard): the remaining rows keep their status for the next run.
    """

    def __init__(
        self,
        client: Any | None,
        *,
        now: datetime,
        max_age_days: int = EDGE_LOOKBACK_DAYS,
        retries: int = 4,
        backoff_base: float = 0.5,
        backoff_cap: float = 8.0,
        retry_after_cap: float = 30.0,
        max_consecutive_errors: int = 5,
        sleep: Callable[[float], None] = time.sleep,
        log: Callable[[str], None] | None = None,
    ):
        self.client = client
        self.now_ts = _now_ts(now)
        self.oldest_ok = self.now_ts - max_age_days * 86_400 + CLOCK_SLACK_S
        self.retries, self.backoff_base, self.backoff_cap, self.retry_after_cap = retries, backoff_base, backoff_cap, retry_after_cap
        self.max_consecutive_errors = max_consecutive_errors
        self.sleep, self.log = sleep, log
        self.consecutive_errors = 0
        self.aborted = False
        #: what this sender did: posted (HTTP calls made by the sender, library retries not counted),
        #: sent, failed, retried (429 retries), too_old, future, dry_run, skipped (left for a later run)
        self.stats: dict[str, int] = dict.fromkeys(("posted", "sent", "failed", "retried", "too_old", "future", "dry_run", "skipped"), 0)

    @property
    def mode(self) -> str:
        return "live" if self.client is not None else "dry_run"

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self.backoff_cap, self.backoff_base * 2**attempt)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.retry_after_cap))
        return delay

    def send(self, rows: list[dict]) -> list[dict]:
        """All rows, updated (new dicts, same order); the input is not modified."""
        out: list[dict] = []
        for row in rows:
            r = dict(row)
            out.append(r)
            if r["status"] not in SENDABLE:
                continue
            ts = int(r["timestamp"])
            if ts < self.oldest_ok:
                r["status"] = "too_old"
                r["last_error"] = f"day {r['day']} is older than Stripe accepts ({EDGE_LOOKBACK_DAYS} days); not sent"
                self.stats["too_old"] += 1
                continue
            if ts > self.now_ts + CLOCK_SLACK_S:
                r["status"] = "future"
                r["last_error"] = f"timestamp {ts} is more than {CLOCK_SLACK_S // 60} minutes ahead of now ({self.now_ts}); sent once it is due"
                self.stats["future"] += 1
                continue
            if self.client is None:
                if r["status"] in ("pending", "future"):
                    r["status"], r["last_error"] = "dry_run", None
                self.stats["dry_run"] += 1
                continue
            if self.aborted:
                self.stats["skipped"] += 1
                continue
            self._post(r, ts)
        return out

    def _post(self, r: dict, ts: int) -> None:
        import stripe

        params = {
            "event_name": r["event_name"],
            "payload": {"stripe_customer_id": r["stripe_customer_id"], "value": str(int(r["value"]))},
            "identifier": r["identifier"],
            "timestamp": ts,
        }
        r["attempts"] = int(r.get("attempts") or 0) + 1
        for attempt in range(self.retries + 1):
            self.stats["posted"] += 1
            try:
                event = self.client.v1.billing.meter_events.create(params=params, options={"idempotency_key": r["identifier"]})
            except stripe.RateLimitError as e:
                if attempt < self.retries:
                    self.stats["retried"] += 1
                    self.sleep(self.backoff(attempt, _retry_after(e)))
                    continue
                self._failed(r, e, retryable=True)
            except (stripe.AuthenticationError, stripe.PermissionError) as e:
                # a wrong or restricted key fails every event alike: stop instead of failing them all
                self._failed(r, e, retryable=False)
                self.aborted = True
                if self.log:
                    self.log(f"Stripe refused the API key ({r['last_error']}); nothing more is sent this run")
            except (stripe.APIConnectionError, stripe.APIError) as e:
                # the library already retried these (5xx, timeouts, connection errors)
                self._failed(r, e, retryable=True)
            except stripe.StripeError as e:
                status = getattr(e, "http_status", None) or 0
                self._failed(r, e, retryable=status >= 500 or status in (409, 429))
            else:
                r["status"], r["last_error"] = "sent", None
                r["stripe_response_id"] = getattr(event, "id", None) or getattr(event, "identifier", None) or r["identifier"]
                self.stats["sent"] += 1
                self.consecutive_errors = 0
            return

    def _failed(self, r: dict, e: Exception, *, retryable: bool) -> None:
        r["status"], r["last_error"] = "failed", _error_text(e)
        self.stats["failed"] += 1
        if not retryable:
            self.consecutive_errors = 0  # a bad row, not a bad API: carry on with the rest
            return
        self.consecutive_errors += 1
        if self.max_consecutive_errors and self.consecutive_errors >= self.max_consecutive_errors:
            self.aborted = True
            if self.log:
                self.log(f"Stripe failed {self.consecutive_errors} events in a row ({r['last_error']}); the remaining events wait for the next run")


def send_outbox(
    rows: list[dict],
    client: Any | None,
    *,
    now: datetime,
    max_age_days: int = EDGE_LOOKBACK_DAYS,
    rate_limit_retries: int = 4,
    sleep: Callable[[float], None] = time.sleep,
    **sender_options: Any,
) -> list[dict]:
    """Send the pending, failed, dry-run and future rows of one outbox; return all rows updated (new
    dicts, same order). See :class:`Sender` for statuses, retries and limits."""
    return Sender(client, now=now, max_age_days=max_age_days, retries=rate_limit_retries, sleep=sleep, **sender_options).send(rows)


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
