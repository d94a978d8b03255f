"""Prepaid credit grants of ``seeds/credits.csv``: parsed and validated against customers and currencies.

Columns: ``grant_id`` (safe identifier, unique), ``customer_id`` (in customers.csv), ``currency``
(the customer's currency), ``amount`` (> 0, at most the currency's minor digits), ``granted_on``,
``expires_on`` (exclusive; empty = never expires), ``description`` (shown on invoices). How
invoices draw them down is billing's (billing/credits.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from pathlib import Path

from billing_dags.seeds.errors import SeedError

CREDITS_FILE = "credits.csv"


@dataclass(frozen=True)
class Grant:
    grant_id: str
    customer_id: str
    currency: str
    amount_minor: int
    granted_on: date
    expires_on: date | None
    description: str
    seed_line: int = 0

    def usable_for(self, period_start: date, period_end: date) -> bool:
        """Granted before the period closed and not expired when it closed (expires_on exclusive)."""
        return self.granted_on < period_end and (self.expires_on is None or period_end <= self.expires_on)

    @property
    def order(self) -> tuple:
        return (self.expires_on is None, self.expires_on or date.max, self.granted_on, self.grant_id)


def validate_grants(
    rows: Iterable[Mapping], customers: Iterable[Mapping], currencies: Iterable[Mapping], *, source: Path | str = "seeds/credits.csv"
) -> list[Grant]:
    """Grants from parsed credit rows, checked against customers and currencies.

    Every problem names the file, the line, the column and the fix: an amount that is not > 0 or
    has more decimals than the currency allows, an unknown customer or currency, a currency that is
    not the customer's, an expiry not after the grant date.
    """
    by_customer = {c["customer_id"]: c for c in customers}
    exponents = {c["currency"]: int(c["minor_unit_exponent"]) for c in currencies}
    out: list[Grant] = []
    for r in rows:
        where = f"{source}:{r.get('seed_line', '?')}"
        amount = r["amount"]
        if isinstance(amount, float) or not isinstance(amount, (Decimal, int, str)):
            raise SeedError(f"{where}: column amount: {amount!r} is not an exact decimal; write it as a decimal number")
        amount = Decimal(str(amount)) if not isinstance(amount, Decimal) else amount
        amount = amount.normalize() if amount != amount.to_integral_value() else amount.quantize(Decimal(1))
        if not amount > 0:
            raise SeedError(f"{where}: column amount: {amount} must be greater than 0; remove the row or give a positive amount")
        cid = r["customer_id"]
        if cid not in by_customer:
            raise SeedError(f"{where}: column customer_id: customer {cid!r} is not in customers.csv; add the customer or fix the id")
        cur = r["currency"]
        if cur not in exponents:
            raise SeedError(f"{where}: column currency: {cur!r} is not in currencies.csv; add it there")
        if cur != by_customer[cid]["currency"]:
            raise SeedError(
                f"{where}: column currency: {cur!r} is not the currency of customer {cid!r} ({by_customer[cid]['currency']!r}); "
                f"grant credits in the customer's currency"
            )
        exp = exponents[cur]
        minor = amount.scaleb(exp)
        if minor != minor.to_integral_value():
            raise SeedError(
                f"{where}: column amount: {amount} has more decimal places than {cur} allows ({exp}); "
                f"round the grant to {exp} decimal place{'s' if exp != 1 else ''}"
            )
        granted_on, expires_on = r["granted_on"], r.get("expires_on")
        if expires_on is not None and expires_on <= granted_on:
            raise SeedError(
                f"{where}: column expires_on: {expires_on} is not after granted_on {granted_on} (expires_on is exclusive); "
                f"fix the dates or leave expires_on empty"
            )
        out.append(Grant(r["grant_id"], cid, cur, int(minor), granted_on, expires_on, r.get("description") or "", int(r.get("seed_line") or 0)))
    return sorted(out, key=lambda g: (g.customer_id, g.order))
