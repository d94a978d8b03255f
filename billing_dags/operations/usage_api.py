"""The customer usage API's answers: one customer's usage by meter and day, allowances used and the
projected invoice of the open month. Plain functions over the warehouse, read only; the HTTP layer is
``operations.customer_api``.

Every figure is computed by the models the invoices use: daily quantities in billing units by
fct_billable_usage_by_subscription_period (each day its own period, so a day's quantity is the
meter's aggregation over that day: the sum for counters, the peak or the average level for gauges,
unit-hours and unit-months for integrals), and the open month's month-to-date and projected
quantities and invoice lines by ``billing.projection`` (the whole pricing chain down to
fct_invoice_lines, the customer's rows only). Quantities and amounts are decimal strings, exact.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from billing_dags.billing import projection
from billing_dags.core.calendar import month_days, month_start, next_month
from billing_dags.core.errors import InputError
from billing_dags.core.money import format_minor
from billing_dags.core.settings import Paths

#: the longest range one request may ask for, in days (both ends included)
MAX_RANGE_DAYS = 366
QUERY_PARAMS = ("start_date", "end_date")
_DAY_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
#: allowance thresholds (percent) when seeds/anomaly_rules.csv has no allowance_used row
DEFAULT_THRESHOLDS = (Decimal(80), Decimal(100))


class ApiError(InputError):
    """A request the API cannot answer as asked: ``status`` (4xx), the message names ``param`` and the fix."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


# --- answers kept while their inputs are unchanged -----------------------------------------------


def inputs_stamp(paths: Paths, start: date, end: date) -> tuple:
    """What an answer about ``start``..``end`` is computed from, as (file, size, mtime) of the daily
    usage partitions of the days and of the months they touch (a projection reads the whole month),
    the seeds and their snapshots, and the notifications outbox: equal stamps, equal answers."""
    first, last = month_start(start), next_month(month_start(end))
    days = paths.models / "fct_usage_by_day"
    files = [days / f"day={(first + timedelta(days=i)).isoformat()}" / "data.parquet" for i in range((last - first).days)]
    files += sorted(paths.seeds_dir.glob("*.csv")) + sorted((paths.data_dir / "seeds").glob("*.parquet"))
    files += sorted((paths.data_dir / "notifications" / "outbox").glob("*.jsonl"))
    out = []
    for f in files:
        try:
            st = f.stat()
        except FileNotFoundError:
            continue
        out.append((str(f), st.st_size, st.st_mtime_ns))
    return tuple(out)


class AnswerCache:
    """The last ``size`` answers by (endpoint, customer, arguments, inputs stamp): a dashboard polling the
    open month costs a stat of its files, not a pricing run, until a day is computed or a seed changes."""

    def __init__(self, size: int = 256):
        self.size = size
        self._docs: dict[tuple, dict] = {}
        self._lock = threading.Lock()
        self.hits = 0

    def get(self, key: tuple, compute):
        with self._lock:
            doc = self._docs.get(key)
            if doc is not None:
                self.hits += 1
                return doc
        doc = compute()
        with self._lock:
            if len(self._docs) >= self.size:
                self._docs.pop(next(iter(self._docs)))
            self._docs[key] = doc
        return doc


# --- the customer ------------------------------------------------------------------------------


def account(paths: Paths, customer_id: str) -> dict:
    """Name, currency, Stripe customer and subscriptions of ``customer_id`` from the seeds the invoices use."""
    seeds = projection.seed_tables(paths)
    rows = [c for c in seeds["customers"].to_pylist() if c["customer_id"] == customer_id]
    if not rows:
        raise ApiError(403, f"customer {customer_id} is not in the billing seeds; ask support to check the account")
    subs = sorted((s for s in seeds["subscriptions"].to_pylist() if s["customer_id"] == customer_id), key=lambda s: s["start_date"])
    c = rows[0]
    return {
        "customer_id": customer_id,
        "name": c["name"],
        "currency": c["currency"],
        "stripe_customer_id": c["stripe_customer_id"],
        "subscriptions": [
            {"plan_id": s["plan_id"], "start_date": s["start_date"].isoformat(), "end_date": s["end_date"].isoformat() if s["end_date"] else None} for s in subs
        ],
    }


