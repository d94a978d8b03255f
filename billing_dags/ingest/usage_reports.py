"""Usage reports (seed 001): instances POST what they used; reports become raw events.

An IoT instance sends, every hour, a JSON object with seed 001's field names::

    {"report_id": "2026-11-21T13:00Z", "customer_id": "iot-010",
     "reported_at": "2026-11-21T13:00:00Z", "interval_seconds": 3600,
     "active_devices": 42, "mqtt_bytes_sent": 123456, "postgres_size_mb": 812.25, ...}

- :func:`parse_report` checks one body against ``seeds/report_fields.csv`` (which field feeds
  which meter, as a per-interval ``delta`` or a ``gauge`` level) and raises :class:`ReportError`
  naming the field and the fix. Numbers are read as Decimal, never float.
- :class:`ReportStore` is the durable landing: a SQLite database (WAL, ``synchronous=FULL``: a
  commit is on disk before it returns) keyed on (customer_id, report_id). The endpoint answers
  2xx only after the commit; the same report again is a no-op (idempotent retry) and a different
  report under a used id is a conflict. Reports stay there as evidence for the retention period.
- :func:`report_events` turns the reports of one UTC day into raw events (one per report and
  meter: fields of one meter are summed, e.g. MQTT bytes sent + received), and
  :func:`compact_day` writes them through :func:`billing_dags.ingest.events.write_events_day` as
  ``part-usage_reports.parquet``. Rebuilt whole from the store, so it is idempotent.

A report's counters are the usage since the previous report and belong to the day of
``reported_at`` (like the later sample of a pair, DESIGN rule 2); its gauges are levels at
``reported_at`` that hold until the next report, at most ``interval_seconds`` plus the 5-minute
staleness limit (DESIGN rule 5).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import pyarrow as pa

from billing_dags.core.errors import InputError
from billing_dags.core.settings import DEFAULT_RETENTION_DAYS, STALENESS_MS, Paths
from billing_dags.ingest import raw

SOURCE = "usage_reports"
REPORT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")
#: fields every report carries besides its usage fields
ENVELOPE = ("report_id", "customer_id", "reported_at", "interval_seconds")
DEFAULT_INTERVAL_S = 3600  # seed 001's reporter runs hourly
MAX_INTERVAL_S = 86_400
#: a report time this far ahead of the server clock is refused (clock skew allowance)
MAX_FUTURE_MS = 5 * 60 * 1000
MAX_QUANTITY = Decimal(10) ** 18
#: a report is one flat object: JSON nested deeper is refused before it is parsed
MAX_JSON_DEPTH = 4
#: JSON numbers longer than this, or beyond 10^±30, are no usage figure (and cost to print or round)
MAX_NUMBER_CHARS = 64
MAX_NUMBER_EXPONENT = 30
#: reports older than the raw retention period are refused (they could never be billed)
DEFAULT_MAX_AGE_DAYS = DEFAULT_RETENTION_DAYS
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class ReportError(InputError):
    """A report that cannot be accepted (HTTP 400); ``field`` names the offending JSON field."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class ReportConflict(Exception):
    """A report id already used for a different report of the same customer (HTTP 409)."""


@dataclass(frozen=True)
class ReportField:
    field: str
    meter_id: str
    kind: str  # delta | gauge
    scale: Decimal


@dataclass
class ReportSchema:
    """What reports may contain and who may send them (seeds report_fields, report_tokens, customers)."""

    fields: dict[str, ReportField]
    tokens: dict[str, list[str]]  # customer_id -> sha256 hex of its bearer tokens
    label_values: dict[str, str]  # customer_id -> label_value (the events' customer_key)

    @staticmethod
    def seed_files(seeds_dir: Path) -> list[Path]:
        """The seed files a schema is read from (the receiver reloads it when one changes)."""
        from billing_dags.seeds.catalog import SPECS

        return [Path(seeds_dir) / SPECS[n].file for n in ("report_fields", "report_tokens", "customers", "meters")]

    @classmethod
    def from_seeds(cls, seeds_dir: Path) -> ReportSchema:
        from billing_dags.seeds.catalog import load_seeds

        seeds = load_seeds(Path(seeds_dir))
        fields = {r["field"]: ReportField(r["field"], r["meter_id"], r["kind"], r["scale"]) for r in seeds["report_fields"].to_pylist()}
        tokens: dict[str, list[str]] = {}
        for r in seeds["report_tokens"].to_pylist():
            tokens.setdefault(r["customer_id"], []).append(r["token_sha256"])
        labels = {r["customer_id"]: r["label_value"] for r in seeds["customers"].to_pylist()}
        return cls(fields, tokens, labels)

    def authorized(self, customer_id: str, token: str | None) -> bool:
        """True when ``token`` is one of the customer's report tokens (constant-time compare)."""
        return _token_in(token, self.tokens.get(customer_id, ()))

    def known_token(self, token: str | None) -> bool:
        """True when ``token`` is some customer's report token: checked before a body is read."""
        return _token_in(token, [h for hashes in self.tokens.values() for h in hashes])


