"""What an invoice document says besides its figures: who issues it, who it is billed to, when it is due,
which tax applies, and how meters are named (``issuer.csv``, ``customer_billing.csv``, ``tax_rates.csv``,
``meter_display.csv``; columns in seeds/README.md).

Rules (decided here):

- **One issuer**: ``issuer.csv`` has exactly one row; its ``payment_terms_days`` and ``tax_code`` are the
  defaults of every customer.
- **Bill-to**: a customer's row of ``customer_billing.csv``; a customer without one is billed under its
  name in customers.csv, on the issuer's defaults (the demo seeds have a row for every customer).
- **Tax rate of a customer**: its own ``tax_code`` if given, else the rate whose ``jurisdiction`` is the
  customer's ``country``, else the issuer's ``tax_code``. A jurisdiction names at most one rate.
- **A zero rate needs a reason**: rate 0 only with a treatment other than ``standard`` (``reverse_charge``,
  ``exempt``, ``zero_rated``, ``out_of_scope``) and a ``note`` printed on the invoice; a ``reverse_charge``
  customer needs a ``tax_id`` (the recipient accounts for the tax under its own registration).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from billing_dags.seeds.errors import SeedError

ISSUER_FILE = "issuer.csv"
CUSTOMER_BILLING_FILE = "customer_billing.csv"
TAX_RATES_FILE = "tax_rates.csv"
METER_DISPLAY_FILE = "meter_display.csv"
#: how a rate applies; every treatment but ``standard`` has rate 0 and a note saying why
TAX_TREATMENTS = {"standard", "reverse_charge", "exempt", "zero_rated", "out_of_scope"}
COUNTRY_RE = re.compile(r"^[A-Z]{2}$")
JURISDICTION_RE = re.compile(r"^[A-Z]{2}(-[A-Z0-9]{1,3})?$")
EMAIL_RE = re.compile(r"^[^@\s,;]+@[^@\s,;]+\.[^@\s,;]+$")
MAX_TERMS_DAYS = 365


def country(value: str) -> str:
    if not COUNTRY_RE.match(value):
        raise ValueError(f"{value!r} is not an ISO 3166-1 alpha-2 country code in capitals (e.g. US, DE)")
    return value


def jurisdiction(value: str) -> str:
    if not JURISDICTION_RE.match(value):
        raise ValueError(f"{value!r} is not a country code (e.g. DE) or an ISO 3166-2 subdivision (e.g. US-CA)")
    return value


def email(value: str) -> str:
    if not EMAIL_RE.match(value):
        raise ValueError(f"{value!r} is not an e-mail address")
    return value


def required_text(value: str) -> str:
    if not value.strip() or any(ord(c) < 32 for c in value):
        raise ValueError("must be non-empty text without control characters")
    return value.strip()


def terms_days(value: str) -> int:
    try:
        days = int(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a whole number of days") from None
    if not 0 <= days <= MAX_TERMS_DAYS:
        raise ValueError(f"{value!r} must be 0 (due on receipt) to {MAX_TERMS_DAYS} days")
    return days


def address_lines(value: str) -> tuple[str, ...]:
    """An address cell: lines separated by ``;``."""
    return tuple(part.strip() for part in value.split(";") if part.strip())


@dataclass(frozen=True)
class TaxRate:
    tax_code: str
    name: str
    rate_percent: Decimal
    treatment: str
    note: str
    jurisdiction: str | None = None


@dataclass(frozen=True)
class Party:
    """An issuer or bill-to block as printed on an invoice."""

    name: str
    address: tuple[str, ...] = ()
    country: str | None = None
    tax_id: str | None = None
    email: str | None = None

    def as_json(self) -> dict:
        return {"name": self.name, "address": list(self.address), "country": self.country, "tax_id": self.tax_id, "email": self.email}


@dataclass(frozen=True)
class MeterDisplay:
    name: str
    unit: str
    decimals: int


@dataclass(frozen=True)
class CustomerTerms:
    """What a customer's invoice says besides its figures."""

    bill_to: Party
    payment_terms_days: int
    tax: TaxRate


@dataclass(frozen=True)
class InvoiceProfile:
    """The issuer, each customer's terms and the meters' display names, validated together."""

    issuer: Party
    default_terms_days: int
    default_tax: TaxRate
    customers: Mapping[str, CustomerTerms] = field(default_factory=dict)
    meters: Mapping[str, MeterDisplay] = field(default_factory=dict)

    def terms(self, customer_id: str, name: str | None = None) -> CustomerTerms:
        """The customer's terms; one without a customer_billing.csv row gets its name and the issuer's defaults."""
        found = self.customers.get(customer_id)
        if found is not None:
            return found
        return CustomerTerms(Party(name or customer_id), self.default_terms_days, self.default_tax)


