"""Building invoices: one per customer and month, from ``fct_invoice_lines`` rows (DESIGN rules 7, 8, 11, 12).

Pure functions, no Dagster, no file written (but the number registry when invoices are finalized).
Money stays exact: line amounts arrive as integer minor units (each line rounded once, upstream,
in SQL) and the total is their integer sum; quantities and prices are ``Decimal`` and are written
as plain decimal strings (never floats, never exponent notation).

An invoice is its **charges** (the lines from ``fct_invoice_lines``: base fee, usage, discount,
risk adjustment, minimum charge, ...; ``charges_minor`` is their sum), then what
``billing.settlement`` adds (adjustments of earlier invoices, prepaid credits, a carry-forward).
Its status and dates come from ``billing.periods``, a finalized invoice's number from
``billing.numbering``, its manifest from ``billing.manifest``; ``billing.store`` writes it and
``billing.render`` renders it.

The steps of ``build_invoices``: the month's context (status, dates, currencies, plans), the lines
checked and grouped by customer, the customers owed an adjustment invoice, the numbers, then one
document per customer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from billing_dags.billing import credits as _credits
from billing_dags.billing.document import GENERATED_LINE_TYPES, LINE_TYPES, SCHEMA_VERSION, safe_customer_id
from billing_dags.billing.errors import InvoiceError
from billing_dags.billing.numbering import assign_invoice_numbers, read_registry
from billing_dags.billing.periods import checked_grace, checked_month, finalization_date, invoice_status, period_end
from billing_dags.billing.settlement import adjustment_document, open_adjustments, settle
from billing_dags.billing.store import PENDING_DIR
from billing_dags.billing.tax import customer_rate, invoice_profile
from billing_dags.core.money import MoneyError, format_decimal, format_minor, format_price, parse_minor
from billing_dags.core.settings import DEFAULT_GRACE_DAYS, Paths
from billing_dags.seeds.catalog import OUTSIDE_SUBSCRIPTION_RULES, SAFE_ID_RE
from billing_dags.seeds.invoicing import InvoiceProfile

DISPUTE_DAYS = 30


@dataclass
class _Month:
    """What every invoice of the month being built shares."""

    month: date
    end: date
    status: str
    grace_days: int
    finalized_on: date
    manifest: Any
    customers: dict[str, Mapping]
    exponents: dict[str, int]
    plan_names: dict[tuple[Any, int], Any]
    held: dict[str, str]
    numbers: Mapping[str, str] | None = None
    profile: InvoiceProfile | None = None


@contextmanager
def _as_invoice_error() -> Iterator[None]:
    """A bad amount or quantity in the input (a MoneyError) is input that cannot be invoiced: an InvoiceError, same message."""
    try:
        yield
    except MoneyError as e:
        raise InvoiceError(str(e)) from None


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
    profile: InvoiceProfile | None = None,
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

    ``profile`` (issuer, bill-to, payment terms, tax rates, meter names; read from ``paths.seeds_dir``
    when not given and ``paths`` is, if it has ``issuer.csv``) adds the issuer and bill-to blocks, issue and due dates, the tax
    line and the meters' names; without either, invoices have none of them.
    """
    with _as_invoice_error():
        grants = list(grants)
        ctx = _month_context(customers, plans, currencies, month, now, grace_days, manifest, held)
        if profile is None and paths is not None:
            # the seed assets require issuer.csv; a seeds folder made by hand without it gives invoices without these blocks
            profile = invoice_profile(paths.seeds_dir)
        ctx.profile = profile
        grouped = _grouped_lines(lines, ctx)
        # every stored invoice and pending adjustment under paths.invoices, listed once (not a glob per customer)
        stored_index = _credits.StoredInvoices(paths.invoices, PENDING_DIR) if paths is not None else None
        leavers = {}
        if stored_index is not None:
            leavers = _leaver_adjustments(paths, stored_index, ctx, set(grouped), ctx.status == "finalized" and numbers is None)
        ctx.numbers = _numbers(ctx, numbers, paths, sorted(c for c in [*grouped, *leavers] if c not in ctx.held))
        grants_by_customer: dict[str, list[_credits.Grant]] = {}
        for g in grants:
            grants_by_customer.setdefault(g.customer_id, []).append(g)
        invoices = [_customer_invoice(ctx, cid, grouped[cid], stored_index, paths, grants_by_customer.get(cid, ())) for cid in sorted(grouped)]
        # an adjustment invoice (a credit note when negative) for each customer that has no invoice this month
        invoices += [_adjustment_invoice(ctx, cid, stored, adjustments, grants_by_customer.get(cid, ())) for cid, (stored, adjustments) in leavers.items()]
    return sorted(invoices, key=lambda d: d["customer_id"])


