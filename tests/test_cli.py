"""Every CLI command meets bad input with exit code 2 and a message naming the input and the fix."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date

import pytest

from billing_dags.cli.main import check_billable_month, last_complete_month, main, parse_month
from billing_dags.core.errors import InputError
from billing_dags.stripe.outbox import read_outbox


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err.replace("\n", " ")


@pytest.mark.parametrize("value", ["2026-13", "2026-1", "26-10", "", "2026-10-01", "october"])
def test_bad_month_is_rejected_with_the_format(value):
    with pytest.raises(InputError) as e:
        parse_month(value)
    assert repr(value) in str(e.value) and "YYYY-MM" in str(e.value)


def test_open_and_too_early_months_are_rejected():
    with pytest.raises(Exception, match="has not ended"):
        check_billable_month(date(2026, 11, 1), today=date(2026, 11, 22))
    with pytest.raises(Exception, match="before the first partition"):
        check_billable_month(date(2020, 1, 1), today=date(2026, 11, 22))
    assert last_complete_month(date(2026, 1, 15)) == date(2025, 12, 1)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "--month", "2026-13"], "'2026-13' is not YYYY-MM"),
        (["run", "--month", "2099-01"], "has not ended"),
        (["demo", "--month", "bad"], "'bad' is not YYYY-MM"),
        (["invoice", "nobody", "--month", "2026-10"], "unknown customer 'nobody'"),
        (["invoice", "../../etc/passwd", "--month", "2026-10"], "not a safe identifier"),
        (["invoice", "mp-001", "--month", "2026-10"], "run `billing run --month 2026-10` first"),
        (["invoices", "--month", "2026-10"], "no invoices for 2026-10"),
        (["usage", "nobody", "--month", "2026-10"], "unknown customer 'nobody'"),
        (["usage", "mp-001", "--month", "2026-10"], "run `billing run --month 2026-10` first"),
        (["simulate", "--month", "2026-10", "--customers", "999"], "seeds have 5 customers"),
        (["simulate", "--month", "2026-10", "--interval", "0"], "--interval 0 must be a positive"),
        (["run", "--month", "2026-10", "--customers", "0"], "--customers 0 must be at least 1"),
        (["run", "--month", "2026-10", "--as-of", "yesterday"], "--as-of 'yesterday' is not an ISO 8601 time"),
        (["run", "--month", "2026-10", "--as-of", "2026-11-01T00:00:00"], "with a UTC offset"),
        (["plans", "--plan", "gold"], "unknown plan 'gold'"),
        (["sql", "selec nothing"], "query failed"),
        (["sql", "   "], "empty query"),
        (["sql", "select 1", "--limit", "-1"], "--limit -1 must be at least 1"),
        (["flags", "list", "--month", "2026-10", "--customer", "nobody"], "unknown customer 'nobody'"),
        (["notifications", "list", "--customer", "nobody"], "unknown customer 'nobody'"),
    ],
)
def test_bad_input_exits_2_naming_input_and_fix(capsys, paths, args, expected):
    code, _out, err = run_cli(capsys, *args)
    assert code == 2
    assert expected in err, err


def test_malformed_seed_row_names_file_line_and_column(capsys, paths, small_seeds):
    text = (small_seeds / "subscriptions.csv").read_text().splitlines()
    fields = text[2].split(",")
    fields[1] = "gold_plan"  # plan_id
    text[2] = ",".join(fields)
    (small_seeds / "subscriptions.csv").write_text("\n".join(text) + "\n")
    code, _out, err = run_cli(capsys, "plans")
    assert code == 2
    assert "subscriptions.csv:3" in err and "plan 'gold_plan' is not in plans.csv" in err


def test_seed_row_with_bad_decimal_is_rejected(capsys, paths, small_seeds):
    with (small_seeds / "prices.csv").open("a") as f:
        f.write("proxy_hybrid,1,proxy_submits,,ten,,per_unit,0.01,1,up,bad allowance\n")
    code, _out, err = run_cli(capsys, "plans")
    assert code == 2
    assert "prices.csv:" in err and "column included_quantity" in err and "'ten' is not a decimal" in err


def test_overlapping_subscriptions_are_rejected(capsys, paths, small_seeds):
    with (small_seeds / "subscriptions.csv").open("a") as f:
        f.write("mp-001,proxy_hybrid,2026-01-01,\n")
    code, _out, err = run_cli(capsys, "plans")
    assert code == 2
    assert "subscriptions.csv:" in err and "overlaps" in err and "end that one on 2026-01-01" in err


def test_tiers_must_end_unbounded(capsys, paths, small_seeds):
    text = (small_seeds / "price_tiers.csv").read_text().replace("proxy_tiered,1,proxy_bytes,,3,,0.05,0", "proxy_tiered,1,proxy_bytes,,3,500,0.05,0")
    (small_seeds / "price_tiers.csv").write_text(text)
    code, _out, err = run_cli(capsys, "plans")
    assert code == 2
    assert "price_tiers.csv:" in err and "only the last tier has an empty up_to" in err


def test_plans_lists_the_seeded_plans_as_json(capsys, paths):
    code, out, _err = run_cli(capsys, "plans", "--format", "json")
    assert code == 0
    plans = {(p["plan"], p["version"]): p for p in json.loads(out)}
    assert plans[("proxy_hybrid", 1)]["base_fee"] == "5"
    assert plans[("proxy_hybrid", 2)]["base_fee"] == "6"
    assert {p["meter_id"] for p in plans[("proxy_hybrid", 1)]["prices"]} == {"proxy_bytes", "proxy_accepted_shares"}


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "billing_dags.cli.main", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("demo", "simulate", "run", "invoice", "invoices", "usage", "plans", "sql"):
        assert command in out


@pytest.mark.acceptance
def test_run_a_month_in_process_then_show_invoices_usage_and_sql(capsys, paths):
    """`billing run` end to end on five customers (one per set-up) at an hourly scrape interval, judged as of
    a fixed time (a replay): the invoices past their grace period, every day still within Stripe's 35 days."""
    code, out, err = run_cli(capsys, "run", "--month", "2026-02", "--interval", "3600", "--as-of", "2026-03-05T00:00:00Z")
    assert code == 0, err
    assert "INV-2026-" in out and "28 days and the month" in out
    # the dry-run outbox judged Stripe's 35-day limit as of March 5, not as of today: nothing is too old
    outbox = [r for d in range(1, 29) for r in read_outbox(paths, date(2026, 2, d))]
    assert outbox and {r["status"] for r in outbox} == {"dry_run"}
    code, out, err = run_cli(capsys, "invoice", "mp-001", "--month", "2026-02", "--format", "json")
    assert code == 0
    doc = json.loads(out)
    assert doc["status"] == "finalized" and doc["total_minor"] == sum(l["amount_minor"] for l in doc["lines"])
    code, out, err = run_cli(capsys, "usage", "mp-001", "--month", "2026-02", "--format", "json")
    assert code == 0 and {r["meter"] for r in json.loads(out)} >= {"proxy_bytes", "proxy_accepted_shares"}
    code, out, err = run_cli(capsys, "sql", "select count(distinct day) as days from fct_usage_by_day", "--format", "json")
    assert code == 0 and json.loads(out) == [{"days": 28}]


