"""Invoices: one per customer and month, built from ``fct_invoice_lines`` rows (DESIGN rules 7, 8, 11, 12).

Pure functions, no Dagster. Money stays exact: line amounts arrive as integer minor units (each
line rounded once, upstream, in SQL) and the total is their integer sum; quantities and prices
are ``Decimal`` and are written as plain decimal strings (never floats, never exponent notation).

An invoice is a ``draft`` until its period has closed and the grace period for late data has
passed; then it is ``finalized``: it gets a gap-free per-year number (``INV-YYYY-000001``) kept in
``<invoices>/registry.json`` and its files are never rewritten. A later rerun whose figures differ
is recorded under ``<month>/pending_adjustments/`` for an adjustment line on a later invoice.

Lines and totals (rules decided here):

- **Charges** are the lines from ``fct_invoice_lines`` (base fee, usage, discount, risk
  adjustment, minimum charge, ...); ``charges_minor`` is their sum. Only charges are compared when
  a finalized month is recomputed.
- **Adjustments** follow: for each earlier month M of the customer whose finalized charges were
  recomputed differently, one ``adjustment`` line of (recomputed − finalized − already carried),
  naming the original invoice number and the reason (late data / seed change / code change, from
  the manifests). It goes on the customer's next invoice that is built; a draft shows it, a
  finalized invoice consumes it (the finalized invoice's line, with ``adjusts``, is the record:
  nothing is carried twice, and a later recomputation carries only the new difference).
- **Adjustment invoices**: a customer with no lines in the month being invoiced (no subscription
  in it, e.g. one who left) whose earlier invoices leave open adjustments gets an invoice of its
  own for that month at ``<month>/<customer>.json`` (``document``: ``adjustment_invoice``, or
  ``credit_note`` when its total is negative, which is refunded rather than carried; ``corrects``:
  the finalized invoice numbers). It follows the month: a draft while the month is, finalized
  with the month's invoices and numbered from the same gap-free series. A month already finalized
  by an earlier run issues no new one: a correction arriving after that goes to the next month's run.
- **Credits** then: prepaid grants drawn in expiry order against charges + adjustments (see
  ``billing_dags.billing.credits``: drafts draw in month order after every finalized draw), as negative
  ``credit`` lines; ``settle_drafts`` keeps the stored drafts of other months in step.
- **Never below zero**: if charges + adjustments are negative, a ``carry_forward`` line brings the
  total to 0 and the amount is owed back as an ``adjustment`` line (a credit) on the customer's
  next invoice. The total due is always the sum of all lines.

Files are deterministic: no wall-clock time inside, sorted keys, fixed formatting, so rerunning
unchanged inputs reproduces every file byte for byte.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import html
import io
import json
import os
import re
import subprocess
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Iterable, Mapping

from billing_dags import __version__
from billing_dags.billing import credits as _credits
from billing_dags.seeds.credits import CREDITS_FILE
from billing_dags.core import durable
from billing_dags.ingest.events import event_files
from billing_dags.ingest.raw import sample_files
from billing_dags.seeds.catalog import OUTSIDE_SUBSCRIPTION_RULES, SAFE_ID_RE, seeds_digest
from billing_dags.core.settings import DEFAULT_GRACE_DAYS, PROJECT_ROOT, Paths
from billing_dags.ingest.usage_reports import SOURCE as REPORTS_SOURCE
from billing_dags.ingest.usage_reports import ReportStore
from billing_dags.core.errors import InputError
from billing_dags.core.money import _minor_text, format_minor
from billing_dags.core.calendar import month_start, next_month

SCHEMA_VERSION = 1
STATUSES = ("draft", "finalized")
#: charge line types fct_invoice_lines produces today; another safe identifier is accepted as a charge too
LINE_TYPES = ("base_fee", "usage", "discount", "risk_adjustment", "minimum_charge")
#: lines the invoice builder adds after the charges (never accepted from fct_invoice_lines)
GENERATED_LINE_TYPES = ("adjustment", "credit", "carry_forward")
REGISTRY_FILE = "registry.json"
REGISTRY_LOCK = ".registry.lock"
PENDING_DIR = "pending_adjustments"
FORMATS = ("json", "csv", "html", "table")
DISPUTE_DAYS = 30

CSV_COLUMNS = (
    "invoice_number",
    "status",
    "customer_id",
    "period_start",
    "period_end",
    "currency",
    "line_number",
    "line_type",
    "meter_id",
    "dimension",
    "description",
    "quantity",
    "unit",
    "unit_price",
    "amount",
    "amount_minor",
)


class InvoiceError(InputError):
    """Input that cannot be invoiced; the message names the input, the row and the fix."""


# --------------------------------------------------------------------------- periods and status


def _month_start(month: date) -> date:
    if isinstance(month, datetime) or not isinstance(month, date):
        raise InvoiceError(f"month {month!r} must be a datetime.date (the first day of the month)")
    if month.day != 1:
        raise InvoiceError(f"month {month.isoformat()} is not the first day of a month; pass {month_start(month).isoformat()}")
    return month


def period_end(month_start: date) -> date:
    """The exclusive end of a monthly period: the first day of the next month."""
    return next_month(_month_start(month_start))


def _utc(now: datetime) -> datetime:
    if not isinstance(now, datetime):
        raise InvoiceError(f"now {now!r} must be a datetime")
    if now.tzinfo is None or now.utcoffset() is None:
        raise InvoiceError(f"now {now.isoformat()} has no time zone; pass an aware datetime, e.g. datetime.now(timezone.utc)")
    return now.astimezone(timezone.utc)


def _check_grace(grace_days: int) -> int:
    if isinstance(grace_days, bool) or not isinstance(grace_days, int) or grace_days < 0:
        raise InvoiceError(f"grace_days {grace_days!r} must be a non-negative integer number of days")
    return grace_days


def finalization_date(month_start: date, grace_days: int = DEFAULT_GRACE_DAYS) -> date:
    """The day (00:00 UTC) from which the month's invoices are final: period end + grace days."""
    return period_end(month_start) + timedelta(days=_check_grace(grace_days))


def invoice_status(month_start: date, now: datetime, grace_days: int = DEFAULT_GRACE_DAYS) -> str:
    """``finalized`` once ``now`` >= period end (00:00 UTC of the next month's first day) + grace days, else ``draft``."""
    fin = finalization_date(month_start, grace_days)
    cutoff = datetime(fin.year, fin.month, fin.day, tzinfo=timezone.utc)
    return "finalized" if _utc(now) >= cutoff else "draft"


# --------------------------------------------------------------------------- exact formatting


def _decimal(value: Any, what: str) -> Decimal:
    """An exact Decimal from Decimal, int or a decimal string; floats are refused (rule 7)."""
    if isinstance(value, bool):
        raise InvoiceError(f"{what}: {value!r} is a boolean, not a number")
    if isinstance(value, Decimal):
        d = value
    elif isinstance(value, int):
        d = Decimal(value)
    elif isinstance(value, str):
        try:
            d = Decimal(value.strip())
        except InvalidOperation:
            raise InvoiceError(f"{what}: {value!r} is not a decimal number") from None
    elif isinstance(value, float):
        raise InvoiceError(f"{what}: {value!r} is a float; pass a Decimal, an int or a decimal string (money is exact)")
    else:
        raise InvoiceError(f"{what}: {value!r} ({type(value).__name__}) is not a decimal number")
    if not d.is_finite():
        raise InvoiceError(f"{what}: {value!r} is not a finite number")
    return d


def _minor(value: Any, what: str) -> int:
    """Integer minor units from int or an integral Decimal."""
    if isinstance(value, bool):
        raise InvoiceError(f"{what}: {value!r} is a boolean, not an amount")
    if isinstance(value, int):
        return value
    d = _decimal(value, what)
    if d != d.to_integral_value():
        raise InvoiceError(f"{what}: {value!r} is not a whole number of minor units")
    return int(d)


def format_decimal(value: Any) -> str:
    """Exact plain decimal string without needless trailing zeros and never in exponent notation."""
    return _plain(_decimal(value, "value"))


