"""Stripe meter events through an outbox (DESIGN rule 9).

Stripe bills exactly what the invoice bills. One Stripe meter (event name) per priced dimension: a
price row of ``seeds/prices.csv`` with an empty dimension prices the whole meter (event name = the
meter's ``stripe_event_name``), a row with a dimension prices that dimension alone (event name
``<stripe_event_name>__<dimension>``, see :func:`stripe_event_name`). Only usage that an invoice
bills is sent: days inside one of the customer's subscription periods, for the meters and
dimensions the period's plan version prices, with the customer's ``stripe_customer_id``.

Values come from the invoices' own models run over each subscription period up to each day (the
period-to-date billable quantity P(d), :func:`period_to_date`), in the meter's Stripe unit
(:func:`unit_decimals`, whole numbers):

- ``sum`` and ``unit_hours`` meters (Stripe formula ``sum``): the day's event is the daily delta
  S(P(d)) - S(P(d-1)), so the period's events add up to S(P(period)) exactly, never a sum of
  separately rounded days;
- ``max``, ``avg`` and ``unit_months`` meters (formula ``last``): the day's event is S(P(d)), the
  period-to-date quantity; Stripe keeps the event with the latest timestamp of the period, the last
  day, whose value is the invoice's.

S(p) (:func:`to_stripe_units`) maps a base-unit quantity to the Stripe unit so that Stripe's
quantity, converted to the billing unit and rounded to the invoice's 9 decimals, is the invoice's.
A recomputed day changes P for every later day of its period: every day whose value changes gets a
new revision (the meters' daily window keeps only the newest event of a day).

Every event is first written to ``data/outbox/date=YYYY-MM-DD/outbox.parquet``; the sender then
posts pending rows and records what Stripe acknowledged. The identifier (and the Idempotency-Key) is
derived from (customer, event name, day, revision). No API key means dry-run. Events older than the
Stripe horizon (35 days) are flagged ``too_old`` and never sent (:func:`too_old_advice` says what to
bill instead); events more than 5 minutes ahead are flagged ``future`` and sent once due.

Statuses: ``pending`` (built, not sent), ``sent`` (Stripe acknowledged it; final), ``dry_run`` (no
key; sent once one is configured), ``too_old`` (final), ``future``, ``failed`` (``last_error`` holds
Stripe's message, never a key; retried on the next run with the same identifier).
"""

from __future__ import annotations

import calendar
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from fractions import Fraction
from pathlib import Path

import pyarrow as pa
import pyarrow.compute
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
        # the price dimension the event name stands for ("" = the whole meter)
        pa.field("dimension", pa.string(), nullable=True),
        # the Stripe unit is the base unit x 10^-unit_decimals
        pa.field("unit_decimals", pa.int32(), nullable=True),
        # the value Stripe holds for this (customer, event name, day) from an earlier acknowledged revision
        pa.field("stripe_value", pa.int64(), nullable=True),
        # the Stripe meter's formula: sum (daily deltas) or last (period-to-date values)
        pa.field("formula", pa.string(), nullable=True),
    ]
)
#: columns added after the first outboxes were written: read as these defaults from older files
_ADDED_DEFAULTS = {"dimension": "", "unit_decimals": 0, "stripe_value": None, "formula": "sum"}


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
    """``<customer>-<event name>-YYYYMMDD-r<revision>`` (``meter_id`` is the event name: a meter's
    own name for its whole-meter events); if that exceeds Stripe's 100 characters, a hash of
    (customer, event name) replaces the readable prefix. Unique per (customer, event name, day, revision)."""
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


def pending_row(
    customer_id: str,
    stripe_customer_id: str,
    meter_id: str,
    event_name: str,
    day: date,
    value: int,
    *,
    revision: int = 1,
    identifier_name: str | None = None,
    timestamp: int | None = None,
    dimension: str = "",
    unit_decimals: int = 0,
    formula: str = "sum",
) -> dict:
    """A new outbox row, ``pending``, never attempted. Its identifier is made of the customer,
    ``identifier_name`` (the event name unless given), the day and the revision."""
    return {
        "customer_id": customer_id,
        "stripe_customer_id": stripe_customer_id,
        "meter_id": meter_id,
        "dimension": dimension,
        "event_name": event_name,
        "day": day,
        "value": value,
        "revision": revision,
        "identifier": event_identifier(customer_id, identifier_name or event_name, day, revision),
        "timestamp": day_timestamp(day) if timestamp is None else timestamp,
        "status": "pending",
        "attempts": 0,
        "last_error": None,
        "stripe_response_id": None,
        "unit_decimals": unit_decimals,
        "stripe_value": None,
        "formula": formula,
    }


