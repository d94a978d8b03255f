"""The invoice a customer reads: issuer and bill-to, dates and terms, the tax line, meter names, its PDF.

Expected tax figures are worked out by hand in the comments, or by an independent oracle (Fraction
arithmetic), never by the code under test.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
from datetime import UTC, date, datetime
from decimal import Decimal
from fractions import Fraction

import pypdf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing_dags.billing.build import build_invoices
from billing_dags.billing.credits import Grant
from billing_dags.billing.errors import InvoiceError
from billing_dags.billing.render import display_decimals, period_label, render_bytes, render_invoice
from billing_dags.billing.settlement import settle
from billing_dags.billing.tax import tax_minor
from billing_dags.core import durable
from billing_dags.core.settings import PROJECT_ROOT
from billing_dags.seeds.catalog import load_invoice_profile, load_seeds
from billing_dags.seeds.errors import SeedError
from billing_dags.seeds.invoicing import CustomerTerms, InvoiceProfile, MeterDisplay, Party, TaxRate

SEEDS = PROJECT_ROOT / "seeds"
NOV = date(2026, 11, 1)
DRAFT_NOW = datetime(2026, 12, 1, 2, tzinfo=UTC)
FINAL_NOW = datetime(2026, 12, 5, tzinfo=UTC)
VAT19 = TaxRate("de-vat-19", "VAT", Decimal(19), "standard", "", "DE")
REVERSE = TaxRate("eu-rc", "VAT", Decimal(0), "reverse_charge", "Reverse charge: VAT to be accounted for by the recipient", None)
PROFILE = InvoiceProfile(
    issuer=Party("Metering GmbH", ("Street 1", "10997 Berlin", "Germany"), "DE", "DE314159265", "billing@example.com"),
    default_terms_days=30,
    default_tax=VAT19,
    customers={
        "acme": CustomerTerms(Party("Acme GmbH", ("Hafenstraße 1", "20095 Hamburg", "Germany"), "DE", "DE271828001", None), 14, VAT19),
        "frog": CustomerTerms(Party("Frog SAS", ("1 rue de la Paix", "75002 Paris", "France"), "FR", "FR41123456781", None), 30, REVERSE),
    },
    meters={"iot_mqtt_bytes": MeterDisplay("MQTT traffic", "GiB", 2), "k8s_cpu": MeterDisplay("CPU", "CPU hours", 2)},
)
CUSTOMERS = [{"customer_id": c, "name": c.title(), "currency": "usd"} for c in ("acme", "frog", "plain")]
PLANS = [{"plan_id": "pro", "version": 1, "name": "Pro", "currency": "usd"}]
CURRENCIES = [{"currency": "usd", "minor_unit_exponent": 2}]
MANIFEST = {"month": "2026-11", "seeds": {}, "code_version": "0.1.0"}


def _lines(cid: str) -> list[dict]:
    common = {"month": NOV, "customer_id": cid, "plan_id": "pro", "plan_version": 1, "currency": "usd"}
    return [
        {
            **common,
            "line_number": 1,
            "line_type": "base_fee",
            "meter_id": None,
            "dimension": "",
            "description": "Pro monthly base fee",
            "quantity": Decimal(1),
            "unit": "month",
            "unit_price": Decimal("29"),
            "amount_minor": 2900,
        },
        {
            **common,
            "line_number": 2,
            "line_type": "usage",
            "meter_id": "iot_mqtt_bytes",
            "dimension": "",
            "description": "10 GiB included then $0.10 per GiB",
            "quantity": Decimal("18.988724084"),
            "included_quantity": Decimal(10),
            "billable_quantity": Decimal("8.988724084"),
            "unit": "gib",
            "unit_price": Decimal("0.10"),
            "amount_minor": 90,  # 8.988724084 x 0.10 = 0.8988724084 -> 0.90
        },
        {
            **common,
            "line_number": 3,
            "line_type": "usage",
            "meter_id": "k8s_cpu",
            "dimension": "",
            "description": "CPU: first 10 at $1.00; beyond at $0.50",
            "quantity": Decimal("12.345"),
            "included_quantity": Decimal(0),
            "billable_quantity": Decimal("12.345"),
            "unit": "hour",
            "unit_price": Decimal(0),
            "tier_formula": "10 x 1 + 2.345 x 0.5",
            "amount_minor": 1117,  # 10.00 + 1.1725 = 11.1725 -> 11.17
        },
        {
            **common,
            "line_number": 4,
            "line_type": "discount",
            "meter_id": None,
            "dimension": "",
            "description": "10% discount on base fee and usage",
            "quantity": Decimal(10),
            "unit": "percent",
            "unit_price": Decimal("41.07"),
            "amount_minor": -411,  # 10% of 41.07 = 4.107 -> 4.11
        },
    ]


def _build(cids=("acme",), now=DRAFT_NOW, grants=(), profile=PROFILE, numbers=None):
    lines = [line for cid in cids for line in _lines(cid)]
    return build_invoices(lines, CUSTOMERS, PLANS, CURRENCIES, NOV, now=now, grace_days=3, manifest=MANIFEST, grants=grants, profile=profile, numbers=numbers)


# --------------------------------------------------------------------------- tax arithmetic


@pytest.mark.parametrize(
    ("base_minor", "rate", "expected"),
    [
        (3666, "19", 697),  # 36.66 x 19% = 6.9654 -> 6.97
        (7161, "19", 1361),  # 71.61 x 19% = 13.6059 -> 13.61
        (30000, "19", 5700),  # exact
        (250, "10", 25),  # exact
        (5, "10", 1),  # 0.5 minor unit: a tie rounds up
        (25, "10", 3),  # 2.5 -> 3 (half-up, not to even)
        (15, "10", 2),  # 1.5 -> 2
        (149, "1", 1),  # 1.49 -> 1, just below the tie
        (150, "1", 2),  # 1.50 -> 2, the tie
        (151, "1", 2),
        (1000, "7.7", 77),  # fractional rate, exact
        (12345, "8.875", 1096),  # 1095.61875 -> 1096
        (12345, "0.001", 0),  # 0.12345 -> 0
        (-25, "10", -3),  # a negative base (a credit) rounds ties away from zero, as div_half_up in SQL
        (-149, "1", -1),
        (0, "19", 0),
        (999999, "0", 0),  # reverse charge, exempt, out of scope
        (999999, "100", 999999),
    ],
)
def test_tax_is_exact_and_rounded_half_up_once(base_minor, rate, expected):
    assert tax_minor(base_minor, Decimal(rate)) == expected
    assert tax_minor(base_minor, rate) == expected


def _oracle(base_minor: int, rate: Decimal) -> int:
    """Half-up (ties away from zero) of base x rate / 100, with Fractions."""
    exact = Fraction(base_minor) * Fraction(rate) / 100
    magnitude = abs(exact)
    rounded = int(magnitude + Fraction(1, 2))  # floor(|x| + 1/2)
    return rounded if exact >= 0 else -rounded


@settings(max_examples=300, deadline=None)
@given(
    base_minor=st.integers(min_value=-(10**12), max_value=10**12),
    rate=st.decimals(min_value=0, max_value=100, places=4, allow_nan=False, allow_infinity=False),
)
def test_tax_agrees_with_a_fraction_oracle(base_minor, rate):
    assert tax_minor(base_minor, rate) == _oracle(base_minor, rate)


@pytest.mark.parametrize("rate", [0.19, "101", "-1", "NaN", Decimal("Infinity")])
def test_tax_refuses_floats_and_rates_outside_0_to_100(rate):
    with pytest.raises(InvoiceError, match="rate"):
        tax_minor(100, rate)


# --------------------------------------------------------------------------- tax on the invoice


def test_tax_is_on_the_charges_after_discount_and_before_prepaid_credits():
    grant = Grant("acme-promo", "acme", "usd", 1000, date(2026, 1, 1), None, "Promotion")
    (inv,) = _build(grants=[grant])
    # charges: 29.00 + 0.90 + 11.17 - 4.11 = 36.96; VAT 19% = 7.0224 -> 7.02; due 43.98; credit 10.00 -> 33.98
    assert inv["charges_minor"] == 3696
    assert inv["tax"] == {
        "tax_code": "de-vat-19",
        "name": "VAT",
        "rate_percent": "19",
        "treatment": "standard",
        "note": "",
        "taxable": "36.96",
        "taxable_minor": 3696,
        "amount": "7.02",
        "amount_minor": 702,
    }
    types = [line["line_type"] for line in inv["lines"]]
    assert types == ["base_fee", "usage", "usage", "discount", "tax", "credit"]
    assert [line["amount_minor"] for line in inv["lines"][-2:]] == [702, -1000]
    assert inv["total_minor"] == 3398 and inv["total"] == "33.98"
    assert inv["total_minor"] == sum(line["amount_minor"] for line in inv["lines"])


def test_reverse_charge_shows_a_zero_tax_line_with_its_note():
    (inv,) = _build(cids=("frog",))
    tax_line = next(line for line in inv["lines"] if line["line_type"] == "tax")
    assert tax_line["amount_minor"] == 0 and tax_line["description"] == "VAT 0% (reverse charge) on 36.96 USD"
    assert "accounted for by the recipient" in tax_line["formula"]
    assert inv["total"] == "36.96" and inv["bill_to"]["tax_id"] == "FR41123456781"
    page = render_invoice(inv, "html")
    assert "Reverse charge: VAT to be accounted for by the recipient" in page and "FR41123456781" in page


def test_recompute_adjustments_are_taxed_carried_balances_are_not():
    charges = [{"line_number": 1, "line_type": "base_fee", "amount_minor": 10000}]
    adjustments = [
        {"kind": "recompute", "month": "2026-09", "invoice_number": "INV-1", "amount_minor": 2000, "description": "late usage", "formula": "f"},
        {"kind": "carry_forward", "month": "2026-10", "invoice_number": "INV-2", "amount_minor": -1190, "description": "owed back", "formula": "f"},
    ]
    settled = settle(charges, adjustments, [], [], NOV, "usd", 2, tax_rate={**VAT19.__dict__})
    # taxable: 100.00 + 20.00 = 120.00 (the carried -11.90 already includes its tax); VAT 19% = 22.80
    assert settled["tax"]["taxable_minor"] == 12000 and settled["tax"]["amount_minor"] == 2280
    assert settled["total_minor"] == 10000 + 2000 - 1190 + 2280


def test_a_negative_balance_carries_its_tax():
    charges = [{"line_number": 1, "line_type": "base_fee", "amount_minor": 1000}]
    adjustments = [{"kind": "recompute", "month": "2026-09", "invoice_number": "INV-1", "amount_minor": -3000, "description": "d", "formula": "f"}]
    settled = settle(charges, adjustments, [], [], NOV, "usd", 2, tax_rate={**VAT19.__dict__})
    # taxable -20.00, VAT -3.80: -23.80 carried forward, total 0
    assert settled["tax"]["amount_minor"] == -380
    assert settled["carried_forward_minor"] == 2380 and settled["total_minor"] == 0


# --------------------------------------------------------------------------- the document


def test_issuer_bill_to_dates_and_terms():
    (draft,) = _build()
    assert draft["issuer"]["name"] == "Metering GmbH" and draft["issuer"]["tax_id"] == "DE314159265"
    assert draft["bill_to"] == {
        "customer_id": "acme",
        "name": "Acme GmbH",
        "address": ["Hafenstraße 1", "20095 Hamburg", "Germany"],
        "country": "DE",
        "tax_id": "DE271828001",
        "email": None,
    }
    # finalized on 1 December + 3 grace days; due 14 days later
    assert (draft["issue_date"], draft["payment_terms"], draft["due_date"]) == ("2026-12-04", "Net 14 days", "2026-12-18")
    (final,) = _build(now=FINAL_NOW, numbers={"acme": "INV-2026-000001"})
    assert final["issue_date"] == final["finalized_on"] == "2026-12-04"
    # a customer without a customer_billing.csv row: its name, the issuer's terms and tax
    (plain,) = _build(cids=("plain",))
    assert plain["bill_to"]["name"] == "Plain" and plain["payment_terms_days"] == 30 and plain["tax"]["tax_code"] == "de-vat-19"


def test_usage_lines_keep_exact_quantities_and_show_them_rounded():
    (inv,) = _build()
    mqtt = inv["lines"][1]
    assert (mqtt["quantity"], mqtt["included_quantity"], mqtt["billable_quantity"]) == ("18.988724084", "10", "8.988724084")
    assert (mqtt["meter_name"], mqtt["display_unit"]) == ("MQTT traffic", "GiB")
    assert inv["lines"][2]["tier_formula"] == "10 x 1 + 2.345 x 0.5"
    page = render_invoice(inv, "html")
    assert "MQTT traffic" in page and "18.99" in page and "8.99" in page and "10.00" in page
    assert "1\u201330 November 2026" in page
    assert page.count("Total due") == 1


@pytest.mark.parametrize(
    ("used", "included", "billable", "price", "amount_minor", "decimals"),
    [
        ("18.988724084", "10", "8.988724084", "0.10", 90, 2),  # 8.99 x 0.10 = 0.899 -> 0.90
        ("1.005", "0", "1.005", "10", 1005, 2),  # 1.01 x 10 = 10.10 is not 10.05: three decimals
        ("2.5", "1.25", "1.25", "1", 125, 2),
        ("3", "0.4", "2.6", "1", 260, 0),  # 3 x 1 = 3.00 is not 2.60: one decimal
    ],
)
def test_display_precision_keeps_quantity_times_price_equal_to_the_amount(used, included, billable, price, amount_minor, decimals):
    line = {
        "quantity": used,
        "included_quantity": included,
        "billable_quantity": billable,
        "unit_price": price,
        "amount_minor": amount_minor,
        "display_decimals": decimals,
    }
    d = display_decimals(line, 2)
    q = Decimal(billable).quantize(Decimal(1).scaleb(-d))
    assert (q * Decimal(price)).quantize(Decimal("0.01")) == Decimal(amount_minor).scaleb(-2)
    assert Decimal(used).quantize(Decimal(1).scaleb(-d)) - Decimal(included).quantize(Decimal(1).scaleb(-d)) == q


def test_period_label():
    assert period_label("2026-11-01", "2026-12-01") == "1\u201330 November 2026"
    assert period_label("2026-02-01", "2026-03-01") == "1\u201328 February 2026"
    assert period_label("2026-10-15", "2026-11-15") == "15 October \u2013 14 November 2026"
    assert period_label("2026-12-15", "2027-01-15") == "15 December 2026 \u2013 14 January 2027"


# --------------------------------------------------------------------------- the PDF


def _pdf_text(data: bytes) -> str:
    reader = pypdf.PdfReader(io.BytesIO(data))
    return "\n".join(page.extract_text() for page in reader.pages)


def _squeezed(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_pdf_text_has_every_line_and_total():
    grant = Grant("acme-promo", "acme", "usd", 1000, date(2026, 1, 1), None, "Promotion")
    (inv,) = _build(grants=[grant])
    data = render_bytes(inv, "pdf")
    assert data.startswith(b"%PDF-")
    text = _pdf_text(data)
    flat = _squeezed(text)
    for line in inv["lines"]:
        assert _squeezed(line["amount"]) in flat, line
        assert _squeezed(line.get("meter_name") or line["description"]) in flat, line
    for figure in (inv["charges"], inv["tax"]["amount"], inv["credits_used"], inv["total"]):
        assert figure in text
    assert _squeezed(f"Total due USD {inv['total']}") in flat and text.count("Total due") == 1
    for must in ("Metering GmbH", "DE314159265", "Acme GmbH", "DE271828001", "18 December 2026", "Net 14 days", "1\u201330 November 2026", "VAT 19%"):
        assert _squeezed(must) in flat, must
    # the same invoice gives the same bytes
    assert render_bytes(inv, "pdf") == data


def test_pdf_is_published_next_to_the_html_and_kept_once_finalized(tmp_path):
    from billing_dags.billing.store import write_invoice_files
    from billing_dags.core.settings import Paths

    p = Paths(tmp_path / "data", tmp_path / "seeds")
    (final,) = _build(now=FINAL_NOW, numbers={"acme": "INV-2026-000001"})
    write_invoice_files(p, [final])
    pdf = p.invoices / "2026-11" / "acme.pdf"
    original = pdf.read_bytes()
    assert "INV-2026-000001" in _pdf_text(original)
    # a finalized invoice's files are never rewritten; a missing PDF is laid out again from the stored JSON
    pdf.unlink()
    again = write_invoice_files(p, [final])
    assert str(pdf) in again["written"] and pdf.read_bytes() == original
    assert write_invoice_files(p, [final])["written"] == []


# --------------------------------------------------------------------------- the seeds


def test_demo_seeds_are_complete():
    tables = load_seeds(SEEDS)
    profile = load_invoice_profile(SEEDS)
    assert {r["customer_id"] for r in tables["customers"].to_pylist()} == set(profile.customers)
    assert {r["meter_id"] for r in tables["meters"].to_pylist()} == set(profile.meters)
    treatments = {t.tax.treatment for t in profile.customers.values()}
    assert {"standard", "reverse_charge", "out_of_scope"} <= treatments


def _edit(seeds, name, change):
    path = seeds / name
    rows = list(csv.DictReader(path.open(newline="", encoding="utf-8")))
    fields = list(rows[0]) if rows else []
    rows = change(rows)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


@pytest.mark.parametrize(
    ("file", "change", "message"),
    [
        (
            "tax_rates.csv",
            lambda rows: [{**r, "treatment": "standard"} if r["tax_code"] == "eu-reverse-charge" else r for r in rows],
            r"tax_rates\.csv:3: rate_percent 0 with treatment standard: a zero rate needs its reason",
        ),
        (
            "tax_rates.csv",
            lambda rows: [{**r, "note": ""} if r["tax_code"] == "eu-reverse-charge" else r for r in rows],
            r"tax_rates\.csv:3: a reverse_charge rate of 0 needs a note",
        ),
        (
            "customer_billing.csv",
            lambda rows: [{**r, "tax_id": ""} if r["customer_id"] == "tb-001" else r for r in rows],
            r"customer_billing\.csv:22: customer tb-001 is taxed under eu-reverse-charge \(reverse charge\), which needs the customer's tax_id",
        ),
        (
            "customer_billing.csv",
            lambda rows: [*rows, {**rows[0], "customer_id": "nobody"}],
            r"customer_billing\.csv:52: customer 'nobody' is not in customers\.csv; add the customer or remove this row",
        ),
        ("customer_billing.csv", lambda rows: [{**rows[0], "tax_code": "gst"}, *rows[1:]], r"customer_billing\.csv:2: tax_code 'gst' is not in tax_rates\.csv"),
        ("customer_billing.csv", lambda rows: [{**rows[0], "country": "usa"}, *rows[1:]], r"customer_billing\.csv:2: column country: 'usa' is not an ISO"),
        ("customer_billing.csv", lambda rows: [{**rows[0], "payment_terms_days": "-1"}, *rows[1:]], r"customer_billing\.csv:2: column payment_terms_days"),
        ("issuer.csv", lambda rows: [*rows, {**rows[0], "name": "Other GmbH"}], r"issuer\.csv:3: 2 issuer rows; keep exactly one"),
        ("meter_display.csv", lambda rows: [*rows, {**rows[0], "meter_id": "nope"}], r"meter_display\.csv:28: meter 'nope' is not in meters\.csv"),
    ],
)
def test_bad_invoice_seeds_name_file_row_and_fix(tmp_path, file, change, message):
    seeds = tmp_path / "seeds"
    shutil.copytree(SEEDS, seeds)
    _edit(seeds, file, change)
    with pytest.raises(SeedError, match=message):
        load_seeds(seeds)


def test_json_stays_canonical_and_exact():
    (inv,) = _build()
    data = durable.canonical_json(inv)
    assert data == durable.canonical_json(_build()[0])
    assert not re.search(rb'"-?\d+(\.\d+)?[eE][+-]?\d+"', data)  # no exponent notation
    for key in ("quantity", "included_quantity", "billable_quantity", "unit_price", "amount"):
        assert isinstance(inv["lines"][1][key], str)


def test_pdfs_can_be_turned_off(tmp_path, monkeypatch):
    from billing_dags.billing.render import pdf_wanted
    from billing_dags.billing.store import write_invoice_files
    from billing_dags.core.settings import Paths

    assert pdf_wanted({}) and not pdf_wanted({"BILLING_INVOICE_PDF": "0"})
    with pytest.raises(InvoiceError, match="BILLING_INVOICE_PDF='yes' must be 1"):
        pdf_wanted({"BILLING_INVOICE_PDF": "yes"})
    monkeypatch.setenv("BILLING_INVOICE_PDF", "0")
    p = Paths(tmp_path / "data", tmp_path / "seeds")
    write_invoice_files(p, _build())
    assert sorted(f.name for f in (p.invoices / "2026-11").iterdir()) == ["acme.csv", "acme.html", "acme.json"]


def _stored_invoice(tmp_path, now, numbers=None, base_fee_only=False):
    """An invoice of iot-001 (a customer of the project's seeds, so the CLI knows it) written as an invoice run writes it."""
    from billing_dags.billing.store import write_invoice_files
    from billing_dags.core.settings import Paths

    p = Paths(tmp_path / "data", SEEDS)
    lines = _lines("iot-001")[: 1 if base_fee_only else None]
    customers = [{"customer_id": "iot-001", "name": "IoT fleet 001", "currency": "usd"}]
    (inv,) = build_invoices(lines, customers, PLANS, CURRENCIES, NOV, now=now, grace_days=3, manifest=MANIFEST, profile=PROFILE, numbers=numbers)
    write_invoice_files(p, [inv])
    return p, inv


def test_the_cli_fetches_or_renders_an_invoice_pdf_and_never_rewrites_a_finalized_one(tmp_path, monkeypatch, capsysbinary):
    import sys

    from billing_dags.cli.main import main

    monkeypatch.setenv("BILLING_INVOICE_PDF", "0")  # invoiced without PDFs: the PDF is made on demand
    p, inv = _stored_invoice(tmp_path, FINAL_NOW, numbers={"iot-001": "INV-2026-000007"})
    pdf = p.invoices / "2026-11" / "iot-001.pdf"
    assert inv["status"] == "finalized" and not pdf.exists()
    cmd = ["--data-dir", str(p.data_dir), "--seeds-dir", str(SEEDS), "invoice", "iot-001", "--month", "2026-11", "--format", "pdf"]
    assert main(cmd) == 0
    out = capsysbinary.readouterr().out
    assert out.startswith(b"%PDF-") and "INV-2026-000007" in _pdf_text(out)
    assert pdf.read_bytes() == out == render_bytes(inv, "pdf")  # published beside its JSON
    # fetched again: the stored file, neither laid out again nor rewritten
    stamp = pdf.stat().st_mtime_ns
    assert main(cmd) == 0 and capsysbinary.readouterr().out == out and pdf.stat().st_mtime_ns == stamp
    # on a terminal: where the file is, not PDF bytes
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(cmd) == 0
    assert str(pdf) in capsysbinary.readouterr().out.decode().replace("\n", "")
    assert main([*cmd[:-4], "--month", "2026-10", "--format", "pdf"]) == 2
    assert b"no invoice for iot-001 in 2026-10" in capsysbinary.readouterr().err


def test_a_redrafted_invoice_keeps_no_pdf_of_the_earlier_draft(tmp_path, monkeypatch, capsysbinary):
    from billing_dags.cli.main import main

    p, first = _stored_invoice(tmp_path, DRAFT_NOW)
    pdf = p.invoices / "2026-11" / "iot-001.pdf"
    assert pdf.read_bytes() == render_bytes(first, "pdf")
    # the draft is computed again with other figures, PDFs turned off: the earlier draft's PDF goes
    monkeypatch.setenv("BILLING_INVOICE_PDF", "0")
    _, second = _stored_invoice(tmp_path, DRAFT_NOW, base_fee_only=True)
    assert second["total"] != first["total"] and not pdf.exists()
    cmd = ["--data-dir", str(p.data_dir), "--seeds-dir", str(SEEDS), "invoice", "iot-001", "--month", "2026-11", "--format", "pdf"]
    assert main(cmd) == 0
    out = capsysbinary.readouterr().out
    assert second["total"] in _pdf_text(out) and pdf.read_bytes() == out