def _plain(d: Decimal) -> str:
    """``format_decimal`` of a finite Decimal."""
    if d == 0:
        return "0"
    s = format(d, "f")  # exact: no context rounding without a precision
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return s


def format_price(value: Any, exponent: int) -> str:
    """A unit price: exact, with at least the currency's minor digits (``0.10``, ``0.0001``, ``10.00``)."""
    return _padded(format_decimal(value), exponent)


def _padded(s: str, exponent: int) -> str:
    if exponent <= 0:
        return s
    whole, _, frac = s.partition(".")
    if len(frac) < exponent:
        frac = frac + "0" * (exponent - len(frac))
    return f"{whole}.{frac}"


def _exact(value: Any, what: Any) -> Decimal:
    """``_decimal(value, what())``, the message built only when it is needed."""
    if type(value) is Decimal and value.is_finite():
        return value
    return _decimal(value, what())


def _whole(value: Any, what: Any) -> int:
    """``_minor(value, what())``, the message built only when it is needed."""
    return value if type(value) is int else _minor(value, what())


def _as_date(value: Any, what: str) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value)
        except ValueError:
            pass
    raise InvoiceError(f"{what}: {value!r} is not a date (YYYY-MM-DD)")


def _safe_customer_id(value: Any, where: str) -> str:
    if not isinstance(value, str) or not SAFE_ID_RE.match(value):
        raise InvoiceError(
            f"{where}: customer_id {value!r} is not a safe identifier (lowercase letters, digits, '_', '-', '.', "
            "at most 63 characters, starting with a letter or digit); fix it in seeds/customers.csv"
        )
    return value


# --------------------------------------------------------------------------- numbering registry


def registry_path(paths: Paths) -> Path:
    return paths.invoices / REGISTRY_FILE


def read_registry(paths: Paths) -> dict:
    """The invoice-number registry: ``{"schema_version": 1, "numbers": {"YYYY-MM/<customer_id>": "INV-YYYY-000001"}}``."""
    path = registry_path(paths)
    if not path.exists():
        return {"schema_version": SCHEMA_VERSION, "numbers": {}}
    try:
        reg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InvoiceError(f"{path}: invoice-number registry is unreadable ({e}); restore it from backup, never recreate it by hand") from None
    if not isinstance(reg, dict) or not isinstance(reg.get("numbers"), dict):
        raise InvoiceError(f"{path}: invoice-number registry has no 'numbers' object; restore it from backup")
    return reg


