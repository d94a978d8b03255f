"""A billed month through Stripe, end to end, the way an operator runs it: `billing run` on an empty
data dir (dry-run Stripe), then `billing stripe sync-meters`, `send` and `reconcile` against the
local Stripe server. Stripe's period totals equal every invoice line's quantity (counters, peaks, an
average, unit-hours, unit-months, per-model tokens, a plan change mid-month, a subscription that
starts and one that ends mid-month); an unsent month and a rejected event are named as such."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from seed_copies import copy_small_seeds
from stripe_server import StripeServer

from billing_dags.cli.main import main
from billing_dags.core.settings import resolve_paths
from billing_dags.models.sqlmodels import Window, load_project, partition_file
from billing_dags.seeds.catalog import load_seeds
from billing_dags.stripe import outbox as ob

pytestmark = [pytest.mark.integration, pytest.mark.acceptance]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MONTH = date(2026, 11, 1)
AS_OF = "2026-12-01T02:00:00Z"
NOW = datetime(2026, 12, 1, 2, 0, tzinfo=UTC)
#: the time `billing run` judges the month as of: past the invoices' grace period
RUN_AS_OF = "2026-12-04T06:00:00Z"
API_KEY = "sk_test_51reconcileMonth0123456789"


def _edit_csv(path: Path, edit) -> None:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    fields = list(rows[0])
    rows = edit(rows)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def month_seeds(d: Path) -> Path:
    """The five-customer seeds with an average meter, a plan change, a late start and an early end."""
    copy_small_seeds(d)

    def meters(rows):
        for r in rows:
            if r["meter_id"] == "iot_storage":
                r["aggregation"], r["description"] = "avg", "Average storage used"
        return rows

    def subscriptions(rows):
        out = []
        for r in rows:
            if r["customer_id"] == "iot-001":
                out += [{**r, "end_date": "2026-11-16"}, {**r, "plan_id": "iot_professional", "start_date": "2026-11-16"}]
            elif r["customer_id"] == "tb-001":
                out.append({**r, "start_date": "2026-11-10"})
            elif r["customer_id"] == "k8s-001":
                out.append({**r, "end_date": "2026-11-21"})
            else:
                out.append(r)
        return out

    _edit_csv(d / "meters.csv", meters)
    _edit_csv(d / "subscriptions.csv", subscriptions)
    return d


@pytest.fixture(scope="module")
def billed_month(tmp_path_factory):
    """`billing run` of the month (simulated usage, invoices, a dry-run outbox) on an empty data dir."""
    root = tmp_path_factory.mktemp("reconcile")
    seeds = month_seeds(root / "seeds")
    (root / "dagster_home").mkdir()
    (root / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRIPE_")}
    env.update(
        BILLING_DATA_DIR=str(root / "data"),
        BILLING_SEEDS_DIR=str(seeds),
        DAGSTER_HOME=str(root / "dagster_home"),
        PYTHONPATH=os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    r = subprocess.run(
        # judged as of a fixed time (every day within Stripe's 35 days), not as of the day the suite runs
        [sys.executable, "-m", "billing_dags.cli.main", "run", "--month", f"{MONTH:%Y-%m}", "--interval", "3600", "--as-of", RUN_AS_OF],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return root / "data", seeds


@pytest.fixture
def env(billed_month, monkeypatch, tmp_path):
    """A copy of the billed month's data dir (tests share no on-disk state) and the Stripe server."""
    import shutil

    data, seeds = billed_month
    mine = tmp_path / "data"
    shutil.copytree(data, mine)
    monkeypatch.setenv("BILLING_DATA_DIR", str(mine))
    monkeypatch.setenv("BILLING_SEEDS_DIR", str(seeds))
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with StripeServer(now=NOW, api_key=API_KEY) as server:
        monkeypatch.setenv("STRIPE_API_KEY", API_KEY)
        monkeypatch.setenv("STRIPE_API_BASE", server.url)
        monkeypatch.setenv("STRIPE_MAX_NETWORK_RETRIES", "0")
        yield resolve_paths(mine, seeds), server


def cli(capsys, *args: str) -> tuple[int, str]:
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse
        code = e.code
    out = capsys.readouterr()
    return code, (out.out + out.err).replace("\n", " ")


def invoice_lines(paths) -> list[dict]:
    model = load_project().models["fct_invoice_lines"]
    path = partition_file(paths, model, Window(MONTH, date(2026, 12, 1)))
    return [r for r in pq.read_table(path, partitioning=None).to_pylist() if r["line_type"] == "usage"]


