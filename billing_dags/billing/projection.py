"""Month-to-date usage and a projected month-end bill for the current, still-open month.

Seed 000 asks for Grafana panels with "current billing period usage" and "projected monthly cost".
A projection is never an invoice and never touches ``data/models``: it reads the daily usage
partitions already computed for the month and prices a projected month in an in-memory DuckDB
with the same SQL models the invoices use (dim_subscription_periods_by_month ->
fct_usage_by_subscription_period -> fct_billable_usage_by_subscription_period -> fct_rated_usage_by_subscription_period ->
fct_invoice_lines). The month-to-date and projected quantities shown per customer, meter and
dimension come from the same billable-quantity model, over the whole month as one period: the
month-to-date one over the computed days only (no partial window: unit-months still divide by the
whole month), the projected one over the computed and the synthetic days.

How the month-end quantity is projected (per customer, meter and dimension):

- ``E`` = elapsed days: the days of the month whose ``fct_usage_by_day`` partition exists (the
  same for every customer; a day without usage for a customer still counts as elapsed for them);
  ``D`` = days in the month. The days without a partition are the *missing* days (the rest of the
  month, and any earlier day not computed yet).
- Additive meters (counters ``sum``, gauges ``unit_hours`` and ``unit_months``): projected =
  month-to-date x D / E, rounded half-up to 1e-9 of the base unit (the precision of every usage
  column). The difference to the month-to-date is spread over the missing days as synthetic daily
  rows in exact integer 1e-9 units (no floats), so a plan change or a subscription ending later
  in the month rates each part of the month with its own plan, exactly as an invoice would.
- Level meters (``max``, ``avg``): projected = month-to-date. Missing days get the month-to-date
  peak (``max``), or a copy of the month-to-date integral and covered time (``avg``: any mix of
  real and synthetic days has exactly the month-to-date average).

The projected total is the sum of the projected invoice lines (base fees, usage, discount, risk,
minimum top-up) and the tax line, before prepaid credits and adjustments; label it "projected, not
an invoice". The tax line is the invoice's (``billing.tax``: the customer's rate, one half-up
rounding) on the projected charges; a seeds folder without ``issuer.csv`` gives none, as invoices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from billing_dags.billing import tax
from billing_dags.core.calendar import month_days, next_month, utc_today
from billing_dags.core.errors import InputError
from billing_dags.core.money import format_minor
from billing_dags.core.settings import Paths

NANO = 10**9
PRICING_MODELS = (
    "dim_subscription_periods_by_month",
    "fct_usage_by_subscription_period",
    "fct_billable_usage_by_subscription_period",
    "fct_rated_usage_by_subscription_period",
    "fct_invoice_lines",
)
ADDITIVE = {"sum": "usage", "unit_hours": "gauge_integral", "unit_months": "gauge_integral"}
LEVEL = {"max", "avg"}
NOTE = "projected, not an invoice"


def month_state(month: date, today: date | None = None) -> str:
    """'closed' (ended before today), 'open' (today is inside it) or 'future'."""
    today = today or utc_today()
    if next_month(month) <= today:
        return "closed"
    if month <= today:
        return "open"
    return "future"


def _error(message: str) -> Exception:
    return InputError(message)


def check_open_month(month: date, today: date | None = None) -> None:
    today = today or utc_today()
    state = month_state(month, today)
    if state == "future":
        raise _error(
            f"month {month:%Y-%m} has not started yet (today is {today}); give the current month "
            f"{today:%Y-%m} for a projection or an earlier month for its usage"
        )
    if state == "closed":
        raise _error(f"month {month:%Y-%m} has ended (today is {today}); its usage is final: `billing usage CUSTOMER --month {month:%Y-%m}`")


# --- exact helpers -----------------------------------------------------------------------------


def to_nano(x: Decimal | None) -> int:
    if x is None:
        return 0
    n = Decimal(x).scaleb(9)
    if n != n.to_integral_value():
        raise ValueError(f"{x} has more than 9 decimal places")
    return int(n)


def from_nano(n: int) -> Decimal:
    return Decimal(n).scaleb(-9).quantize(Decimal("0.000000001"))


def div_half_up(n: int, d: int) -> int:
    """n / d rounded half-up (half away from zero), d > 0; the SQL macro of the same name."""
    if n >= 0:
        return (2 * n + d) // (2 * d)
    return -((2 * -n + d) // (2 * d))


def fmt(x: Decimal) -> str:
    return f"{Decimal(x).quantize(Decimal('0.000000001')).normalize():f}"


# --- inputs ------------------------------------------------------------------------------------


def seed_tables(paths: Paths) -> dict[str, pa.Table]:
    """The seed snapshots the invoices use (data/seeds/*.parquet), else the validated seed CSVs."""
    from billing_dags.models.sqlmodels import seed_snapshot_path
    from billing_dags.seeds.catalog import SPECS, load_seeds

    snaps = {name: seed_snapshot_path(paths, name) for name in SPECS}
    if all(p.exists() for p in snaps.values()):
        return {name: pq.read_table(p) for name, p in snaps.items()}
    return load_seeds(paths.seeds_dir)


def daily_partitions(paths: Paths, month: date) -> tuple[list[date], pa.Table | None]:
    """The computed fct_usage_by_day partitions of the month (read only) and their rows."""
    from billing_dags.models.sqlmodels import Window, load_project, read_day_partition

    model = load_project().models["fct_usage_by_day"]
    days, tables = [], []
    for d in month_days(month):
        t = read_day_partition(paths, model, Window(d, d + timedelta(days=1)))
        if t is not None:
            days.append(d)
            tables.append(t)
    if not tables:
        return [], None
    return days, pa.concat_tables(tables, promote_options="default")


# --- the projection ----------------------------------------------------------------------------


def _only(table: pa.Table, customer_id: str) -> pa.Table:
    """The rows of one customer of a seed table that has a customer_id column; other tables whole."""
    if "customer_id" not in table.column_names:
        return table
    return table.filter(pc.equal(table["customer_id"], customer_id))


def project_days(actual: pa.Table, month: date, computed: list[date], aggregations: dict[str, str]) -> pa.Table:
    """The actual daily rows plus synthetic rows for the missing days (see the module docstring)."""
    days = month_days(month)
    missing = [d for d in days if d not in set(computed)]
    elapsed, total_days = len(computed), len(days)
    if not missing or elapsed == 0:
        return actual
    groups: dict[tuple, dict] = {}
    for r in actual.to_pylist():
        key = (r["customer_id"], r["meter_id"], r["dimension"])
        g = groups.setdefault(key, {"kind": r["kind"], "usage": 0, "integral": 0, "covered": 0, "peak": None})
        g["usage"] += to_nano(r["usage"])
        g["integral"] += to_nano(r["gauge_integral"])
        g["covered"] += r["gauge_covered_ms"] or 0
        if r["gauge_peak"] is not None:
            g["peak"] = r["gauge_peak"] if g["peak"] is None else max(g["peak"], r["gauge_peak"])
    synthetic: list[dict] = []
    for (customer, meter, dimension), g in sorted(groups.items()):
        agg = aggregations.get(meter)
        if agg is None:
            continue
        base = {
            "customer_id": customer,
            "meter_id": meter,
            "dimension": dimension,
            "kind": g["kind"],
            "usage": None,
            "gauge_integral": None,
            "gauge_covered_ms": None,
            "gauge_peak": None,
            "series": 0,
            "samples": 0,
            "dropped_samples": 0,
            "resets": 0,
            "reappeared_series": 0,
            "max_gap_ms": 0,
            "events": 0,
            "duplicate_conflicts": 0,
        }
        per_day: list[dict] = []
        if agg in ADDITIVE:
            mtd = g["usage"] if agg == "sum" else g["integral"]
            extra = div_half_up(mtd * total_days, elapsed) - mtd
            q, r = divmod(extra, len(missing))
            for i in range(len(missing)):
                n = from_nano(q + (1 if i < r else 0))
                if agg == "sum":
                    per_day.append({"usage": n})
                else:
                    per_day.append({"gauge_integral": n, "gauge_covered_ms": 0, "gauge_peak": Decimal(0)})
        elif agg == "max":
            per_day = [{"gauge_integral": Decimal(0), "gauge_covered_ms": 0, "gauge_peak": g["peak"] or Decimal(0)}] * len(missing)
        elif agg == "avg" and g["covered"] > 0:
            per_day = [{"gauge_integral": from_nano(g["integral"]), "gauge_covered_ms": g["covered"], "gauge_peak": g["peak"] or Decimal(0)}] * len(missing)
        for d, values in zip(missing, per_day):
            synthetic.append({**base, **values, "day": d})
    if not synthetic:
        return actual
    extra_rows = pa.Table.from_pylist(synthetic, schema=actual.schema)
    return pa.concat_tables([actual, extra_rows])


@dataclass
class Projection:
    month: date
    today: date
    days_in_month: int
    computed_days: list[date]
    usage: list[dict] = field(default_factory=list)  # per customer, meter, dimension
    lines: list[dict] = field(default_factory=list)  # projected fct_invoice_lines rows
    totals: dict[str, dict] = field(default_factory=dict)  # customer -> {currency, amount_minor, exponent}
    allowances: list[dict] = field(default_factory=list)  # per customer, meter, dimension of the plan in force

    @property
    def days_elapsed(self) -> int:
        return len(self.computed_days)


def project_month(paths: Paths, month: date, today: date | None = None, customer_id: str | None = None) -> Projection:
    """Month-to-date and projected usage and charges of every customer (or only ``customer_id``) for the
    open ``month``.

    Reads data/models and the seeds; writes nothing.
    """
    from billing_dags.models import sqlmodels
    from billing_dags.models.sqlmodels import Window, create_table

    today = today or utc_today()
    check_open_month(month, today)
    computed, actual = daily_partitions(paths, month)
    if actual is None:
        raise _error(
            f"no daily usage computed for {month:%Y-%m} yet under {paths.models / 'fct_usage_by_day'}; "
            f"materialize the daily_usage job for the days of {month:%Y-%m} that have ended (e.g. in the Dagster UI)"
        )
    seeds = seed_tables(paths)
    if customer_id is not None:  # one customer's rows only, from the start: nothing of another is priced
        actual = actual.filter(pc.equal(actual["customer_id"], customer_id))
        seeds = {name: _only(t, customer_id) for name, t in seeds.items()}
    meters = {m["meter_id"]: m for m in seeds["meters"].to_pylist()}
    aggregations = {k: m["aggregation"] for k, m in meters.items()}
    projected = project_days(actual, month, computed, aggregations)
    window = Window(month, next_month(month))
    project = sqlmodels.load_project()
    con = sqlmodels.connect()
    try:
        for name, table in seeds.items():
            create_table(con, f"seed_{name}", table)
        create_table(con, "fct_usage_by_day", projected)
        lines = None
        for name in PRICING_MODELS:
            model = project.models[name]
            sqlmodels.prepare(con, project, name, None, window)
            out = sqlmodels.query(con, model, window)
            sqlmodels.check_window(model, out, window)
            create_table(con, name, out)
            lines = out
        allowances = (
            con.sql(
                """
            select p.customer_id, pr.meter_id, pr.dimension, pr.included_quantity, pr.included_pool,
                   m.billing_unit || case m.aggregation when 'unit_hours' then '-hour' when 'unit_months' then '-month' else '' end as unit
            from dim_subscription_periods_by_month p
            join stg_seeds__prices pr on pr.plan_id = p.plan_id and pr.plan_version = p.plan_version
            join stg_seeds__meters m on m.meter_id = pr.meter_id
            where p.is_invoice_plan
            order by p.customer_id, pr.price_line
            """
            )
            .to_arrow_table()
            .to_pylist()
        )
        exponents = {r[0]: r[1] for r in con.execute("select currency, minor_unit_exponent from stg_seeds__currencies").fetchall()}
    finally:
        con.close()
    mtd_rows = sqlmodels.billable_quantities(actual, seeds, window, project=project)
    proj_by_key = {(r["customer_id"], r["meter_id"], r["dimension"]): r for r in sqlmodels.billable_quantities(projected, seeds, window, project=project)}
    usage = []
    for r in mtd_rows:
        p = proj_by_key.get((r["customer_id"], r["meter_id"], r["dimension"]), r)
        usage.append(
            {
                "customer_id": r["customer_id"],
                "meter_id": r["meter_id"],
                "dimension": r["dimension"],
                "kind": meters[r["meter_id"]]["kind"],
                "aggregation": r["aggregation"],
                "unit": r["unit"],
                "base_unit": r["base_unit"],
                "month_to_date": r["quantity"],
                "projected": p["quantity"],
                "month_to_date_base": r["base_quantity"],
                "projected_base": p["base_quantity"],
                "days_with_data": r["days_with_data"],
            }
        )
    line_rows = lines.to_pylist() if lines is not None else []
    totals: dict[str, dict] = {}
    for line in line_rows:
        t = totals.setdefault(line["customer_id"], {"currency": line["currency"], "amount_minor": 0, "exponent": exponents.get(line["currency"], 2)})
        t["amount_minor"] += int(line["amount_minor"])
    line_rows += _tax_lines(paths, seeds, line_rows, totals)
    return Projection(month, today, len(month_days(month)), computed, usage, line_rows, totals, allowances)


def _tax_lines(paths: Paths, seeds: dict[str, pa.Table], lines: list[dict], totals: dict[str, dict]) -> list[dict]:
    """Each customer's tax line on its projected charges, numbered after its last line, added to ``totals``
    (``amount_minor``, and ``tax_minor``); none without an invoice profile (seeds without issuer.csv)."""
    profile = tax.invoice_profile(paths.seeds_dir)
    if profile is None:
        return []
    names = {c["customer_id"]: c["name"] for c in seeds["customers"].to_pylist()}
    out = []
    for cid, t in sorted(totals.items()):
        block = tax.tax_block(tax.customer_rate(profile, cid, names.get(cid)), t["amount_minor"], t["exponent"])
        last = max((l for l in lines if l["customer_id"] == cid), key=lambda l: l["line_number"])
        line = tax.tax_line(last["line_number"] + 1, block, t["currency"])
        # a row of fct_invoice_lines' columns (the plan and period of the customer's last line) plus the formula
        out.append(
            {
                **last,
                **dict.fromkeys(("included_quantity", "billable_quantity", "package_size", "packages", "tier_formula")),
                **{k: line[k] for k in ("line_number", "line_type", "meter_id", "dimension", "description", "unit", "amount_minor", "formula")},
                "quantity": Decimal(line["quantity"]),
                "unit_price": Decimal(block["taxable_minor"]).scaleb(-t["exponent"]),
            }
        )
        t["amount_minor"] += block["amount_minor"]
        t["tax_minor"] = block["amount_minor"]
    return out


# --- `billing usage` for an open month ---------------------------------------------------------


def usage_report(paths: Paths, customer_id: str, month: date, today: date | None = None) -> dict:
    """One customer's month-to-date and projected usage and projected charges (JSON-ready)."""
    p = project_month(paths, month, today)
    rows = [u for u in p.usage if u["customer_id"] == customer_id]
    lines = [l for l in p.lines if l["customer_id"] == customer_id]
    total = p.totals.get(customer_id)
    exponent = total["exponent"] if total else 2
    return {
        "customer_id": customer_id,
        "month": f"{month:%Y-%m}",
        "status": "open",
        "as_of": p.today.isoformat(),
        "days_elapsed": p.days_elapsed,
        "days_in_month": p.days_in_month,
        "last_computed_day": max(p.computed_days).isoformat(),
        "usage": [
            {
                "meter": u["meter_id"],
                "dimension": u["dimension"],
                "aggregation": u["aggregation"],
                "month_to_date": fmt(u["month_to_date"]),
                "projected": fmt(u["projected"]),
                "unit": u["unit"],
                "days": u["days_with_data"],
            }
            for u in rows
        ],
        "projected_lines": [
            {
                "line": l["line_number"],
                "type": l["line_type"],
                "description": l["description"],
                "quantity": fmt(l["quantity"]) if l["quantity"] is not None else "",
                "unit": l["unit"],
                "amount": format_minor(int(l["amount_minor"]), exponent),
                "amount_minor": int(l["amount_minor"]),
            }
            for l in lines
        ],
        "currency": total["currency"] if total else None,
        "projected_total": format_minor(total["amount_minor"], exponent) if total else None,
        "projected_total_minor": total["amount_minor"] if total else None,
        "note": f"{NOTE}: month-to-date x {p.days_in_month}/{p.days_elapsed} days for additive meters, "
        "month-to-date level for peaks and averages; before prepaid credits and adjustments",
    }