def revised_row(prev: Mapping | None, row: dict, identifier_name: str | None = None) -> dict:
    """``prev`` (the stored row of the same customer, meter and dimension) unchanged when ``row`` has
    its value, Stripe customer and event name; else ``row`` as the next revision of ``prev``, with
    the value Stripe holds from ``prev`` (its value if it was sent, else what it held)."""
    if prev is None:
        return row
    if (int(prev["value"]), prev["stripe_customer_id"], prev["event_name"]) == (row["value"], row["stripe_customer_id"], row["event_name"]):
        return dict(prev)
    revision = int(prev["revision"]) + 1
    name = identifier_name or row["event_name"]
    held = int(prev["value"]) if prev["status"] == "sent" else prev.get("stripe_value")
    return {**row, "revision": revision, "identifier": event_identifier(row["customer_id"], name, row["day"], revision), "stripe_value": held}


def build_outbox(
    day: date,
    quantities: list[dict],
    customers: list[dict],
    meters: list[dict],
    previous: list[dict],
) -> list[dict]:
    """Low level (tests, benchmarks of the sender): the outbox rows of ``day`` for given quantities,
    one per customer and meter, every meter a ``sum`` meter of the day's value (the pipeline builds
    the outbox with :func:`build_month_outbox`, which knows prices, subscriptions and levels). One
    row per customer (with a stripe_customer_id) and meter (with a
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
        out.append(
            revised_row(
                prev,
                pending_row(cid, stripe_customer_id, mid, event_name, day, value, identifier_name=mid, timestamp=ts),
                identifier_name=mid,
            )
        )
    return out


# --------------------------------------------------------------------------- exact meters: names, units, values

#: aggregations whose period quantity is a level (peak, average, month-to-date GiB-months): sent as
#: the period-to-date quantity to a ``last`` meter; the others add up and go to ``sum`` meters
LEVEL_AGGREGATIONS = frozenset({"max", "avg", "unit_months"})
#: base units measured on a continuum (time in seconds): sent in a sub-unit like the fractional aggregations
CONTINUOUS_UNITS = frozenset({"second"})
#: Stripe rejects values with more than 15 significant digits
MAX_DIGITS = 15
EVENT_NAME_MAX = 100
_NANO = 10**9
_SLUG_RE = re.compile(r"[^a-z0-9_.-]")


def stripe_formula(aggregation: str) -> str:
    """The Stripe meter formula of a seeds aggregation: ``last`` for levels, ``sum`` for the rest."""
    return "last" if aggregation in LEVEL_AGGREGATIONS else "sum"


def unit_decimals(aggregation: str, unit: str, divisor: int) -> int:
    """d such that the meter's Stripe unit is the base unit x 10^-d. Whole things (bytes, tokens,
    requests, devices) counted (``sum``) or peaked (``max``) are whole base units: d = 0. Fractional
    quantities (``avg``, ``unit_hours``, ``unit_months``, and time in seconds) use the smallest d that
    makes one Stripe unit at most 10^-9 billing unit, the invoice's precision (device averages in
    10^-9 devices, CPU seconds in microseconds; byte-hours need no scaling: a byte is 0.93 nano-GiB)."""
    if aggregation in ("sum", "max") and unit not in CONTINUOUS_UNITS:
        return 0
    d = 0
    while 10**d * divisor < _NANO:
        d += 1
    return d


def unit_label(unit: str, decimals: int) -> str:
    """The Stripe unit's name: ``byte``, ``1e-6 second``."""
    return unit if decimals == 0 else f"1e-{decimals} {unit}"