def _append(path, line: str) -> int:
    """Append one CSV row; returns its line number in the file."""
    with path.open("a") as f:
        f.write(line + "\n")
    return len(path.read_text().splitlines())


def test_run_rejects_a_subscription_that_starts_before_its_plans_first_version(capsys, paths, small_seeds):
    # the plan's only version is in force from 2026-10-15; a subscription from 2026-10-01 would have
    # no price on its first 14 days (the model used to drop the whole period: no invoice, exit 0)
    plan_line = _append(small_seeds / "plans.csv", "proxy_new,1,2026-10-15,Proxy new,proxy,usd,31.00,0,0,1,new plan")
    _append(small_seeds / "prices.csv", "proxy_new,1,proxy_bytes,,0,,per_unit,0.10,1,up,$0.10 per GiB")
    _append(small_seeds / "customers.csv", "mp-new,Miner new,proxy,miner-new,usd,,prometheus")
    sub_line = _append(small_seeds / "subscriptions.csv", "mp-new,proxy_new,2026-10-01,")
    code, _out, err = run_cli(capsys, "run", "--month", "2026-02")
    assert code == 2
    assert f"subscriptions.csv:{sub_line}:" in err, err
    assert f"plans.csv line {plan_line}" in err and "2026-10-15" in err
    assert "start it on or after 2026-10-15" in err  # the fix
    assert "Traceback" not in err and "Stack Trace" not in err