def require_subscription(acct: dict) -> None:
    if not acct["subscriptions"]:
        raise ApiError(403, f"customer {acct['customer_id']} has no subscription, so nothing is metered or billed to this key; ask support to set up a plan")


# --- the query ---------------------------------------------------------------------------------


def _day(name: str, value: str) -> date:
    if _DAY_RE.match(value):
        try:
            return date.fromisoformat(value)
        except ValueError:
            pass
    raise ApiError(400, f"{name}={value[:40]!r} is not a day; give YYYY-MM-DD, e.g. {name}=2026-11-01", name)


def parse_range(params: Iterable[tuple[str, str]], today: date) -> tuple[date, date]:
    """``start_date`` and ``end_date`` (UTC days, both included) from a query string's pairs.

    Defaults: ``end_date`` today, ``start_date`` the first day of ``end_date``'s month. A bad day, an
    unknown or repeated parameter, an end before the start, a start after today or a range over
    MAX_RANGE_DAYS is an ApiError (400) naming the parameter and the fix."""
    got: dict[str, str] = {}
    for name, value in params:
        if name not in QUERY_PARAMS:
            raise ApiError(400, f"unknown parameter {name[:40]!r}; this endpoint takes start_date and end_date (YYYY-MM-DD)", name[:40])
        if name in got:
            raise ApiError(400, f"{name} is given twice; give it once", name)
        got[name] = value
    end = _day("end_date", got["end_date"]) if "end_date" in got else today
    start = _day("start_date", got["start_date"]) if "start_date" in got else month_start(end)
    if end < start:
        raise ApiError(400, f"end_date {end} is before start_date {start}; give an end_date on or after the start_date", "end_date")
    if start > today:
        raise ApiError(400, f"start_date {start} is after today ({today}): there is no usage yet; give a start_date on or before {today}", "start_date")
    days = (end - start).days + 1
    if days > MAX_RANGE_DAYS:
        raise ApiError(
            400,
            f"the range {start} to {end} is {days} days, over the limit of {MAX_RANGE_DAYS}; "
            f"ask for at most {MAX_RANGE_DAYS} days at a time (e.g. end_date={start + timedelta(days=MAX_RANGE_DAYS - 1)})",
            "end_date",
        )
    return start, end


# --- daily usage -------------------------------------------------------------------------------


def _usage_rows(paths: Paths, customer_id: str, days: list[date]) -> tuple[list[date], pa.Table | None]:
    """The computed days among ``days`` and the customer's fct_usage_by_day rows of them (read only)."""
    from billing_dags.models.sqlmodels import Window, day_partition_files, load_project

    model = load_project().models["fct_usage_by_day"]
    computed, tables = [], []
    for d in days:
        files = day_partition_files(paths, model, Window(d, d + timedelta(days=1)))
        if files:
            computed.append(d)
            t = pa.concat_tables([pq.read_table(f, filters=[("customer_id", "=", customer_id)], partitioning=None) for f in files])
            if t.num_rows:
                tables.append(t)
    if not tables:
        return computed, None
    return computed, pa.concat_tables(tables, promote_options="default")


def daily_quantities(paths: Paths, customer_id: str, start: date, end: date) -> tuple[list[date], list[dict]]:
    """(computed days, rows of meter, dimension, day, quantity, unit, aggregation) for one customer.

    Each day is its own group of the billable-quantity model (its key stands in the model's customer
    column: the rows are one customer's), over the day's month (unit-months divide by its length)."""
    from billing_dags.models.sqlmodels import Window, billable_quantities

    days = [start + timedelta(days=i) for i in range((end - start).days + 1)]
    computed, table = _usage_rows(paths, customer_id, days)
    if table is None:
        return computed, []
    seeds = projection.seed_tables(paths)
    out: list[dict] = []
    month = month_start(start)
    while month <= end:
        of_month = table.filter(pc.and_(pc.greater_equal(table["day"], month), pc.less(table["day"], next_month(month))))
        if of_month.num_rows:
            keyed = of_month.set_column(of_month.schema.get_field_index("customer_id"), "customer_id", pc.cast(of_month["day"], pa.string()))
            for r in billable_quantities(keyed, seeds, Window(month, next_month(month))):
                out.append(
                    {
                        "day": r["customer_id"],
                        "meter": r["meter_id"],
                        "dimension": r["dimension"],
                        "aggregation": r["aggregation"],
                        "unit": r["unit"],
                        "quantity": r["quantity"],
                    }
                )
        month = next_month(month)
    out.sort(key=lambda r: (r["meter"], r["dimension"], r["day"]))
    return computed, out