def stripe_event_name(base: str, dimension: str | None) -> str:
    """The event name of a priced dimension: the meter's ``stripe_event_name`` for the whole meter
    (empty dimension), else ``<base>__<dimension>`` with the dimension lowercased and every character
    other than a-z 0-9 _ . - replaced by ``_``; when that changed the dimension (or the name would
    pass 100 characters) a short hash of the exact dimension is appended, so distinct dimensions
    never share a name."""
    if not dimension:
        return base
    slug = _SLUG_RE.sub("_", dimension.lower())
    name = f"{base}__{slug}"
    if slug != dimension or len(name) > EVENT_NAME_MAX:
        h = hashlib.sha256(dimension.encode()).hexdigest()[:10]
        name = f"{base}__{slug[: max(1, EVENT_NAME_MAX - len(base) - 2 - 11)]}_{h}"
    return name[:EVENT_NAME_MAX]


def _div_half_up(n: int, d: int) -> int:
    return round_half_up(Fraction(n, d))


def to_stripe_units(base_nano: int, divisor: int, decimals: int) -> int:
    """A base-unit quantity (in 10^-9 base units) as a whole number of Stripe units (base x 10^-decimals)
    such that :func:`stripe_to_billing_nano` gives back the invoice's figure: exactly the quantity
    when it is a whole number of Stripe units, else the invoice's 9-decimal billing quantity expressed
    in Stripe units (which round-trips when a Stripe unit is at most 10^-9 billing unit)."""
    scaled = Fraction(base_nano * 10**decimals, _NANO)
    if scaled.denominator == 1:
        return scaled.numerator
    q_nano = _div_half_up(base_nano, divisor)
    return _div_half_up(q_nano * divisor * 10**decimals, _NANO)


def stripe_to_billing_nano(value: int, divisor: int, decimals: int) -> int:
    """Stripe units as billing units x 10^9, rounded half-up as the invoice line rounds."""
    return _div_half_up(int(value) * _NANO, divisor * 10**decimals)


def check_digits(value: int, where: str) -> int:
    if len(str(abs(int(value)))) > MAX_DIGITS:
        raise OutboxError(f"{where}: value {value} has more than {MAX_DIGITS} digits, which Stripe rejects; give the meter a larger unit")
    return int(value)


# --------------------------------------------------------------------------- the month's priced lines


@dataclass(frozen=True)
class PricedLine:
    """One invoice line as Stripe sees it: a customer's subscription period and a priced (meter, dimension)."""

    customer_id: str
    stripe_customer_id: str
    period_start: date
    period_end: date
    meter_id: str
    dimension: str
    event_name: str
    aggregation: str
    divisor: int
    decimals: int


def _to_nano(x) -> int:
    f = Fraction(x)
    n = f * _NANO
    if n.denominator != 1:
        return round_half_up(n)
    return n.numerator


def period_to_date(daily: pa.Table, seeds: Mapping[str, pa.Table], month: date, through: date) -> tuple[list[dict], list[dict]]:
    """(subscription periods of ``month``, period-to-date billable quantities). The periods are
    dim_subscription_periods_by_month's rows; for every period and every day d of it up to
    ``through`` the quantities are fct_billable_usage_by_subscription_period over [period start, d]
    of ``daily`` (fct_usage_by_day rows of the month), one row per (customer, period, day, meter,
    dimension) with ``base_nano`` (base units x 10^9, as the invoice's rated model reads them).
    ``seeds`` holds the meters, units, customers, subscriptions, plans and currencies tables."""
    from billing_dags.core.duck import session
    from billing_dags.models.sqlmodels import BILLABLE_MODEL, create_table, load_project, prepare, query

    window = Window(month_start(month), next_month(month))
    project = load_project()
    with session(1) as con:
        for name in ("meters", "units", "customers", "subscriptions", "plans", "currencies"):
            create_table(con, f"seed_{name}", seeds[name])
        prepare(con, project, "dim_subscription_periods_by_month", None, window)
        periods = query(con, project.models["dim_subscription_periods_by_month"], window).to_pylist()
        ends = []
        for p in periods:
            d = p["period_start"]
            while d < p["period_end"] and d <= through:
                ends.append({"customer_id": p["customer_id"], "period_start": p["period_start"], "day": d})
                d += timedelta(days=1)
        if not ends or daily.num_rows == 0:
            return periods, []
        create_table(con, "usage_source", daily)
        create_table(con, "period_ends", pa.Table.from_pylist(ends))
        # every period-to-date window as a period of its own customer key (customer, end day)
        con.execute(
            "create or replace table fct_usage_by_day as select u.* replace (u.customer_id || chr(31) || strftime(e.day, '%Y-%m-%d') as customer_id) "
            "from usage_source u join period_ends e on u.customer_id = e.customer_id and u.day >= e.period_start and u.day <= e.day"
        )
        con.execute(
            "create or replace table dim_subscription_periods_by_month as select $month::date as month, "
            "customer_id || chr(31) || strftime(day, '%Y-%m-%d') as customer_id, period_start, (day + 1)::date as period_end from period_ends",
            {"month": window.start},
        )
        for name in ("fct_usage_by_subscription_period", BILLABLE_MODEL):
            prepare(con, project, name, None, window)
            create_table(con, name, query(con, project.models[name], window))
        rows = con.sql(f"select customer_id, period_start, meter_id, dimension, aggregation, base_quantity from {BILLABLE_MODEL}").to_arrow_table()
    out = []
    for r in rows.to_pylist():
        cid, day = r["customer_id"].split("\x1f")
        out.append({**r, "customer_id": cid, "day": date.fromisoformat(day), "base_nano": _to_nano(r["base_quantity"])})
    return periods, out