def assign_invoice_numbers(paths: Paths, month: date, customer_ids: Iterable[str]) -> dict[str, str]:
    """Numbers for the finalized invoices of ``month``: reused from the registry, else the next of the
    period's year, assigned in customer_id order. Read-modify-write under an exclusive file lock;
    the registry is written atomically. Returns ``{customer_id: "INV-YYYY-NNNNNN"}``."""
    month = _month_start(month)
    ids = sorted({_safe_customer_id(c, "assign_invoice_numbers") for c in customer_ids})
    paths.invoices.mkdir(parents=True, exist_ok=True)
    prefix = f"INV-{month.year:04d}-"
    with open(paths.invoices / REGISTRY_LOCK, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            reg = read_registry(paths)
            numbers: dict[str, str] = reg["numbers"]
            used = sorted(int(n[len(prefix):]) for n in numbers.values() if n.startswith(prefix))
            if used != list(range(1, len(used) + 1)):
                raise InvoiceError(
                    f"{registry_path(paths)}: numbers {prefix}* are not a gap-free sequence from 1; "
                    "restore the registry from backup before finalizing more invoices"
                )
            nxt = len(used) + 1
            out: dict[str, str] = {}
            changed = False
            for cid in ids:
                key = f"{month:%Y-%m}/{cid}"
                if key not in numbers:
                    numbers[key] = f"{prefix}{nxt:06d}"
                    nxt += 1
                    changed = True
                out[cid] = numbers[key]
            if changed:
                reg["schema_version"] = SCHEMA_VERSION
                durable.write_bytes(registry_path(paths), durable.canonical_json(reg))
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return out


# --------------------------------------------------------------------------- building


def _formula(line: Mapping, out: dict, currency: str, exponent: int) -> str:
    """Human text showing how a line's amount comes about (exact figures; the amount is rounded half-up once)."""
    cur = currency.upper()
    q, unit, price, amount = out["quantity"], out["unit"], out["unit_price"], out["amount"]
    if out["line_type"] == "base_fee":
        return f"{q} {unit} × {price} {cur} = {amount} {cur}"
    if out["line_type"] == "risk_adjustment":
        return f"(risk multiplier − 1) {q} × subtotal {price} {cur} = {amount} {cur}"
    if out["line_type"] == "usage":
        billable = line.get("billable_quantity")
        included = line.get("included_quantity")
        packages = line.get("packages")
        package_size = line.get("package_size")
        if billable is not None and included is not None:
            head = f"{q} {unit} used − {format_decimal(included)} included = {format_decimal(billable)} {unit}"
            if packages is not None and package_size is not None and int(package_size) > 1:
                return f"{head} → {format_decimal(packages)} packages of {format_decimal(package_size)} × {price} {cur} = {amount} {cur}"
            return f"{head} × {price} {cur} per {unit} = {amount} {cur}"
        desc = out["description"]
        return f"{q} {unit} used; {desc}" if desc else f"{q} {unit} used at {price} {cur} per {unit}"
    return f"{q} {unit} × {price} {cur} = {amount} {cur}"


def _dispute_text(number: str, status: str, finalized_on: date) -> str:
    text = (
        f"To dispute this invoice, reply to your billing contact within {DISPUTE_DAYS} days of "
        f"{finalized_on.isoformat()}, "
        f"quoting {number} and the line numbers concerned. Every line is recomputed from the raw usage "
        "identified in the manifest (hashes of the raw sample and raw event files, of the usage reports and "
        "seed files, and the code version), "
        "so a disputed figure can be reproduced exactly. A finalized invoice is never edited: any correction "
        "appears as an adjustment line on a later invoice."
    )
    if status == "draft":
        text = (
            f"DRAFT: figures may still change as late usage arrives; this invoice is finalized on "
            f"{finalized_on.isoformat()} (UTC). " + text
        )
    return text


def _plain_json(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise InvoiceError(f"{what} is not JSON-serialisable ({e}); pass strings, numbers, lists and dicts") from None


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InvoiceError(f"{path}: {what} is unreadable ({e}); restore it from backup") from None


def _recompute_reason(finalized: Mapping | None, recomputed_manifest: Mapping | None) -> str:
    """Why a finalized month's figures changed, from the two manifests. Raw events and usage reports
    are compared only when the finalized manifest has them (manifests written before they were
    fingerprinted do not); the usage reports' own events file is explained by the reports."""
    old = (finalized or {}).get("manifest") or {}
    new = recomputed_manifest or {}
    reasons = []
    if old.get("raw_samples") != new.get("raw_samples"):
        reasons.append("late data")
    if "raw_events" in old:
        reports_part = f"/part-{REPORTS_SOURCE}.parquet"
        others = lambda m: {k: v for k, v in (m.get("raw_events") or {}).items() if not k.endswith(reports_part)}  # noqa: E731
        if others(old) != others(new):
            reasons.append("late usage events")
    if "usage_reports" in old and old["usage_reports"] != new.get("usage_reports"):
        before, after = old["usage_reports"], new.get("usage_reports") or {}
        days = sorted(d for d in set(before) | set(after) if before.get(d) != after.get(d))
        added = sum(after.get(d, {}).get("reports", 0) - before.get(d, {}).get("reports", 0) for d in days)
        what = f"{added} late usage report{'s' if added != 1 else ''}" if added > 0 else "changed usage reports"
        reasons.append(f"{what} ({', '.join(days)})")
    if old.get("seeds") != new.get("seeds"):
        reasons.append("a seed change")
    if old.get("code_version") != new.get("code_version"):
        reasons.append("a code change")
    return " and ".join(reasons) or "a rerun"


def _open_adjustments(paths: Paths, cid: str, month: date, stored: list[dict], currency: str, exp: int,
                      pending_files: list[Path] | None = None) -> list[dict]:
    """What earlier invoices of ``cid`` still leave to settle on the invoice of ``month``.

    Two sources, each of a month before ``month``: a finalized invoice whose recomputed charges
    differ (``<M>/pending_adjustments/<cid>.json``: recomputed − finalized charges), and an invoice
    whose charges plus adjustments were negative (its ``carried_forward_minor``, owed back as a
    credit). What adjustment lines of *finalized* invoices of other months already carried is
    subtracted, so an amount is carried once; drafts show it without consuming it.
    """
    mk = f"{month:%Y-%m}"
    carried: dict[tuple[str, str], int] = {}
    for d in stored:
        if d.get("status") != "finalized" or d["period_start"][:7] == mk:
            continue
        for line in d["lines"]:
            src = line.get("adjusts")
            if line.get("line_type") == "adjustment" and isinstance(src, dict):
                key = (src.get("kind"), src.get("month"))
                carried[key] = carried.get(key, 0) + int(line["amount_minor"])
    by_month = {d["period_start"][:7]: d for d in stored}
    out: list[dict] = []
    if pending_files is None:
        pending_files = sorted(paths.invoices.glob(f"????-??/{PENDING_DIR}/{cid}.json"))
    for f in pending_files:
        src = f.parent.parent.name
        if src >= mk:
            continue
        pend = _read_json(f, "pending adjustment")
        if pend.get("currency") != currency:
            raise InvoiceError(
                f"{f}: adjustment in {pend.get('currency')!r} cannot go on {cid}'s {mk} invoice in {currency!r}; "
                "settle it by hand and remove the file"
            )
        fin = int(pend.get("finalized_charges_minor", pend.get("finalized_total_minor", 0)))
        rec = int(pend.get("recomputed_charges_minor", pend.get("recomputed_total_minor", 0)))
        done = carried.get(("recompute", src), 0)
        amount = rec - fin - done
        if amount == 0:
            continue
        number = pend.get("finalized_invoice_number") or src
        reason = _recompute_reason(by_month.get(src), pend.get("recomputed_manifest"))
        text = f"usage of {src} recomputed after {reason}: {number} charges {format_minor(fin, exp)} -> {format_minor(rec, exp)}"
        if done:
            text += f" ({format_minor(done, exp)} already adjusted)"
        out.append({"kind": "recompute", "month": src, "invoice_number": number, "amount_minor": amount, "description": text,
                    "formula": f"recomputed {format_minor(rec, exp)} − finalized {format_minor(fin, exp)}"
                    + (f" − already adjusted {format_minor(done, exp)}" if done else "") + f" = {format_minor(amount, exp)} {currency.upper()}"})
    for d in stored:
        src = d["period_start"][:7]
        owed = int(d.get("carried_forward_minor") or 0)
        if src >= mk or not owed:
            continue
        amount = -owed - carried.get(("carry_forward", src), 0)
        if amount == 0:
            continue
        out.append({"kind": "carry_forward", "month": src, "invoice_number": d["invoice_number"], "amount_minor": amount,
                    "description": f"credit balance carried from {d['invoice_number']} ({src})",
                    "formula": f"{format_minor(owed, exp)} {currency.upper()} owed back by {d['invoice_number']} = {format_minor(amount, exp)} {currency.upper()}"})
    return sorted(out, key=lambda a: (a["month"], a["kind"]))


def _generated_line(ln: int, line_type: str, amount_minor: int, exp: int, **fields: Any) -> dict:
    return {
        "line_number": ln,
        "line_type": line_type,
        "meter_id": None,
        "dimension": fields.pop("dimension", ""),
        "description": fields.pop("description"),
        "quantity": "1",
        "unit": fields.pop("unit"),
        "unit_price": format_price(Decimal(amount_minor).scaleb(-exp), exp),
        "amount": format_minor(amount_minor, exp),
        "amount_minor": amount_minor,
        **fields,
    }


def _settle(
    charge_lines: list[dict],
    charges_minor: int,
    adjustments: list[dict],
    grants: list[_credits.Grant],
    drawn_before: list[dict],
    month: date,
    end: date,
    currency: str,
    exp: int,
    credit_note: bool = False,
) -> tuple[list[dict], dict]:
    """The lines after the charges (adjustments, credits, carry-forward) and the invoice's summary figures.

    ``drawn_before``: the stored invoices whose credit draws come first (``credits.drawn_before``).
    A ``credit_note`` (an adjustment invoice) keeps a negative total: it is refunded, not carried."""
    cur = currency.upper()
    fmt = lambda m: format_minor(m, exp)  # noqa: E731
    ln = max((l["line_number"] for l in charge_lines), default=0) + 1
    extra: list[dict] = []
    for a in adjustments:
        extra.append(
            _generated_line(ln, "adjustment", a["amount_minor"], exp, dimension=a["month"], description=a["description"], unit="adjustment",
                            adjusts={"kind": a["kind"], "month": a["month"], "invoice_number": a["invoice_number"]}, formula=a["formula"])
        )
        ln += 1
    adjustments_minor = sum(a["amount_minor"] for a in adjustments)
    subtotal = charges_minor + adjustments_minor
    balances = _credits.balances_before(grants, drawn_before)
    draws = _credits.draw(grants, balances, subtotal, month, end)
    due = subtotal
    for d in draws:
        g = d["grant"]
        until = f"usable through {(g.expires_on - timedelta(days=1)).isoformat()}" if g.expires_on else "no expiry"
        label = f"{g.description}; {until}" if g.description else until
        extra.append(
            _generated_line(
                ln, "credit", -d["drawn_minor"], exp, dimension=g.grant_id, unit="credit", grant_id=g.grant_id,
                description=f"Prepaid credit {g.grant_id} ({label}): {fmt(d['remaining_minor'])} {cur} remaining",
                formula=f"min(balance {fmt(d['available_minor'])}, due {fmt(due)}) = {fmt(d['drawn_minor'])} {cur} applied; "
                f"{fmt(d['remaining_minor'])} {cur} remains",
            )
        )
        due -= d["drawn_minor"]
        ln += 1
    credits_used = sum(d["drawn_minor"] for d in draws)
    carried_forward = 0
    if due < 0 and not credit_note:
        carried_forward = -due
        extra.append(
            _generated_line(
                ln, "carry_forward", carried_forward, exp, unit="adjustment",
                description="negative balance carried to the next invoice as a credit (a total is never below zero)",
                formula=f"charges and adjustments {fmt(subtotal)} {cur} < 0: {fmt(carried_forward)} {cur} carried forward, total 0",
            )
        )
        due = 0
    drawn = {d["grant"].grant_id: d["drawn_minor"] for d in draws}
    credit_rows = []
    for g in sorted((g for g in grants if g.usable_for(month, end)), key=lambda g: g.order):
        available = balances.get(g.grant_id, g.amount_minor)
        if available <= 0:
            continue
        used = drawn.get(g.grant_id, 0)
        credit_rows.append(
            {
                "grant_id": g.grant_id,
                "description": g.description,
                "expires_on": g.expires_on.isoformat() if g.expires_on else None,
                "available": fmt(available),
                "used": fmt(used),
                "remaining": fmt(available - used),
                "remaining_minor": available - used,
            }
        )
    summary = {
        "charges": fmt(charges_minor),
        "charges_minor": charges_minor,
        "adjustments": fmt(adjustments_minor),
        "adjustments_minor": adjustments_minor,
        "subtotal": fmt(subtotal),
        "subtotal_minor": subtotal,
        "credits_used": fmt(credits_used),
        "credits_used_minor": credits_used,
        "credits": credit_rows,
        "carried_forward": fmt(carried_forward),
        "carried_forward_minor": carried_forward,
    }
    return extra, summary


def _settled(charge_lines: list[dict], adjustments: list[dict], grants: Iterable[_credits.Grant], stored: list[dict],
             month: date, currency: str, exp: int, credit_note: bool = False) -> dict:
    """The lines (charges, then what ``_settle`` adds), summary figures and total of a customer's invoice of
    ``month``; ``stored`` are the customer's stored invoices (credit draws of other months)."""
    charges = sum(line["amount_minor"] for line in charge_lines)
    extra, summary = _settle(charge_lines, charges, adjustments, [g for g in grants if g.currency == currency],
                             _credits.drawn_before(stored, month.isoformat()), month, period_end(month), currency, exp, credit_note)
    lines = [*charge_lines, *extra]
    total_minor = sum(line["amount_minor"] for line in lines)
    return {"lines": lines, **summary, "total": format_minor(total_minor, exp), "total_minor": total_minor}


def _adjustment_document(adjustments: list[dict], total_minor: int) -> dict:
    """The fields that make an invoice an adjustment invoice: its kind and the finalized invoices it corrects."""
    return {
        "document": "credit_note" if total_minor < 0 else "adjustment_invoice",
        "corrects": sorted({a["invoice_number"] for a in adjustments}),
    }


def _leaver_adjustments(paths: Paths, index: _credits.StoredInvoices, month: date, customers_by_id: Mapping[str, Mapping],
                        billed: set[str], exponents: Mapping[str, int], closing: bool) -> dict[str, tuple[list[dict], list[dict]]]:
    """Customers without lines in ``month`` (no subscription in it) whose earlier invoices leave adjustments:
    {customer_id: (their stored invoices, the open adjustments)}. ``closing``: the month's invoices are being
    finalized; if some were finalized by an earlier run, the month is closed and only a customer that already
    has its adjustment invoice there keeps it (a later correction goes to the next month's run)."""
    mk = f"{month:%Y-%m}"
    registry = None
    out: dict[str, tuple[list[dict], list[dict]]] = {}
    for cid in sorted(customers_by_id):
        if cid in billed or not any(name < mk and f"{cid}.json" in names for name, names, _ in index.months):
            continue
        currency = customers_by_id[cid].get("currency")
        if currency not in exponents:
            raise InvoiceError(f"customer {cid!r}: currency {currency!r} is not in seeds/currencies.csv; add it there")
        stored = index.invoices(_safe_customer_id(cid, "customers.csv"))
        adjustments = _open_adjustments(paths, cid, month, stored, currency, exponents[currency], index.pending(cid))
        if not adjustments:
            continue
        if closing:
            if registry is None:
                registry = read_registry(paths)["numbers"]
            if f"{mk}/{cid}" not in registry and any(k.startswith(f"{mk}/") for k in registry):
                continue
        out[cid] = (stored, adjustments)
    return out


def build_invoices(
    lines: list[dict],
    customers: list[dict],
    plans: list[dict],
    currencies: list[dict],
    month: date,
    *,
    now: datetime,
    grace_days: int = DEFAULT_GRACE_DAYS,
    manifest: dict,
    numbers: Mapping[str, str] | None = None,
    paths: Paths | None = None,
    grants: Iterable[_credits.Grant] = (),
    held: Mapping[str, str] | None = None,
) -> list[dict]:
    """One JSON-ready invoice per customer that has lines in ``month`` (fct_invoice_lines rows), in customer_id order.

    Drafts are numbered ``DRAFT-YYYY-MM-<customer_id>``. Finalized invoices take their numbers from
    ``numbers`` ({customer_id: number}) when given, else from the registry under ``paths.invoices``
    (assigned there at first finalization, reused afterwards); one of the two is required then.

    After the charge lines come, numbered on: ``adjustment`` lines (open adjustments of earlier
    finalized invoices and credit balances carried from earlier invoices; needs ``paths``), then
    ``credit`` lines drawing on ``grants`` (prepaid credits, see ``billing_dags.billing.credits``; balances
    from the stored invoices of earlier months under ``paths``), then, if charges plus adjustments
    are negative, a ``carry_forward`` line bringing the total to zero. The total is the sum of the
    lines and never below zero.

    ``held`` ({customer_id: reason}) keeps those customers' invoices in draft although the grace
    period has passed (an unacknowledged critical anomaly flag); the reason is on the invoice.

    With ``paths``, a customer of ``customers`` without lines in ``month`` but with open adjustments of
    earlier invoices gets an adjustment invoice (or credit note) of ``month`` among the returned invoices.
    """
    grants = list(grants)
    held = dict(held or {})
    month = _month_start(month)
    grace_days = _check_grace(grace_days)
    status = invoice_status(month, now, grace_days)
    end = period_end(month)
    fin_on = finalization_date(month, grace_days)
    manifest_json = _plain_json(manifest, "manifest")

    customers_by_id = {c["customer_id"]: c for c in customers}
    exponents: dict[str, int] = {}
    for c in currencies:
        exponents[c["currency"]] = _minor(c["minor_unit_exponent"], f"currencies.csv {c['currency']}: minor_unit_exponent")
    # plans seed rows (version, name) or staged rows (plan_version, plan_name)
    plan_names = {
        (p["plan_id"], int(p["version"] if "version" in p else p["plan_version"])): p.get("name") or p.get("plan_name") or p["plan_id"]
        for p in plans
    }

    grouped: dict[str, list[Mapping]] = {}
    checked: set[str] = set()  # customer ids already found safe and in customers.csv
    for i, line in enumerate(lines):
        where = lambda: f"invoice line {i} (customer {line.get('customer_id')!r}, line_number {line.get('line_number')!r})"  # noqa: E731
        cid = line.get("customer_id")
        if type(cid) is not str or cid not in checked:
            cid = _safe_customer_id(cid, where())
            if cid not in customers_by_id:
                raise InvoiceError(f"{where()}: unknown customer {cid!r}; add it to seeds/customers.csv or rebuild fct_invoice_lines")
            checked.add(cid)
        line_month = line.get("month")
        if line_month is not None and (line_month if type(line_month) is date else _as_date(line_month, f"{where()}: month")) != month:
            raise InvoiceError(f"{where()}: month {line['month']} is not the invoiced month {month.isoformat()}; pass only that month's lines")
        grouped.setdefault(cid, []).append(line)

    cids = sorted(grouped)
    # every stored invoice and pending adjustment under paths.invoices, listed once (not a glob per customer)
    stored_index = _credits.StoredInvoices(paths.invoices, PENDING_DIR) if paths is not None else None
    leavers = {}
    if stored_index is not None:
        leavers = _leaver_adjustments(paths, stored_index, month, customers_by_id, set(grouped), exponents,
                                      status == "finalized" and numbers is None)
    numbered = sorted(c for c in [*cids, *leavers] if c not in held)
    if status == "finalized":
        if numbers is None:
            if paths is None:
                raise InvoiceError(
                    f"invoices of {month:%Y-%m} are finalized and need numbers: pass paths= (registry) or numbers="
                )
            numbers = assign_invoice_numbers(paths, month, numbered)
        missing = [c for c in numbered if not numbers.get(c)]
        if missing:
            raise InvoiceError(f"no invoice number given for finalized invoices of {month:%Y-%m}: {', '.join(missing)}")

    month_key = f"{month:%Y-%m}"
    grants_by_customer: dict[str, list[_credits.Grant]] = {}
    for g in grants:
        grants_by_customer.setdefault(g.customer_id, []).append(g)
    invoices: list[dict] = []

    def document(cid: str, plan_id: Any, plan_version: Any, plan_name: Any, currency: str, exp: int, settled: dict, **extra: Any) -> dict:
        customer_status = "draft" if cid in held else status
        number = numbers[cid] if customer_status == "finalized" else f"DRAFT-{month_key}-{cid}"
        return {
            "schema_version": SCHEMA_VERSION,
            "invoice_number": number,
            "status": customer_status,
            **({"held_reason": held[cid]} if cid in held else {}),
            **extra,
            "customer_id": cid,
            "customer_name": customers_by_id[cid].get("name") or cid,
            "plan_id": plan_id,
            "plan_version": plan_version,
            "plan_name": plan_name,
            "period_start": month.isoformat(),
            "period_end": end.isoformat(),
            "currency": currency,
            "minor_unit_exponent": exp,
            "grace_days": grace_days,
            "finalized_on": fin_on.isoformat() if customer_status == "finalized" else None,
            **settled,
            "dispute_instructions": _dispute_text(number, customer_status, fin_on),
            "manifest": manifest_json,
        }

    for cid in cids:
        customer = customers_by_id[cid]
        line_number_what = lambda: f"customer {cid}: line_number"  # noqa: E731
        rows = sorted(grouped[cid], key=lambda r: _whole(r.get("line_number"), line_number_what))
        seen_numbers: set[int] = set()
        currency = plan_id = plan_version = None
        out_lines: list[dict] = []
        for r in rows:
            ln = _whole(r.get("line_number"), line_number_what)
            where = lambda: f"invoice line {ln} of customer {cid!r} ({month_key})"  # noqa: E731
            if ln in seen_numbers:
                raise InvoiceError(f"{where()}: duplicate line_number; fct_invoice_lines must have one row per (month, customer_id, line_number)")
            seen_numbers.add(ln)
            cur = r.get("currency")
            if currency is None:
                currency, plan_id, plan_version = cur, r.get("plan_id"), r.get("plan_version")
            if (cur, r.get("plan_id"), r.get("plan_version")) != (currency, plan_id, plan_version):
                raise InvoiceError(f"{where()}: currency/plan ({cur}, {r.get('plan_id')} v{r.get('plan_version')}) differs from line {out_lines[0]['line_number']} ({currency}, {plan_id} v{plan_version}); one invoice has one currency and plan version")
            if cur != customer.get("currency"):
                raise InvoiceError(f"{where()}: currency {cur!r} differs from the customer's currency {customer.get('currency')!r} in seeds/customers.csv")
            if cur not in exponents:
                raise InvoiceError(f"{where()}: currency {cur!r} is not in seeds/currencies.csv; add it there")
            exp = exponents[cur]
            line_type = r.get("line_type")
            if line_type in GENERATED_LINE_TYPES or not isinstance(line_type, str) or not SAFE_ID_RE.match(line_type):
                raise InvoiceError(
                    f"{where()}: line_type {line_type!r} is not a charge line type (e.g. {', '.join(LINE_TYPES)}); "
                    f"{', '.join(GENERATED_LINE_TYPES)} lines are added by the invoice builder, never by fct_invoice_lines"
                )
            amount_minor = _whole(r.get("amount_minor"), lambda: f"{where()}: amount_minor")
            out = {
                "line_number": ln,
                "line_type": line_type,
                "meter_id": r.get("meter_id"),
                "dimension": r.get("dimension") or "",
                "description": r.get("description") or "",
                "quantity": _plain(_exact(r.get("quantity"), lambda: f"{where()}: quantity")),
                "unit": r.get("unit") or "",
                "unit_price": _padded(_plain(_exact(r.get("unit_price"), lambda: f"{where()}: unit_price")), exp),
                "amount": _minor_text(amount_minor, exp),
                "amount_minor": amount_minor,
            }
            out["formula"] = _formula(r, out, cur, exp)
            out_lines.append(out)
        exp = exponents[currency]
        stored = stored_index.invoices(cid) if stored_index is not None else []
        adjustments = _open_adjustments(paths, cid, month, stored, currency, exp, stored_index.pending(cid)) if stored_index is not None else []
        settled = _settled(out_lines, adjustments, grants_by_customer.get(cid, ()), stored, month, currency, exp)
        version = int(plan_version) if plan_version is not None else None
        invoices.append(document(cid, plan_id, version, plan_names.get((plan_id, version), plan_id), currency, exp, settled))
    # an adjustment invoice (a credit note when negative) for each customer that has no invoice this month
    for cid, (stored, adjustments) in leavers.items():
        currency = customers_by_id[cid]["currency"]
        exp = exponents[currency]
        last = next((d for d in reversed(stored) if d["period_start"] < month.isoformat()), {})  # the plan of the last invoice
        settled = _settled([], adjustments, grants_by_customer.get(cid, ()), stored, month, currency, exp, credit_note=True)
        invoices.append(document(cid, last.get("plan_id"), last.get("plan_version"), last.get("plan_name"), currency, exp, settled,
                                 **_adjustment_document(adjustments, settled["total_minor"])))
    return sorted(invoices, key=lambda d: d["customer_id"])


def uninvoiced_customers(
    month: date,
    subscriptions: Iterable[Mapping],
    usage: Iterable[Mapping],
    invoiced: Iterable[str],
    flags: Iterable[Mapping],
    plans: Iterable[Mapping],
) -> tuple[dict[str, str], dict[str, str]]:
    """Customers with a subscription or usage in ``month`` and no invoice: (silently unbilled, named).

    ``subscriptions`` are seed rows, ``usage`` the month's fct_usage_by_month rows, ``flags`` its
    fct_anomaly_flags rows, ``plans`` the plans seed. A customer subscribed in the month must have an
    invoice, unless it has no usage in the month and no version of its plans has a base fee or a
    minimum charge (nothing to bill). One with usage and no subscription in the month has none to
    have: its usage must be named by a flag of ``OUTSIDE_SUBSCRIPTION_RULES``, else nobody would know
    it is billed to nobody.
    """
    start, end = _month_start(month), period_end(month)
    invoiced = set(invoiced)
    subscribed: dict[str, list[str]] = {}
    for sub in subscriptions:
        if sub["start_date"] < end and (sub["end_date"] is None or sub["end_date"] > start):
            subscribed.setdefault(sub["customer_id"], []).append(sub["plan_id"])
    used = {
        r["customer_id"] for r in usage
        if any((r[c] or 0) > 0 for c in ("usage", "gauge_peak", "gauge_integral"))
    }
    named: dict[str, set[str]] = {}
    for f in flags:
        if f["rule"] in OUTSIDE_SUBSCRIPTION_RULES:
            named.setdefault(f["customer_id"], set()).add(f"{f['rule']} on {f['meter_id']}")
    fixed_charge = {p["plan_id"] for p in plans if (p["base_fee"] or 0) > 0 or (p["minimum_charge"] or 0) > 0}
    unbilled, with_reason = {}, {}
    for cid in sorted((set(subscribed) | used) - invoiced):
        if cid in subscribed and cid not in used and not fixed_charge & set(subscribed[cid]):
            plan_ids = ", ".join(sorted(subscribed[cid]))
            with_reason[cid] = f"nothing to bill: no usage in the month on {plan_ids}, which has no base fee or minimum charge"
        elif cid in subscribed:
            unbilled[cid] = f"subscribed to {', '.join(sorted(subscribed[cid]))} in the month, no invoice"
        elif cid in named:
            with_reason[cid] = "flagged " + ", ".join(sorted(named[cid]))
        else:
            unbilled[cid] = "usage in the month, no subscription, no invoice"
    return unbilled, with_reason


# --------------------------------------------------------------------------- manifest and code version


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def code_version(root: Path | str = PROJECT_ROOT) -> str:
    """The package version, plus ``+g<commit>`` when ``root`` is a git checkout and ``git rev-parse HEAD`` works."""
    version = __version__
    root = Path(root)
    if not (root / ".git").exists():
        return version
    try:
        r = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
        )
    except (OSError, subprocess.SubprocessError):
        return version
    sha = (r.stdout or "").strip()
    if r.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", sha):
        return f"{version}+g{sha}"
    return version


def invoice_manifest(paths: Paths, month: date, seeds_dir: Path | str, code_version: str) -> dict:
    """What produced a month's invoices: SHA-256 of each raw samples and raw events Parquet file of the
    month's days (path relative to the data dir -> hash), the usage reports accepted for each day
    (count and SHA-256, from the report store: a late report changes it), each seed file's SHA-256,
    and the code version."""
    month = _month_start(month)
    end = period_end(month)
    raw: dict[str, str] = {}
    raw_events: dict[str, str] = {}
    day = month
    while day < end:
        for f in sample_files(paths, day):
            raw[f.relative_to(paths.data_dir).as_posix()] = _sha256_file(f)
        for f in event_files(paths, day):
            raw_events[f.relative_to(paths.data_dir).as_posix()] = _sha256_file(f)
        day += timedelta(days=1)
    with ReportStore.open(paths, readonly=True) as store:
        reports = store.fingerprints(month, end)
    seeds = seeds_digest(Path(seeds_dir))
    credits_file = Path(seeds_dir) / CREDITS_FILE
    if credits_file.exists():  # also while seeds.SPECS has no credits entry
        seeds.setdefault(CREDITS_FILE, _sha256_file(credits_file))
    return {
        "month": f"{month:%Y-%m}",
        "raw_samples": raw,
        "raw_events": raw_events,
        "usage_reports": reports,
        "seeds": dict(sorted(seeds.items())),
        "code_version": code_version,
    }


# --------------------------------------------------------------------------- rendering


def _csv_text(value: Any) -> str:
    """Text for a CSV cell; a leading formula character is neutralised for spreadsheets."""
    s = "" if value is None else str(value)
    if s and s[0] in "=+-@\t\r":
        return "'" + s
    return s


DOCUMENT_TITLES = {"adjustment_invoice": "Adjustment invoice", "credit_note": "Credit note"}


def document_title(invoice: Mapping) -> str:
    """``Invoice``, ``Adjustment invoice`` or ``Credit note`` (an adjustment invoice with a negative total)."""
    return DOCUMENT_TITLES.get(invoice.get("document"), "Invoice")


def total_label(invoice: Mapping) -> str:
    """``Total due``, or ``Total refunded`` on a credit note."""
    return "Total refunded" if invoice.get("document") == "credit_note" else "Total due"


def _render_json(invoice: dict) -> str:
    return durable.canonical_json(invoice).decode("utf-8")


def _render_csv(invoice: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    head = [invoice["invoice_number"], invoice["status"], invoice["customer_id"], invoice["period_start"], invoice["period_end"], invoice["currency"]]
    for line in invoice["lines"]:
        w.writerow(
            head
            + [
                line["line_number"],
                line["line_type"],
                line["meter_id"] or "",
                _csv_text(line["dimension"]),
                _csv_text(line["description"]),
                line["quantity"],
                _csv_text(line["unit"]),
                line["unit_price"],
                line["amount"],
                line["amount_minor"],
            ]
        )
    if int(invoice.get("credits_used_minor") or 0):
        # a summary row (not a charge): the credit lines above already hold these amounts, negated
        w.writerow(head + ["", "credits_used", "", "", "Prepaid credits used", "", "", "", invoice["credits_used"], invoice["credits_used_minor"]])
    w.writerow(head + ["", "total", "", "", total_label(invoice), "", "", "", invoice["total"], invoice["total_minor"]])
    return buf.getvalue()


def _summary_rows(invoice: Mapping) -> list[tuple[str, str]]:
    """(label, amount) rows summing up to the total due; only the rows that apply (stored invoices
    written before credits existed have none but the total)."""
    rows: list[tuple[str, str]] = []
    if int(invoice.get("adjustments_minor") or 0):
        rows.append(("Adjustments of earlier invoices", invoice["adjustments"]))
    if int(invoice.get("credits_used_minor") or 0):
        rows.append(("Prepaid credits used", "-" + invoice["credits_used"]))
    if int(invoice.get("carried_forward_minor") or 0):
        rows.append(("Credit carried to the next invoice", invoice["carried_forward"]))
    if rows:
        rows.insert(0, ("Charges for the period", invoice["charges"]))
    rows.append((total_label(invoice), invoice["total"]))
    return rows


def _render_table(invoice: dict) -> str:
    cur = invoice["currency"].upper()
    out = [
        f"{document_title(invoice)} {invoice['invoice_number']} ({invoice['status']})",
        f"Customer: {invoice['customer_name']} ({invoice['customer_id']})",
        f"Plan: {invoice.get('plan_name') or invoice['plan_id']} (v{invoice['plan_version']})",
        f"Period: {invoice['period_start']} to {invoice['period_end']} (exclusive, UTC)",
        "",
    ]
    header = ("#", "type", "description", "quantity", "unit", "unit price", f"amount {cur}")
    rows = [
        (str(l["line_number"]), l["line_type"], l["description"], l["quantity"], l["unit"], l["unit_price"], l["amount"])
        for l in invoice["lines"]
    ]
    summary = _summary_rows(invoice)
    rows.extend(("", "", label, "", "", "", value) for label, value in summary[:-1])
    rows.append(("", "", total_label(invoice), "", "", "", invoice["total"]))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {0, 3, 5, 6}

    def fmt(r: tuple) -> str:
        return "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)).rstrip()

    out.append(fmt(header))
    out.append("  ".join("-" * w for w in widths))
    n_sum = len(summary) - 1
    out.extend(fmt(r) for r in rows[: len(rows) - 1 - n_sum])
    out.append("  ".join("-" * w for w in widths))
    out.extend(fmt(r) for r in rows[len(rows) - 1 - n_sum : -1])
    out.append(fmt(rows[-1]))
    for c in invoice.get("credits") or []:
        out.append(f"Prepaid credit {c['grant_id']}: {c['available']} available, {c['used']} used, {c['remaining']} {cur} remaining"
                   + (f" (expires {c['expires_on']}, exclusive)" if c.get("expires_on") else ""))
    out += ["", invoice["dispute_instructions"], ""]
    return "\n".join(out)


_HTML_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1f2328; margin: 2rem auto; max-width: 960px; padding: 0 1rem; }
header { display: flex; justify-content: space-between; align-items: flex-start; border-bottom: 2px solid #1f2328; padding-bottom: 1rem; }
h1 { margin: 0 0 .25rem 0; font-size: 1.6rem; }
h2 { font-size: 1.1rem; margin-top: 2rem; }
.status { display: inline-block; padding: .15rem .6rem; border-radius: 1rem; font-size: .85rem; font-weight: 600; text-transform: uppercase; }
.status-draft { background: #fff8c5; color: #7d4e00; border: 1px solid #d4a72c; }
.status-finalized { background: #dafbe1; color: #116329; border: 1px solid #4ac26b; }
dl { display: grid; grid-template-columns: max-content auto; gap: .2rem 1rem; margin: 0; }
dt { color: #59636e; } dd { margin: 0; }
table { width: 100%; border-collapse: collapse; margin-top: .5rem; font-size: .92rem; }
th, td { text-align: left; padding: .4rem .5rem; border-bottom: 1px solid #d1d9e0; vertical-align: top; }
th { background: #f6f8fa; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.formula { color: #59636e; font-size: .85rem; }
tr.total td { font-weight: 700; border-top: 2px solid #1f2328; border-bottom: none; font-size: 1.05rem; }
.dispute { margin-top: 2rem; padding: 1rem; background: #f6f8fa; border-left: 4px solid #59636e; font-size: .88rem; }
.manifest { margin-top: 1rem; color: #59636e; font-size: .75rem; word-break: break-all; }
@media print { body { margin: 0; max-width: none; } .status { border: 1px solid #000; } th { background: none; } }
""".strip()


def _escape(value: Any) -> str:
    """``html.escape(str(value), quote=True)`` ("" for None), without the five replacements when nothing needs them."""
    s = "" if value is None else value if type(value) is str else str(value)
    if "&" in s or "<" in s or ">" in s or '"' in s or "'" in s:
        return html.escape(s, quote=True)
    return s


def _render_html(invoice: dict) -> str:
    e = _escape
    cur = invoice["currency"].upper()
    status = invoice["status"] if invoice["status"] in STATUSES else "draft"
    usage = [l for l in invoice["lines"] if l["line_type"] == "usage"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(document_title(invoice))} {e(invoice['invoice_number'])} — {e(invoice['customer_name'])}</title>",
        f"<style>\n{_HTML_STYLE}\n</style>",
        "</head>",
        "<body>",
        "<header>",
        "<div>",
        f"<h1>{e(document_title(invoice))} {e(invoice['invoice_number'])}</h1>",
        f'<span class="status status-{e(status)}">{e(invoice["status"])}</span>',
        "</div>",
        "<dl>",
        f"<dt>Customer</dt><dd>{e(invoice['customer_name'])} ({e(invoice['customer_id'])})</dd>",
        f"<dt>Plan</dt><dd>{e(invoice.get('plan_name') or invoice['plan_id'])} (v{e(invoice['plan_version'])})</dd>",
        f"<dt>Period</dt><dd>{e(invoice['period_start'])} to {e(invoice['period_end'])} (exclusive, UTC)</dd>",
        f"<dt>Currency</dt><dd>{e(cur)}</dd>",
    ]
    if invoice.get("finalized_on"):
        parts.append(f"<dt>Finalized on</dt><dd>{e(invoice['finalized_on'])}</dd>")
    parts += ["</dl>", "</header>"]
    if invoice.get("corrects"):
        parts.append(f"<p>Corrects {e(', '.join(invoice['corrects']))} (finalized; see the adjustment lines for the reason). "
                     "No subscription in this period, so the correction is issued on its own.</p>")
    parts.append("<h2>Usage summary</h2>")
    if usage:
        parts += [
            "<table>",
            '<thead><tr><th>Meter</th><th>Dimension</th><th class="num">Quantity</th><th>Unit</th></tr></thead>',
            "<tbody>",
        ]
        for l in usage:
            parts.append(
                f"<tr><td>{e(l['meter_id'])}</td><td>{e(l['dimension'])}</td>"
                f'<td class="num">{e(l["quantity"])}</td><td>{e(l["unit"])}</td></tr>'
            )
        parts += ["</tbody>", "</table>"]
    else:
        parts.append("<p>No metered usage in this period.</p>")
    parts += [
        "<h2>Charges</h2>",
        "<table>",
        "<thead><tr><th class=\"num\">#</th><th>Description</th><th class=\"num\">Quantity</th><th>Unit</th>"
        f"<th class=\"num\">Unit price ({e(cur)})</th><th>How it is computed</th><th class=\"num\">Amount ({e(cur)})</th></tr></thead>",
        "<tbody>",
    ]
    for l in invoice["lines"]:
        parts.append(
            f'<tr><td class="num">{e(l["line_number"])}</td><td>{e(l["description"])}</td>'
            f'<td class="num">{e(l["quantity"])}</td><td>{e(l["unit"])}</td>'
            f'<td class="num">{e(l["unit_price"])}</td><td class="formula">{e(l.get("formula", ""))}</td>'
            f'<td class="num">{e(l["amount"])}</td></tr>'
        )
    parts += [
        f'<tr class="total"><td></td><td colspan="5">{e(total_label(invoice))}</td><td class="num">{e(cur)} {e(invoice["total"])}</td></tr>',
        "</tbody>",
        "</table>",
        "<h2>Summary</h2>",
        '<table class="summary">',
        "<tbody>",
    ]
    summary = _summary_rows(invoice)
    for label, value in summary[:-1]:
        parts.append(f'<tr><td>{e(label)}</td><td class="num">{e(cur)} {e(value)}</td></tr>')
    parts += [
        f'<tr class="total"><td>{e(total_label(invoice))}</td><td class="num">{e(cur)} {e(invoice["total"])}</td></tr>',
        "</tbody>",
        "</table>",
    ]
    if invoice.get("credits"):
        parts += [
            "<h2>Prepaid credits</h2>",
            "<table>",
            "<thead><tr><th>Grant</th><th>Description</th><th>Expires (exclusive)</th>"
            f'<th class="num">Available ({e(cur)})</th><th class="num">Used ({e(cur)})</th><th class="num">Remaining ({e(cur)})</th></tr></thead>',
            "<tbody>",
        ]
        for c in invoice["credits"]:
            parts.append(
                f"<tr><td>{e(c['grant_id'])}</td><td>{e(c['description'])}</td><td>{e(c['expires_on'] or 'never')}</td>"
                f'<td class="num">{e(c["available"])}</td><td class="num">{e(c["used"])}</td><td class="num">{e(c["remaining"])}</td></tr>'
            )
        parts += ["</tbody>", "</table>"]
    parts += [
        f'<div class="dispute"><strong>Disputes.</strong> {e(invoice["dispute_instructions"])}</div>',
    ]
    manifest = invoice.get("manifest") or {}
    if manifest:
        parts.append(
            f'<div class="manifest">Manifest: code {e(manifest.get("code_version", ""))}; '
            f'{e(len(manifest.get("raw_samples") or {}))} raw sample files, '
            f'{e(len(manifest.get("raw_events") or {}))} raw event files, '
            f'{e(sum(d["reports"] for d in (manifest.get("usage_reports") or {}).values()))} usage reports and '
            f'{e(len(manifest.get("seeds") or {}))} seed files hashed (SHA-256, listed in the JSON invoice).</div>'
        )
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def _render_bytes(invoice: dict, fmt: str) -> bytes:
    """The stored bytes of one of an invoice's files (json, csv or html)."""
    if fmt == "json":
        return durable.canonical_json(invoice)
    return render_invoice(invoice, fmt).encode("utf-8")


def render_invoice(invoice: dict, fmt: str = "json") -> str:
    """The invoice as text: ``json`` (canonical, as stored), ``csv`` (one row per line plus a total row),
    ``html`` (a self-contained printable page) or ``table`` (plain text)."""
    if fmt == "json":
        return _render_json(invoice)
    if fmt == "csv":
        return _render_csv(invoice)
    if fmt == "html":
        return _render_html(invoice)
    if fmt == "table":
        return _render_table(invoice)
    raise InvoiceError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")


# --------------------------------------------------------------------------- files


def invoice_dir(paths: Paths, month: date | str) -> Path:
    key = month if isinstance(month, str) else f"{month:%Y-%m}"
    if not re.fullmatch(r"\d{4}-\d{2}", key):
        raise InvoiceError(f"month {month!r} must look like YYYY-MM")
    return paths.invoices / key


def invoice_files(paths: Paths, month: date | str, customer_id: str) -> dict[str, Path]:
    """Where a customer's invoice of a month lives: {"json": ..., "csv": ..., "html": ...}."""
    d = invoice_dir(paths, month)
    cid = _safe_customer_id(customer_id, "invoice_files")
    return {fmt: d / f"{cid}.{fmt}" for fmt in ("json", "csv", "html")}


def read_invoice(paths: Paths, month: date | str, customer_id: str) -> dict | None:
    """A stored invoice (JSON), or None if there is none."""
    return _read_stored(invoice_files(paths, month, customer_id)["json"])


def _read_stored(path: Path) -> dict | None:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise InvoiceError(f"{path}: stored invoice is unreadable ({e}); restore it from backup (a finalized invoice is never regenerated)") from None
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError as e:
        raise InvoiceError(f"{path}: stored invoice is unreadable ({e}); restore it from backup (a finalized invoice is never regenerated)") from None


def _charge_lines(invoice: Mapping) -> list[Mapping]:
    return [l for l in invoice["lines"] if l["line_type"] not in GENERATED_LINE_TYPES]


def charges_minor(invoice: Mapping) -> int:
    """The period's own charges: the sum of the lines from fct_invoice_lines (before adjustments and credits)."""
    return sum(int(l["amount_minor"]) for l in _charge_lines(invoice))


def _figures(invoice: Mapping) -> tuple:
    """What the period's charges depend on; two invoices with equal figures charge the same. Adjustment,
    credit and carry-forward lines are left out: they settle other months and the prepaid ledger, and a
    finalized invoice's draws stand as stored."""
    lines = tuple(
        (
            l["line_type"],
            l.get("meter_id"),
            l.get("dimension") or "",
            Decimal(l["quantity"]),
            l.get("unit") or "",
            Decimal(l["unit_price"]),
            int(l["amount_minor"]),
        )
        for l in sorted(_charge_lines(invoice), key=lambda l: int(l["line_number"]))
    )
    return (invoice["currency"], invoice.get("plan_id"), invoice.get("plan_version"), charges_minor(invoice), lines)


def _carried_elsewhere(paths: Paths, cid: str, source_month: str) -> int:
    """What finalized invoices of ``cid`` already carried as adjustments of ``source_month``'s recomputation."""
    total = 0
    for d in _credits.stored_invoices(paths.invoices, cid):
        if d.get("status") != "finalized" or d["period_start"][:7] == source_month:
            continue
        for line in d["lines"]:
            src = line.get("adjusts")
            if line.get("line_type") == "adjustment" and isinstance(src, dict) and src.get("kind") == "recompute" and src.get("month") == source_month:
                total += int(line["amount_minor"])
    return total


def _same_bytes(path: Path, data: bytes) -> bool:
    """Whether ``path`` holds exactly ``data`` (the size first: a file of another size is not read)."""
    try:
        if os.stat(path).st_size != len(data):
            return False
        with open(path, "rb") as f:
            return f.read() == data
    except FileNotFoundError:
        return False


def _write_if_changed(path: Path, data: bytes, written: list[str], unchanged: list[str], write) -> None:
    if _same_bytes(path, data):
        unchanged.append(str(path))
        return
    write(path, data)
    written.append(str(path))


def write_invoice_files(paths: Paths, invoices: list[dict]) -> dict:
    """Write each invoice as ``<invoices>/YYYY-MM/<customer_id>.json|.csv|.html`` (atomic, deterministic).

    A finalized invoice already on disk is never rewritten (rule 8): if the recomputed figures
    differ, the customer is listed in ``changed_after_finalization`` and the new figures go to
    ``YYYY-MM/pending_adjustments/<customer_id>.json``; a missing CSV/HTML of it is re-rendered from
    the stored JSON. Files whose bytes would not change are left alone. Returns figures: counts by
    status and totals by currency of the invoices as they now stand on disk, and the paths written.
    """
    written: list[str] = []
    unchanged: list[str] = []
    changed_after: list[str] = []
    pending: list[str] = []
    by_status: dict[str, int] = {s: 0 for s in STATUSES}
    totals_minor: dict[str, int] = {}
    exponents: dict[str, int] = {}
    # the files of a month are made durable together (see durable.Batch), before the next month is read
    batch = durable.Batch()
    batch_month = None
    try:
        for inv in sorted(invoices, key=lambda i: (i["period_start"], i["customer_id"])):
            if inv["period_start"][:7] != batch_month:
                batch.commit()
                batch_month = inv["period_start"][:7]
            _write_invoice(paths, inv, batch, written, unchanged, changed_after, pending, by_status, totals_minor, exponents)
        batch.commit()
    except BaseException:
        batch.abort()
        raise
    finally:
        batch.close()
    return {
        "invoices": len(invoices),
        "by_status": by_status,
        "totals_by_currency": {c: format_minor(totals_minor[c], exponents[c]) for c in sorted(totals_minor)},
        "totals_minor_by_currency": dict(sorted(totals_minor.items())),
        "written": written,
        "unchanged": unchanged,
        "changed_after_finalization": changed_after,
        "pending_adjustments": pending,
    }


def _write_invoice(paths: Paths, inv: dict, batch: durable.Batch, written: list[str], unchanged: list[str], changed_after: list[str],
                   pending: list[str], by_status: dict[str, int], totals_minor: dict[str, int], exponents: dict[str, int]) -> None:
    """One invoice of write_invoice_files: its files go into ``batch``; the figures are added up."""
    month_key = inv["period_start"][:7]
    cid = _safe_customer_id(inv["customer_id"], f"invoice {inv.get('invoice_number')!r}")
    folder = invoice_dir(paths, month_key)
    files = {fmt: folder / f"{cid}.{fmt}" for fmt in ("json", "csv", "html")}  # invoice_files
    pending_path = folder / PENDING_DIR / f"{cid}.json"
    stored = _read_stored(files["json"])
    if stored is not None and stored.get("status") == "finalized":
        effective = stored
        differs = _figures(stored) != _figures(inv)
        if differs or (pending_path.exists() and _carried_elsewhere(paths, cid, month_key)):
            # a recomputation that later returns to the finalized figures keeps its file while some of it
            # was already carried, so that the reversal is carried too
            if differs:
                changed_after.append(cid)
            fin_charges, rec_charges = charges_minor(stored), charges_minor(inv)
            adjustment = {
                "schema_version": SCHEMA_VERSION,
                "status": "pending",
                "customer_id": cid,
                "period_start": stored["period_start"],
                "period_end": stored["period_end"],
                "currency": stored["currency"],
                "minor_unit_exponent": stored["minor_unit_exponent"],
                "finalized_invoice_number": stored["invoice_number"],
                "finalized_total_minor": int(stored["total_minor"]),
                "recomputed_total_minor": int(inv["total_minor"]),
                # charges: the period's own lines, before adjustments and credits; the delta is what an
                # adjustment line on the customer's next invoice carries (less what was already carried)
                "finalized_charges_minor": fin_charges,
                "recomputed_charges_minor": rec_charges,
                "delta_minor": rec_charges - fin_charges,
                "delta": format_minor(rec_charges - fin_charges, int(stored["minor_unit_exponent"])),
                "recomputed_lines": _charge_lines(inv),
                "recomputed_manifest": inv.get("manifest"),
            }
            _write_if_changed(pending_path, durable.canonical_json(adjustment), written, unchanged, batch.write)
            pending.append(str(pending_path))
        elif pending_path.exists():
            # usage went back to what was finalized: nothing left to adjust
            pending_path.unlink()
        for fmt in ("csv", "html"):
            if not files[fmt].exists():
                batch.write(files[fmt], _render_bytes(stored, fmt))
                written.append(str(files[fmt]))
    else:
        effective = inv
        for fmt in ("json", "csv", "html"):
            _write_if_changed(files[fmt], _render_bytes(inv, fmt), written, unchanged, batch.write)
    by_status[effective["status"]] = by_status.get(effective["status"], 0) + 1
    cur = effective["currency"]
    totals_minor[cur] = totals_minor.get(cur, 0) + int(effective["total_minor"])
    exponents[cur] = int(effective["minor_unit_exponent"])


def settle_drafts(paths: Paths, month: date, invoices: Iterable[Mapping], grants: Iterable[_credits.Grant]) -> list[str]:
    """After ``write_invoice_files`` of ``month``: settle the stored drafts of those customers in other
    months again, in month order, from their stored charge lines (adjustment, credit and carry-forward
    lines and totals recomputed; see ``credits.drawn_before``), so that every stored draft shows what
    rerunning it gives and the draws of all stored invoices never exceed a grant. A draft adjustment
    invoice left with nothing to adjust (in any month, ``month`` included) is withdrawn: its files are
    removed. Returns the paths written or removed."""
    month_iso = _month_start(month).isoformat()
    mk = month_iso[:7]
    grants = list(grants)
    index = _credits.StoredInvoices(paths.invoices, PENDING_DIR)
    billed = {d["customer_id"] for d in invoices}
    changed: list[str] = []
    for name, names, _ in index.months:
        for file in sorted(names) if name == mk else ():  # this month's draft adjustment invoices not issued again
            cid = file[: -len(".json")]
            if file.endswith(".json") and cid not in billed and SAFE_ID_RE.match(cid):
                doc = _read_stored(paths.invoices / name / file)
                if doc and doc.get("status") == "draft" and doc.get("document"):
                    changed += _withdraw(paths, month, cid)
    for cid in sorted(billed):
        if not any(name != mk and f"{cid}.json" in names for name, names, _ in index.months):
            continue  # no invoice in another month: nothing to read
        stored = index.invoices(cid)
        own = [g for g in grants if g.customer_id == cid]
        for doc in list(stored):
            if doc.get("status") != "draft" or doc["period_start"] == month_iso:
                continue
            start = date.fromisoformat(doc["period_start"])
            currency, exp = doc["currency"], int(doc["minor_unit_exponent"])
            adjustments = _open_adjustments(paths, cid, start, stored, currency, exp, index.pending(cid))
            position = stored.index(doc)
            if doc.get("document") and not adjustments:
                changed += _withdraw(paths, start, cid)
                del stored[position]
                continue
            settled = _settled(_charge_lines(doc), adjustments, own, stored, start, currency, exp, credit_note=bool(doc.get("document")))
            new = {**doc, **settled}
            if doc.get("document"):
                new.update(_adjustment_document(adjustments, settled["total_minor"]))
            stored[position] = new
            for fmt, path in invoice_files(paths, start, cid).items():
                _write_if_changed(path, _render_bytes(new, fmt), changed, [], durable.write_bytes)
    return changed


def _withdraw(paths: Paths, month: date, customer_id: str) -> list[str]:
    """Remove a draft's files; returns the paths removed."""
    removed = []
    for path in invoice_files(paths, month, customer_id).values():
        if durable.remove(path):
            removed.append(str(path))
    return removed
