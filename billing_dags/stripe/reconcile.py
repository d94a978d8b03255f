"""Reconciliation: Stripe's period totals against the invoice lines (DESIGN rule 9).

For every usage line of a month's invoices (``fct_invoice_lines``) that Stripe bills (a priced
dimension of a meter with a ``stripe_event_name``, a customer with a ``stripe_customer_id``), Stripe's
meter event summary over the line's subscription period ``[period_start, period_end)`` (the meter's
own formula: ``sum`` of the daily deltas, ``last`` period-to-date value) is converted to the billing
unit, rounded as the invoice rounds, and compared with the line's quantity. A line is ``equal``, or
each difference is named with its cause from the outbox rows of the line's days: ``not yet sent``
(pending, dry-run, future, or days with no outbox yet), ``rejected`` (failed, with Stripe's message),
``too old`` (older than Stripe's 35 days: bill it as an invoice item or credit note instead),
``rounding of a fraction`` (a quantity finer than the meter's Stripe unit), ``no Stripe meter``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

import pyarrow.parquet as pq

from billing_dags.core.calendar import month_days, month_start, next_month
from billing_dags.core.errors import InputError
from billing_dags.core.settings import Paths
from billing_dags.stripe import outbox as ob

NOT_SENT = ("pending", "dry_run", "future")


class ReconcileError(InputError):
    """A month that cannot be reconciled (no invoices, no key); the message names it and the fix."""


@dataclass
class LineCheck:
    customer_id: str
    period_start: date
    period_end: date
    meter_id: str
    dimension: str
    event_name: str
    unit: str
    invoice_quantity: Decimal
    stripe_quantity: Decimal | None
    status: str  # equal | different | not_in_stripe
    causes: list[str] = field(default_factory=list)

    def as_row(self) -> dict:
        return {
            "customer": self.customer_id,
            "period": f"{self.period_start}..{self.period_end - timedelta(days=1)}",
            "event_name": self.event_name,
            "invoice": f"{self.invoice_quantity.normalize():f} {self.unit}",
            "stripe": "" if self.stripe_quantity is None else f"{self.stripe_quantity.normalize():f} {self.unit}",
            "status": self.status,
            "cause": "; ".join(self.causes),
        }


def invoice_usage_lines(paths: Paths, month: date) -> list[dict]:
    """The usage lines of the month's invoice lines (fct_invoice_lines); a ReconcileError when none were built."""
    from billing_dags.models.sqlmodels import Window, load_project, partition_file

    model = load_project().models["fct_invoice_lines"]
    path = partition_file(paths, model, Window(month_start(month), next_month(month)))
    if not path.exists():
        raise ReconcileError(
            f"no invoices for {month:%Y-%m} yet ({path} is missing); build them first (`billing run --month {month:%Y-%m}`) and reconcile again"
        )
    return [r for r in pq.read_table(path, partitioning=None).to_pylist() if r["line_type"] == "usage"]


def _ts(d: date) -> int:
    return ob.day_timestamp(d)


def stripe_period_value(client, meter_id: str, customer: str, start: date, end: date) -> int:
    """Stripe's aggregated value of a meter for a customer over [start, end) (one summary, no grouping window)."""
    page = client.v1.billing.meters.event_summaries.list(meter_id, params={"customer": customer, "start_time": _ts(start), "end_time": _ts(end)})
    total = Decimal(0)
    for s in page.auto_paging_iter():
        total += Decimal(str(s.aggregated_value if not isinstance(s, Mapping) else s["aggregated_value"]))
    return int(total)


def _q(nano: int) -> Decimal:
    return Decimal(nano) / Decimal(10**9)


def reconcile_month(
    paths: Paths,
    month: date,
    seeds: Mapping[str, Any],
    period_value: Callable[[str, str, str, date, date], int | None],
) -> list[LineCheck]:
    """Every Stripe-billed usage line of the month's invoices against Stripe. ``period_value(event_name,
    meter_id, stripe_customer_id, start, end)`` returns Stripe's total for the line's period (None: no
    Stripe meter for the event name)."""
    month = month_start(month)
    lines = invoice_usage_lines(paths, month)
    meters = {m["meter_id"]: m for m in seeds["meters"].to_pylist()}
    units = {(u["unit"], u["billing_unit"]): int(u["divisor"]) for u in seeds["units"].to_pylist()}
    customers = {c["customer_id"]: c for c in seeds["customers"].to_pylist()}
    outbox: dict[tuple[str, str, str], list[dict]] = {}
    for d in month_days(month):
        for r in ob.read_outbox(paths, d):
            outbox.setdefault((r["customer_id"], r["meter_id"], r.get("dimension") or ""), []).append(r)
    out = []
    for line in sorted(lines, key=lambda r: (r["customer_id"], r["period_start"], r["meter_id"], r["dimension"])):
        m = meters.get(line["meter_id"])
        cust = customers.get(line["customer_id"]) or {}
        if not m or not m.get("stripe_event_name") or not cust.get("stripe_customer_id"):
            continue  # Stripe does not bill this line (no event name or no Stripe customer)
        divisor = units[(m["unit"], m["billing_unit"])]
        decimals = ob.unit_decimals(m["aggregation"], m["unit"], divisor)
        dim = line["dimension"] or ""
        ev = ob.stripe_event_name(m["stripe_event_name"], dim)
        invoice_nano = int(Decimal(line["quantity"]) * 10**9)
        check = LineCheck(
            line["customer_id"], line["period_start"], line["period_end"], line["meter_id"], dim, ev, line["unit"], _q(invoice_nano), None, "equal"
        )
        value = period_value(ev, line["meter_id"], cust["stripe_customer_id"], line["period_start"], line["period_end"])
        if value is None:
            check.status = "not_in_stripe"
            check.causes.append(f"no Stripe meter for event name {ev!r}: run `billing stripe sync-meters`")
            out.append(check)
            continue
        stripe_nano = ob.stripe_to_billing_nano(value, divisor, decimals)
        check.stripe_quantity = _q(stripe_nano)
        if stripe_nano != invoice_nano:
            check.status = "different"
            rows = [r for r in outbox.get((line["customer_id"], line["meter_id"], dim), []) if line["period_start"] <= r["day"] < line["period_end"]]
            check.causes = explain(rows, m["aggregation"], value, invoice_nano, divisor, decimals, line["period_start"], line["period_end"])
        out.append(check)
    return out