def stripe_vs_invoice(paths, server) -> list[tuple]:
    """(customer, period start, event name, aggregation, invoice quantity, Stripe's quantity) of every
    line Stripe bills, computed here from the server's own state (independently of reconcile)."""
    seeds = load_seeds(paths.seeds_dir)
    meters = {m["meter_id"]: m for m in seeds["meters"].to_pylist()}
    divisors = {(u["unit"], u["billing_unit"]): int(u["divisor"]) for u in seeds["units"].to_pylist()}
    stripe_ids = {c["customer_id"]: c["stripe_customer_id"] for c in seeds["customers"].to_pylist()}
    out = []
    for line in invoice_lines(paths):
        m = meters[line["meter_id"]]
        ev = ob.stripe_event_name(m["stripe_event_name"], line["dimension"])
        divisor = divisors[(m["unit"], m["billing_unit"])]
        decimals = ob.unit_decimals(m["aggregation"], m["unit"], divisor)
        value = server.summary_value(ev, stripe_ids[line["customer_id"]], ob.day_timestamp(line["period_start"]), ob.day_timestamp(line["period_end"]))
        stripe_q = Decimal(ob.stripe_to_billing_nano(value, divisor, decimals)) / 10**9
        out.append((line["customer_id"], line["period_start"], ev, m["aggregation"], line["quantity"], stripe_q))
    return out


def test_a_month_in_stripe_equals_its_invoices_and_differences_are_named(env, capsys):
    paths, server = env
    code, out = cli(capsys, "stripe", "sync-meters")
    assert code == 0, out

    # nothing sent yet (the run was a dry run): each line with usage is named "not yet sent"
    code, out = cli(capsys, "stripe", "reconcile", "--month", "2026-11", "--format", "json")
    assert code == 1 and "not yet sent" in out, out

    # one event of a counter is rejected by Stripe: its line is named "rejected" with Stripe's message
    victim = next(r for r in ob.read_outbox(paths, date(2026, 11, 12)) if r["event_name"] == "k8s_network")
    server.reject_identifier(victim["identifier"], "This event was refused for the test.")
    code, out = cli(capsys, "stripe", "send", "--month", "2026-11", "--as-of", AS_OF)
    assert code == 1, out
    code, out = cli(capsys, "stripe", "reconcile", "--month", "2026-11", "--format", "json")
    assert code == 1 and "rejected: 1 events (2026-11-12)" in out and "refused for the test" in out, out
    assert out.count('"status": "different"') == 1, out

    # Stripe accepts it on the next run: every line equal
    server.rejected_identifiers.clear()
    code, out = cli(capsys, "stripe", "send", "--month", "2026-11", "--as-of", AS_OF)
    assert code == 0, out
    checked = stripe_vs_invoice(paths, server)
    assert [c for c in checked if c[4] != c[5]] == []
    aggregations = {c[3] for c in checked if c[4] > 0}
    assert {"sum", "max", "avg", "unit_hours", "unit_months"} <= aggregations
    assert any("__" in c[2] for c in checked if c[4] > 0)  # per-model token meters
    assert len([c for c in checked if c[0] == "iot-001" and c[2] == "iot_devices"]) == 2  # plan change: two periods
    code, out = cli(capsys, "stripe", "reconcile", "--month", "2026-11")
    assert code == 0 and f"{len(checked)} equal" in out, out

    # only billed usage went out: nothing before tb-001's start, after k8s-001's end, or unpriced
    events = server.events
    day = {e.identifier: datetime.fromtimestamp(e.timestamp, UTC).date() for e in events}
    assert not [e for e in events if e.customer == "cus_demoTB001" and day[e.identifier] < date(2026, 11, 10)]
    assert not [e for e in events if e.customer == "cus_demoK8S001" and day[e.identifier] >= date(2026, 11, 21)]
    assert not [e for e in events if e.event_name in ("proxy_rejected_shares", "iot_devices_total", "llm_input_tokens")]

    # a rerun sends nothing
    posted = len(server.event_posts())
    code, out = cli(capsys, "stripe", "send", "--month", "2026-11", "--as-of", AS_OF)
    assert code == 0 and len(server.event_posts()) == posted


