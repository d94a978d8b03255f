"""Prepaid credits: grants from ``seeds/credits.csv``, drawn down by invoices (DESIGN rules 7, 8, 11).

``seeds/credits.csv`` columns: ``grant_id`` (safe identifier, unique), ``customer_id`` (in
customers.csv), ``currency`` (the customer's currency), ``amount`` (> 0, at most the currency's
minor digits: 100.00 usd, 5000 jpy), ``granted_on`` (date), ``expires_on`` (date, exclusive: the
grant is usable on days before it; empty = never expires), ``description`` (shown on invoices).

Rules (decided here):

- **Usable by a month's invoice** when ``granted_on < period_end`` (granted before the period
  closed, even mid-period) and ``expires_on`` is empty or ``period_end <= expires_on`` (it had
  not expired when the period closed: a grant valid through the last day of the period counts).
- **Draw order**: ``expires_on`` ascending (never-expiring last), then ``granted_on``, then
  ``grant_id``; each grant gives ``min(its balance, what is still due)``.
- **Balance of a grant for month M** = amount − the draws recorded on the stored invoices
  (``<invoices>/YYYY-MM/<customer>.json``, credit lines carry ``grant_id``) of every finalized
  invoice of another month, earlier or later (a finalized draw stands), and of every draft of an
  earlier month. So drafts draw in month order from what the finalized draws leave, and the draws
  of all stored invoices of a grant add up to at most its amount: a month held in draft (a
  critical flag) and recomputed after a later month was finalized draws only what that one left.
  A month's run settles the customer's stored drafts of other months again in month order
  (``invoices.settle_drafts``), so a draft always shows what it would draw if rerun, and
  rerunning an unchanged draft reproduces it byte for byte.
- Everything is integer minor units; no float touches an amount.

The ledger view ``<invoices>/credits_ledger.json`` lists every grant with each invoice's draw and
the balance after it, derived from the grants and the stored invoices, deterministically.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Iterable, Mapping


from . import seeds as _seeds
from .seeds import SeedError

CREDITS_FILE = "credits.csv"
LEDGER_FILE = "credits_ledger.json"
SCHEMA_VERSION = 1

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


# --------------------------------------------------------------------------- reading and validation


def read_credit_rows(seeds_dir: Path | str) -> list[dict]:
    """The parsed rows of ``seeds/credits.csv`` (columns checked one by one, no references yet)."""
    return _seeds.read_seed(Path(seeds_dir), "credits").to_pylist()


def validate_grants(rows: Iterable[Mapping], customers: Iterable[Mapping], currencies: Iterable[Mapping], *, source: Path | str = "seeds/credits.csv") -> list[Grant]:
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
            raise SeedError(f"{where}: column currency: {cur!r} is not the currency of customer {cid!r} ({by_customer[cid]['currency']!r}); grant credits in the customer's currency")
        exp = exponents[cur]
        minor = amount.scaleb(exp)
        if minor != minor.to_integral_value():
            raise SeedError(
                f"{where}: column amount: {amount} has more decimal places than {cur} allows ({exp}); "
                f"round the grant to {exp} decimal place{'s' if exp != 1 else ''}"
            )
        granted_on, expires_on = r["granted_on"], r.get("expires_on")
        if expires_on is not None and expires_on <= granted_on:
            raise SeedError(f"{where}: column expires_on: {expires_on} is not after granted_on {granted_on} (expires_on is exclusive); fix the dates or leave expires_on empty")
        out.append(Grant(r["grant_id"], cid, cur, int(minor), granted_on, expires_on, r.get("description") or "", int(r.get("seed_line") or 0)))
    return sorted(out, key=lambda g: (g.customer_id, g.order))


def load_grants(seeds_dir: Path | str, customers: Iterable[Mapping], currencies: Iterable[Mapping]) -> list[Grant]:
    """Read and validate ``seeds/credits.csv`` against the given customer and currency rows."""
    seeds_dir = Path(seeds_dir)
    return validate_grants(read_credit_rows(seeds_dir), customers, currencies, source=seeds_dir / CREDITS_FILE)


# --------------------------------------------------------------------------- the ledger


def stored_invoices(invoices_dir: Path, customer_id: str | None = None) -> list[dict]:
    """Every stored invoice JSON (``YYYY-MM/<customer>.json``), optionally of one customer, in (month, customer) order."""
    pattern = f"????-??/{customer_id}.json" if customer_id else "????-??/*.json"
    docs = []
    for f in sorted(Path(invoices_dir).glob(pattern)):
        doc = _stored_invoice(f)
        if doc is not None:
            docs.append(doc)
    return sorted(docs, key=lambda d: (d["period_start"], d["customer_id"]))


def _stored_invoice(f: Path) -> dict | None:
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SeedError(f"{f}: stored invoice is unreadable ({e}); restore it from backup") from None
    return doc if isinstance(doc, dict) and "customer_id" in doc and "lines" in doc else None


_MONTH_DIR = re.compile(r"(?s).{4}-.{2}")  # the glob ????-??


class StoredInvoices:
    """The folders under ``invoices_dir`` listed once, for many per-customer look-ups (building a month
    of 10,000 invoices): ``invoices(cid)`` is ``stored_invoices(invoices_dir, cid)`` and ``pending(cid)``
    is ``sorted(invoices_dir.glob("????-??/pending_adjustments/<cid>.json"))``, without two globs per
    customer. Files are read when asked for; the listing is taken when the object is made."""

    def __init__(self, invoices_dir: Path, pending_dir: str = "pending_adjustments") -> None:
        self.dir = Path(invoices_dir)
        self.pending_dir = pending_dir
        self.months: list[tuple[str, frozenset[str], frozenset[str]]] = []  # (folder, file names, pending file names)
        try:
            entries = sorted((e.name for e in os.scandir(self.dir) if _MONTH_DIR.fullmatch(e.name) and e.is_dir()))
        except (FileNotFoundError, NotADirectoryError):
            entries = []
        for name in entries:
            names = frozenset(os.listdir(self.dir / name))
            pending = frozenset()
            if pending_dir in names and (self.dir / name / pending_dir).is_dir():
                pending = frozenset(os.listdir(self.dir / name / pending_dir))
            self.months.append((name, names, pending))

    def invoices(self, customer_id: str) -> list[dict]:
        file = f"{customer_id}.json"
        docs = []
        for name, names, _ in self.months:
            if file in names:
                f = self.dir / name / file
                if not f.exists():  # a dangling link, as the glob skips it
                    continue
                doc = _stored_invoice(f)
                if doc is not None:
                    docs.append(doc)
        return sorted(docs, key=lambda d: (d["period_start"], d["customer_id"]))

    def pending(self, customer_id: str) -> list[Path]:
        file = f"{customer_id}.json"
        return [f for name, _, pending in self.months if file in pending and (f := self.dir / name / self.pending_dir / file).exists()]


def draws_of(invoice: Mapping) -> dict[str, int]:
    """What an invoice drew from each grant: {grant_id: minor units (positive)}."""
    out: dict[str, int] = {}
    for line in invoice.get("lines", []):
        if line.get("line_type") == "credit" and line.get("grant_id"):
            out[line["grant_id"]] = out.get(line["grant_id"], 0) - int(line["amount_minor"])
    return out


def drawn_before(invoices: Iterable[Mapping], period_start: str) -> list[dict]:
    """The stored invoices (of one customer) whose draws come before those of its invoice starting on
    ``period_start`` (ISO date): every finalized invoice of another month and every draft of an earlier month."""
    return [
        d for d in invoices
        if d["period_start"] != period_start and (d.get("status") == "finalized" or d["period_start"] < period_start)
    ]


def balances_before(grants: Iterable[Grant], earlier_invoices: Iterable[Mapping]) -> dict[str, int]:
    """Balance of each grant (minor units) after the draws of ``earlier_invoices`` (see ``drawn_before``)."""
    bal = {g.grant_id: g.amount_minor for g in grants}
    for inv in earlier_invoices:
        for gid, drawn in draws_of(inv).items():
            if gid in bal:
                bal[gid] -= drawn
    return bal


def draw(grants: Iterable[Grant], balances: Mapping[str, int], due_minor: int, period_start: date, period_end: date) -> list[dict]:
    """Draws against ``due_minor`` from the usable grants in draw order; never more than is due or available.

    Returns ``[{"grant": Grant, "available_minor", "drawn_minor", "remaining_minor"}]`` for grants
    that give something (nothing when ``due_minor <= 0``)."""
    left = max(int(due_minor), 0)
    out = []
    for g in sorted((g for g in grants if g.usable_for(period_start, period_end)), key=lambda g: g.order):
        if left <= 0:
            break
        available = int(balances.get(g.grant_id, g.amount_minor))
        if available <= 0:
            continue
        take = min(available, left)
        left -= take
        out.append({"grant": g, "available_minor": available, "drawn_minor": take, "remaining_minor": available - take})
    return out


def ledger(grants: Iterable[Grant], invoices: Iterable[Mapping], exponents: Mapping[str, int]) -> dict:
    """The credits ledger: each grant with every invoice draw (in month order) and the balance after it."""
    from .invoices import format_minor

    invoices = sorted(invoices, key=lambda d: (d["period_start"], d["customer_id"]))
    known = {g.grant_id: g for g in grants}
    rows: dict[str, dict] = {}
    for g in sorted(known.values(), key=lambda g: (g.customer_id, g.order)):
        exp = int(exponents.get(g.currency, 2))
        rows[g.grant_id] = {
            "grant_id": g.grant_id,
            "customer_id": g.customer_id,
            "currency": g.currency,
            "amount": format_minor(g.amount_minor, exp),
            "amount_minor": g.amount_minor,
            "granted_on": g.granted_on.isoformat(),
            "expires_on": g.expires_on.isoformat() if g.expires_on else None,
            "description": g.description,
            "draws": [],
            "balance_minor": g.amount_minor,
        }
    for inv in invoices:
        for gid, drawn in sorted(draws_of(inv).items()):
            row = rows.get(gid)
            if row is None:  # a grant removed from the seeds after an invoice drew from it
                row = rows[gid] = {
                    "grant_id": gid, "customer_id": inv["customer_id"], "currency": inv["currency"], "amount": None,
                    "amount_minor": None, "granted_on": None, "expires_on": None,
                    "description": "not in seeds/credits.csv any more", "draws": [], "balance_minor": None,
                }
            if row["balance_minor"] is not None:
                row["balance_minor"] -= drawn
            row["draws"].append(
                {
                    "month": inv["period_start"][:7],
                    "invoice_number": inv["invoice_number"],
                    "status": inv["status"],
                    "drawn_minor": drawn,
                    "balance_after_minor": row["balance_minor"],
                }
            )
    out = []
    for row in rows.values():
        exp = int(exponents.get(row["currency"], 2))
        for d in row["draws"]:
            d["drawn"] = format_minor(d["drawn_minor"], exp)
            d["balance_after"] = None if d["balance_after_minor"] is None else format_minor(d["balance_after_minor"], exp)
        row["balance"] = None if row["balance_minor"] is None else format_minor(row["balance_minor"], exp)
        row["overdrawn"] = row["balance_minor"] is not None and row["balance_minor"] < 0
        out.append(row)
    out.sort(key=lambda r: (r["customer_id"], r["grant_id"]))
    return {"schema_version": SCHEMA_VERSION, "grants": out}


def write_ledger(paths, grants: Iterable[Grant], exponents: Mapping[str, int]) -> dict:
    """Write ``<invoices>/credits_ledger.json`` from the grants and every stored invoice (only when its bytes change).
    Returns {"path", "written", "grants", "overdrawn"}."""
    from .durable import write_bytes
    from .invoices import _json_bytes

    doc = ledger(grants, stored_invoices(paths.invoices), exponents)
    data = _json_bytes(doc)
    path = Path(paths.invoices) / LEDGER_FILE
    written = not (path.exists() and path.read_bytes() == data)
    if written:
        write_bytes(path, data)
    return {"path": str(path), "written": written, "grants": len(doc["grants"]), "overdrawn": [r["grant_id"] for r in doc["grants"] if r["overdrawn"]]}