def test_run_rejects_a_catch_all_price_beside_per_model_prices(capsys, paths, small_seeds):
    # llm_payg prices llm_input_tokens per model ($2.50 per 1M gpt-4o tokens); a row with an empty
    # dimension ($1.00 per 1M, every model) would bill the same 1M gpt-4o tokens $2.50 + $1.00
    gpt4o_line = next(i for i, l in enumerate((small_seeds / "prices.csv").read_text().splitlines(), 1) if l.startswith("llm_payg,1,llm_input_tokens,gpt-4o,"))
    line = _append(small_seeds / "prices.csv", "llm_payg,1,llm_input_tokens,,0,,per_unit,1.00,1,up,$1.00 per 1M tokens")
    code, _out, err = run_cli(capsys, "run", "--month", "2026-02")
    assert code == 2
    assert f"prices.csv:{line}:" in err, err
    assert f"line {gpt4o_line}" in err and "billed twice" in err
    assert "give this row a dimension" in err  # the fix
    assert "Traceback" not in err and "Stack Trace" not in err


def test_a_failed_blocking_check_shows_its_message_and_exits_2_without_a_traceback(paths):
    """`billing run` where the source wrote the same event id on two days: the check's own message, no stack trace."""
    import os

    from sql_helpers import duplicate_event

    from billing_dags.core.settings import PROJECT_ROOT

    duplicate_event(paths, (date(2026, 2, 1), date(2026, 2, 2)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(
        [sys.executable, "-m", "billing_dags.cli.main", "run", "--month", "2026-02", "--customers", "1", "--interval", "3600"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    out = (r.stdout + r.stderr).replace("\n", " ")
    assert r.returncode == 2, out
    assert "usage_events event_ids_unique_across_days" in out
    assert "req-42 (also on 2026-02-02)" in out and "rerun usage_events for 2026-02-02" in out
    for noise in ("Traceback", "Stack Trace", "DagsterAssetCheckFailedError", "blocking asset check failed"):
        assert noise not in out, out


@pytest.mark.acceptance
def test_a_month_with_a_day_whose_usage_was_never_computed_is_not_invoiced(capsys, paths):
    """The monthly run (as the schedule on the 1st starts it) over a month where one day has raw samples but no
    fct_usage_by_day partition (its daily run failed, or, sharded, its models were never run): it stops before
    rating, naming the day and the fix, instead of invoicing that day as zero; the invoices keep their bytes."""
    import shutil

    from billing_dags.cli import runs
    from billing_dags.cli.common import RunFailed
    from billing_dags.ingest import raw

    code, _out, err = run_cli(capsys, "run", "--month", "2026-02", "--interval", "3600", "--as-of", "2026-03-02T00:00:00Z")
    assert code == 0, err
    day = date(2026, 2, 10)
    assert raw.sample_files(paths, day)
    invoices = {p: p.read_bytes() for p in sorted((paths.invoices / "2026-02").glob("*.json"))}
    shutil.rmtree(paths.models / "fct_usage_by_day" / f"day={day}")
    defs, instance = runs.definitions_of(paths)
    with pytest.raises(RunFailed) as failed:
        runs.execute(
            defs.resolve_job_def("monthly_invoicing"),
            instance,
            "month 2026-02",
            {"ops": {"invoices": {"config": {"as_of": "2026-03-02T00:00:00Z"}}}},
            partition_key="2026-02-01",
        )
    message = str(failed.value)
    assert failed.value.exit_code == 2, message
    assert "fct_usage_by_day" in message and "2026-02-10" in message and "Materialize fct_usage_by_day" in message, message
    assert {p: p.read_bytes() for p in sorted((paths.invoices / "2026-02").glob("*.json"))} == invoices