def validate_profile(
    issuer_rows: list[dict],
    tax_rows: list[dict],
    billing_rows: list[dict],
    display_rows: list[dict],
    customers: Iterable[Mapping],
    meters: Iterable[Mapping],
    seeds_dir: Path,
) -> InvoiceProfile:
    """Check the four files against each other, customers.csv and meters.csv; a SeedError names the file, line and fix."""

    def fail(file: str, row: Mapping | None, problem: str) -> SeedError:
        line = f":{row['seed_line']}" if row is not None else ""
        return SeedError(f"{Path(seeds_dir) / file}{line}: {problem}")

    rates: dict[str, TaxRate] = {}
    by_jurisdiction: dict[str, dict] = {}
    for r in tax_rows:
        rate = r["rate_percent"]
        if r["treatment"] == "standard" and rate == 0:
            raise fail(
                TAX_RATES_FILE,
                r,
                "rate_percent 0 with treatment standard: a zero rate needs its reason; set treatment to reverse_charge, exempt, zero_rated or "
                "out_of_scope and say why in note",
            )
        if r["treatment"] != "standard" and rate != 0:
            raise fail(
                TAX_RATES_FILE,
                r,
                (f"treatment {r['treatment']} charges no tax but rate_percent is {rate}; set rate_percent to 0 or treatment to standard"),
            )
        if rate == 0 and not r["note"].strip():
            raise fail(
                TAX_RATES_FILE,
                r,
                (f"a {r['treatment']} rate of 0 needs a note printed on the invoice saying why (e.g. the legal basis of a reverse charge)"),
            )
        if r["jurisdiction"] is not None:
            if r["jurisdiction"] in by_jurisdiction:
                raise fail(
                    TAX_RATES_FILE,
                    r,
                    f"jurisdiction {r['jurisdiction']} already has tax_code {by_jurisdiction[r['jurisdiction']]['tax_code']!r} "
                    f"(line {by_jurisdiction[r['jurisdiction']]['seed_line']}); leave jurisdiction empty here and name this tax_code in customer_billing.csv",
                )
            by_jurisdiction[r["jurisdiction"]] = r
        rates[r["tax_code"]] = TaxRate(r["tax_code"], r["name"], rate, r["treatment"], r["note"].strip(), r["jurisdiction"])

    if len(issuer_rows) != 1:
        raise fail(
            ISSUER_FILE,
            issuer_rows[1] if issuer_rows else None,
            (f"{len(issuer_rows)} issuer rows; keep exactly one (the company that issues the invoices)"),
        )
    iss = issuer_rows[0]
    if iss["tax_code"] not in rates:
        raise fail(
            ISSUER_FILE,
            iss,
            (f"tax_code {iss['tax_code']!r} is not in {TAX_RATES_FILE}; add it there or use one of {', '.join(sorted(rates)) or '(none)'}"),
        )
    issuer = Party(iss["name"], address_lines(iss["address"]), iss["country"], iss["tax_id"], iss["email"])
    if not issuer.address:
        raise fail(ISSUER_FILE, iss, "address is empty; give the postal address, lines separated by ';'")
    default_tax = rates[iss["tax_code"]]

    names = {c["customer_id"]: c for c in customers}
    terms: dict[str, CustomerTerms] = {}
    for b in billing_rows:
        cid = b["customer_id"]
        if cid not in names:
            raise fail(CUSTOMER_BILLING_FILE, b, f"customer {cid!r} is not in customers.csv; add the customer or remove this row")
        code = b["tax_code"]
        if code is not None and code not in rates:
            raise fail(
                CUSTOMER_BILLING_FILE,
                b,
                (f"tax_code {code!r} is not in {TAX_RATES_FILE}; add it there or leave tax_code empty for the rate of the country"),
            )
        rate = rates[code] if code is not None else rates.get(by_jurisdiction.get(b["country"], {}).get("tax_code"), default_tax)
        if rate.treatment == "reverse_charge" and not b["tax_id"]:
            raise fail(
                CUSTOMER_BILLING_FILE,
                b,
                f"customer {cid} is taxed under {rate.tax_code} (reverse charge), which needs the customer's tax_id (its VAT number); "
                "add tax_id or use another tax_code",
            )
        lines = address_lines(b["address"])
        if not lines:
            raise fail(CUSTOMER_BILLING_FILE, b, "address is empty; give the customer's postal address, lines separated by ';'")
        terms_of = b["payment_terms_days"] if b["payment_terms_days"] is not None else iss["payment_terms_days"]
        terms[cid] = CustomerTerms(Party(b["legal_name"], lines, b["country"], b["tax_id"], b["email"]), terms_of, rate)

    meter_ids = {m["meter_id"] for m in meters}
    display: dict[str, MeterDisplay] = {}
    for d in display_rows:
        if d["meter_id"] not in meter_ids:
            raise fail(METER_DISPLAY_FILE, d, f"meter {d['meter_id']!r} is not in meters.csv; add the meter or remove this row")
        if d["decimals"] > 9:
            raise fail(METER_DISPLAY_FILE, d, f"decimals {d['decimals']} is more than the 9 decimals quantities have; use 0 to 9")
        display[d["meter_id"]] = MeterDisplay(d["name"], d["unit"], d["decimals"])
    return InvoiceProfile(issuer, iss["payment_terms_days"], default_tax, terms, display)
