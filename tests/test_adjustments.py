"""Adjustments (rule 8): a finalized invoice is never edited; a recomputation that changes its
charges is carried once, as a signed adjustment line with the reason, on the customer's next invoice;
credits apply after adjustments and a total never goes below zero."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from billing_dags.billing import credits as cr
from billing_dags.billing.build import build_invoices
from billing_dags.billing.render import render_invoice
from billing_dags.billing.settlement import settle_drafts
from billing_dags.billing.store import write_invoice_files
from billing_dags.core.settings import Paths
from billing_dags.seeds.credits import Grant

UTC = UTC
JAN, FEB, MAR, APR = date(2025, 1, 1), date(2025, 2, 1), date(2025, 3, 1), date(2025, 4, 1)
LATER = datetime(2025, 6, 1, tzinfo=UTC)  # January..April are final
CUSTOMERS = [{"customer_id": "acme", "name": "Acme", "currency": "usd", "plan_id": "pro"}]
PLANS = [{"plan_id": "pro", "version": 1, "name": "Pro", "currency": "usd"}]
CURRENCIES = [{"currency": "usd", "minor_unit_exponent": 2}]


def manifest(raw_hash: str = "aa") -> dict:
    return {
        "month": "x",
        "raw_samples": {"raw/samples/date=2025-01-31/part-sim.parquet": raw_hash * 32},
        "seeds": {"meters.csv": "cd" * 32},
        "code_version": "1",
    }


def lines(month: date, usage_minor: int) -> list[dict]:
    common = {"month": month, "customer_id": "acme", "plan_id": "pro", "plan_version": 1, "currency": "usd", "dimension": ""}
    return [
        {
            **common,
            "line_number": 1,
            "line_type": "base_fee",
            "meter_id": None,
            "description": "Pro base fee",
            "quantity": Decimal(1),
            "unit": "month",
            "unit_price": Decimal("10"),
            "amount_minor": 1000,
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
            "amount_minor": usage_minor,
        },
    ]


def bill(p: Paths, month: date, usage_minor: int, *, now=LATER, raw="aa", grants=()) -> dict:
    docs = build_invoices(lines(month, usage_minor), CUSTOMERS, PLANS, CURRENCIES, month, now=now, manifest=manifest(raw), paths=p, grants=list(grants))
    res = write_invoice_files(p, docs)
    settle_drafts(p, month, docs, list(grants))
    cr.write_ledger(p, list(grants), {"usd": 2})
    stored = json.loads((p.invoices / f"{month:%Y-%m}" / "acme.json").read_text())
    stored["_result"] = res
    return stored


def adjustments(doc: dict) -> list[tuple[str, int, str]]:
    return [(l["adjusts"]["month"], l["amount_minor"], l["description"]) for l in doc["lines"] if l["line_type"] == "adjustment"]


def all_files(p: Paths) -> dict:
    return {f.relative_to(p.invoices).as_posix(): f.read_bytes() for f in sorted(p.invoices.rglob("*")) if f.is_file() and not f.name.startswith(".")}


@pytest.fixture
def p(tmp_path) -> Paths:
    return Paths(tmp_path / "data", tmp_path / "seeds")


def test_recomputed_finalized_invoice_is_adjusted_exactly_once_on_the_next_invoice(p):
    jan = bill(p, JAN, 1234)  # 10.00 + 12.34
    assert jan["invoice_number"] == "INV-2025-000001" and jan["total"] == "22.34"
    jan_bytes = (p.invoices / "2025-01" / "acme.json").read_bytes()

    # late data raises January's usage by 2.66: January stays as it was, the difference waits
    rerun = bill(p, JAN, 1500, raw="bb")
    assert rerun["_result"]["changed_after_finalization"] == ["acme"]
    assert (p.invoices / "2025-01" / "acme.json").read_bytes() == jan_bytes
    pending = json.loads((p.invoices / "2025-01" / "pending_adjustments" / "acme.json").read_text())
    assert (pending["finalized_charges_minor"], pending["recomputed_charges_minor"], pending["delta"]) == (2234, 2500, "2.66")

    feb = bill(p, FEB, 1000)
    reason = "usage of 2025-01 recomputed after late data: INV-2025-000001 charges 22.34 -> 25.00"
    assert adjustments(feb) == [("2025-01", 266, reason)]
    assert feb["lines"][2]["line_number"] == 3 and feb["lines"][2]["amount"] == "2.66"
    assert feb["lines"][2]["adjusts"] == {"kind": "recompute", "month": "2025-01", "invoice_number": "INV-2025-000001"}
    assert (feb["charges_minor"], feb["adjustments_minor"], feb["total_minor"]) == (2000, 266, 2266)

    # consumed: not on March, and rerunning February or January changes nothing
    mar = bill(p, MAR, 1000)
    assert adjustments(mar) == [] and mar["total_minor"] == 2000
    before = all_files(p)
    bill(p, JAN, 1500, raw="bb")
    bill(p, FEB, 1000)
    bill(p, MAR, 1000)
    assert all_files(p) == before


def test_negative_adjustment_and_only_the_new_difference_after_a_second_recomputation(p):
    bill(p, JAN, 1234)
    bill(p, JAN, 1000, raw="bb")  # usage corrected down by 2.34
    feb = bill(p, FEB, 1000)
    assert [(m, a) for m, a, _ in adjustments(feb)] == [("2025-01", -234)]
    assert "INV-2025-000001 charges 22.34 -> 20.00" in adjustments(feb)[0][2]
    # January recomputed again (now +1.00 against what was finalized): only what was not yet carried follows
    bill(p, JAN, 1334, raw="cc")
    mar = bill(p, MAR, 1000)
    assert adjustments(mar) == [
        ("2025-01", 334, "usage of 2025-01 recomputed after late data: INV-2025-000001 charges 22.34 -> 23.34 (-2.34 already adjusted)")
    ]
    # back to the finalized figures: the carried corrections are reversed once more
    bill(p, JAN, 1234)
    apr = bill(p, APR, 1000)
    assert [(m, a) for m, a, _ in adjustments(apr)] == [("2025-01", -100)]
    assert bill(p, date(2025, 5, 1), 1000, now=datetime(2025, 7, 1, tzinfo=UTC))["adjustments_minor"] == 0


def test_drafts_show_an_adjustment_without_consuming_it(p):
    bill(p, JAN, 1234)
    bill(p, JAN, 1500, raw="bb")
    feb_draft_time = datetime(2025, 3, 2, tzinfo=UTC)  # February is still in its grace period
    feb = bill(p, FEB, 1000, now=feb_draft_time)
    assert feb["status"] == "draft" and [a for _, a, _ in adjustments(feb)] == [266]
    assert [a for _, a, _ in adjustments(bill(p, FEB, 1000, now=feb_draft_time))] == [266]  # still once, not twice
    feb = bill(p, FEB, 1000)  # finalized: consumes it
    assert feb["status"] == "finalized" and [a for _, a, _ in adjustments(feb)] == [266]
    assert adjustments(bill(p, MAR, 1000)) == []


def test_credits_apply_after_adjustments(p):
    grants = [Grant("g", "acme", "usd", 1000, date(2024, 12, 1), None, "Prepaid")]
    jan = bill(p, JAN, 1234, grants=grants)
    assert jan["total_minor"] == 2234 - 1000 and jan["credits_used"] == "10.00"
    bill(p, JAN, 1500, raw="bb", grants=grants)  # the finalized credit draw stands; the charge difference follows
    feb = bill(p, FEB, 1000, grants=grants)
    assert [l["line_type"] for l in feb["lines"]] == ["base_fee", "usage", "adjustment"]  # the grant is used up
    assert feb["total_minor"] == 2000 + 266


def test_a_total_never_goes_below_zero_and_the_remainder_is_carried(p):
    grants = [Grant("g", "acme", "usd", 500, date(2024, 12, 1), None, "Prepaid")]
    bill(p, JAN, 5000, grants=grants)  # 60.00 - 5.00 credit
    bill(p, JAN, 0, raw="bb", grants=grants)  # January's usage was wrong: -50.00
    feb = bill(p, FEB, 1000, grants=grants)  # 20.00 - 50.00 = -30.00
    types = [(l["line_type"], l["amount_minor"]) for l in feb["lines"]]
    assert types == [("base_fee", 1000), ("usage", 1000), ("adjustment", -5000), ("carry_forward", 3000)]
    assert (feb["total_minor"], feb["credits_used_minor"], feb["carried_forward"]) == (0, 0, "30.00")
    mar = bill(p, MAR, 4000, grants=grants)  # 50.00 - 30.00 carried, then no credit left
    assert adjustments(mar) == [("2025-02", -3000, "credit balance carried from INV-2025-000002 (2025-02)")]
    assert mar["total_minor"] == 2000 and mar["credits_used_minor"] == 0
    assert adjustments(bill(p, APR, 1000, grants=grants)) == []


def test_unchanged_inputs_reproduce_every_file_including_the_ledger(p):
    grants = [Grant("g1", "acme", "usd", 1500, date(2024, 12, 1), date(2025, 3, 1), "Early"), Grant("g2", "acme", "usd", 4000, date(2024, 12, 1), None, "Late")]

    def history():
        bill(p, JAN, 1234, grants=grants)
        bill(p, JAN, 1500, raw="bb", grants=grants)
        bill(p, FEB, 1000, grants=grants)
        bill(p, MAR, 800, now=datetime(2025, 4, 2, tzinfo=UTC), grants=grants)  # March still a draft

    history()
    first = all_files(p)
    assert {"credits_ledger.json", "registry.json", "2025-01/pending_adjustments/acme.json", "2025-03/acme.html"} <= set(first)
    history()
    assert all_files(p) == first


def test_a_late_usage_report_after_finalization_is_named_in_the_adjustment(p):
    """The manifests fingerprint usage reports: a report accepted after finalization is the reason, not "a rerun"."""
    from billing_dags.billing.manifest import invoice_manifest
    from billing_dags.ingest.usage_reports import Report, ReportStore

    p.seeds_dir.mkdir(parents=True)
    (p.seeds_dir / "meters.csv").write_text("meter_id\n")
    at = int(datetime(2025, 1, 31, 10, tzinfo=UTC).timestamp()) * 1000

    def bill_with(month: date, usage_minor: int, manifest: dict) -> dict:
        write_invoice_files(p, build_invoices(lines(month, usage_minor), CUSTOMERS, PLANS, CURRENCIES, month, now=LATER, manifest=manifest, paths=p))
        return json.loads((p.invoices / f"{month:%Y-%m}" / "acme.json").read_text())

    with ReportStore.open(p) as store:
        store.accept(Report("h10", "acme", at, 3600, {"active_devices": Decimal(3)}))
    jan = bill_with(JAN, 1234, invoice_manifest(p, JAN, p.seeds_dir, "1"))
    assert jan["status"] == "finalized" and jan["manifest"]["usage_reports"]["2025-01-31"]["reports"] == 1
    with ReportStore.open(p) as store:  # received after January was finalized
        store.accept(Report("h11", "acme", at + 3_600_000, 3600, {"active_devices": Decimal(5)}))
    bill_with(JAN, 1500, invoice_manifest(p, JAN, p.seeds_dir, "1"))
    feb = bill_with(FEB, 1000, invoice_manifest(p, FEB, p.seeds_dir, "1"))
    assert adjustments(feb) == [("2025-01", 266, "usage of 2025-01 recomputed after 1 late usage report (2025-01-31): INV-2025-000001 charges 22.34 -> 25.00")]


# --------------------------------------------------------------------------- customers who leave

# "gone" subscribed to Pro until 1 February 2025 (exclusive): fct_invoice_lines has no line of it from February on
WITH_LEAVER = [*CUSTOMERS, {"customer_id": "gone", "name": "Gone Ltd", "currency": "usd", "plan_id": "pro"}]


def bill_all(p: Paths, month: date, usage_minor: dict[str, int], *, now=LATER, raw="aa", grants=()) -> dict[str, dict]:
    """Bill the customers in ``usage_minor`` (base fee 10.00 + usage each); every stored invoice of the month by customer."""
    rows = [{**line, "customer_id": cid} for cid, usage in usage_minor.items() for line in lines(month, usage)]
    docs = build_invoices(rows, WITH_LEAVER, PLANS, CURRENCIES, month, now=now, manifest=manifest(raw), paths=p, grants=list(grants))
    write_invoice_files(p, docs)
    settle_drafts(p, month, docs, list(grants))
    cr.write_ledger(p, list(grants), {"usd": 2})
    return {f.stem: json.loads(f.read_text()) for f in sorted((p.invoices / f"{month:%Y-%m}").glob("*.json"))}


def test_late_data_for_a_customer_who_left_is_billed_on_an_adjustment_invoice(p):
    jan = bill_all(p, JAN, {"acme": 1234, "gone": 1234})  # 10.00 + 12.34 each
    assert (jan["acme"]["invoice_number"], jan["gone"]["invoice_number"], jan["gone"]["total"]) == ("INV-2025-000001", "INV-2025-000002", "22.34")
    bill_all(p, JAN, {"acme": 1234, "gone": 1500}, raw="bb")  # late data: gone's usage 12.34 -> 15.00

    feb = bill_all(p, FEB, {"acme": 1000})  # gone has no subscription in February, so no invoice lines
    assert feb["acme"]["invoice_number"] == "INV-2025-000003" and feb["acme"]["total_minor"] == 2000
    adj = feb["gone"]
    assert (adj["invoice_number"], adj["status"], adj["document"], adj["corrects"]) == (
        "INV-2025-000004",
        "finalized",
        "adjustment_invoice",
        ["INV-2025-000002"],
    )
    assert adj["period_start"] == "2025-02-01" and adj["finalized_on"] == "2025-03-04"
    assert [(l["line_number"], l["line_type"], l["amount_minor"], l["description"]) for l in adj["lines"]] == [
        (1, "adjustment", 1500 - 1234, "usage of 2025-01 recomputed after late data: INV-2025-000002 charges 22.34 -> 25.00"),
    ]
    assert adj["lines"][0]["adjusts"] == {"kind": "recompute", "month": "2025-01", "invoice_number": "INV-2025-000002"}
    assert (adj["charges_minor"], adj["adjustments_minor"], adj["total"], adj["total_minor"]) == (0, 266, "2.66", 266)
    # rendered like an invoice and listed with the month's invoices
    html = (p.invoices / "2025-02" / "gone.html").read_text()
    assert "<h1>Adjustment invoice INV-2025-000004</h1>" in html and "Corrects INV-2025-000002" in html and "USD 2.66" in html
    csv_text = (p.invoices / "2025-02" / "gone.csv").read_text()
    assert "INV-2025-000004,finalized,gone,2025-02-01,2025-03-01,usd,1,adjustment," in csv_text
    assert csv_text.splitlines()[-1] == "INV-2025-000004,finalized,gone,2025-02-01,2025-03-01,usd,,total,,,Total due,,,,2.66,266"
    assert render_invoice(adj, "table").startswith("Adjustment invoice INV-2025-000004 (finalized)")
    from billing_dags.billing.listing import invoice_rows

    rows = {r["customer"]: r for r in invoice_rows(p, FEB)}
    assert (rows["gone"]["invoice"], rows["gone"]["document"], rows["gone"]["total"]) == ("INV-2025-000004", "adjustment invoice", "2.66 USD")
    assert rows["acme"]["document"] == "invoice"

    # issued once: March has no invoice for gone, and rerunning every month changes no byte
    assert set(bill_all(p, MAR, {"acme": 1000})) == {"acme"}
    before = all_files(p)
    bill_all(p, JAN, {"acme": 1234, "gone": 1500}, raw="bb")
    bill_all(p, FEB, {"acme": 1000})
    bill_all(p, MAR, {"acme": 1000})
    assert all_files(p) == before


def test_a_subscription_that_ended_gets_its_last_months_late_data_on_an_adjustment_invoice(tmp_path):
    """Seeds in tmp (mp-001 on proxy_per_gb, 0.10 USD per GiB, until 1 February 2025; mp-004 on the 10.00 flat
    plan), invoice lines from the SQL models, then the invoices as the monthly runs make them."""
    import csv
    import shutil

    from sql_helpers import SEEDS_DIR, month_window, rate_month, seed_tables

    seeds_dir = tmp_path / "seeds"
    shutil.copytree(SEEDS_DIR, seeds_dir)
    subs = list(csv.DictReader((seeds_dir / "subscriptions.csv").open()))
    for row in subs:
        if row["customer_id"] == "mp-001":
            row["end_date"] = "2025-02-01"
    with (seeds_dir / "subscriptions.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(subs[0]))
        w.writeheader()
        w.writerows(subs)
    seeds = seed_tables(seeds_dir)
    customers, plans, currencies = (seeds[n].to_pylist() for n in ("customers", "plans", "currencies"))
    p = Paths(tmp_path / "data", seeds_dir)

    def run(month: date, gib: int, raw: str = "aa") -> dict[str, dict]:
        window = month_window(month.year, month.month)
        usage = [
            {
                "month": month,
                "customer_id": cid,
                "meter_id": "proxy_bytes",
                "dimension": "",
                "kind": "counter",
                "usage": Decimal(gib * 2**30),
                "period_ms": window.end_ms - window.start_ms,
            }
            for cid in ("mp-001", "mp-004")
        ]
        lines_ = [r for r in rate_month(usage, window, seeds)[1] if r["customer_id"] in ("mp-001", "mp-004")]
        docs = build_invoices(lines_, customers, plans, currencies, month, now=LATER, manifest=manifest(raw), paths=p)
        write_invoice_files(p, docs)
        settle_drafts(p, month, docs, [])
        return {d["customer_id"]: d for d in docs}

    jan = run(JAN, 100)  # mp-001: 100 GiB x 0.10 = 10.00
    assert (jan["mp-001"]["invoice_number"], jan["mp-001"]["total"]) == ("INV-2025-000001", "10.00")
    run(JAN, 150, raw="bb")  # late data: 150 GiB, 15.00
    feb = run(FEB, 150)  # mp-001 has no subscription in February: no invoice lines, an adjustment invoice
    # the seeds' tax rate of a US customer is 0 (out of scope), shown as a 0.00 tax line
    assert [(l["line_type"], l["amount_minor"]) for l in feb["mp-004"]["lines"]] == [("base_fee", 1000), ("tax", 0)]
    adj = feb["mp-001"]
    assert (adj["invoice_number"], adj["document"], adj["status"], adj["plan_id"]) == (
        "INV-2025-000003",
        "adjustment_invoice",
        "finalized",
        "proxy_per_gb",
    )  # numbered in customer order
    assert [(l["amount_minor"], l["description"]) for l in adj["lines"]] == [
        (1500 - 1000, "usage of 2025-01 recomputed after late data: INV-2025-000001 charges 10.00 -> 15.00"),
        (0, "VAT 0% (out of scope) on 5.00 USD"),  # a correction of a taxable charge is taxed with it
    ]
    assert adj["total"] == "5.00" and (p.invoices / "2025-02" / "mp-001.html").exists()
    assert "mp-001" not in run(MAR, 150)


def test_a_negative_correction_for_a_customer_who_left_is_a_credit_note(p):
    bill_all(p, JAN, {"acme": 1234, "gone": 1234})
    bill_all(p, JAN, {"acme": 1234, "gone": 0}, raw="bb")  # gone's January usage was wrong: 22.34 -> 10.00
    feb_draft_time = datetime(2025, 3, 2, tzinfo=UTC)
    draft = bill_all(p, FEB, {"acme": 1000}, now=feb_draft_time)["gone"]  # shown while February is a draft
    assert (draft["invoice_number"], draft["status"], draft["document"], draft["total"]) == ("DRAFT-2025-02-gone", "draft", "credit_note", "-12.34")
    assert bill_all(p, FEB, {"acme": 1000}, now=feb_draft_time)["gone"] == draft  # not consumed by a draft
    note = bill_all(p, FEB, {"acme": 1000})["gone"]
    assert (note["invoice_number"], note["status"], note["document"]) == ("INV-2025-000004", "finalized", "credit_note")
    # refunded, not carried: the total is negative and there is no carry-forward line
    assert [(l["line_type"], l["amount_minor"]) for l in note["lines"]] == [("adjustment", 0 - 1234)]
    assert (note["total"], note["total_minor"], note["carried_forward_minor"]) == ("-12.34", -1234, 0)
    assert "<h1>Credit note INV-2025-000004</h1>" in (p.invoices / "2025-02" / "gone.html").read_text()
    last = (p.invoices / "2025-02" / "gone.csv").read_text().splitlines()[-1]
    assert last == "INV-2025-000004,finalized,gone,2025-02-01,2025-03-01,usd,,total,,,Total refunded,,,,-12.34,-1234"
    assert set(bill_all(p, MAR, {"acme": 1000})) == {"acme"}


def test_a_credit_carried_from_the_last_invoice_of_a_customer_who_left_is_refunded(p):
    bill_all(p, JAN, {"acme": 1234, "gone": 1234})
    bill_all(p, JAN, {"acme": 1234, "gone": 0}, raw="bb")  # -12.34 for January
    feb = bill_all(p, FEB, {"acme": 1000, "gone": 0})["gone"]  # its last month: 10.00 - 12.34 < 0, 2.34 carried
    assert (feb["invoice_number"], feb["total_minor"], feb["carried_forward_minor"]) == ("INV-2025-000004", 0, 1234 - 1000)
    note = bill_all(p, MAR, {"acme": 1000})["gone"]  # no next invoice: the 2.34 is refunded
    assert (note["invoice_number"], note["document"], note["corrects"], note["total_minor"]) == ("INV-2025-000006", "credit_note", ["INV-2025-000004"], -234)
    assert [l["description"] for l in note["lines"]] == ["credit balance carried from INV-2025-000004 (2025-02)"]


def test_a_correction_after_the_next_month_was_finalized_goes_on_the_following_months_run(p):
    bill_all(p, JAN, {"acme": 1234, "gone": 1234})
    bill_all(p, FEB, {"acme": 1000})  # nothing to adjust yet: no invoice for gone
    bill_all(p, JAN, {"acme": 1234, "gone": 1500}, raw="bb")  # the correction arrives after February was finalized
    assert set(bill_all(p, FEB, {"acme": 1000})) == {"acme"}  # a rerun of the closed month issues nothing new
    mar = bill_all(p, MAR, {"acme": 1000})
    assert (mar["gone"]["invoice_number"], mar["gone"]["total_minor"]) == ("INV-2025-000005", 266)
    # January corrected once more (+1.00): only the new difference, on April's run
    bill_all(p, JAN, {"acme": 1234, "gone": 1600}, raw="cc")
    apr = bill_all(p, APR, {"acme": 1000})
    assert [(l["amount_minor"], l["description"]) for l in apr["gone"]["lines"]] == [
        (100, "usage of 2025-01 recomputed after late data: INV-2025-000002 charges 22.34 -> 26.00 (2.66 already adjusted)")
    ]


def test_a_draft_adjustment_invoice_is_withdrawn_when_the_correction_is_undone(p):
    bill_all(p, JAN, {"acme": 1234, "gone": 1234})
    bill_all(p, JAN, {"acme": 1234, "gone": 1500}, raw="bb")
    feb_draft_time = datetime(2025, 3, 2, tzinfo=UTC)
    assert bill_all(p, FEB, {"acme": 1000}, now=feb_draft_time)["gone"]["total_minor"] == 266
    bill_all(p, JAN, {"acme": 1234, "gone": 1234})  # back to the finalized figures: nothing left to adjust
    assert set(bill_all(p, FEB, {"acme": 1000}, now=feb_draft_time)) == {"acme"}
    assert not list((p.invoices / "2025-02").glob("gone.*"))


def test_prepaid_credit_pays_an_adjustment_invoice(p):
    grants = [Grant("g", "gone", "usd", 500, date(2025, 2, 1), None, "Goodwill")]  # granted after January closed
    bill_all(p, JAN, {"acme": 1234, "gone": 1234}, grants=grants)
    bill_all(p, JAN, {"acme": 1234, "gone": 1500}, raw="bb", grants=grants)
    adj = bill_all(p, FEB, {"acme": 1000}, grants=grants)["gone"]
    assert [(l["line_type"], l["amount_minor"]) for l in adj["lines"]] == [("adjustment", 266), ("credit", -266)]
    assert adj["total_minor"] == 0 and adj["document"] == "adjustment_invoice"