def priced_lines(periods: list[dict], seeds: Mapping[str, pa.Table]) -> list[PricedLine]:
    """The invoice lines Stripe can bill: each period's price rows whose meter has a
    ``stripe_event_name``, for customers with a ``stripe_customer_id``."""
    meters = {m["meter_id"]: m for m in seeds["meters"].to_pylist()}
    divisors = {(u["unit"], u["billing_unit"]): int(u["divisor"]) for u in seeds["units"].to_pylist()}
    customers = {c["customer_id"]: c for c in seeds["customers"].to_pylist()}
    prices: dict[tuple[str, int], list[dict]] = {}
    for pr in seeds["prices"].to_pylist():
        prices.setdefault((pr["plan_id"], int(pr["version"])), []).append(pr)
    out = []
    for p in periods:
        stripe_id = (customers.get(p["customer_id"]) or {}).get("stripe_customer_id")
        if not stripe_id:
            continue
        for pr in prices.get((p["plan_id"], int(p["plan_version"])), []):
            m = meters.get(pr["meter_id"])
            if not m or not m.get("stripe_event_name"):
                continue
            divisor = divisors[(m["unit"], m["billing_unit"])]
            dim = pr["dimension"] or ""
            out.append(
                PricedLine(
                    p["customer_id"],
                    stripe_id,
                    p["period_start"],
                    p["period_end"],
                    m["meter_id"],
                    dim,
                    stripe_event_name(m["stripe_event_name"], dim),
                    m["aggregation"],
                    divisor,
                    unit_decimals(m["aggregation"], m["unit"], divisor),
                )
            )
    return sorted(out, key=lambda x: (x.customer_id, x.period_start, x.meter_id, x.dimension))


def line_values(line: PricedLine, quantities: list[dict], through: date) -> dict[date, int]:
    """{day: event value} of one priced line from the period-to-date ``quantities`` of its customer:
    a level line has an event every day from its first day with usage (the period-to-date value), an
    additive line one on each day its period-to-date Stripe quantity moves (the delta)."""
    ptd: dict[date, int] = {}
    for q in quantities:
        if q["meter_id"] == line.meter_id and (not line.dimension or q["dimension"] == line.dimension):
            ptd[q["day"]] = ptd.get(q["day"], 0) + q["base_nano"]
    out: dict[date, int] = {}
    prev_s, started = 0, False
    d = line.period_start
    while d < line.period_end and d <= through:
        started = started or d in ptd
        s = to_stripe_units(ptd.get(d, 0), line.divisor, line.decimals) if started else 0
        where = f"{line.customer_id} {line.event_name} {d}"
        if line.aggregation in LEVEL_AGGREGATIONS:
            if started:
                out[d] = check_digits(s, where)
        elif s != prev_s:
            out[d] = check_digits(s - prev_s, where)
        prev_s = s
        d += timedelta(days=1)
    return out