def demo_report_token(customer_id: str) -> str:
    """The demo's report token of a customer: derived when needed, never stored (the seeds hold its SHA-256)."""
    return "demo-" + hashlib.sha256(f"billing_dags demo report token/{customer_id}".encode()).hexdigest()[:32]


def _token_in(token: str | None, hashes) -> bool:
    if not token:
        return False
    digest = hashlib.sha256(token.encode("utf-8")).hexdigest()
    ok = False
    for known in hashes:
        ok |= hmac.compare_digest(digest, known)
    return ok


@dataclass(frozen=True)
class Report:
    report_id: str
    customer_id: str
    reported_at_ms: int
    interval_s: int
    values: dict[str, Decimal] = field(default_factory=dict)  # field -> reported number

    @property
    def day(self) -> date:
        return datetime.fromtimestamp(self.reported_at_ms / 1000, UTC).date()

    def canonical(self) -> str:
        """The report as canonical JSON (sorted keys, numbers as text): what is stored and compared."""
        return json.dumps(
            {
                "report_id": self.report_id,
                "customer_id": self.customer_id,
                "reported_at_ms": self.reported_at_ms,
                "interval_seconds": self.interval_s,
                "values": {k: _number_text(v) for k, v in sorted(self.values.items())},
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.canonical().encode()).hexdigest()


def _number_text(d: Decimal) -> str:
    """A Decimal as plain text without exponent or trailing zeros (1E+3 -> '1000', 2.50 -> '2.5')."""
    return format(d.normalize(), "f")


def _reject_constant(name: str):
    raise ReportError("body", f"{name} is not a number; send finite JSON numbers")


class OutOfRange:
    """A JSON number too long or too far from 1 to be a usage figure (its text); parse_report names the field.
    Not a string, so it never passes as an id."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _number(text: str) -> Decimal | OutOfRange:
    if len(text) > MAX_NUMBER_CHARS:
        return OutOfRange(text)
    value = Decimal(text)
    if value and not -MAX_NUMBER_EXPONENT <= value.adjusted() <= MAX_NUMBER_EXPONENT:
        return OutOfRange(text)
    return value


# a string runs to its closing quote, or to the end of an unterminated body (linear, never backtracking
# from every quote)
_JSON_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*(?:"|\Z)', re.S)


def _depth(text: str) -> int:
    """How deep arrays and objects nest in JSON ``text`` (brackets inside strings do not count)."""
    depth = deepest = 0
    for c in re.findall(r"[\[\]{}]", _JSON_STRING_RE.sub("", text)):
        depth += 1 if c in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def parse_customer_id(doc: object) -> str:
    """The ``customer_id`` of a decoded body (needed before authentication)."""
    if not isinstance(doc, dict):
        raise ReportError("body", "must be a JSON object with report_id, customer_id, reported_at and usage fields")
    customer_id = doc.get("customer_id")
    if not isinstance(customer_id, str) or not customer_id:
        raise ReportError("customer_id", 'missing or not a string; send the customer id of your license (e.g. "iot-010")')
    return customer_id


def decode_body(body: bytes) -> object:
    """JSON with numbers as Decimal (exact), NaN/Infinity refused, nesting and number size bounded."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ReportError("body", "is not UTF-8; send a UTF-8 JSON object") from None
    if _depth(text) > MAX_JSON_DEPTH:
        raise ReportError("body", f"nests arrays or objects deeper than {MAX_JSON_DEPTH} levels; send one flat JSON object")
    try:
        return json.loads(text, parse_float=_number, parse_int=_number, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise ReportError("body", f"is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def _parse_time(value: object) -> int:
    if not isinstance(value, str):
        raise ReportError("reported_at", 'must be an RFC 3339 string with a time zone, e.g. "2026-11-21T13:00:00Z"')
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise ReportError("reported_at", f'{value!r} is not an RFC 3339 time; send e.g. "2026-11-21T13:00:00Z"') from None
    if t.tzinfo is None:
        raise ReportError("reported_at", f"{value!r} has no time zone; add Z (UTC) or an offset like +01:00")
    return (t - _EPOCH) // timedelta(milliseconds=1)  # exact integer ms (no float)


def parse_report(doc: object, schema: ReportSchema, *, now_ms: int | None = None, max_age_days: int = DEFAULT_MAX_AGE_DAYS) -> Report:
    """Validate a decoded report; raises ReportError naming the first bad field."""
    customer_id = parse_customer_id(doc)
    assert isinstance(doc, dict)
    if customer_id not in schema.label_values:
        # authentication runs first, so only a customer with a token but no customers.csv row lands here
        raise ReportError("customer_id", f"{customer_id!r} is not a customer in seeds/customers.csv")
    report_id = doc.get("report_id")
    if not isinstance(report_id, str) or not REPORT_ID_RE.match(report_id):
        raise ReportError(
            "report_id",
            "missing or not 1-128 characters of letters, digits and . _ : + -; send a stable id per report "
            "(the same id when retrying, e.g. the hour's start time)",
        )
    if "reported_at" not in doc:
        raise ReportError("reported_at", 'missing; send the time the report covers up to, e.g. "2026-11-21T13:00:00Z"')
    reported_at_ms = _parse_time(doc["reported_at"])
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    if reported_at_ms > now_ms + MAX_FUTURE_MS:
        raise ReportError("reported_at", f"{doc['reported_at']!r} is in the future; check the instance clock (NTP)")
    if reported_at_ms < now_ms - max_age_days * raw.DAY_MS:
        raise ReportError("reported_at", f"{doc['reported_at']!r} is older than the {max_age_days}-day retention; it can no longer be billed")
    interval = doc.get("interval_seconds", Decimal(DEFAULT_INTERVAL_S))
    if isinstance(interval, bool) or not isinstance(interval, Decimal) or interval != interval.to_integral_value() or not 1 <= interval <= MAX_INTERVAL_S:
        raise ReportError("interval_seconds", f"must be a whole number of seconds from 1 to {MAX_INTERVAL_S} (seed 001 reports hourly: 3600)")
    values: dict[str, Decimal] = {}
    for name, value in doc.items():
        if name in ENVELOPE:
            continue
        spec = schema.fields.get(name)
        if spec is None:
            raise ReportError(name, f"unknown field; known usage fields are {', '.join(sorted(schema.fields))} (seeds/report_fields.csv)")
        if value is None:
            continue  # not measured this time: no event (a gauge is not 0 because a reading is missing)
        if isinstance(value, OutOfRange):
            raise ReportError(name, f"{value.text[:24]}{'...' * (len(value.text) > 24)} is out of range; usage figures are below 10^18 with at most 9 decimals")
        if isinstance(value, bool) or not isinstance(value, Decimal):
            raise ReportError(name, f"must be a JSON number, got {type(value).__name__}")
        if value < 0:
            raise ReportError(name, f"{_number_text(value)} is negative; usage is never negative (send the amount since the previous report)")
        if value >= MAX_QUANTITY:
            raise ReportError(name, f"{_number_text(value)} is too large (at most 10^18)")
        if spec.kind == "delta" and value != value.to_integral_value():
            raise ReportError(name, f"{_number_text(value)} is not a whole number; it counts messages, bytes or requests")
        try:
            scaled = (value * spec.scale).quantize(Decimal("1e-9"))
        except InvalidOperation:
            raise ReportError(name, f"{_number_text(value)} has too many digits") from None
        if scaled != value * spec.scale:
            raise ReportError(name, f"{_number_text(value)} has more decimals than the 9 the warehouse keeps")
        values[name] = value
    return Report(report_id, customer_id, reported_at_ms, int(interval), values)


# --- the durable landing ----------------------------------------------------------------------


def store_path(paths: Paths) -> Path:
    return landing_store_path(paths.landing)


def landing_store_path(landing_dir: Path) -> Path:
    return Path(landing_dir) / "reports" / "reports.sqlite"


_SCHEMA = """
create table if not exists reports (
    customer_id text not null,
    report_id text not null,
    day text not null,
    reported_at_ms integer not null,
    interval_s integer not null,
    digest text not null,
    report text not null,
    received_at_ms integer not null,
    primary key (customer_id, report_id)
);
create index if not exists reports_by_day on reports (day);
create table if not exists compactions (
    day text primary key,
    max_rowid integer not null,
    reports integer not null,
    compacted_at_ms integer not null
);
"""


class ReportStore:
    """The SQLite landing of accepted reports; safe to share between threads of one process."""

    def __init__(self, path: Path, *, readonly: bool = False):
        self.path = Path(path)
        self._lock = threading.Lock()
        if readonly:
            if not self.path.exists():
                self._con = None
                return
            self._con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._con = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            self._con.execute("pragma journal_mode = wal")
            self._con.execute("pragma synchronous = full")  # each commit is fsynced before it returns
            self._con.executescript(_SCHEMA)

    @classmethod
    def open(cls, paths: Paths, *, readonly: bool = False) -> ReportStore:
        return cls(store_path(paths), readonly=readonly)

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def __enter__(self) -> ReportStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def accept(self, report: Report, *, now_ms: int | None = None) -> str:
        """Store a report durably: 'accepted' (new) or 'duplicate' (the same report again).

        Raises ReportConflict when the id is taken by a different report of that customer.
        """
        assert self._con is not None, "read-only store"
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        with self._lock:
            con = self._con
            con.execute("begin immediate")
            try:
                row = con.execute(
                    "select digest from reports where customer_id = ? and report_id = ?",
                    (report.customer_id, report.report_id),
                ).fetchone()
                if row is not None:
                    con.execute("rollback")
                    if row[0] == report.digest:
                        return "duplicate"
                    raise ReportConflict(
                        f"report_id {report.report_id!r} of customer {report.customer_id} was already accepted with "
                        "different contents; send a new report_id for a new report (retries must repeat the same body)"
                    )
                con.execute(
                    "insert into reports values (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        report.customer_id,
                        report.report_id,
                        report.day.isoformat(),
                        report.reported_at_ms,
                        report.interval_s,
                        report.digest,
                        report.canonical(),
                        now_ms,
                    ),
                )
                con.execute("commit")
            except ReportConflict:
                raise
            except BaseException:
                if con.in_transaction:
                    con.execute("rollback")
                raise
        return "accepted"

    def reports_of_day(self, day: date) -> list[Report]:
        if self._con is None:
            return []
        with self._lock:
            rows = self._con.execute("select report from reports where day = ? order by customer_id, report_id", (day.isoformat(),)).fetchall()
        return [_report_from_json(r[0]) for r in rows]

    def pending_days(self) -> dict[str, dict]:
        """Days with reports accepted after their last compaction: {day: {reports, max_rowid}}."""
        if self._con is None:
            return {}
        with self._lock:
            rows = self._con.execute(
                "select r.day, count(*), max(r.rowid) from reports as r left join compactions as c on c.day = r.day "
                "group by r.day having max(r.rowid) > coalesce(max(c.max_rowid), 0) order by r.day"
            ).fetchall()
        return {day: {"reports": n, "max_rowid": rowid} for day, n, rowid in rows}

    def mark_compacted(self, day: date, max_rowid: int, reports: int) -> None:
        assert self._con is not None, "read-only store"
        with self._lock:
            self._con.execute(
                "insert into compactions values (?, ?, ?, ?) on conflict (day) do update set "
                "max_rowid = excluded.max_rowid, reports = excluded.reports, compacted_at_ms = excluded.compacted_at_ms",
                (day.isoformat(), max_rowid, reports, int(time.time() * 1000)),
            )

    def max_rowid(self, day: date) -> int:
        if self._con is None:
            return 0
        with self._lock:
            row = self._con.execute("select coalesce(max(rowid), 0) from reports where day = ?", (day.isoformat(),)).fetchall()
        return int(row[0][0])

    def delete_day(self, day: date) -> int:
        """Retention: remove the reports of one day (and its compaction mark); returns how many."""
        assert self._con is not None, "read-only store"
        with self._lock:
            cur = self._con.execute("delete from reports where day = ?", (day.isoformat(),))
            self._con.execute("delete from compactions where day = ?", (day.isoformat(),))
        return cur.rowcount

    def fingerprints(self, start: date, end: date) -> dict[str, dict]:
        """{day: {"reports": n, "sha256": ...}} for the days in [start, end) with reports: the SHA-256 over
        each report's customer, id and digest (in key order), so an added or changed report changes it."""
        if self._con is None:
            return {}
        with self._lock:
            rows = self._con.execute(
                "select day, customer_id, report_id, digest from reports where day >= ? and day < ? order by day, customer_id, report_id",
                (start.isoformat(), end.isoformat()),
            ).fetchall()
        out: dict[str, dict] = {}
        hashes: dict[str, Any] = {}
        for day, customer_id, report_id, digest in rows:
            hashes.setdefault(day, hashlib.sha256()).update(f"{customer_id}/{report_id}:{digest}\n".encode())
            out.setdefault(day, {"reports": 0})["reports"] += 1
        return {day: {**out[day], "sha256": hashes[day].hexdigest()} for day in out}

    def day_counts(self) -> dict[str, tuple[int, int]]:
        """{day: (reports, max rowid)} for every day in the store."""
        if self._con is None:
            return {}
        with self._lock:
            rows = self._con.execute("select day, count(*), max(rowid) from reports group by day order by day").fetchall()
        return {d: (n, m) for d, n, m in rows}


def _report_from_json(text: str) -> Report:
    doc = json.loads(text)
    return Report(
        doc["report_id"],
        doc["customer_id"],
        int(doc["reported_at_ms"]),
        int(doc["interval_seconds"]),
        {k: Decimal(v) for k, v in doc["values"].items()},
    )


# --- reports -> raw events --------------------------------------------------------------------


def report_events(reports: list[Report], schema: ReportSchema) -> pa.Table:
    """One event per report and meter (its fields summed, scaled to the meter's unit)."""
    from billing_dags.ingest.events import EVENTS_SCHEMA

    rows = []
    for r in reports:
        by_meter: dict[str, list[tuple[ReportField, Decimal]]] = {}
        for name, value in r.values.items():
            spec = schema.fields.get(name)
            if spec is None:
                raise ReportError(
                    name,
                    f"report {r.report_id!r} of {r.customer_id} has a field no longer in seeds/report_fields.csv; "
                    "put the field back (accepted reports are never dropped)",
                )
            by_meter.setdefault(spec.meter_id, []).append((spec, value))
        for meter_id, parts in sorted(by_meter.items()):
            kind = parts[0][0].kind
            quantity = sum((v * spec.scale for spec, v in parts), Decimal(0))
            rows.append(
                {
                    "event_id": f"{r.customer_id}/{r.report_id}:{meter_id}",
                    "ts": r.reported_at_ms,
                    "customer_key": schema.label_values.get(r.customer_id, r.customer_id),
                    "meter_id": meter_id,
                    "dimension": "",
                    "kind": kind,
                    "quantity": quantity,
                    "hold_ms": r.interval_s * 1000 + STALENESS_MS if kind == "gauge" else 0,
                    # the reported numbers behind the event, for disputes
                    "attributes": [("report_id", r.report_id)] + [(spec.field, _number_text(v)) for spec, v in sorted(parts, key=lambda p: p[0].field)],
                }
            )
    return pa.Table.from_pylist(rows, schema=EVENTS_SCHEMA)


def compact_day(paths: Paths, day: date, schema: ReportSchema | None = None) -> dict:
    """Rebuild ``part-usage_reports.parquet`` of ``day`` from every report of the day in the store."""
    from billing_dags.ingest.events import write_events_day

    schema = schema or ReportSchema.from_seeds(paths.seeds_dir)
    store = ReportStore.open(paths)
    try:
        max_rowid = store.max_rowid(day)
        reports = store.reports_of_day(day)
        table = report_events(reports, schema)
        figures = write_events_day(paths, day, table, SOURCE)
        store.mark_compacted(day, max_rowid, len(reports))
    finally:
        store.close()
    unknown = sorted({r.customer_id for r in reports if r.customer_id not in schema.label_values})
    return {**figures, "reports": len(reports), "customers": len({r.customer_id for r in reports}), "unknown_customers": unknown}