def _by_meter(rows: list[dict], descriptions: dict[str, str]) -> list[dict]:
    meters: dict[tuple, dict] = {}
    for r in rows:
        m = meters.setdefault(
            (r["meter"], r["dimension"]),
            {
                "meter": r["meter"],
                "description": descriptions.get(r["meter"], ""),
                "dimension": r["dimension"],
                "aggregation": r["aggregation"],
                "unit": r["unit"],
                "days": [],
                "_q": [],
            },
        )
        m["days"].append({"day": r["day"], "quantity": fmt(r["quantity"])})
        m["_q"].append(r["quantity"])
    out = []
    for m in meters.values():
        q = m.pop("_q")
        # additive aggregations add up over days; a level (peak, average) has no meaningful sum
        m["total"] = fmt(sum(q, Decimal(0))) if m["aggregation"] in projection.ADDITIVE else None
        m["peak"] = fmt(max(q)) if m["aggregation"] in projection.LEVEL else None
        out.append(m)
    return out


def fmt(x: Decimal) -> str:
    """An exact decimal string without exponent or trailing zeros ("12.5", "0")."""
    return projection.fmt(x)


def _descriptions(paths: Paths) -> dict[str, str]:
    return {m["meter_id"]: m["description"] for m in projection.seed_tables(paths)["meters"].to_pylist()}


def usage(paths: Paths, customer_id: str, start: date, end: date, today: date) -> dict:
    """``GET /v1/billing/usage``: the customer's usage by meter and day from ``start`` to ``end`` (both included)."""
    acct = account(paths, customer_id)
    require_subscription(acct)
    computed, rows = daily_quantities(paths, customer_id, start, end)
    return {
        "object": "usage",
        "customer_id": customer_id,
        "start_date": start.isoformat(),
        "end_date": end.isoformat(),
        "as_of": today.isoformat(),
        "days_computed": len(computed),
        "last_computed_day": max(computed).isoformat() if computed else None,
        "meters": _by_meter(rows, _descriptions(paths)),
        "note": "quantities in each meter's billing unit, exact; a day appears once it has ended and been computed (days without usage are left out)",
    }


# --- the open month ----------------------------------------------------------------------------


def _thresholds(paths: Paths) -> dict[str, list[Decimal]]:
    """Allowance alert levels (percent) per meter from seeds/anomaly_rules.csv ('' = every meter)."""
    rules = [r for r in projection.seed_tables(paths)["anomaly_rules"].to_pylist() if r["rule"] == "allowance_used"]
    out: dict[str, list[Decimal]] = {}
    for r in rules:
        out.setdefault(r["meter_id"], []).append(r["threshold"])
    return {k: sorted(v) for k, v in out.items()}


def percent(used: Decimal, included: Decimal) -> Decimal:
    """used / included in percent, half-up to 2 decimals."""
    return (used * 100 / included).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def allowances(p: projection.Projection, customer_id: str, thresholds: dict[str, list[Decimal]]) -> list[dict]:
    """Each included allowance of the plan in force: included, used month to date and projected, in percent,
    the alert levels reached. A pool (several meters sharing one allowance) is one entry."""
    usage = {(u["meter_id"], u["dimension"]): u for u in p.usage if u["customer_id"] == customer_id}
    groups: dict[tuple, dict] = {}
    for a in p.allowances:
        if a["customer_id"] != customer_id or not a["included_quantity"]:
            continue
        key = ("pool", a["included_pool"]) if a["included_pool"] else ("meter", a["meter_id"], a["dimension"])
        g = groups.setdefault(key, {"pool": a["included_pool"], "meters": [], "included": a["included_quantity"], "unit": a["unit"], "mtd": [], "proj": []})
        if (a["meter_id"], a["dimension"]) in {(m, d) for m, d in g["meters"]}:
            continue  # the same allowance of another subscription period in the month: counted once
        g["meters"].append((a["meter_id"], a["dimension"]))
        u = usage.get((a["meter_id"], a["dimension"]))
        g["mtd"].append(u["month_to_date"] if u else Decimal(0))
        g["proj"].append(u["projected"] if u else Decimal(0))
    out = []
    for g in groups.values():
        used, projected, included = sum(g["mtd"], Decimal(0)), sum(g["proj"], Decimal(0)), g["included"]
        levels = thresholds.get(g["meters"][0][0]) or thresholds.get("") or list(DEFAULT_THRESHOLDS)
        pct = percent(used, included)
        out.append(
            {
                "meters": [m for m, _ in g["meters"]],
                "dimension": g["meters"][0][1],
                "pool": g["pool"],
                "unit": g["unit"],
                "included": fmt(included),
                "used": fmt(used),
                "remaining": fmt(max(included - used, Decimal(0))),
                "used_percent": f"{pct:f}",
                "projected": fmt(projected),
                "projected_percent": f"{percent(projected, included):f}",
                "thresholds_reached": [f"{t.normalize():f}" for t in levels if used * 100 >= t * included],
            }
        )
    return out


