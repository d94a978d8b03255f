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
  (``settlement.settle_drafts``), so a draft always shows what it would draw if rerun, and
  rerunning an unchanged draft reproduces it byte for byte.
- Everything is integer minor units; no float touches an amount.

The ledger view ``<invoices>/credits_ledger.json`` lists every grant with each invoice's draw and
the balance after it, derived from the grants and the stored invoices, deterministically.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from datetime import date
from pathlib import Path

from billing_dags.core import durable
from billing_dags.core.money import format_minor
from billing_dags.seeds.credits import Grant
from billing_dags.seeds.errors import SeedError

LEDGER_FILE = "credits_ledger.json"
SCHEMA_VERSION = 1


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
    """A stored invoice JSON, read for an update (``durable.read_for_update``: settling a draft rewrites it)."""
    try:
        data = durable.read_for_update(f)
        if data is None:
            return None
        doc = json.loads(data.decode("utf-8"))
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
            entries = sorted(e.name for e in os.scandir(self.dir) if _MONTH_DIR.fullmatch(e.name) and e.is_dir())
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
    return [d for d in invoices if d["period_start"] != period_start and (d.get("status") == "finalized" or d["period_start"] < period_start)]


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
                    "grant_id": gid,
                    "customer_id": inv["customer_id"],
                    "currency": inv["currency"],
                    "amount": None,
                    "amount_minor": None,
                    "granted_on": None,
                    "expires_on": None,
                    "description": "not in seeds/credits.csv any more",
                    "draws": [],
                    "balance_minor": None,
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
    doc = ledger(grants, stored_invoices(paths.invoices), exponents)
    data = durable.canonical_json(doc)
    path = Path(paths.invoices) / LEDGER_FILE
    written = not (path.exists() and path.read_bytes() == data)
    if written:
        durable.write_bytes(path, data)
    return {"path": str(path), "written": written, "grants": len(doc["grants"]), "overdrawn": [r["grant_id"] for r in doc["grants"] if r["overdrawn"]]}