def test_reconcile_bad_input_exits_2(env, capsys, monkeypatch):
    code, out = cli(capsys, "stripe", "reconcile", "--month", "2026-13")
    assert code == 2 and "YYYY-MM" in out
    code, out = cli(capsys, "stripe", "reconcile", "--month", "2026-10")
    assert code == 2 and "no invoices for 2026-10" in out and "billing run --month 2026-10" in out
    monkeypatch.delenv("STRIPE_API_KEY")
    code, out = cli(capsys, "stripe", "reconcile", "--month", "2026-11")
    assert code == 2 and "STRIPE_API_KEY" in out
    code, out = cli(capsys, "stripe", "send", "--month", "2026-11", "--as-of", "yesterday")
    assert code == 2 and "--as-of" in out


def test_too_old_events_are_flagged_in_the_daily_summary(env):
    """An event Stripe no longer accepts is never sent; the daily summary says what to bill instead."""
    from billing_dags.operations.reports import build_daily_summary, to_markdown
    from billing_dags.stripe.sender import Sender

    paths, server = env
    old_day = date(2026, 11, 2)
    rows = ob.read_outbox(paths, old_day)
    later = Sender(None, now=datetime.combine(old_day + timedelta(days=36), datetime.min.time(), UTC))
    ob.write_outbox(paths, old_day, later.send(rows))
    assert later.stats["too_old"] == len(rows) > 0 and not server.events
    text = to_markdown(build_daily_summary(paths, date(2026, 11, 30)))
    section = text.split("## Stripe: meter events too old to send")[1]
    # counters: the day's delta must be billed another way; levels: a later day carries the value
    assert "k8s_network 2026-11-02: Stripe holds 0, the invoice" in section and "as an invoice item" in section
    assert "iot_devices 2026-11-02" not in section


def test_the_reconciliation_check_runs_live_in_a_dagster_run_that_sends_the_month(env, capsys, tmp_path):
    """The daily run of the month's last day on a Dagster instance (on disk) materializes stripe_outbox and
    stripe_meter_events (which send every day of the month built so far to the Stripe server) and runs
    reconciled_with_invoices; the instance records each result. A rejected event makes the check fail (a
    warning naming the line and the cause); the next run, sending alone, passes."""
    import dagster as dg

    from billing_dags.defs.shared.resources import StripeResource, WarehouseResource
    from billing_dags.defs.stripe.assets import stripe_meter_events, stripe_outbox
    from billing_dags.defs.stripe.checks import reconciled_with_invoices

    paths, server = env
    code, out = cli(capsys, "stripe", "sync-meters")
    assert code == 0, out
    victim = next(r for r in ob.read_outbox(paths, date(2026, 11, 12)) if r["event_name"] == "k8s_network")
    server.reject_identifier(victim["identifier"], "This event was refused for the test.")
    resources = {
        "warehouse": WarehouseResource(data_dir=str(paths.data_dir), seeds_dir=str(paths.seeds_dir)),
        # the sender judges Stripe's 35-day limit as of the month's close, as `billing stripe send --as-of` does
        "stripe": StripeResource(api_key=API_KEY, api_base=server.url, max_network_retries=0, as_of=AS_OF),
    }
    key = dg.AssetCheckKey(dg.AssetKey("stripe_meter_events"), "reconciled_with_invoices")
    (tmp_path / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:

        def run(*assets):
            result = dg.materialize([*assets, reconciled_with_invoices], instance=instance, resources=resources, partition_key="2026-11-30")
            assert result.success
            evaluations = result.get_asset_check_evaluations()
            assert len(evaluations) == 1, evaluations
            evaluation = evaluations[0]
            (record,) = instance.event_log_storage.get_asset_check_execution_history(key, limit=1)
            assert record.run_id == result.run_id
            assert record.status.name == ("SUCCEEDED" if evaluation.passed else "FAILED")
            return evaluation

        first = run(stripe_outbox, stripe_meter_events)
        assert not first.passed and first.severity == dg.AssetCheckSeverity.WARN
        assert first.description.startswith("1 invoice lines differ from Stripe") and "k8s_network" in first.description
        assert "rejected: 1 events (2026-11-12)" in first.description
        server.rejected_identifiers.clear()
        second = run(stripe_meter_events)
        assert second.passed and second.metadata["differences"].value == []
        checked = stripe_vs_invoice(paths, server)
        assert second.metadata["lines"].value == {"equal": len(checked)}
        assert [c for c in checked if c[4] != c[5]] == []
