"""One customer as support sees them: plan and subscriptions, usage to date and the projected bill, open flags, the
last invoices with their status, prepaid credits left. Reads the seeds and the data dir; writes nothing.

Every figure comes from where billing keeps it, so the console never disagrees with an invoice: the projection is
billing.projection (the invoices' own pricing SQL over the days computed so far), invoices are the stored files
(billing.store), credits are the ledger of billing.credits over the stored invoices, flags are
fct_anomaly_flags_by_day less the acknowledgements (operations.flags). Amounts are exact decimal strings with their
integer minor units beside them.
"""

from __future__ import annotations

from datetime import date

from billing_dags.billing import credits as _credits
from billing_dags.billing import projection
from billing_dags.billing.render import document_title
from billing_dags.billing.store import PENDING_DIR, read_pending
from billing_dags.core.calendar import next_month, utc_today
from billing_dags.core.errors import InputError
from billing_dags.core.money import format_minor
from billing_dags.core.settings import Paths
from billing_dags.operations.flags import _ack_key, _quantity, month_flags, read_acks
from billing_dags.seeds.catalog import load_grants, load_seeds

#: months of flags the console looks at: the open month and the ones before it
FLAG_MONTHS = 3


def _months_back(month: date, n: int) -> list[date]:
    """``month`` and the ``n - 1`` months before it, newest first."""
    out = [month]
    while len(out) < n:
        m = out[-1]
        out.append(date(m.year - (m.month == 1), 12 if m.month == 1 else m.month - 1, 1))
    return out


def subscriptions(seeds: dict, customer_id: str, today: date) -> list[dict]:
    """The customer's subscriptions (seeds/subscriptions.csv), oldest first, with the plan's name in force today."""
    plans = sorted(seeds["plans"].to_pylist(), key=lambda p: (p["plan_id"], p["effective_from"]))
    out = []
    for s in sorted((s for s in seeds["subscriptions"].to_pylist() if s["customer_id"] == customer_id), key=lambda s: s["start_date"]):
        versions = [p for p in plans if p["plan_id"] == s["plan_id"]]
        in_force = [p for p in versions if p["effective_from"] <= today] or versions[:1]
        plan = in_force[-1] if in_force else {}
        start, end = s["start_date"], s["end_date"]
        status = "not started" if start > today else ("ended" if end is not None and end <= today else "active")
        out.append(
            {
                "plan_id": s["plan_id"],
                "plan_name": plan.get("name"),
                "start_date": start.isoformat(),
                "end_date": end.isoformat() if end else None,
                "status": status,
            }
        )
    return out


def current_month(paths: Paths, customer_id: str, today: date) -> dict:
    """Usage to date and the projected bill of the open month; ``usage`` is None (and ``note`` says why) when no day
    of the month is computed yet."""
    month = today.replace(day=1)
    computed, _rows = projection.daily_partitions(paths, month)
    if not computed:
        first_day_over = today > month
        note = f"No usage computed for {month:%Y-%m} yet: the daily usage of a UTC day is computed after it ends" + (
            f" (the daily_usage schedule, or materialize {month} .. {today.fromordinal(today.toordinal() - 1)} in the Dagster UI)"
            if first_day_over
            else f" (the first is {month})"
        )
        return {"month": f"{month:%Y-%m}", "status": "open", "days_elapsed": 0, "usage": None, "projected_total": None, "note": note}
    report = projection.usage_report(paths, customer_id, month, today)
    return {**report, "note": report["note"]}


def open_flags(paths: Paths, customer_id: str, today: date, months: int = FLAG_MONTHS) -> list[dict]:
    """The customer's flags nobody has acknowledged, in the open month and the ``months - 1`` before it, newest first.
    A critical one holds the month's invoice in draft."""
    acked = {_ack_key(a) for a in read_acks(paths)}
    out = []
    for month in _months_back(today.replace(day=1), months):
        for f in month_flags(paths, month):
            if f["customer_id"] != customer_id or (customer_id, f"{month:%Y-%m}", f["meter_id"], f["rule"]) in acked:
                continue
            out.append(
                {
                    "month": f"{month:%Y-%m}",
                    "day": f["day"].isoformat() if isinstance(f["day"], date) else str(f["day"]),
                    "meter": f["meter_id"],
                    "rule": f["rule"],
                    "severity": f["severity"],
                    "quantity": _quantity(f),
                    "holds_invoice": f["severity"] == "critical",
                    "detail": f["detail"],
                }
            )
    return sorted(out, key=lambda f: (f["month"], f["day"], f["meter"] or "", f["rule"]), reverse=True)