def _notifications(paths: Paths, customer_id: str, period: str) -> list[dict]:
    """The allowance notifications of the customer's period (operations.notifications' outbox)."""
    from billing_dags.operations.notifications import outbox

    keep = ("id", "day", "meter_id", "threshold_percent", "quantity", "allowance", "unit", "subject")
    return [{k: n[k] for k in keep} for n in outbox(paths, period) if n["customer_id"] == customer_id]


def current_period(paths: Paths, customer_id: str, today: date) -> dict:
    """``GET /v1/billing/usage/current-period``: the open month to date, allowances used and the projected invoice."""
    acct = account(paths, customer_id)
    require_subscription(acct)
    month = month_start(today)
    days_in_month = len(month_days(month))
    base = {
        "object": "usage.current_period",
        "customer_id": customer_id,
        "period": {"start_date": month.isoformat(), "end_date": (next_month(month) - timedelta(days=1)).isoformat(), "month": f"{month:%Y-%m}"},
        "as_of": today.isoformat(),
        "days_in_month": days_in_month,
    }
    computed, rows = daily_quantities(paths, customer_id, month, min(today, next_month(month) - timedelta(days=1)))
    if not computed:
        return {
            **base,
            "days_computed": 0,
            "last_computed_day": None,
            "meters": [],
            "allowances": [],
            "projected_invoice": None,
            "note": f"no day of {month:%Y-%m} has been computed yet: a day's usage appears once the day has ended and been computed",
        }
    p = projection.project_month(paths, month, today, customer_id=customer_id)
    daily = {(m["meter"], m["dimension"]): m for m in _by_meter(rows, _descriptions(paths))}
    meters = []
    for u in p.usage:
        d = daily.get((u["meter_id"], u["dimension"]), {})
        meters.append(
            {
                "meter": u["meter_id"],
                "description": d.get("description") or _descriptions(paths).get(u["meter_id"], ""),
                "dimension": u["dimension"],
                "aggregation": u["aggregation"],
                "unit": u["unit"],
                "month_to_date": fmt(u["month_to_date"]),
                "projected": fmt(u["projected"]),
                "days": d.get("days", []),
            }
        )
    total = p.totals.get(customer_id)
    exponent = total["exponent"] if total else 2
    lines = [
        {
            "line": l["line_number"],
            "type": l["line_type"],
            "meter": l["meter_id"],
            "description": l["description"],
            "quantity": fmt(l["quantity"]) if l["quantity"] is not None else None,
            "unit": l["unit"],
            "amount": format_minor(int(l["amount_minor"]), exponent),
        }
        for l in p.lines
        if l["customer_id"] == customer_id
    ]
    return {
        **base,
        "notifications": _notifications(paths, customer_id, f"{month:%Y-%m}"),
        "days_computed": p.days_elapsed,
        "last_computed_day": max(p.computed_days).isoformat(),
        "meters": meters,
        "allowances": allowances(p, customer_id, _thresholds(paths)),
        "projected_invoice": {
            "currency": total["currency"] if total else acct["currency"],
            "lines": lines,
            "total": format_minor(total["amount_minor"], exponent) if total else format_minor(0, exponent),
            "note": f"{projection.NOTE}: month-to-date x {days_in_month}/{p.days_elapsed} days for additive meters, "
            "the month-to-date level for peaks and averages; before prepaid credits and adjustments",
        },
    }