def _month_context(
    customers: list[dict],
    plans: list[dict],
    currencies: list[dict],
    month: date,
    now: datetime,
    grace_days: int,
    manifest: dict,
    held: Mapping[str, str] | None,
) -> _Month:
    """The month's status and dates, its manifest as plain JSON, the customers, currency exponents and plan names."""
    held = dict(held or {})
    month = checked_month(month)
    grace_days = checked_grace(grace_days)
    status = invoice_status(month, now, grace_days)
    end = period_end(month)
    fin_on = finalization_date(month, grace_days)
    manifest_json = _plain_json(manifest, "manifest")
    customers_by_id = {c["customer_id"]: c for c in customers}
    exponents: dict[str, int] = {}
    for c in currencies:
        exponents[c["currency"]] = parse_minor(c["minor_unit_exponent"], f"currencies.csv {c['currency']}: minor_unit_exponent")
    # plans seed rows (version, name) or staged rows (plan_version, plan_name)
    plan_names = {
        (p["plan_id"], int(p["version"] if "version" in p else p["plan_version"])): p.get("name") or p.get("plan_name") or p["plan_id"] for p in plans
    }
    return _Month(month, end, status, grace_days, fin_on, manifest_json, customers_by_id, exponents, plan_names, held)


def _grouped_lines(lines: list[dict], ctx: _Month) -> dict[str, list[Mapping]]:
    """The month's lines by customer, each customer safe and known, each line of the month."""
    month = ctx.month
    grouped: dict[str, list[Mapping]] = {}
    checked: set[str] = set()  # customer ids already found safe and in customers.csv
    for i, line in enumerate(lines):
        where = lambda i=i, line=line: f"invoice line {i} (customer {line.get('customer_id')!r}, line_number {line.get('line_number')!r})"  # noqa: E731
        cid = line.get("customer_id")
        if type(cid) is not str or cid not in checked:
            cid = safe_customer_id(cid, where())
            if cid not in ctx.customers:
                raise InvoiceError(f"{where()}: unknown customer {cid!r}; add it to seeds/customers.csv or rebuild fct_invoice_lines")
            checked.add(cid)
        line_month = line.get("month")
        if line_month is not None and (line_month if type(line_month) is date else _as_date(line_month, f"{where()}: month")) != month:
            raise InvoiceError(f"{where()}: month {line['month']} is not the invoiced month {month.isoformat()}; pass only that month's lines")
        grouped.setdefault(cid, []).append(line)
    return grouped