def build_month_outbox(
    month: date,
    through: date,
    daily: pa.Table,
    seeds: Mapping[str, pa.Table],
    previous: Mapping[date, list[dict]],
) -> dict[date, list[dict]]:
    """The outbox rows of every day of ``month`` up to ``through``: {day: rows}, from the month's
    fct_usage_by_day rows ``daily`` (days after ``through`` ignored) and the rows stored so far
    (``previous``, by day). A row whose value, Stripe customer and event name are unchanged is kept
    as it is (status included); a changed one gets the next revision and is pending again; a stored
    row no longer billed (no price covers it, outside every subscription) is re-sent as 0 so what was
    reported is undone. ``seeds`` holds meters, units, customers, subscriptions, plans, currencies and prices."""
    if isinstance(month, datetime) or not isinstance(month, date):
        raise OutboxError(f"month {month!r} must be a datetime.date")
    start, end = month_start(month), next_month(month)
    if not start <= through < end:
        raise OutboxError(f"through {through} is not a day of {start:%Y-%m}")
    daily = daily.filter(pa.compute.less_equal(daily.column("day"), pa.scalar(through, pa.date32()))) if daily.num_rows else daily
    for d in set(daily.column("day").to_pylist()) if daily.num_rows else ():
        if not start <= d < end:
            raise OutboxError(f"usage row of {d} is not in {start:%Y-%m}; pass only that month's rows of fct_usage_by_day")
    periods, quantities = period_to_date(daily, seeds, start, through)
    by_customer: dict[str, list[dict]] = {}
    for q in quantities:
        by_customer.setdefault(q["customer_id"], []).append(q)
    wanted: dict[date, dict[tuple[str, str, str], tuple[PricedLine, int]]] = {}
    for line in priced_lines(periods, seeds):
        for d, v in line_values(line, by_customer.get(line.customer_id, []), through).items():
            wanted.setdefault(d, {})[(line.customer_id, line.meter_id, line.dimension)] = (line, v)
    out: dict[date, list[dict]] = {}
    d = start
    while d <= through:
        out[d] = _merge_day(d, wanted.get(d, {}), previous.get(d, []))
        d += timedelta(days=1)
    return out


def _merge_day(day: date, wanted: Mapping[tuple[str, str, str], tuple[PricedLine, int]], previous: list[dict]) -> list[dict]:
    prev_by_key = {}
    for p in previous:
        if _row_day(p) != day:
            raise OutboxError(f"previous outbox row {p.get('identifier')!r} is for {p.get('day')}, not {day}; pass the rows stored for {day}")
        prev_by_key[_row_key(p)] = p
    ts = day_timestamp(day)
    rows = []
    for key in sorted(set(wanted) | set(prev_by_key)):
        prev = prev_by_key.get(key)
        if key in wanted:
            line, value = wanted[key]
            stripe_customer_id, event_name, decimals, formula = line.stripe_customer_id, line.event_name, line.decimals, stripe_formula(line.aggregation)
        elif prev is not None and (int(prev["value"]) == 0 or prev["status"] == "too_old"):
            rows.append(dict(prev))  # nothing to undo
            continue
        else:  # reported before, no longer billed: undo it
            value, stripe_customer_id, event_name, decimals, formula = (
                0,
                prev["stripe_customer_id"],
                prev["event_name"],
                prev.get("unit_decimals") or 0,
                prev.get("formula"),
            )
        row = pending_row(key[0], stripe_customer_id, key[1], event_name, day, value, timestamp=ts, dimension=key[2], unit_decimals=decimals, formula=formula)
        rows.append(revised_row(prev, row))
    return rows


def too_old_advice(row: Mapping, later_level_rows: bool = False) -> str:
    """What to bill instead of a meter event Stripe no longer accepts (older than 35 days)."""
    held = int(row.get("stripe_value") or 0)
    diff = int(row["value"]) - held
    unit = f"Stripe units of {row['event_name']}" + (f" (1 = 1e-{row['unit_decimals']} base unit)" if row.get("unit_decimals") else "")
    if later_level_rows:
        return "superseded: a later day of the period carries the period-to-date value; nothing to bill"
    if diff == 0:
        return "Stripe already holds this value; nothing to bill"
    what = "an invoice item" if diff > 0 else "a credit note"
    return f"Stripe holds {held}, the invoice {row['value']}: bill the difference of {diff} {unit} as {what} for {row['customer_id']} ({row['day']})"