def last_invoices(paths: Paths, docs: list[dict], n: int) -> list[dict]:
    """The ``n`` latest stored invoices, newest first, with their status and any adjustment pending for the next one."""
    out = []
    for doc in sorted(docs, key=lambda d: d["period_start"], reverse=True)[:n]:
        month = doc["period_start"][:7]
        exp = int(doc["minor_unit_exponent"])
        pending_file = paths.invoices / month / PENDING_DIR / f"{doc['customer_id']}.json"
        pending = read_pending(pending_file) if pending_file.exists() else None
        out.append(
            {
                "month": month,
                "invoice": doc["invoice_number"],
                "document": document_title(doc).lower(),
                "status": doc["status"],
                "total": doc["total"],
                "total_minor": int(doc["total_minor"]),
                "currency": doc["currency"],
                "credits_used": format_minor(int(doc.get("credits_used_minor", 0)), exp),
                "finalized_on": doc.get("finalized_on"),
                "due_date": doc.get("due_date"),
                "pending_adjustment": format_minor(int(pending["delta_minor"]), exp) if pending else None,
            }
        )
    return out


def credits_left(paths: Paths, seeds: dict, customer_id: str, docs: list[dict], today: date) -> list[dict]:
    """Each prepaid grant of the customer: amount, what the stored invoices drew (drafts included), the balance left."""
    grants = [g for g in load_grants(paths.seeds_dir, seeds["customers"].to_pylist(), seeds["currencies"].to_pylist()) if g.customer_id == customer_id]
    exponents = {c["currency"]: c["minor_unit_exponent"] for c in seeds["currencies"].to_pylist()}
    out = []
    for row in _credits.ledger(grants, docs, exponents)["grants"]:
        expires = row["expires_on"]
        out.append(
            {
                "grant_id": row["grant_id"],
                "description": row["description"],
                "currency": row["currency"],
                "amount": row["amount"],
                "amount_minor": row["amount_minor"],
                "balance": row["balance"],
                "balance_minor": row["balance_minor"],
                "granted_on": row["granted_on"],
                "expires_on": expires,
                "expired": expires is not None and date.fromisoformat(expires) <= today,
                "drawn_by": [f"{d['invoice_number']} ({d['status']}) {d['drawn']}" for d in row["draws"]],
            }
        )
    return out


def customer_summary(paths: Paths, customer_id: str, *, today: date | None = None, invoices: int = 6) -> dict:
    """Everything `billing customer` shows, JSON-ready (see the module docstring)."""
    today = today or utc_today()
    seeds = load_seeds(paths.seeds_dir)
    customer = next((c for c in seeds["customers"].to_pylist() if c["customer_id"] == customer_id), None)
    if customer is None:
        raise InputError(f"unknown customer {customer_id!r} in {paths.seeds_dir / 'customers.csv'}")
    docs = _credits.stored_invoices(paths.invoices, customer_id)
    return {
        "customer": {k: customer[k] for k in ("customer_id", "name", "setup", "currency", "stripe_customer_id", "usage_source")},
        "as_of": today.isoformat(),
        "subscriptions": subscriptions(seeds, customer_id, today),
        "current_month": current_month(paths, customer_id, today),
        "open_flags": open_flags(paths, customer_id, today),
        "invoices": last_invoices(paths, docs, invoices),
        "credits": credits_left(paths, seeds, customer_id, docs, today),
        "next_invoice": f"{today:%Y-%m} is billed after it ends, on {next_month(today.replace(day=1))}",
    }


def customer_list(seeds: dict, today: date | None = None) -> list[dict]:
    """Every customer of the seeds with the plan they are on today (or their latest)."""
    today = today or utc_today()
    out = []
    for c in seeds["customers"].to_pylist():
        subs = subscriptions(seeds, c["customer_id"], today)
        now = next((s for s in subs if s["status"] == "active"), subs[-1] if subs else None)
        out.append(
            {
                "customer": c["customer_id"],
                "name": c["name"],
                "setup": c["setup"],
                "currency": c["currency"],
                "plan": now["plan_id"] if now else None,
                "since": now["start_date"] if now else None,
                "subscription": now["status"] if now else "none",
            }
        )
    return out