def _leaver_adjustments(paths: Paths, index: _credits.StoredInvoices, ctx: _Month, billed: set[str], closing: bool) -> dict[str, tuple[list[dict], list[dict]]]:
    """Customers without lines in ``month`` (no subscription in it) whose earlier invoices leave adjustments:
    {customer_id: (their stored invoices, the open adjustments)}. ``closing``: the month's invoices are being
    finalized; if some were finalized by an earlier run, the month is closed and only a customer that already
    has its adjustment invoice there keeps it (a later correction goes to the next month's run)."""
    month, customers_by_id, exponents = ctx.month, ctx.customers, ctx.exponents
    mk = f"{month:%Y-%m}"
    registry = None
    out: dict[str, tuple[list[dict], list[dict]]] = {}
    for cid in sorted(customers_by_id):
        if cid in billed or not any(name < mk and f"{cid}.json" in names for name, names, _ in index.months):
            continue
        currency = customers_by_id[cid].get("currency")
        if currency not in exponents:
            raise InvoiceError(f"customer {cid!r}: currency {currency!r} is not in seeds/currencies.csv; add it there")
        stored = index.invoices(safe_customer_id(cid, "customers.csv"))
        adjustments = open_adjustments(paths, cid, month, stored, currency, exponents[currency], index.pending(cid))
        if not adjustments:
            continue
        if closing:
            if registry is None:
                registry = read_registry(paths)["numbers"]
            if f"{mk}/{cid}" not in registry and any(k.startswith(f"{mk}/") for k in registry):
                continue
        out[cid] = (stored, adjustments)
    return out


def _numbers(ctx: _Month, numbers: Mapping[str, str] | None, paths: Paths | None, numbered: list[str]) -> Mapping[str, str] | None:
    """The numbers of the month's finalized invoices: ``numbers`` as given, else assigned in the registry."""
    if ctx.status != "finalized":
        return numbers
    month = ctx.month
    if numbers is None:
        if paths is None:
            raise InvoiceError(f"invoices of {month:%Y-%m} are finalized and need numbers: pass paths= (registry) or numbers=")
        numbers = assign_invoice_numbers(paths, month, numbered)
    missing = [c for c in numbered if not numbers.get(c)]
    if missing:
        raise InvoiceError(f"no invoice number given for finalized invoices of {month:%Y-%m}: {', '.join(missing)}")
    return numbers


def _charges(ctx: _Month, cid: str, rows: list[Mapping]) -> tuple[list[dict], Any, Any, Any]:
    """A customer's charge lines, checked (one currency and plan version, known line types, exact figures) and
    in line_number order: (lines, currency, plan_id, plan_version)."""
    customer = ctx.customers[cid]
    month_key = f"{ctx.month:%Y-%m}"
    line_number_what = lambda: f"customer {cid}: line_number"  # noqa: E731
    rows = sorted(rows, key=lambda r: parse_minor(r.get("line_number"), line_number_what))
    seen_numbers: set[int] = set()
    currency = plan_id = plan_version = None
    out_lines: list[dict] = []
    for r in rows:
        ln = parse_minor(r.get("line_number"), line_number_what)
        where = lambda ln=ln: f"invoice line {ln} of customer {cid!r} ({month_key})"  # noqa: E731
        if ln in seen_numbers:
            raise InvoiceError(f"{where()}: duplicate line_number; fct_invoice_lines must have one row per (month, customer_id, line_number)")
        seen_numbers.add(ln)
        cur = r.get("currency")
        if currency is None:
            currency, plan_id, plan_version = cur, r.get("plan_id"), r.get("plan_version")
        if (cur, r.get("plan_id"), r.get("plan_version")) != (currency, plan_id, plan_version):
            raise InvoiceError(
                f"{where()}: currency/plan ({cur}, "
                f"{r.get('plan_id')} v{r.get('plan_version')}) differs from line {out_lines[0]['line_number']} ({currency}, {plan_id} v{plan_version}); "
                f"one invoice has one currency and plan version"
            )
        if cur != customer.get("currency"):
            raise InvoiceError(f"{where()}: currency {cur!r} differs from the customer's currency {customer.get('currency')!r} in seeds/customers.csv")
        if cur not in ctx.exponents:
            raise InvoiceError(f"{where()}: currency {cur!r} is not in seeds/currencies.csv; add it there")
        exp = ctx.exponents[cur]
        line_type = r.get("line_type")
        if line_type in GENERATED_LINE_TYPES or not isinstance(line_type, str) or not SAFE_ID_RE.match(line_type):
            raise InvoiceError(
                f"{where()}: line_type {line_type!r} is not a charge line type (e.g. {', '.join(LINE_TYPES)}); "
                f"{', '.join(GENERATED_LINE_TYPES)} lines are added by the invoice builder, never by fct_invoice_lines"
            )
        amount_minor = parse_minor(r.get("amount_minor"), lambda where=where: f"{where()}: amount_minor")
        out = {
            "line_number": ln,
            "line_type": line_type,
            "meter_id": r.get("meter_id"),
            "dimension": r.get("dimension") or "",
            "description": r.get("description") or "",
            "quantity": format_decimal(r.get("quantity"), lambda where=where: f"{where()}: quantity"),
            "unit": r.get("unit") or "",
            "unit_price": format_price(r.get("unit_price"), exp, lambda where=where: f"{where()}: unit_price"),
            "amount": format_minor(amount_minor, exp),
            "amount_minor": amount_minor,
        }
        if line_type == "usage":
            out.update(_usage_details(r, ctx.profile, where))
        out["formula"] = _formula(r, out, cur, exp)
        out_lines.append(out)
    return out_lines, currency, plan_id, plan_version