# --------------------------------------------------------------------------- storage


def outbox_path(paths: Paths, day: date) -> Path:
    return paths.outbox / f"date={day.isoformat()}" / "outbox.parquet"


def read_outbox(paths: Paths, day: date) -> list[dict]:
    """The stored outbox rows of ``day`` ([] when none), sorted by (customer_id, meter_id)."""
    data = durable.read_for_update(outbox_path(paths, day))
    if data is None:
        return []
    table = pq.read_table(pa.BufferReader(data))
    rows = [{**_ADDED_DEFAULTS, **r} for r in table.to_pylist()]
    return sorted(rows, key=_row_key)


def _has_status(paths: Paths, day: date, status: str) -> bool:
    """Whether a row of ``day``'s outbox has ``status`` (its status column alone is read)."""
    path = outbox_path(paths, day)
    return path.exists() and status in pq.read_table(path, columns=["status"]).column("status").to_pylist()


def _row_key(r: Mapping) -> tuple[str, str, str]:
    return (r["customer_id"], r["meter_id"], r.get("dimension") or "")


def write_outbox(paths: Paths, day: date, rows: list[dict]) -> Path:
    """Replace the outbox of ``day`` with ``rows`` (durable: temp file, fsync, rename, fsync of the folder). Same rows, same bytes."""
    for r in rows:
        if _row_day(r) != day:
            raise OutboxError(f"outbox row {r.get('identifier')!r} is for {r.get('day')}, not {day}")
        if r.get("status") not in STATUSES:
            raise OutboxError(f"outbox row {r.get('identifier')!r} has status {r.get('status')!r}; use one of {', '.join(STATUSES)}")
    keys = [_row_key(r) for r in rows]
    if len(set(keys)) != len(keys):
        raise OutboxError(f"outbox of {day} has more than one row for a (customer, meter, dimension); keep one per day")
    ordered = sorted(rows, key=_row_key)
    table = pa.Table.from_pylist([{f.name: r.get(f.name, _ADDED_DEFAULTS.get(f.name)) for f in OUTBOX_SCHEMA} for r in ordered], schema=OUTBOX_SCHEMA)
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


def too_old_flags(paths: Paths, day: date, lookback_days: int = 62) -> list[str]:
    """The meter events of the ``lookback_days`` up to ``day`` that are too old for Stripe (35 days)
    and still matter, each with what to bill instead: "<customer> <event name> <day>: <advice>"."""
    days = [day - timedelta(days=i) for i in range(lookback_days, -1, -1)]
    if not any(_has_status(paths, d, "too_old") for d in days):
        return []  # the usual case: only the status column of each day was read
    rows = [r for d in days for r in read_outbox(paths, d)]
    live = {(r["customer_id"], r["event_name"], r["day"]) for r in rows if r["status"] != "too_old"}
    out = []
    for r in rows:
        if r["status"] != "too_old":
            continue
        later = r.get("formula") == "last" and any(
            (r["customer_id"], r["event_name"], r["day"] + timedelta(days=k)) in live
            for k in range(1, 32)
            if (r["day"] + timedelta(days=k)).month == r["day"].month
        )
        advice = too_old_advice(r, later)
        if advice.startswith(("superseded", "Stripe already")):
            continue
        out.append(f"{r['customer_id']} {r['event_name']} {r['day']}: {advice}")
    return out


def outbox_summary(paths: Paths, month: date) -> str:
    """Meter events of the month's days by status, e.g. '1,234 meter events: 900 dry_run, 334 too_old'."""
    from billing_dags.core.calendar import month_days

    summary = summarize(row for day in month_days(month) for row in read_outbox(paths, day))
    return f"{summary['rows']:,} meter events: " + ", ".join(f"{n:,} {status}" for status, n in sorted(summary["by_status"].items()) if n)
