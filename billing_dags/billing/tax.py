"""Tax on an invoice: one line, computed once on the taxable subtotal (DESIGN rule 7).

Rules (decided here):

- **Base**: the period's charges (base fee, usage, discount, risk adjustment, minimum top-up: the
  subtotal *after* discounts) plus the adjustments that recompute earlier charges (a correction of a
  taxable supply is taxable at the same time it is billed). Not in the base: the credit balance carried
  from an earlier invoice (it already includes that invoice's tax) and prepaid credits. Prepaid credits
  are a means of payment drawn *after* tax: they settle the tax-inclusive amount due, as a customer
  balance does, so the tax charged never depends on which balance pays it, and a month whose credits
  cover everything still shows the tax it bears.
- **Arithmetic**: ``base_minor × rate_percent / 100``, exact, rounded once half-up (a tie goes away
  from zero, as ``div_half_up`` in SQL) to the currency's minor unit. Integers only, no float.
- **Zero rates** (reverse charge, exempt, out of scope) still give a tax line of 0.00 with the note
  saying why, so the invoice states its tax treatment.
"""

from __future__ import annotations

from dataclasses import asdict
from decimal import Decimal
from pathlib import Path

from billing_dags.billing.errors import InvoiceError
from billing_dags.core.money import format_decimal, format_minor
from billing_dags.seeds.catalog import load_invoice_profile
from billing_dags.seeds.invoicing import ISSUER_FILE, InvoiceProfile

TREATMENT_LABELS = {
    "standard": "",
    "reverse_charge": "reverse charge",
    "exempt": "exempt",
    "zero_rated": "zero-rated",
    "out_of_scope": "out of scope",
}


def invoice_profile(seeds_dir: Path) -> InvoiceProfile | None:
    """The issuer, customers' terms and tax rates of ``seeds_dir``; None for a seeds folder made by hand
    without ``issuer.csv`` (the seed assets require it): documents then have no tax line."""
    if not (Path(seeds_dir) / ISSUER_FILE).exists():
        return None
    return load_invoice_profile(seeds_dir)


def customer_rate(profile: InvoiceProfile | None, customer_id: str, name: str | None = None) -> dict | None:
    """The customer's tax rate (tax_code, name, rate_percent, treatment, note, jurisdiction): its
    customer_billing.csv row's, else the issuer's default; None without a profile (no tax line)."""
    if profile is None:
        return None
    return asdict(profile.terms(customer_id, name).tax)


def div_half_up(n: int, d: int) -> int:
    """``n / d`` rounded half-up (ties away from zero), for integers, ``d > 0``."""
    if d <= 0:
        raise InvoiceError(f"divisor {d} must be positive")
    q = (2 * abs(n) + d) // (2 * d)
    return q if n >= 0 else -q


def tax_minor(base_minor: int, rate_percent: Decimal | str | int) -> int:
    """The tax on ``base_minor`` minor units at ``rate_percent`` (e.g. ``19`` or ``"7.7"``), exact, rounded once half-up."""
    if isinstance(base_minor, bool) or not isinstance(base_minor, int):
        raise InvoiceError(f"taxable amount {base_minor!r} must be integer minor units")
    if isinstance(rate_percent, float):
        raise InvoiceError(f"tax rate {rate_percent!r} is a float; pass a Decimal or a decimal string (money is exact)")
    rate = Decimal(rate_percent)
    if not rate.is_finite() or not 0 <= rate <= 100:
        raise InvoiceError(f"tax rate {rate_percent!r} must be a percentage from 0 to 100")
    _, digits, exponent = rate.as_tuple()
    numerator = int("".join(map(str, digits)) or "0")
    scale = 10 ** max(0, -int(exponent))
    numerator *= 10 ** max(0, int(exponent))
    return div_half_up(base_minor * numerator, 100 * scale)


def rate_text(rate_percent: Decimal | str) -> str:
    """``19%``, ``7.7%``, ``0%``."""
    return f"{format_decimal(Decimal(rate_percent))}%"


def tax_block(rate: dict, base_minor: int, exponent: int) -> dict:
    """The invoice's ``tax`` object: the rate applied, its treatment and note, the base and the amount."""
    amount = tax_minor(base_minor, rate["rate_percent"])
    return {
        "tax_code": rate["tax_code"],
        "name": rate["name"],
        "rate_percent": format_decimal(Decimal(rate["rate_percent"])),
        "treatment": rate["treatment"],
        "note": rate.get("note") or "",
        "taxable": format_minor(base_minor, exponent),
        "taxable_minor": base_minor,
        "amount": format_minor(amount, exponent),
        "amount_minor": amount,
    }


def tax_line(ln: int, block: dict, currency: str) -> dict:
    """The invoice line of ``block`` (a ``tax_block``)."""
    cur = currency.upper()
    label = TREATMENT_LABELS.get(block["treatment"], block["treatment"])
    rate = rate_text(block["rate_percent"])
    description = f"{block['name']} {rate}" + (f" ({label})" if label else "") + f" on {block['taxable']} {cur}"
    formula = f"{block['taxable']} {cur} × {rate} = {block['amount']} {cur}" + (" (rounded half-up once)" if block["amount_minor"] else "")
    if block["note"]:
        formula += f"; {block['note']}"
    return {
        "line_number": ln,
        "line_type": "tax",
        "meter_id": None,
        "dimension": block["tax_code"],
        "description": description,
        "quantity": format_decimal(Decimal(block["rate_percent"])),
        "unit": "percent",
        "unit_price": block["taxable"],
        "amount": block["amount"],
        "amount_minor": block["amount_minor"],
        "formula": formula,
    }