def _customer_invoice(
    ctx: _Month, cid: str, rows: list[Mapping], stored_index: _credits.StoredInvoices | None, paths: Paths | None, grants: Iterable[_credits.Grant]
) -> dict:
    """The invoice of a customer with lines in the month: its charges, then what settlement adds."""
    out_lines, currency, plan_id, plan_version = _charges(ctx, cid, rows)
    exp = ctx.exponents[currency]
    stored = stored_index.invoices(cid) if stored_index is not None else []
    adjustments = open_adjustments(paths, cid, ctx.month, stored, currency, exp, stored_index.pending(cid)) if stored_index is not None else []
    settled = settle(out_lines, adjustments, grants, stored, ctx.month, currency, exp, tax_rate=_tax_rate(ctx, cid))
    version = int(plan_version) if plan_version is not None else None
    return _document(ctx, cid, plan_id, version, ctx.plan_names.get((plan_id, version), plan_id), currency, exp, settled)


def _adjustment_invoice(ctx: _Month, cid: str, stored: list[dict], adjustments: list[dict], grants: Iterable[_credits.Grant]) -> dict:
    """The adjustment invoice (a credit note when negative) of a customer without lines in the month, on its last invoice's plan."""
    currency = ctx.customers[cid]["currency"]
    exp = ctx.exponents[currency]
    last = next((d for d in reversed(stored) if d["period_start"] < ctx.month.isoformat()), {})  # the plan of the last invoice
    settled = settle([], adjustments, grants, stored, ctx.month, currency, exp, credit_note=True, tax_rate=_tax_rate(ctx, cid))
    return _document(
        ctx,
        cid,
        last.get("plan_id"),
        last.get("plan_version"),
        last.get("plan_name"),
        currency,
        exp,
        settled,
        **adjustment_document(adjustments, settled["total_minor"]),
    )


def _document(ctx: _Month, cid: str, plan_id: Any, plan_version: Any, plan_name: Any, currency: str, exp: int, settled: dict, **extra: Any) -> dict:
    """The invoice document: number, status and dates of the month (a held customer stays a draft), the settled lines and figures."""
    customer_status = "draft" if cid in ctx.held else ctx.status
    number = ctx.numbers[cid] if customer_status == "finalized" else f"DRAFT-{ctx.month:%Y-%m}-{cid}"
    return {
        "schema_version": SCHEMA_VERSION,
        "invoice_number": number,
        "status": customer_status,
        **({"held_reason": ctx.held[cid]} if cid in ctx.held else {}),
        **extra,
        "customer_id": cid,
        "customer_name": ctx.customers[cid].get("name") or cid,
        "plan_id": plan_id,
        "plan_version": plan_version,
        "plan_name": plan_name,
        "period_start": ctx.month.isoformat(),
        "period_end": ctx.end.isoformat(),
        "currency": currency,
        "minor_unit_exponent": exp,
        "grace_days": ctx.grace_days,
        "finalized_on": ctx.finalized_on.isoformat() if customer_status == "finalized" else None,
        **_parties(ctx, cid),
        **settled,
        "dispute_instructions": _dispute_text(number, customer_status, ctx.finalized_on),
        "manifest": ctx.manifest,
    }