def _expected(rows: list[dict], aggregation: str, pick: Callable[[dict], int | None]) -> int:
    """What Stripe holds for the period given each day's value ``pick(row)`` (None: nothing for that day)."""
    values = [(r["day"], pick(r)) for r in sorted(rows, key=lambda r: r["day"])]
    values = [(d, v) for d, v in values if v is not None]
    if aggregation in ob.LEVEL_AGGREGATIONS:
        return values[-1][1] if values else 0
    return sum(v for _, v in values)


def explain(rows: list[dict], aggregation: str, stripe_value: int, invoice_nano: int, divisor: int, decimals: int, start: date, end: date) -> list[str]:
    """The causes of a difference between Stripe and an invoice line, from the outbox rows of the line's days."""
    causes = []
    unsent = [r for r in rows if r["status"] in NOT_SENT]
    failed = [r for r in rows if r["status"] == "failed"]
    too_old = [r for r in rows if r["status"] == "too_old"]

    def days(rs: list[dict]) -> str:
        ds = sorted({r["day"] for r in rs})
        return ", ".join(str(d) for d in ds[:5]) + (f" (+{len(ds) - 5} more)" if len(ds) > 5 else "")

    if unsent:
        causes.append(f"not yet sent: {len(unsent)} events ({days(unsent)}); run `billing stripe send`")
    if failed:
        causes.append(f"rejected: {len(failed)} events ({days(failed)}): {failed[0]['last_error']}")
    if too_old:
        causes.append(f"too old: {len(too_old)} events ({days(too_old)}) older than Stripe's 35 days; {ob.too_old_advice(too_old[-1])}")
    outbox_total = _expected(rows, aggregation, lambda r: int(r["value"]))
    # the invoice's quantity in Stripe units: the outbox holds it up to the one rounding of a fraction
    invoice_units = ob.round_half_up(ob.Fraction(invoice_nano * divisor * 10**decimals, 10**9))
    if abs(outbox_total - invoice_units) > 1 and not (unsent or failed or too_old):
        causes.append(
            f"not yet sent: the outbox does not hold the invoice's quantity for {start}..{end - timedelta(days=1)} "
            "(days not built yet, or usage recomputed since): materialize stripe_outbox for the month, then send"
        )
    sent_total = _expected(rows, aggregation, lambda r: int(r["value"]) if r["status"] == "sent" else r.get("stripe_value"))
    if not causes and sent_total != stripe_value:
        causes.append(f"Stripe holds {stripe_value}, the events acknowledged add up to {sent_total}: events missing in Stripe or not aggregated yet")
    if not causes:
        causes.append(f"rounding of a fraction: the quantity is finer than the meter's Stripe unit (1e-{decimals} base unit); Stripe holds {stripe_value}")
    return causes


def reconcile_with_client(paths: Paths, month: date, seeds: Mapping[str, Any], client) -> list[LineCheck]:
    """``reconcile_month`` against a Stripe account (the meters listed once, summaries read per line)."""
    from billing_dags.stripe.meters import _get, list_meters

    if client is None:
        raise ReconcileError("no STRIPE_API_KEY: reconciling reads Stripe's meter event summaries; set STRIPE_API_KEY (and STRIPE_API_BASE for a test server)")
    by_event = {}
    for m in list_meters(client):
        if _get(m, "status") == "active":
            by_event[_get(m, "event_name")] = _get(m, "id")

    def period_value(ev: str, meter_id: str, customer: str, start: date, end: date) -> int | None:
        sid = by_event.get(ev)
        return None if sid is None else stripe_period_value(client, sid, customer, start, end)

    return reconcile_month(paths, month, seeds, period_value)


def summary(checks: list[LineCheck]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in checks:
        out[c.status] = out.get(c.status, 0) + 1
    return out
