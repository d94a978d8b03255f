"""Prepaid credits (rules 7, 8, 11): expiry-ordered draw-down, balances carried across months,
never below zero, exact minor units, clear seed errors, a deterministic ledger."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing_dags.billing import credits as cr
from billing_dags.billing.build import build_invoices
from billing_dags.billing.render import render_invoice
from billing_dags.billing.settlement import settle_drafts
from billing_dags.billing.store import write_invoice_files
from billing_dags.core.settings import Paths
from billing_dags.seeds.catalog import SeedError, load_grants
from billing_dags.seeds.credits import Grant

UTC = UTC
JAN, FEB, MAR = date(2025, 1, 1), date(2025, 2, 1), date(2025, 3, 1)
AFTER_ALL = datetime(2025, 6, 1, tzinfo=UTC)  # every month above is final (3 grace days)
CUSTOMERS = [
    {"customer_id": "acme", "name": "Acme", "currency": "usd", "plan_id": "pro"},
    {"customer_id": "tokyo", "name": "Tokyo KK", "currency": "jpy", "plan_id": "jp"},
]
PLANS = [{"plan_id": "pro", "version": 1, "name": "Pro", "currency": "usd"}, {"plan_id": "jp", "version": 1, "name": "JP", "currency": "jpy"}]
CURRENCIES = [{"currency": "usd", "minor_unit_exponent": 2}, {"currency": "jpy", "minor_unit_exponent": 0}]
EXPONENTS = {"usd": 2, "jpy": 0}
MANIFEST = {"month": "x", "raw_samples": {}, "seeds": {}, "code_version": "test"}


def charges(cid: str, month: date, amount_minor: int, currency: str = "usd") -> list[dict]:
    return [
        {
            "month": month,
            "customer_id": cid,
            "plan_id": "jp" if currency == "jpy" else "pro",
            "plan_version": 1,
            "currency": currency,
            "line_number": 1,
            "line_type": "usage",
            "meter_id": "api_calls",
            "dimension": "",
            "description": "API calls",
            "quantity": Decimal("100"),
            "unit": "call",
            "unit_price": Decimal("0.01"),
            "amount_minor": amount_minor,
            "extra_column_from_a_newer_model": "ignored",
        }
    ]


def grant(gid, amount_minor, expires_on=None, granted_on=date(2024, 12, 1), cid="acme", currency="usd", description="") -> Grant:
    return Grant(gid, cid, currency, amount_minor, granted_on, expires_on, description)


def bill(p: Paths, month: date, lines: list[dict], grants, now=AFTER_ALL, held=None) -> dict:
    """Build, write, update the ledger; the stored JSON of the (single) invoice."""
    docs = build_invoices(lines, CUSTOMERS, PLANS, CURRENCIES, month, now=now, manifest=MANIFEST, paths=p, grants=grants, held=held)
    write_invoice_files(p, docs)
    settle_drafts(p, month, docs, grants)
    cr.write_ledger(p, grants, EXPONENTS)
    (doc,) = docs
    return json.loads((p.invoices / f"{month:%Y-%m}" / f"{doc['customer_id']}.json").read_text())


def credit_lines(doc: dict) -> list[tuple[str, int]]:
    return [(l["grant_id"], l["amount_minor"]) for l in doc["lines"] if l["line_type"] == "credit"]


@pytest.fixture
def p(tmp_path) -> Paths:
    return Paths(tmp_path / "data", tmp_path / "seeds")


def test_expiry_order_across_grants_and_balances_carry_over_three_months(p):
    a = grant("a-early", 3000, expires_on=date(2025, 3, 1))  # usable for Jan and Feb (period end <= expiry), not March
    b = grant("b-later", 5000, expires_on=date(2026, 1, 1))
    c = grant("c-never", 1000, expires_on=None)  # never expires: drawn last
    grants = [c, b, a]  # input order does not matter

    jan = bill(p, JAN, charges("acme", JAN, 2000), grants)  # a: 30.00 -> 10.00
    assert credit_lines(jan) == [("a-early", -2000)]
    assert (jan["charges_minor"], jan["credits_used_minor"], jan["total_minor"]) == (2000, 2000, 0)

    feb = bill(p, FEB, charges("acme", FEB, 2500), grants)  # a: 10.00 -> 0, b: 50.00 -> 35.00
    assert credit_lines(feb) == [("a-early", -1000), ("b-later", -1500)]
    assert feb["total_minor"] == 0 and feb["credits_used"] == "25.00"

    mar = bill(p, MAR, charges("acme", MAR, 5000), grants)  # a expired; b: 35.00 -> 0, c: 10.00 -> 0, 5.00 due
    assert credit_lines(mar) == [("b-later", -3500), ("c-never", -1000)]
    assert mar["total_minor"] == 5000 - 3500 - 1000 == 500 and mar["total"] == "5.00"
    assert sum(l["amount_minor"] for l in mar["lines"]) == mar["total_minor"]
    assert [l["line_number"] for l in mar["lines"]] == [1, 2, 3]
    assert "b-later" in mar["lines"][1]["description"] and "0.00 USD remaining" in mar["lines"][1]["description"]

    ledger = json.loads((p.invoices / "credits_ledger.json").read_text())
    rows = {g["grant_id"]: g for g in ledger["grants"]}
    assert [(d["month"], d["drawn_minor"], d["balance_after_minor"]) for d in rows["a-early"]["draws"]] == [("2025-01", 2000, 1000), ("2025-02", 1000, 0)]
    assert [(d["month"], d["drawn_minor"], d["balance_after_minor"]) for d in rows["b-later"]["draws"]] == [("2025-02", 1500, 3500), ("2025-03", 3500, 0)]
    assert [(d["month"], d["balance_after"]) for d in rows["c-never"]["draws"]] == [("2025-03", "0.00")]
    assert rows["c-never"]["balance"] == "0.00" and rows["a-early"]["draws"][0]["invoice_number"] == "INV-2025-000001"
    assert not any(g["overdrawn"] for g in ledger["grants"])


def test_expired_or_not_yet_granted_credit_is_not_used(p):
    grants = [
        grant("expired", 5000, expires_on=date(2025, 1, 31)),  # exclusive: gone before January closed
        grant("too-late", 5000, granted_on=date(2025, 2, 1)),  # granted after January closed
        grant("last-day", 700, expires_on=date(2025, 2, 1)),  # valid through 31 January: counts for January
    ]
    jan = bill(p, JAN, charges("acme", JAN, 2000), grants)
    assert credit_lines(jan) == [("last-day", -700)]
    assert jan["total_minor"] == 1300
    assert [c["grant_id"] for c in jan["credits"]] == ["last-day"]
    # February: the grant given on 1 February applies; the others are gone
    feb = bill(p, FEB, charges("acme", FEB, 2000), grants)
    assert credit_lines(feb) == [("too-late", -2000)] and feb["total_minor"] == 0
    rows = {g["grant_id"]: g for g in json.loads((p.invoices / "credits_ledger.json").read_text())["grants"]}
    assert rows["expired"]["draws"] == [] and rows["expired"]["balance"] == "50.00"


def test_invoice_smaller_than_the_credit_goes_to_zero_and_the_balance_carries(p):
    grants = [grant("big", 10000, expires_on=date(2027, 1, 1), description="Welcome credit")]
    jan = bill(p, JAN, charges("acme", JAN, 1234), grants)
    assert jan["total_minor"] == 0 and jan["total"] == "0.00"
    (line,) = [l for l in jan["lines"] if l["line_type"] == "credit"]
    assert line["amount"] == "-12.34" and line["unit_price"] == "-12.34" and line["quantity"] == "1"
    assert line["description"] == "Prepaid credit big (Welcome credit; usable through 2026-12-31): 87.66 USD remaining"
    assert jan["credits"] == [
        {
            "grant_id": "big",
            "description": "Welcome credit",
            "expires_on": "2027-01-01",
            "available": "100.00",
            "used": "12.34",
            "remaining": "87.66",
            "remaining_minor": 8766,
        }
    ]
    feb = bill(p, FEB, charges("acme", FEB, 2011), grants)
    assert credit_lines(feb) == [("big", -2011)] and feb["credits"][0]["remaining"] == "67.55"

    # every rendering shows the credit, the credits used and the total due
    page = render_invoice(feb, "html")
    assert "Prepaid credits used" in page and "USD -20.11" in page and "Prepaid credit big" in page and "67.55" in page
    table = render_invoice(feb, "table")
    assert "Prepaid credits used" in table and "Total due" in table
    text = render_invoice(feb, "csv")
    assert ",credit,," in text and ",credits_used,,,Prepaid credits used,,,,20.11,2011" in text
    assert text.splitlines()[-1].endswith(",total,,,Total due,,,,0.00,0")


def test_yen_credits_are_whole_units(p):
    grants = [grant("jp", 5000, cid="tokyo", currency="jpy")]
    (doc,) = build_invoices(charges("tokyo", JAN, 1230, "jpy"), CUSTOMERS, PLANS, CURRENCIES, JAN, now=AFTER_ALL, manifest=MANIFEST, paths=p, grants=grants)
    assert credit_lines(doc) == [("jp", -1230)] and doc["credits"][0]["remaining"] == "3770" and doc["total"] == "0"


def test_draft_shows_credits_and_rerun_reproduces_everything(p):
    grants = [grant("a", 3000, expires_on=date(2025, 3, 1)), grant("b", 5000)]
    draft_now = datetime(2025, 3, 2, tzinfo=UTC)  # January final, February still a draft
    bill(p, JAN, charges("acme", JAN, 2000), grants, now=draft_now)
    feb = bill(p, FEB, charges("acme", FEB, 2500), grants, now=draft_now)
    assert feb["status"] == "draft" and credit_lines(feb) == [("a", -1000), ("b", -1500)]
    files = {f: f.read_bytes() for f in sorted(p.invoices.rglob("*")) if f.is_file() and not f.name.startswith(".")}
    assert p.invoices / "credits_ledger.json" in files
    # rerun in order, then out of order: every byte is the same
    bill(p, JAN, charges("acme", JAN, 2000), grants, now=draft_now)
    bill(p, FEB, charges("acme", FEB, 2500), grants, now=draft_now)
    bill(p, JAN, charges("acme", JAN, 2000), grants, now=draft_now)
    assert {f: f.read_bytes() for f in sorted(p.invoices.rglob("*")) if f.is_file() and not f.name.startswith(".")} == files


HELD = {"acme": "held by unacknowledged critical flags: reappeared_series on api_calls"}


def ledger_rows(p: Paths) -> dict:
    return {g["grant_id"]: g for g in json.loads((p.invoices / "credits_ledger.json").read_text())["grants"]}


def test_a_held_month_recomputed_after_the_next_month_was_finalized_draws_only_what_is_left(p):
    grants = [grant("g", 1000)]  # 10.00, no expiry
    jan = bill(p, JAN, charges("acme", JAN, 500), grants, held=HELD)  # past its grace, held in draft by a flag
    assert jan["status"] == "draft" and credit_lines(jan) == [("g", -500)]
    feb = bill(p, FEB, charges("acme", FEB, 1000), grants)  # 10.00 - 5.00 drawn by January = 5.00 left
    assert feb["status"] == "finalized" and credit_lines(feb) == [("g", -500)] and feb["total_minor"] == 1000 - 500
    # late data raises January to 10.00 while it is still held: February's finalized 5.00 is gone,
    # so January draws the 5.00 left (not the whole 10.00 again: 15.00 drawn from a 10.00 grant)
    jan = bill(p, JAN, charges("acme", JAN, 1000), grants, held=HELD)
    assert jan["status"] == "draft" and credit_lines(jan) == [("g", -500)] and jan["total_minor"] == 1000 - 500
    assert jan["credits"][0]["available"] == "5.00"
    row = ledger_rows(p)["g"]
    assert [(d["month"], d["drawn_minor"]) for d in row["draws"]] == [("2025-01", 500), ("2025-02", 500)]
    assert row["balance"] == "0.00" and not row["overdrawn"]
    # the flag is acknowledged: January is finalized with the same draw, numbered after February
    jan = bill(p, JAN, charges("acme", JAN, 1000), grants)
    assert jan["status"] == "finalized" and jan["invoice_number"] == "INV-2025-000002"
    assert credit_lines(jan) == [("g", -500)] and jan["total_minor"] == 500
    assert ledger_rows(p)["g"]["balance_minor"] == 0


def test_drafts_follow_a_changed_draw_of_another_month(p):
    grants = [grant("g", 1000)]
    bill(p, JAN, charges("acme", JAN, 300), grants, held=HELD)  # draws 3.00
    feb = bill(p, FEB, charges("acme", FEB, 1000), grants, held=HELD)  # draws the 7.00 left
    assert credit_lines(feb) == [("g", -700)]
    bill(p, JAN, charges("acme", JAN, 800), grants, held=HELD)  # January first in the draw order: 8.00
    feb = json.loads((p.invoices / "2025-02" / "acme.json").read_text())  # February's draft follows: 2.00 left
    assert credit_lines(feb) == [("g", -200)] and feb["total_minor"] == 800
    assert ledger_rows(p)["g"]["balance_minor"] == 0
    # February finalized draws what January left; January's draft then shows February's draw as used
    bill(p, FEB, charges("acme", FEB, 1000), grants)
    jan = json.loads((p.invoices / "2025-01" / "acme.json").read_text())
    assert credit_lines(jan) == [("g", -800)] and jan["credits"][0]["remaining"] == "0.00"


MONTHS = (JAN, FEB, MAR, date(2025, 4, 1))
GRANT_ROWS = st.lists(
    st.tuples(
        st.integers(min_value=1, max_value=3000),
        st.sampled_from([None, FEB, MAR, date(2025, 4, 1), date(2025, 5, 1)]),  # expires_on (exclusive)
        st.sampled_from([date(2024, 12, 1), date(2025, 1, 20), date(2025, 2, 15)]),  # granted_on
    ),
    min_size=1,
    max_size=3,
)
# (month index, charges of that month in minor units, finalize: else held in draft by a critical flag)
RUNS = st.lists(st.tuples(st.integers(min_value=0, max_value=3), st.integers(min_value=0, max_value=2500), st.booleans()), min_size=1, max_size=7)


@pytest.mark.acceptance
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=GRANT_ROWS, runs=RUNS)
def test_draws_never_exceed_a_grant_in_any_order_of_finalizing_and_recomputing(tmp_path_factory, rows, runs):
    p = Paths(tmp_path_factory.mktemp("credits") / "data", Path("unused-seeds"))
    grants = [
        grant(f"g{i}", amount, expires_on=expires if expires is None or expires > granted else None, granted_on=granted)
        for i, (amount, expires, granted) in enumerate(rows)
    ]
    by_id = {g.grant_id: g for g in grants}
    last: dict[date, int] = {}

    def run(month: date, amount: int, final: bool) -> None:
        bill(p, month, charges("acme", month, amount), grants, held=None if final else HELD)
        last[month] = amount

    def files() -> dict:
        return {f: f.read_bytes() for f in sorted(p.invoices.rglob("*")) if f.is_file() and not f.name.startswith(".")}

    for i, amount, final in runs:
        run(MONTHS[i], amount, final)
        stored = cr.stored_invoices(p.invoices)
        drawn: dict[str, int] = {}
        for doc in stored:
            assert doc["total_minor"] >= 0 and doc["total_minor"] == sum(l["amount_minor"] for l in doc["lines"])
            for gid, minor in cr.draws_of(doc).items():
                assert minor > 0 and by_id[gid].usable_for(date.fromisoformat(doc["period_start"]), date.fromisoformat(doc["period_end"]))
                drawn[gid] = drawn.get(gid, 0) + minor
        for gid, minor in drawn.items():
            assert minor <= by_id[gid].amount_minor, (gid, minor, by_id[gid].amount_minor)
        assert not any(r["overdrawn"] for r in ledger_rows(p).values())
        # recomputing any unchanged draft reproduces every file byte for byte
        before = files()
        for doc in stored:
            if doc["status"] == "draft":
                month = date.fromisoformat(doc["period_start"])
                run(month, last[month], False)
                assert files() == before, f"rerun of the {month:%Y-%m} draft changed files"


# --------------------------------------------------------------------------- seeds/credits.csv


def write_credits(seeds: Path, *rows: str) -> Path:
    seeds.mkdir(parents=True, exist_ok=True)
    f = seeds / "credits.csv"
    f.write_text("grant_id,customer_id,currency,amount,granted_on,expires_on,description\n" + "".join(r + "\n" for r in rows))
    return f


def test_seed_file_loads_with_exact_minor_units(tmp_path):
    write_credits(tmp_path, "g1,acme,usd,100.00,2025-01-01,2027-01-01,Welcome", "g2,acme,usd,5,2025-01-01,,No expiry", "g3,tokyo,jpy,5000,2025-01-01,,Yen")
    grants = {g.grant_id: g for g in load_grants(tmp_path, CUSTOMERS, CURRENCIES)}
    assert grants["g1"].amount_minor == 10000 and grants["g1"].expires_on == date(2027, 1, 1)
    assert grants["g2"].amount_minor == 500 and grants["g2"].expires_on is None and grants["g2"].seed_line == 3
    assert grants["g3"].amount_minor == 5000


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            "g1,acme,usd,10.005,2025-01-01,,x",
            "credits.csv:2: column amount: 10.005 has more decimal places than usd allows (2); round the grant to 2 decimal places",
        ),
        ("g1,tokyo,jpy,100.5,2025-01-01,,x", "credits.csv:2: column amount: 100.5 has more decimal places than jpy allows (0)"),
        ("g1,acme,usd,0,2025-01-01,,x", "credits.csv:2: column amount: 0 must be greater than 0"),
        ("g1,acme,usd,-5,2025-01-01,,x", "credits.csv:2: column amount: '-5' is negative"),
        ("g1,acme,usd,ten,2025-01-01,,x", "credits.csv:2: column amount: 'ten' is not a decimal number; fix this value"),
        ("g1,ghost,usd,10,2025-01-01,,x", "credits.csv:2: column customer_id: customer 'ghost' is not in customers.csv"),
        ("g1,acme,eur,10,2025-01-01,,x", "credits.csv:2: column currency: 'eur' is not in currencies.csv"),
        ("g1,acme,jpy,10,2025-01-01,,x", "credits.csv:2: column currency: 'jpy' is not the currency of customer 'acme' ('usd')"),
        ("g1,acme,usd,10,2025-01-01,2025-01-01,x", "credits.csv:2: column expires_on: 2025-01-01 is not after granted_on 2025-01-01"),
        ("g1,acme,usd,10,01/02/2025,,x", "credits.csv:2: column granted_on: '01/02/2025' is not a date (YYYY-MM-DD)"),
        ("G 1,acme,usd,10,2025-01-01,,x", "credits.csv:2: column grant_id: 'G 1' is not a safe identifier"),
    ],
)
def test_bad_grant_rows_are_rejected_with_file_line_and_fix(tmp_path, row, message):
    write_credits(tmp_path, row)
    with pytest.raises(SeedError) as e:
        load_grants(tmp_path, CUSTOMERS, CURRENCIES)
    assert message in str(e.value)


def test_duplicate_grant_and_missing_file(tmp_path):
    write_credits(tmp_path, "g1,acme,usd,10,2025-01-01,,x", "g1,acme,usd,20,2025-01-01,,y")
    with pytest.raises(SeedError, match=r"credits.csv:3: duplicate key \{'grant_id': 'g1'\} \(first on line 2\)"):
        load_grants(tmp_path, CUSTOMERS, CURRENCIES)
    with pytest.raises(SeedError, match=r"credits\.csv: seed file missing"):
        load_grants(tmp_path / "nowhere", CUSTOMERS, CURRENCIES)


def test_project_seed_credits_are_valid():
    from billing_dags.core.settings import PROJECT_ROOT
    from billing_dags.seeds.catalog import read_seed

    seeds = PROJECT_ROOT / "seeds"
    grants = load_grants(seeds, read_seed(seeds, "customers").to_pylist(), read_seed(seeds, "currencies").to_pylist())
    by_customer: dict[str, list[Grant]] = {}
    for g in grants:
        by_customer.setdefault(g.customer_id, []).append(g)
    assert any(len({g.expires_on for g in gs}) > 1 for gs in by_customer.values())  # a customer with two expiries


def test_invoice_list_shows_the_total_due_after_credits(p):
    from billing_dags.billing.listing import invoice_rows

    bill(p, JAN, charges("acme", JAN, 1234), [grant("g", 1000)])
    (row,) = invoice_rows(p, JAN)
    assert row["status"] == "finalized" and row["total"] == "2.34 USD"