def _tax_rate(ctx: _Month, cid: str) -> dict | None:
    """The customer's tax rate (tax_code, name, rate_percent, treatment, note), None without a profile."""
    return customer_rate(ctx.profile, cid, ctx.customers[cid].get("name"))


def payment_terms_text(days: int) -> str:
    """``Due on receipt`` or ``Net 30 days``."""
    return "Due on receipt" if days == 0 else f"Net {days} day" + ("s" if days != 1 else "")


def _parties(ctx: _Month, cid: str) -> dict:
    """Issuer and bill-to blocks, issue date (the finalization date: a draft shows the date it is to be
    issued on), payment terms and due date. Nothing without a profile."""
    if ctx.profile is None:
        return {}
    terms = ctx.profile.terms(cid, ctx.customers[cid].get("name"))
    issued = ctx.finalized_on
    return {
        "issuer": ctx.profile.issuer.as_json(),
        "bill_to": {"customer_id": cid, **terms.bill_to.as_json()},
        "issue_date": issued.isoformat(),
        "payment_terms_days": terms.payment_terms_days,
        "payment_terms": payment_terms_text(terms.payment_terms_days),
        "due_date": (issued + timedelta(days=terms.payment_terms_days)).isoformat(),
    }


def _usage_details(row: Mapping, profile: InvoiceProfile | None, where) -> dict:
    """A usage line's exact allowance figures (included, billable, packages, tiers) and the meter's display name and unit."""
    out: dict[str, Any] = {}
    for key in ("included_quantity", "billable_quantity"):
        if row.get(key) is not None:
            out[key] = format_decimal(row[key], lambda key=key: f"{where()}: {key}")
    if row.get("packages") is not None and row.get("package_size") is not None and int(row["package_size"]) > 1:
        out["package_size"] = int(row["package_size"])
        out["packages"] = int(row["packages"])
    if row.get("tier_formula"):
        out["tier_formula"] = str(row["tier_formula"])
    shown = profile.meters.get(row.get("meter_id")) if profile is not None else None
    if shown is not None:
        out["meter_name"] = shown.name
        out["display_unit"] = shown.unit
        out["display_decimals"] = shown.decimals
    return out


def _formula(line: Mapping, out: dict, currency: str, exponent: int) -> str:
    """Human text showing how a line's amount comes about (exact figures; the amount is rounded half-up once)."""
    cur = currency.upper()
    q, unit, price, amount = out["quantity"], out.get("display_unit") or out["unit"], out["unit_price"], out["amount"]
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
            if line.get("tier_formula"):
                return f"{head}; tiers: {line['tier_formula']} = {amount} {cur}"
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
        text = f"DRAFT: figures may still change as late usage arrives; this invoice is finalized on {finalized_on.isoformat()} (UTC). " + text
    return text


def _plain_json(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise InvoiceError(f"{what} is not JSON-serialisable ({e}); pass strings, numbers, lists and dicts") from None


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
    fct_anomaly_flags_by_day rows, ``plans`` the plans seed. A customer subscribed in the month must have an
    invoice, unless it has no usage in the month and no version of its plans has a base fee or a
    minimum charge (nothing to bill). One with usage and no subscription in the month has none to
    have: its usage must be named by a flag of ``OUTSIDE_SUBSCRIPTION_RULES``, else nobody would know
    it is billed to nobody.
    """
    start, end = checked_month(month), period_end(month)
    invoiced = set(invoiced)
    subscribed: dict[str, list[str]] = {}
    for sub in subscriptions:
        if sub["start_date"] < end and (sub["end_date"] is None or sub["end_date"] > start):
            subscribed.setdefault(sub["customer_id"], []).append(sub["plan_id"])
    used = {r["customer_id"] for r in usage if any((r[c] or 0) > 0 for c in ("usage", "gauge_peak", "gauge_integral"))}
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
