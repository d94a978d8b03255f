"""The support console as support staff use it: `billing customer`, `billing customers`, `billing dispute`, on an
empty data dir and on a billed month; tables that never cut a number; hints right for the month; global options
after the subcommand; "did you mean" for a mistyped command, choice or customer."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import date

import pytest
from test_disputes import D3, _bill, _run_models, _samples

from billing_dags.cli import common
from billing_dags.cli.main import main
from billing_dags.core.calendar import next_month, utc_today
from billing_dags.core.settings import PROJECT_ROOT
from billing_dags.defs.seeds.assets import write_seed_snapshots


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err.replace("\n", " ")


def parse_error(capsys, *args: str) -> str:
    """argparse's own errors exit 2 through SystemExit."""
    with pytest.raises(SystemExit) as e:
        main(list(args))
    assert e.value.code == 2
    return capsys.readouterr().err.replace("\n", " ")


def billing(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The `billing` command as its own process."""
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    return subprocess.run([sys.executable, "-m", "billing_dags.cli", *args], capture_output=True, text=True, env=environ, timeout=300)


def current_month() -> date:
    return utc_today().replace(day=1)


@pytest.fixture
def billed(paths):
    """February 2026 finalized for mp-001 (10 GiB of proxy_bytes on Feb 3), with a prepaid grant it draws from."""
    with (paths.seeds_dir / "credits.csv").open("a") as f:
        f.write("mp-001-welcome,mp-001,usd,123456789.00,2026-01-01,,Welcome credit\n")
    write_seed_snapshots(paths)
    _samples(paths, D3, 0, 10)
    _run_models(paths, [D3])
    _bill(paths)
    return paths


# --------------------------------------------------------------------------- parsing


def test_global_options_are_accepted_after_the_subcommand(capsys, paths, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    code, _out, err = run_cli(capsys, "invoices", "--month", "2026-02", "--data-dir", str(elsewhere))
    assert code == 2 and str(elsewhere / "invoices") in err, err
    code, out, err = run_cli(capsys, "plans", "--format", "json", "--seeds-dir", str(paths.seeds_dir))
    assert code == 0 and json.loads(out), err
    # nested commands too, and the option before the subcommand still works
    code, _out, err = run_cli(capsys, "flags", "list", "--month", "2026-02", "--data-dir", str(elsewhere))
    assert code == 0
    code, _out, err = run_cli(capsys, "--data-dir", str(elsewhere), "invoices", "--month", "2026-02")
    assert code == 2 and str(elsewhere / "invoices") in err, err


@pytest.mark.parametrize(
    ("args", "suggestion"),
    [
        (["dispte", "mp-001", "--month", "2026-02"], "did you mean 'dispute'?"),
        (["invoces", "--month", "2026-02"], "did you mean 'invoices'?"),
        (["costumer", "mp-001"], "did you mean 'customer'?"),
        (["flags", "lsit", "--month", "2026-02"], "did you mean 'list'?"),
        (["plans", "--format", "jsn"], "did you mean 'json'?"),
    ],
)
def test_a_mistyped_command_or_choice_gets_a_suggestion(capsys, paths, args, suggestion):
    err = parse_error(capsys, *args)
    assert suggestion in err, err


def test_a_mistyped_option_gets_a_suggestion_even_when_a_required_one_is_then_missing(capsys, paths):
    err = parse_error(capsys, "invoices", "--mnth", "2026-02")
    assert "unrecognized option '--mnth'; did you mean '--month'?" in err, err
    err = parse_error(capsys, "customer", "mp-001", "--data-dri", "x")
    assert "did you mean '--data-dir'?" in err, err


def test_dispute_of_an_unknown_meter_suggests_the_closest(capsys, billed):
    code, _out, err = run_cli(capsys, "dispute", "mp-001", "--month", "2026-02", "--meter", "proxy_byte")
    assert code == 2 and "did you mean 'proxy_bytes'?" in err, err


def test_an_unknown_customer_gets_a_suggestion_and_how_to_list_customers(capsys, paths):
    for args in (["customer", "mp-01"], ["usage", "mp-01", "--month", "2026-02"], ["dispute", "mp01", "--month", "2026-02"]):
        code, _out, err = run_cli(capsys, *args)
        assert code == 2
        assert "unknown customer" in err and "did you mean 'mp-001'?" in err and "billing customers" in err, err
    code, _out, err = run_cli(capsys, "customer", "zzz")
    assert code == 2 and "did you mean" not in err and "billing customers" in err, err


def test_customers_lists_every_seeded_customer_on_an_empty_data_dir(capsys, paths):
    code, out, err = run_cli(capsys, "customers", "--format", "json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["customer"] for r in rows] == ["mp-001", "iot-001", "tb-001", "llm-001", "k8s-001"]
    assert rows[0]["plan"] == "proxy_per_gb" and rows[0]["since"] == "2025-01-01"


# --------------------------------------------------------------------------- hints for the case


def test_hints_never_suggest_billing_run_for_a_month_it_refuses(capsys, paths):
    month = f"{current_month():%Y-%m}"
    for args in (["invoice", "mp-001", "--month", month], ["invoices", "--month", month], ["dispute", "mp-001", "--month", month]):
        code, _out, err = run_cli(capsys, *args)
        assert code == 2, err
        assert f"billing run --month {month}" not in err and "has not ended" in err, err
        assert "retention" not in err, err
    code, _out, err = run_cli(capsys, "stripe", "reconcile", "--month", month)
    assert code == 2 and "has not ended" in err and f"billing run --month {month}" not in err, err
    future = f"{next_month(next_month(current_month())):%Y-%m}"
    code, _out, err = run_cli(capsys, "invoice", "mp-001", "--month", future)
    assert code == 2 and "has not started" in err and f"billing run --month {future}" not in err, err
    code, _out, err = run_cli(capsys, "invoice", "mp-001", "--month", "2020-01")
    assert code == 2 and "before the first partition" in err and "billing run --month 2020-01" not in err, err


def test_report_daily_hint_fits_the_day(capsys, paths):
    today = utc_today()
    code, _out, err = run_cli(capsys, "report", "daily", "--date", today.isoformat())
    assert code == 2 and "has not ended" in err and "billing run" not in err, err
    code, _out, err = run_cli(capsys, "report", "daily", "--date", "2026-02-03")
    assert code == 2 and "billing run --month 2026-02" in err, err
    if today.day > 1:  # a day of the open month that has ended: computed by the daily schedule, not `billing run`
        code, _out, err = run_cli(capsys, "report", "daily", "--date", current_month().isoformat())
        assert code == 2 and "billing run" not in err and "Dagster UI" in err, err


def test_dispute_on_an_empty_data_dir_says_to_run_the_month(capsys, paths):
    code, _out, err = run_cli(capsys, "dispute", "mp-001", "--month", "2026-02")
    assert code == 2
    assert "nothing is computed for 2026-02" in err and "billing run --month 2026-02" in err, err
    assert "seed_customers asset" not in err


# --------------------------------------------------------------------------- dispute


def test_dispute_says_plainly_when_the_month_is_not_computed_and_there_is_no_invoice(capsys, paths):
    write_seed_snapshots(paths)
    _samples(paths, D3, 0, 10)  # raw samples, nothing computed, no invoice
    code, out, err = run_cli(capsys, "dispute", "mp-001", "--month", "2026-02")
    assert code == 0, err
    out = " ".join(out.split())
    assert "DOES NOT TIE OUT" not in out, out
    assert "No invoice for mp-001 in 2026-02 yet" in out and "not computed yet" in out and "billing run --month 2026-02" in out, out


def test_dispute_shows_included_and_billable_quantities_per_line(capsys, billed):
    common.console.width = 60  # a narrow terminal
    try:
        code, out, err = run_cli(capsys, "dispute", "mp-001", "--month", "2026-02")
    finally:
        common.console.width = 140
    assert code == 0, err
    assert "…" not in out, out
    table = out[out.index("Invoice INV-2026-000004 (finalized) lines") :]
    header = " ".join(c.strip() for l in table.splitlines() if l.startswith("┃") for c in l.split("┃"))
    assert "included" in header.replace(" ", "") and "billable" in header.replace(" ", ""), table
    row = next(l for l in table.splitlines() if l.startswith("│ 1 "))  # line 1: 10 GiB, none included, 10 billable
    cells = [c.strip() for c in row.strip("│").split("│")]
    assert cells[4:8] == ["10", "gib", "0", "10"], (cells, table)


# --------------------------------------------------------------------------- tables


def test_tables_never_cut_a_number_on_a_narrow_terminal(capsys, billed):
    code, out, _err = run_cli(capsys, "usage", "mp-001", "--month", "2026-02", "--format", "json")
    numbers = {r[k] for r in json.loads(out) for k in ("quantity", "base_quantity", "samples")}
    common.console.width = 60
    try:
        code, out, err = run_cli(capsys, "usage", "mp-001", "--month", "2026-02")
        code2, inv, err2 = run_cli(capsys, "invoice", "mp-001", "--month", "2026-02")
    finally:
        common.console.width = 140
    assert code == 0 and code2 == 0, err + err2
    assert "…" not in out + inv
    cells = set(re.findall(r"[\w.]+", out))
    assert {str(n) for n in numbers} <= cells, (numbers, out)
    doc = json.loads((billed.invoices / "2026-02" / "mp-001.json").read_text())
    assert all(l["amount"] in inv and l["quantity"] in inv for l in doc["lines"]) and doc["total"] in inv, inv


# --------------------------------------------------------------------------- billing customer


def test_customer_as_support_runs_it(billed, tmp_path):
    """`billing customer` as its own process, on a 60-column terminal, options after the subcommand."""
    r = billing("customer", "mp-001", "--data-dir", str(billed.data_dir), "--seeds-dir", str(billed.seeds_dir), env={"COLUMNS": "60"})
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "Traceback" not in out + r.stderr
    for text in ("Miner 001", "proxy_per_gb", "2025-01-01", "INV-2026-000004", "finalized", "mp-001-welcome"):
        assert text in out, (text, out)
    assert "123456789.00" in out and "…" not in out, out  # the grant's amount, every digit
    assert max(len(l) for l in out.splitlines()) <= 60 or "123456789" in out


def test_customer_json_has_every_section(capsys, billed):
    code, out, err = run_cli(capsys, "customer", "mp-001", "--format", "json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["customer"]["customer_id"] == "mp-001" and doc["customer"]["name"] == "Miner 001"
    assert doc["subscriptions"] == [
        {"plan_id": "proxy_per_gb", "plan_name": doc["subscriptions"][0]["plan_name"], "start_date": "2025-01-01", "end_date": None, "status": "active"}
    ]
    inv = doc["invoices"][0]
    assert inv["invoice"] == "INV-2026-000004" and inv["status"] == "finalized" and inv["month"] == "2026-02"
    invoice = json.loads((billed.invoices / "2026-02" / "mp-001.json").read_text())
    assert inv["total"] == invoice["total"] and inv["currency"] == "usd"
    [grant] = doc["credits"]
    drawn = -sum(l["amount_minor"] for l in invoice["lines"] if l["line_type"] == "credit")
    assert grant["grant_id"] == "mp-001-welcome" and grant["amount_minor"] == 12345678900 and grant["balance_minor"] == 12345678900 - drawn
    assert doc["open_flags"] == [] and "current_month" in doc


def test_customer_on_an_empty_data_dir_says_what_is_missing(capsys, paths):
    code, out, err = run_cli(capsys, "customer", "mp-001")
    assert code == 0, err
    out = " ".join(out.split())
    month = f"{current_month():%Y-%m}"
    assert "proxy_per_gb" in out and "No invoices yet" in out, out
    assert f"No usage computed for {month} yet" in out and f"billing run --month {month}" not in out, out


def test_customer_projects_the_open_month(capsys, billed, monkeypatch):
    """With February open (today 2026-02-10, one day computed) the console shows usage to date and the projection."""
    from billing_dags.operations import customers

    report = customers.customer_summary(billed, "mp-001", today=date(2026, 2, 10))["current_month"]
    assert report["month"] == "2026-02" and report["days_elapsed"] == 1
    assert report["usage"][0]["meter"] == "proxy_bytes" and report["usage"][0]["month_to_date"] == "10"
    assert report["projected_total"] is not None
