"""Invoices (rules 7, 8, 11, 12): status, exact totals, numbering, immutability, deterministic files."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing_dags.billing import build as build_module
from billing_dags.billing import manifest as manifest_module
from billing_dags.billing.build import build_invoices, uninvoiced_customers
from billing_dags.billing.errors import InvoiceError
from billing_dags.billing.manifest import code_version, invoice_manifest
from billing_dags.billing.numbering import read_registry
from billing_dags.billing.periods import invoice_status
from billing_dags.billing.render import render_invoice
from billing_dags.billing.store import write_invoice_files
from billing_dags.core import durable
from billing_dags.core.money import format_decimal, format_minor
from billing_dags.core.settings import Paths

UTC = UTC
JAN = date(2025, 1, 1)
FEB = date(2025, 2, 1)
#: first instant at which January 2025 is final with the default 3 grace days
JAN_FINAL = datetime(2025, 2, 4, tzinfo=UTC)
FEB_FINAL = datetime(2025, 3, 4, tzinfo=UTC)
JAN_DRAFT = datetime(2025, 1, 20, 12, 0, tzinfo=UTC)

CUSTOMERS = [
    {"customer_id": "acme", "name": "Acme Corp", "currency": "usd", "plan_id": "pro", "stripe_customer_id": "cus_A"},
    {"customer_id": "beta", "name": "Beta & Sons", "currency": "usd", "plan_id": "pro", "stripe_customer_id": None},
    {"customer_id": "cobalt", "name": "Cobalt", "currency": "usd", "plan_id": "pro", "stripe_customer_id": "cus_C"},
    {"customer_id": "tokyo", "name": "Tokyo KK", "currency": "jpy", "plan_id": "jp", "stripe_customer_id": "cus_T"},
]
PLANS = [
    {"plan_id": "pro", "version": 1, "name": "Pro", "currency": "usd"},
    {"plan_id": "jp", "version": 2, "name": "Japan", "currency": "jpy"},
]
CURRENCIES = [{"currency": "usd", "minor_unit_exponent": 2}, {"currency": "jpy", "minor_unit_exponent": 0}]
MANIFEST = {
    "month": "2025-01",
    "raw_samples": {"raw/samples/date=2025-01-01/part-sim.parquet": "ab" * 32},
    "seeds": {"meters.csv": "cd" * 32},
    "code_version": "0.1.0",
}


def paths_for(tmp_path) -> Paths:
    return Paths(tmp_path / "data", tmp_path / "seeds")


def lines_for(customer_id: str, month: date = JAN, *, usage_minor: int = 1234, currency: str = "usd") -> list[dict]:
    plan = ("jp", 2) if currency == "jpy" else ("pro", 1)
    common = {"month": month, "customer_id": customer_id, "plan_id": plan[0], "plan_version": plan[1], "currency": currency}
    return [
        {
            **common,
            "line_number": 1,
            "line_type": "base_fee",
            "meter_id": None,
            "dimension": "",
            "description": "Pro monthly base fee",
            "quantity": Decimal("1.000000000"),
            "unit": "month",
            "unit_price": Decimal("10.000000000"),
            "amount_minor": 1000,
        },
        {
            **common,
            "line_number": 2,
            "line_type": "usage",
            "meter_id": "proxy_bytes",
            "dimension": "",
            "description": "10 GiB included then $0.05 per GiB",
            "quantity": Decimal("12.500000000"),
            "unit": "gib",
            "unit_price": Decimal("0.050000000"),
            "amount_minor": usage_minor,
        },
        {
            **common,
            "line_number": 3,
            "line_type": "risk_adjustment",
            "meter_id": None,
            "dimension": "",
            "description": "Risk multiplier 0.90x on base fee and usage",
            "quantity": Decimal("-0.100000000"),
            "unit": "multiplier",
            "unit_price": Decimal("22.340000000"),
            "amount_minor": -223,
        },
    ]


def build(lines, month=JAN, now=JAN_DRAFT, paths=None, customers=CUSTOMERS, manifest=MANIFEST):
    return build_invoices(lines, customers, PLANS, CURRENCIES, month, now=now, grace_days=3, manifest=manifest, paths=paths)


# --------------------------------------------------------------------------- status


def test_status_boundary_exactly_at_period_end_plus_grace():
    assert invoice_status(JAN, JAN_FINAL, 3) == "finalized"
    assert invoice_status(JAN, JAN_FINAL - timedelta(seconds=1), 3) == "draft"
    # another time zone naming the same instant
    plus2 = timezone(timedelta(hours=2))
    assert invoice_status(JAN, datetime(2025, 2, 4, 2, 0, tzinfo=plus2), 3) == "finalized"
    assert invoice_status(JAN, datetime(2025, 2, 4, 1, 59, 59, tzinfo=plus2), 3) == "draft"
    # grace 0: final at the period end itself; December rolls into the next year
    assert invoice_status(JAN, datetime(2025, 2, 1, tzinfo=UTC), 0) == "finalized"
    assert invoice_status(date(2024, 12, 1), datetime(2025, 1, 3, 23, 59, 59, tzinfo=UTC)) == "draft"
    assert invoice_status(date(2024, 12, 1), datetime(2025, 1, 4, tzinfo=UTC)) == "finalized"


def test_status_rejects_bad_input():
    with pytest.raises(InvoiceError, match="time zone"):
        invoice_status(JAN, datetime(2025, 3, 1))
    with pytest.raises(InvoiceError, match="first day"):
        invoice_status(date(2025, 1, 15), JAN_FINAL)
    with pytest.raises(InvoiceError, match="grace_days"):
        invoice_status(JAN, JAN_FINAL, -1)


def test_finalized_invoice_carries_finalized_on(tmp_path):
    (final,) = build(lines_for("acme"), now=JAN_FINAL, paths=paths_for(tmp_path))
    assert final["status"] == "finalized"
    assert final["finalized_on"] == "2025-02-04"
    assert final["period_start"] == "2025-01-01" and final["period_end"] == "2025-02-01"
    (draft,) = build(lines_for("acme"))
    assert draft["status"] == "draft" and draft["finalized_on"] is None
    assert draft["invoice_number"] == "DRAFT-2025-01-acme"


# --------------------------------------------------------------------------- exact money


def test_total_is_the_sum_of_rounded_lines():
    lines = lines_for("acme")
    (invoice,) = build(lines)
    expected_minor = 1000 + 1234 - 223  # computed here, independently of the code under test
    assert invoice["total_minor"] == expected_minor == 2011
    assert invoice["total"] == invoice["subtotal"] == "20.11"
    assert [l["amount_minor"] for l in invoice["lines"]] == [1000, 1234, -223]
    assert [l["amount"] for l in invoice["lines"]] == ["10.00", "12.34", "-2.23"]
    assert invoice["lines"][1]["quantity"] == "12.5"
    assert invoice["lines"][1]["unit_price"] == "0.05"
    assert invoice["lines"][2]["quantity"] == "-0.1"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=-(10**12), max_value=10**12), min_size=1, max_size=12))
def test_total_equals_sum_of_lines_property(amounts):
    base = lines_for("acme")[1]
    lines = [{**base, "line_number": i + 1, "meter_id": f"m{i:02d}", "amount_minor": a} for i, a in enumerate(amounts)]
    (invoice,) = build(lines)
    total = 0
    for a in amounts:
        total += a
    assert invoice["charges_minor"] == total
    # never below zero: a negative balance is carried forward by a line of its own
    assert invoice["total_minor"] == max(total, 0)
    assert invoice["carried_forward_minor"] == max(-total, 0)
    assert Decimal(invoice["total"]) == Decimal(max(total, 0)) / 100
    assert sum(Decimal(l["amount"]) for l in invoice["lines"]) == Decimal(invoice["total"])
    assert sum(l["amount_minor"] for l in invoice["lines"]) == invoice["total_minor"]


def test_amount_strings_usd_two_digits_jpy_none():
    assert format_minor(1230, 2) == "12.30"
    assert format_minor(5, 2) == "0.05"
    assert format_minor(-250, 2) == "-2.50"
    assert format_minor(0, 2) == "0.00"
    assert format_minor(1230, 0) == "1230"
    assert format_minor(-7, 0) == "-7"
    (jp,) = build(lines_for("tokyo", currency="jpy", usage_minor=1230))
    assert jp["currency"] == "jpy" and jp["minor_unit_exponent"] == 0
    assert [l["amount"] for l in jp["lines"]] == ["1000", "1230", "-223"]
    assert jp["total"] == "2007" and jp["total_minor"] == 2007
    assert jp["lines"][0]["unit_price"] == "10"  # no padding for a currency without minor digits
    (us,) = build(lines_for("acme", usage_minor=1230))
    assert us["lines"][1]["amount"] == "12.30"


def test_decimal_strings_never_use_exponents():
    assert format_decimal(Decimal("12.500000000")) == "12.5"
    assert format_decimal(Decimal("1E+3")) == "1000"
    assert format_decimal(Decimal("0E-9")) == "0"
    assert format_decimal(Decimal("-0")) == "0"
    assert format_decimal(Decimal("0.000000001")) == "0.000000001"
    big = Decimal("12345678901234567890123456789.123456789")  # 38 digits: beyond the default context
    assert format_decimal(big) == "12345678901234567890123456789.123456789"


def test_bad_lines_are_rejected_with_a_clear_message():
    lines = lines_for("acme")
    with pytest.raises(InvoiceError, match="float"):
        build([{**lines[0], "quantity": 1.0}])
    with pytest.raises(InvoiceError, match="unknown customer 'ghost'"):
        build([{**lines[0], "customer_id": "ghost"}])
    with pytest.raises(InvoiceError, match="not a safe identifier"):
        build([{**lines[0], "customer_id": "../etc"}])
    with pytest.raises(InvoiceError, match="not the invoiced month"):
        build([{**lines[0], "month": FEB}])
    with pytest.raises(InvoiceError, match="duplicate line_number"):
        build([lines[0], {**lines[1], "line_number": 1}])
    with pytest.raises(InvoiceError, match="customer's currency"):
        build([{**lines[0], "currency": "jpy"}])
    with pytest.raises(InvoiceError, match="need numbers"):
        build(lines, now=JAN_FINAL, paths=None)


# --------------------------------------------------------------------------- files


def test_files_are_reproduced_byte_for_byte(tmp_path):
    p = paths_for(tmp_path)
    lines = lines_for("acme") + lines_for("beta") + lines_for("tokyo", currency="jpy")
    first = write_invoice_files(p, build(lines))
    files = sorted((p.invoices / "2025-01").glob("*.*"))
    # drafts: no PDF (a finalized invoice's PDF is laid out when it is finalized)
    assert [f.name for f in files] == [f"{c}.{ext}" for c in ("acme", "beta", "tokyo") for ext in ("csv", "html", "json")]
    before = {f.name: f.read_bytes() for f in files}
    assert len(first["written"]) == 9
    assert first["by_status"] == {"draft": 3, "finalized": 0}
    assert first["totals_by_currency"] == {"jpy": "2011", "usd": "40.22"}  # 1000 + 1234 - 223 yen

    again = write_invoice_files(p, build(lines))
    assert again["written"] == [] and len(again["unchanged"]) == 9
    assert {f.name: f.read_bytes() for f in sorted((p.invoices / "2025-01").glob("*.*"))} == before

    # an independent data dir gets the very same bytes: no paths or clocks inside
    other = paths_for(tmp_path / "other")
    write_invoice_files(other, build(lines))
    assert {f.name: f.read_bytes() for f in sorted((other.invoices / "2025-01").glob("*.*"))} == before

    stored = json.loads(before["acme.json"])
    assert stored["total_minor"] == 2011 and stored["manifest"] == MANIFEST
    assert stored["lines"][1]["amount"] == "12.34"
    csv_lines = before["acme.csv"].decode().splitlines()
    assert csv_lines[0].startswith("invoice_number,status,customer_id")
    assert len(csv_lines) == 1 + 3 + 1
    assert csv_lines[-1].endswith(",total,,,Total due,,,,20.11,2011")


def test_finalized_invoice_is_never_rewritten(tmp_path):
    p = paths_for(tmp_path)
    res = write_invoice_files(p, build(lines_for("acme"), now=JAN_FINAL, paths=p))
    assert res["by_status"]["finalized"] == 1
    json_path = p.invoices / "2025-01" / "acme.json"
    original = {ext: (p.invoices / "2025-01" / f"acme.{ext}").read_bytes() for ext in ("json", "csv", "html")}
    assert json.loads(original["json"])["invoice_number"] == "INV-2025-000001"

    # same inputs later: nothing rewritten, nothing pending
    res = write_invoice_files(p, build(lines_for("acme"), now=JAN_FINAL + timedelta(days=40), paths=p))
    assert res["changed_after_finalization"] == [] and res["written"] == []

    # late data changes the usage line: the finalized files stay, the new figures wait for an adjustment
    changed = build(lines_for("acme", usage_minor=1500), now=JAN_FINAL + timedelta(days=40), paths=p)
    res = write_invoice_files(p, changed)
    assert res["changed_after_finalization"] == ["acme"]
    assert {ext: (p.invoices / "2025-01" / f"acme.{ext}").read_bytes() for ext in ("json", "csv", "html")} == original
    pending = json.loads((p.invoices / "2025-01" / "pending_adjustments" / "acme.json").read_text())
    assert pending["finalized_invoice_number"] == "INV-2025-000001"
    assert pending["finalized_total_minor"] == 2011
    assert pending["recomputed_total_minor"] == 2011 - 1234 + 1500
    assert pending["delta_minor"] == 266 and pending["delta"] == "2.66"
    assert res["totals_by_currency"] == {"usd": "20.11"}  # what stands on disk is the finalized invoice
    assert str(json_path) not in res["written"]

    # a deleted rendering is restored from the stored JSON, not from the new figures
    (p.invoices / "2025-01" / "acme.html").unlink()
    write_invoice_files(p, changed)
    assert (p.invoices / "2025-01" / "acme.html").read_bytes() == original["html"]


def test_numbering_gap_free_across_months_and_stable_on_rerun(tmp_path):
    p = paths_for(tmp_path)
    jan_lines = lines_for("cobalt") + lines_for("acme") + lines_for("beta")
    # drafts consume no numbers
    assert [i["invoice_number"] for i in build(jan_lines, paths=p)] == ["DRAFT-2025-01-acme", "DRAFT-2025-01-beta", "DRAFT-2025-01-cobalt"]
    assert read_registry(p)["numbers"] == {}

    jan = build(jan_lines, now=JAN_FINAL, paths=p)
    assert [(i["customer_id"], i["invoice_number"]) for i in jan] == [
        ("acme", "INV-2025-000001"),
        ("beta", "INV-2025-000002"),
        ("cobalt", "INV-2025-000003"),
    ]
    write_invoice_files(p, jan)
    feb = build(lines_for("cobalt", FEB) + lines_for("acme", FEB), FEB, now=FEB_FINAL, paths=p)
    assert [i["invoice_number"] for i in feb] == ["INV-2025-000004", "INV-2025-000005"]

    # reruns reuse the numbers; a later year starts again at 1
    assert [i["invoice_number"] for i in build(jan_lines, now=FEB_FINAL, paths=p)] == ["INV-2025-000001", "INV-2025-000002", "INV-2025-000003"]
    assert [i["invoice_number"] for i in build(lines_for("cobalt", FEB) + lines_for("acme", FEB), FEB, now=FEB_FINAL, paths=p)] == [
        "INV-2025-000004",
        "INV-2025-000005",
    ]
    dec = date(2025, 12, 1)
    assert [i["invoice_number"] for i in build(lines_for("beta", dec), dec, now=datetime(2026, 1, 5, tzinfo=UTC), paths=p)] == ["INV-2025-000006"]
    jan26 = date(2026, 1, 1)
    assert [i["invoice_number"] for i in build(lines_for("beta", jan26), jan26, now=datetime(2026, 2, 5, tzinfo=UTC), paths=p)] == ["INV-2026-000001"]

    numbers = read_registry(p)["numbers"]
    seq_2025 = sorted(int(n.rsplit("-", 1)[1]) for n in numbers.values() if n.startswith("INV-2025-"))
    assert seq_2025 == list(range(1, 7))
    assert numbers["2025-02/acme"] == "INV-2025-000004"
    assert not list(p.invoices.glob(".registry.json.tmp-*"))


def test_html_escapes_customer_text(tmp_path):
    evil = [{**CUSTOMERS[0], "name": "<script>alert('x')</script> & Co"}]
    lines = lines_for("acme")
    lines[1]["description"] = 'per GiB <b>"bold"</b>'
    (invoice,) = build(lines, customers=evil)
    page = render_invoice(invoice, "html")
    assert "<script>" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; Co" in page
    assert "&lt;b&gt;&quot;bold&quot;&lt;/b&gt;" in page
    assert page.startswith("<!DOCTYPE html>") and "DRAFT-2025-01-acme" in page
    assert page.count("Total due") == 1 and "USD 20.11" in page
    assert "Charges" in page and "proxy_bytes" in page
    assert "dispute" in page.lower()
    # self-contained: no external resources
    assert "http://" not in page and "https://" not in page and "<link" not in page


def test_render_formats():
    (invoice,) = build(lines_for("acme"))
    assert json.loads(render_invoice(invoice, "json")) == invoice
    table = render_invoice(invoice, "table")
    assert "DRAFT-2025-01-acme" in table and "20.11" in table and "Total due" in table
    assert render_invoice(invoice, "csv").count("\n") == 5
    with pytest.raises(InvoiceError, match="format"):
        render_invoice(invoice, "pdf")


def test_csv_neutralises_formula_text():
    lines = lines_for("acme")
    lines[1]["description"] = '=HYPERLINK("http://x")'
    (invoice,) = build(lines)
    assert "'=HYPERLINK" in render_invoice(invoice, "csv")


# --------------------------------------------------------------------------- manifest


def test_manifest_hashes_raw_files_of_the_month_and_seeds(tmp_path):
    import hashlib

    p = paths_for(tmp_path)
    for d, content in [("2025-01-01", b"one"), ("2025-01-31", b"two"), ("2025-02-01", b"next month"), ("2024-12-31", b"before")]:
        f = p.raw_samples / f"date={d}" / "part-sim.parquet"
        f.parent.mkdir(parents=True)
        f.write_bytes(content)
    p.seeds_dir.mkdir(parents=True)
    (p.seeds_dir / "meters.csv").write_text("meter_id\n")
    m = invoice_manifest(p, JAN, p.seeds_dir, "0.1.0+gabc")
    assert m["raw_samples"] == {
        "raw/samples/date=2025-01-01/part-sim.parquet": hashlib.sha256(b"one").hexdigest(),
        "raw/samples/date=2025-01-31/part-sim.parquet": hashlib.sha256(b"two").hexdigest(),
    }
    assert m["seeds"] == {"meters.csv": hashlib.sha256(b"meter_id\n").hexdigest()}
    assert m["code_version"] == "0.1.0+gabc" and m["month"] == "2025-01"


def test_manifest_fingerprints_raw_events_and_usage_reports_of_the_month(tmp_path):
    """An invoice billed from usage events or usage reports carries a fingerprint of them too."""
    import hashlib

    from billing_dags.ingest.usage_reports import Report, ReportStore

    p = paths_for(tmp_path)
    for d, name, content in [
        ("2025-01-05", "part-postgres.parquet", b"pg"),
        ("2025-01-31", "part-usage_reports.parquet", b"ur"),
        ("2025-02-01", "part-postgres.parquet", b"next month"),
    ]:
        f = p.data_dir / "raw" / "events" / f"date={d}" / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(content)
    p.seeds_dir.mkdir(parents=True)
    (p.seeds_dir / "meters.csv").write_text("meter_id\n")
    at = lambda d, h: int(datetime(d.year, d.month, d.day, h, tzinfo=UTC).timestamp()) * 1000  # noqa: E731
    with ReportStore.open(p) as store:
        store.accept(Report("r1", "iot-001", at(date(2025, 1, 31), 10), 3600, {"active_devices": Decimal(3)}))
        store.accept(Report("r9", "iot-001", at(FEB, 10), 3600, {"active_devices": Decimal(3)}))  # February's
    m = invoice_manifest(p, JAN, p.seeds_dir, "0.1.0")
    assert m["raw_events"] == {
        "raw/events/date=2025-01-05/part-postgres.parquet": hashlib.sha256(b"pg").hexdigest(),
        "raw/events/date=2025-01-31/part-usage_reports.parquet": hashlib.sha256(b"ur").hexdigest(),
    }
    assert list(m["usage_reports"]) == ["2025-01-31"] and m["usage_reports"]["2025-01-31"]["reports"] == 1
    first = m["usage_reports"]["2025-01-31"]["sha256"]
    assert len(first) == 64 and first == invoice_manifest(p, JAN, p.seeds_dir, "0.1.0")["usage_reports"]["2025-01-31"]["sha256"]
    with ReportStore.open(p) as store:  # a late report of the same day
        store.accept(Report("r2", "iot-001", at(date(2025, 1, 31), 11), 3600, {"active_devices": Decimal(4)}))
    late = invoice_manifest(p, JAN, p.seeds_dir, "0.1.0")["usage_reports"]["2025-01-31"]
    assert late["reports"] == 2 and late["sha256"] != first


def test_code_version_falls_back_silently(tmp_path, monkeypatch):
    from billing_dags import __version__

    (tmp_path / ".git").mkdir()

    def no_git(*a, **k):
        raise FileNotFoundError("git")

    monkeypatch.setattr(manifest_module.subprocess, "run", no_git)
    assert code_version(tmp_path) == __version__

    def timeout(*a, **k):
        raise subprocess.TimeoutExpired("git", 5)

    monkeypatch.setattr(manifest_module.subprocess, "run", timeout)
    assert code_version(tmp_path) == __version__

    sha = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setattr(manifest_module.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=sha + "\n", stderr=""))
    assert code_version(tmp_path) == f"{__version__}+g{sha}"
    # not a checkout: git is not asked at all
    assert code_version(tmp_path / "elsewhere") == __version__


def test_formula_uses_allowance_and_packages_when_the_line_has_them():
    lines = lines_for("acme")
    lines[1].update({"included_quantity": Decimal("10"), "billable_quantity": Decimal("2.5"), "package_size": 1, "packages": None, "amount_minor": 13})
    (invoice,) = build(lines)
    assert invoice["lines"][1]["formula"] == "12.5 gib used − 10 included = 2.5 gib × 0.05 USD per gib = 0.13 USD"
    lines[1].update(
        {
            "quantity": Decimal("2500"),
            "unit": "request",
            "unit_price": Decimal("0.5"),
            "included_quantity": Decimal("0"),
            "billable_quantity": Decimal("2500"),
            "package_size": 1000,
            "packages": 3,
            "amount_minor": 150,
        }
    )
    (invoice,) = build(lines)
    assert invoice["lines"][1]["formula"] == "2500 request used − 0 included = 2500 request → 3 packages of 1000 × 0.50 USD = 1.50 USD"


# --------------------------------------------------------------------------- writing many files at once


def _stdlib_json(obj) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def test_json_files_are_the_json_module_bytes_with_or_without_orjson(monkeypatch):
    customers = [{**CUSTOMERS[0], "name": 'Acmé "Ünïcode" <b>&</b> \u2028 \x01 \\ / 😀'}]
    lines = lines_for("acme")
    lines[1]["description"] = "tab\there, newline\nthere, \u0000 nul, ° and — dashes"
    (invoice,) = build(lines, customers=customers)
    invoice["nested"] = {"empty_list": [], "empty_dict": {}, "z": [1, [2, {}]], "a": None, "t": True, "f": False}
    invoice["big"] = -(2**63)
    assert durable.canonical_json(invoice) == _stdlib_json(invoice)
    assert render_invoice(invoice, "json") == _stdlib_json(invoice).decode("utf-8")
    # what orjson refuses (an integer beyond 64 bits, a non-string key) still gets the same bytes
    for odd in ({**invoice, "big": 2**64 + 1}, {"numbers": {1: "a"}}):
        assert durable.canonical_json(odd) == _stdlib_json(odd)
    monkeypatch.setattr(durable, "_orjson", None)
    assert durable.canonical_json(invoice) == _stdlib_json(invoice)


@pytest.mark.parametrize("durability", ["syncfs", "fsync each file"])
def test_many_files_are_durable_the_same_either_way(tmp_path, monkeypatch, durability):
    if durability == "syncfs":
        if durable._SYNCFS is None:
            pytest.skip("no syncfs (Linux 5.8 or later) here")
        monkeypatch.setattr(durable.Batch, "SYNCFS_MIN_FILES", 1)
    else:
        monkeypatch.setattr(durable, "_SYNCFS", None)
    p = paths_for(tmp_path)
    lines = lines_for("acme") + lines_for("beta") + lines_for("tokyo", currency="jpy")
    res = write_invoice_files(p, build(lines))
    assert len(res["written"]) == 9
    files = sorted((p.invoices / "2025-01").iterdir())
    assert [f.name for f in files] == [f"{c}.{ext}" for c in ("acme", "beta", "tokyo") for ext in ("csv", "html", "json")]
    reference = paths_for(tmp_path / "reference")
    monkeypatch.undo()
    write_invoice_files(reference, build(lines))
    assert {f.name: f.read_bytes() for f in files} == {f.name: f.read_bytes() for f in sorted((reference.invoices / "2025-01").iterdir())}


@pytest.mark.parametrize("durability", ["syncfs", "fsync each file"])
def test_a_failed_flush_leaves_the_old_files_and_no_temporary_ones(tmp_path, monkeypatch, durability):
    p = paths_for(tmp_path)
    lines = lines_for("acme") + lines_for("beta")
    write_invoice_files(p, build(lines))
    folder = p.invoices / "2025-01"
    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    if durability == "syncfs":
        monkeypatch.setattr(durable.Batch, "SYNCFS_MIN_FILES", 1)
        monkeypatch.setattr(durable, "_SYNCFS", lambda fd: -1)
    else:
        monkeypatch.setattr(durable, "_SYNCFS", None)

        def failing_fsync(path):
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(durable, "fsync_path", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        write_invoice_files(p, build(lines_for("acme", usage_minor=999) + lines_for("beta", usage_minor=998)))
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before  # old bytes, no .tmp- files left


def test_stored_invoices_listing_matches_the_globs(tmp_path):
    from billing_dags.billing import credits as cr

    def doc(month, cid):
        return json.dumps({"customer_id": cid, "lines": [], "period_start": f"{month}-01"})

    d = tmp_path / "invoices"
    for month in ("2025-02", "2025-01", "2024-1x"):
        (d / month / "pending_adjustments").mkdir(parents=True)
        for cid in ("acme", "beta"):
            (d / month / f"{cid}.json").write_text(doc(month, cid))
        (d / month / "pending_adjustments" / "acme.json").write_text("{}")
    (d / "2025-03").mkdir()
    (d / "2025-03" / "acme.json").write_text(json.dumps({"not": "an invoice"}))
    (d / "2025-03" / "beta.json").symlink_to(d / "nowhere.json")  # dangling: the glob skips it
    (d / "2025-04").write_text("a file, not a folder")
    (d / "notamonth").mkdir()
    (d / "notamonth" / "acme.json").write_text(doc("2025-05", "acme"))
    listing = cr.StoredInvoices(d)
    for cid in ("acme", "beta", "nobody"):
        assert listing.invoices(cid) == cr.stored_invoices(d, cid)
        assert listing.pending(cid) == sorted(d.glob(f"????-??/pending_adjustments/{cid}.json"))
    assert [x["period_start"] for x in listing.invoices("acme")] == ["2024-1x-01", "2025-01-01", "2025-02-01"]
    assert cr.StoredInvoices(tmp_path / "missing").invoices("acme") == []
    (d / "2025-01" / "beta.json").write_text("{ not json")
    with pytest.raises(Exception, match="stored invoice is unreadable"):
        cr.StoredInvoices(d).invoices("beta")


def test_customers_subscribed_or_using_the_service_without_an_invoice_are_named():
    oct_ = date(2026, 10, 1)

    def sub(cid, plan, start, end=None):
        return {"customer_id": cid, "plan_id": plan, "start_date": date.fromisoformat(start), "end_date": end and date.fromisoformat(end)}

    def use(cid, usage=None, peak=None):
        return {"customer_id": cid, "usage": usage, "gauge_peak": peak, "gauge_integral": None}

    subs = [
        sub("acme", "pro", "2025-01-01"),
        sub("late", "proxy_new", "2026-10-01"),  # its period was dropped: no invoice line
        sub("gone", "pro", "2025-01-01", "2026-10-01"),  # ended before October: nothing expected
        sub("joiner", "pro", "2026-10-31"),  # one day of October: expected
    ]
    usage = [use("acme", usage=Decimal(5)), use("nosub", usage=Decimal(7)), use("flagged", peak=Decimal(3)), use("idle", usage=Decimal(0))]
    flags = [
        {"customer_id": "flagged", "meter_id": "iot_devices", "rule": "outside_subscription"},
        {"customer_id": "nosub", "meter_id": "proxy_bytes", "rule": "scrape_gap"},
    ]  # names nothing about billing
    plans = [
        {"plan_id": "pro", "base_fee": Decimal(10), "minimum_charge": Decimal(0)},
        {"plan_id": "proxy_new", "base_fee": Decimal(31), "minimum_charge": Decimal(0)},
    ]
    unbilled, named = uninvoiced_customers(oct_, subs, usage, {"acme"}, flags, plans)
    assert unbilled == {
        "joiner": "subscribed to pro in the month, no invoice",
        "late": "subscribed to proxy_new in the month, no invoice",
        "nosub": "usage in the month, no subscription, no invoice",
    }
    assert named == {"flagged": "flagged outside_subscription on iot_devices"}
    assert uninvoiced_customers(oct_, subs, usage, {"acme", "late", "joiner", "nosub"}, flags, plans)[0] == {}


def test_an_idle_customer_of_a_plan_without_fixed_charges_is_not_unbilled():
    # a pay-as-you-go customer with no usage in the month has nothing to bill: no invoice lines, and
    # that must not hold every other customer's invoices; a plan with a base fee or a minimum still must bill
    oct_ = date(2026, 10, 1)
    subs = [
        {"customer_id": c, "plan_id": p, "start_date": date(2025, 1, 1), "end_date": None}
        for c, p in (("idle", "payg"), ("fee", "pro"), ("minimum", "floor"), ("busy", "payg"))
    ]
    plans = [
        {"plan_id": "payg", "version": 1, "base_fee": Decimal(0), "minimum_charge": Decimal(0)},
        {"plan_id": "pro", "version": 1, "base_fee": Decimal(0), "minimum_charge": Decimal(0)},
        {"plan_id": "pro", "version": 2, "base_fee": Decimal(10), "minimum_charge": Decimal(0)},
        {"plan_id": "floor", "version": 1, "base_fee": Decimal(0), "minimum_charge": Decimal(5)},
    ]
    usage = [{"customer_id": "busy", "usage": Decimal(3), "gauge_peak": None, "gauge_integral": None}]
    unbilled, named = uninvoiced_customers(oct_, subs, usage, set(), [], plans)
    assert sorted(unbilled) == ["busy", "fee", "minimum"]
    assert named == {"idle": "nothing to bill: no usage in the month on payg, which has no base fee or minimum charge"}


# --------------------------------------------------------------------------- validated before anything is written


def test_invoices_failing_the_total_check_write_no_file(tmp_path, monkeypatch):
    """The invoices asset checks totals against fct_invoice_lines before writing: a failure leaves no invoice file."""
    import shutil

    import dagster as dg
    import pyarrow as pa
    import pyarrow.parquet as pq

    from billing_dags.core.settings import PROJECT_ROOT
    from billing_dags.defs.invoicing.assets import invoices as invoices_asset
    from billing_dags.defs.seeds.assets import write_seed_snapshots
    from billing_dags.defs.shared.resources import WarehouseResource
    from billing_dags.models.sqlmodels import Window, load_project, partition_file

    seeds = shutil.copytree(PROJECT_ROOT / "seeds", tmp_path / "seeds")
    subs = (seeds / "subscriptions.csv").read_text().splitlines()
    (seeds / "subscriptions.csv").write_text("\n".join([subs[0], *(l for l in subs[1:] if l.startswith("mp-001,"))]) + "\n")
    p = Paths(tmp_path / "data", seeds)
    write_seed_snapshots(p)
    common = {"month": JAN, "customer_id": "mp-001", "plan_id": "proxy_hybrid", "plan_version": 1, "currency": "usd", "dimension": ""}
    rows = [
        {
            **common,
            "line_number": 1,
            "line_type": "base_fee",
            "meter_id": None,
            "description": "base fee",
            "quantity": Decimal(1),
            "unit": "month",
            "unit_price": Decimal(5),
            "amount_minor": 500,
        },
        {
            **common,
            "line_number": 2,
            "line_type": "usage",
            "meter_id": "proxy_bytes",
            "description": "per GiB",
            "quantity": Decimal("12.5"),
            "unit": "gib",
            "unit_price": Decimal("0.05"),
            "amount_minor": 63,
        },
    ]
    f = partition_file(p, load_project().models["fct_invoice_lines"], Window(JAN, FEB))
    f.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), f)
    usage = partition_file(p, load_project().models["fct_usage_by_month"], Window(JAN, FEB))
    usage.parent.mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"customer_id": "mp-001", "usage": Decimal("12.5"), "gauge_peak": None, "gauge_integral": None},
            ]
        ),
        usage,
    )
    real_build = build_module.build_invoices

    def miscounted(*args, **kwargs):
        docs = real_build(*args, **kwargs)
        docs[0]["total_minor"] += 1  # a builder bug: the total is not the sum of the lines
        return docs

    def materialize():
        resources = {"warehouse": WarehouseResource(data_dir=str(p.data_dir), seeds_dir=str(p.seeds_dir))}
        return dg.materialize(
            [invoices_asset], partition_key=JAN.isoformat(), resources=resources, instance=dg.DagsterInstance.ephemeral(), raise_on_error=False
        )

    monkeypatch.setattr(build_module, "build_invoices", miscounted)
    result = materialize()
    assert not result.success
    month_folder = p.invoices / "2025-01"
    assert (sorted(f.name for f in month_folder.rglob("*")) if month_folder.exists() else []) == []
    assert not (p.invoices / "credits_ledger.json").exists()
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert "total_equals_sum_of_lines failed, no invoice file was written" in failure.step_failure_data.error.message
    assert "mp-001" in failure.step_failure_data.error.message

    monkeypatch.setattr(build_module, "build_invoices", real_build)
    assert materialize().success
    assert sorted(f.name for f in (p.invoices / "2025-01").iterdir()) == ["mp-001.csv", "mp-001.html", "mp-001.json", "mp-001.pdf"]
