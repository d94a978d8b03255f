"""Settlement: what follows an invoice's charges — adjustments of earlier invoices, prepaid credits, a carry-forward.

Rules (decided here):

- **Adjustments** follow the charges: for each earlier month M of the customer whose finalized charges were
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
- **Tax** then: one ``tax`` line on the charges plus the recompute adjustments, at the customer's rate
  (``billing_dags.billing.tax``: after discounts, before prepaid credits; a carried credit balance already
  includes its tax and is not taxed again).
- **Credits** then: prepaid grants drawn in expiry order against charges + adjustments (see
  ``billing_dags.billing.credits``: drafts draw in month order after every finalized draw), as negative
  ``credit`` lines; ``settle_drafts`` keeps the stored drafts of other months in step.
- **Never below zero**: if charges + adjustments are negative, a ``carry_forward`` line brings the
  total to 0 and the amount is owed back as an ``adjustment`` line (a credit) on the customer's
  next invoice. The total due is always the sum of all lines.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from billing_dags.billing import credits as _credits
from billing_dags.billing.document import carried_adjustments, charge_lines
from billing_dags.billing.errors import InvoiceError
from billing_dags.billing.manifest import recompute_reason
from billing_dags.billing.periods import checked_month, period_end
from billing_dags.billing.store import PENDING_DIR, invoice_files, read_pending, read_stored, withdraw, write_files
from billing_dags.billing.tax import tax_block, tax_line
from billing_dags.core import durable
from billing_dags.core.money import format_minor, format_price
from billing_dags.core.settings import Paths
from billing_dags.seeds.catalog import SAFE_ID_RE


def open_adjustments(paths: Paths, cid: str, month: date, stored: list[dict], currency: str, exp: int, pending_files: list[Path] | None = None) -> list[dict]:
    """What earlier invoices of ``cid`` still leave to settle on the invoice of ``month``.

    Two sources, each of a month before ``month``: a finalized invoice whose recomputed charges
    differ (``<M>/pending_adjustments/<cid>.json``: recomputed − finalized charges), and an invoice
    whose charges plus adjustments were negative (its ``carried_forward_minor``, owed back as a
    credit). What adjustment lines of *finalized* invoices of other months already carried is
    subtracted, so an amount is carried once; drafts show it without consuming it.
    """
    mk = f"{month:%Y-%m}"
    carried = carried_adjustments(stored, mk)
    by_month = {d["period_start"][:7]: d for d in stored}
    out: list[dict] = []
    if pending_files is None:
        pending_files = sorted(paths.invoices.glob(f"????-??/{PENDING_DIR}/{cid}.json"))
    for f in pending_files:
        src = f.parent.parent.name
        if src >= mk:
            continue
        pend = read_pending(f)
        if pend.get("currency") != currency:
            raise InvoiceError(
                f"{f}: adjustment in {pend.get('currency')!r} cannot go on {cid}'s {mk} invoice in {currency!r}; settle it by hand and remove the file"
            )
        fin = int(pend.get("finalized_charges_minor", pend.get("finalized_total_minor", 0)))
        rec = int(pend.get("recomputed_charges_minor", pend.get("recomputed_total_minor", 0)))
        done = carried.get(("recompute", src), 0)
        amount = rec - fin - done
        if amount == 0:
            continue
        number = pend.get("finalized_invoice_number") or src
        reason = recompute_reason(by_month.get(src), pend.get("recomputed_manifest"))
        text = f"usage of {src} recomputed after {reason}: {number} charges {format_minor(fin, exp)} -> {format_minor(rec, exp)}"
        if done:
            text += f" ({format_minor(done, exp)} already adjusted)"
        out.append(
            {
                "kind": "recompute",
                "month": src,
                "invoice_number": number,
                "amount_minor": amount,
                "description": text,
                "formula": f"recomputed {format_minor(rec, exp)} − finalized {format_minor(fin, exp)}"
                + (f" − already adjusted {format_minor(done, exp)}" if done else "")
                + f" = {format_minor(amount, exp)} {currency.upper()}",
            }
        )
    for d in stored:
        src = d["period_start"][:7]
        owed = int(d.get("carried_forward_minor") or 0)
        if src >= mk or not owed:
            continue
        amount = -owed - carried.get(("carry_forward", src), 0)
        if amount == 0:
            continue
        out.append(
            {
                "kind": "carry_forward",
                "month": src,
                "invoice_number": d["invoice_number"],
                "amount_minor": amount,
                "description": f"credit balance carried from {d['invoice_number']} ({src})",
                "formula": f"{format_minor(owed, exp)} {currency.upper()} owed back by {d['invoice_number']} = {format_minor(amount, exp)} {currency.upper()}",
            }
        )
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
    charges: list[dict],
    charges_minor: int,
    adjustments: list[dict],
    grants: list[_credits.Grant],
    drawn_before: list[dict],
    month: date,
    end: date,
    currency: str,
    exp: int,
    credit_note: bool = False,
    tax_rate: Mapping | None = None,
) -> tuple[list[dict], dict]:
    """The lines after the charges (adjustments, credits, carry-forward) and the invoice's summary figures.

    ``drawn_before``: the stored invoices whose credit draws come first (``credits.drawn_before``).
    A ``credit_note`` (an adjustment invoice) keeps a negative total: it is refunded, not carried.
    ``tax_rate`` (tax_code, name, rate_percent, treatment, note): the tax line's rate; None = no tax line."""
    cur = currency.upper()
    fmt = lambda m: format_minor(m, exp)  # noqa: E731
    ln = max((l["line_number"] for l in charges), default=0) + 1
    extra: list[dict] = []
    for a in adjustments:
        extra.append(
            _generated_line(
                ln,
                "adjustment",
                a["amount_minor"],
                exp,
                dimension=a["month"],
                description=a["description"],
                unit="adjustment",
                adjusts={"kind": a["kind"], "month": a["month"], "invoice_number": a["invoice_number"]},
                formula=a["formula"],
            )
        )
        ln += 1
    adjustments_minor = sum(a["amount_minor"] for a in adjustments)
    subtotal = charges_minor + adjustments_minor
    tax = None
    due = subtotal
    if tax_rate is not None:
        taxable = charges_minor + sum(a["amount_minor"] for a in adjustments if a["kind"] == "recompute")
        tax = tax_block(dict(tax_rate), taxable, exp)
        extra.append(tax_line(ln, tax, currency))
        ln += 1
        due += tax["amount_minor"]
    balances = _credits.balances_before(grants, drawn_before)
    draws = _credits.draw(grants, balances, due, month, end)
    for d in draws:
        g = d["grant"]
        until = f"usable through {(g.expires_on - timedelta(days=1)).isoformat()}" if g.expires_on else "no expiry"
        label = f"{g.description}; {until}" if g.description else until
        extra.append(
            _generated_line(
                ln,
                "credit",
                -d["drawn_minor"],
                exp,
                dimension=g.grant_id,
                unit="credit",
                grant_id=g.grant_id,
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
                ln,
                "carry_forward",
                carried_forward,
                exp,
                unit="adjustment",
                description="negative balance carried to the next invoice as a credit (a total is never below zero)",
                formula=f"charges and adjustments {fmt(subtotal)} {cur}"
                + (f" and tax {fmt(tax['amount_minor'])} {cur}" if tax else "")
                + f" < 0: {fmt(carried_forward)} {cur} carried forward, total 0",
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
        **({"tax": tax} if tax is not None else {}),
        "credits_used": fmt(credits_used),
        "credits_used_minor": credits_used,
        "credits": credit_rows,
        "carried_forward": fmt(carried_forward),
        "carried_forward_minor": carried_forward,
    }
    return extra, summary


def settle(
    charges: list[dict],
    adjustments: list[dict],
    grants: Iterable[_credits.Grant],
    stored: list[dict],
    month: date,
    currency: str,
    exp: int,
    credit_note: bool = False,
    tax_rate: Mapping | None = None,
) -> dict:
    """The lines (the charge lines ``charges``, then what ``_settle`` adds), summary figures and total of a
    customer's invoice of ``month``; ``stored`` are the customer's stored invoices (credit draws of other months);
    ``tax_rate``: the customer's rate (see ``_settle``), None for an invoice without a tax line."""
    charges_minor = sum(line["amount_minor"] for line in charges)
    extra, summary = _settle(
        charges,
        charges_minor,
        adjustments,
        [g for g in grants if g.currency == currency],
        _credits.drawn_before(stored, month.isoformat()),
        month,
        period_end(month),
        currency,
        exp,
        credit_note,
        tax_rate,
    )
    lines = [*charges, *extra]
    total_minor = sum(line["amount_minor"] for line in lines)
    return {"lines": lines, **summary, "total": format_minor(total_minor, exp), "total_minor": total_minor}


def adjustment_document(adjustments: list[dict], total_minor: int) -> dict:
    """The fields that make an invoice an adjustment invoice: its kind and the finalized invoices it corrects."""
    return {
        "document": "credit_note" if total_minor < 0 else "adjustment_invoice",
        "corrects": sorted({a["invoice_number"] for a in adjustments}),
    }


def settle_drafts(paths: Paths, month: date, invoices: Iterable[Mapping], grants: Iterable[_credits.Grant]) -> list[str]:
    """After ``write_invoice_files`` of ``month``: settle the stored drafts of those customers in other
    months again, in month order, from their stored charge lines (adjustment, credit and carry-forward
    lines and totals recomputed; see ``credits.drawn_before``), so that every stored draft shows what
    rerunning it gives and the draws of all stored invoices never exceed a grant. A draft adjustment
    invoice left with nothing to adjust (in any month, ``month`` included) is withdrawn: its files are
    removed. Returns the paths written or removed."""
    month_iso = checked_month(month).isoformat()
    mk = month_iso[:7]
    grants = list(grants)
    index = _credits.StoredInvoices(paths.invoices, PENDING_DIR)
    billed = {d["customer_id"] for d in invoices}
    changed: list[str] = []
    for name, names, _ in index.months:
        for file in sorted(names) if name == mk else ():  # this month's draft adjustment invoices not issued again
            cid = file[: -len(".json")]
            if file.endswith(".json") and cid not in billed and SAFE_ID_RE.match(cid):
                doc = read_stored(paths.invoices / name / file)
                if doc and doc.get("status") == "draft" and doc.get("document"):
                    changed += withdraw(paths, month, cid)
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
            adjustments = open_adjustments(paths, cid, start, stored, currency, exp, index.pending(cid))
            position = stored.index(doc)
            if doc.get("document") and not adjustments:
                changed += withdraw(paths, start, cid)
                del stored[position]
                continue
            settled = settle(charge_lines(doc), adjustments, own, stored, start, currency, exp, credit_note=bool(doc.get("document")), tax_rate=doc.get("tax"))
            new = {**doc, **settled}
            if doc.get("document"):
                new.update(adjustment_document(adjustments, settled["total_minor"]))
            stored[position] = new
            write_files(invoice_files(paths, start, cid), new, changed, [], durable.write_bytes)
    return changed
