"""The invoice document: its schema version, statuses and line types, and what of it counts as the period's charges.

An invoice's lines are the period's charges (from ``fct_invoice_lines``) followed by the lines the
builder adds (``GENERATED_LINE_TYPES``: adjustments of earlier invoices, the tax line, prepaid credits, a
carry-forward). Only the charges are compared when a finalized month is recomputed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

from billing_dags.billing.errors import InvoiceError
from billing_dags.seeds.catalog import SAFE_ID_RE

SCHEMA_VERSION = 1
STATUSES = ("draft", "finalized")
#: charge line types fct_invoice_lines produces today; another safe identifier is accepted as a charge too
LINE_TYPES = ("base_fee", "usage", "discount", "risk_adjustment", "minimum_charge")
#: lines the invoice builder adds after the charges (never accepted from fct_invoice_lines)
GENERATED_LINE_TYPES = ("adjustment", "tax", "credit", "carry_forward")


def safe_customer_id(value: Any, where: str) -> str:
    """``value`` if it is a safe customer identifier (it names files), else an InvoiceError saying where."""
    if not isinstance(value, str) or not SAFE_ID_RE.match(value):
        raise InvoiceError(
            f"{where}: customer_id {value!r} is not a safe identifier (lowercase letters, digits, '_', '-', '.', "
            "at most 63 characters, starting with a letter or digit); fix it in seeds/customers.csv"
        )
    return value


def charge_lines(invoice: Mapping) -> list[Mapping]:
    """The period's own lines (from fct_invoice_lines), without the generated ones."""
    return [l for l in invoice["lines"] if l["line_type"] not in GENERATED_LINE_TYPES]


def charges_minor(invoice: Mapping) -> int:
    """The period's own charges: the sum of the lines from fct_invoice_lines (before adjustments and credits)."""
    return sum(int(l["amount_minor"]) for l in charge_lines(invoice))


def figures(invoice: Mapping) -> tuple:
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
        for l in sorted(charge_lines(invoice), key=lambda l: int(l["line_number"]))
    )
    return (invoice["currency"], invoice.get("plan_id"), invoice.get("plan_version"), charges_minor(invoice), lines)


def carried_adjustments(stored: Iterable[Mapping], excluded_month: str) -> dict[tuple[str, str], int]:
    """What the adjustment lines of the finalized invoices in ``stored``, except those of ``excluded_month``
    (``YYYY-MM``), already carried: {(kind, source month): minor units}."""
    carried: dict[tuple[str, str], int] = {}
    for d in stored:
        if d.get("status") != "finalized" or d["period_start"][:7] == excluded_month:
            continue
        for line in d["lines"]:
            src = line.get("adjusts")
            if line.get("line_type") == "adjustment" and isinstance(src, dict):
                key = (src.get("kind"), src.get("month"))
                carried[key] = carried.get(key, 0) + int(line["amount_minor"])
    return carried
