"""The billable quantity of a closed month is computed once (fct_billable_usage_by_subscription_period):
`billing usage` shows the quantity the invoice bills, rounded the same way (half-up to 1e-9)."""

from __future__ import annotations

import json
from datetime import date, timedelta
from decimal import Decimal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sql_helpers import USAGE_BY_DAY_SCHEMA as DAY_SCHEMA

from billing_dags.cli.main import main
from billing_dags.core.settings import PROJECT_ROOT, resolve_paths
from billing_dags.models import sqlmodels
from billing_dags.models.sqlmodels import Window
from billing_dags.seeds.catalog import load_seeds

OCT, NOV = date(2026, 10, 1), date(2026, 11, 1)
GIB = 2**30


def counter_day(day: date, customer: str, meter: str, usage: int | str) -> dict:
    return {
        "day": day,
        "customer_id": customer,
        "meter_id": meter,
        "dimension": "",
        "kind": "counter",
        "usage": Decimal(usage),
        "gauge_integral": None,
        "gauge_covered_ms": None,
        "gauge_peak": None,
        "series": 1,
        "samples": 1,
        "dropped_samples": 0,
        "resets": 0,
        "reappeared_series": 0,
        "max_gap_ms": 0,
        "events": 0,
        "duplicate_conflicts": 0,
        "gauge_held_ms": None,
    }


def month_models(project: sqlmodels.Project) -> list[str]:
    """The monthly models the rating reads, and the rating and the month's usage, in dependency order."""
    wanted = {"fct_rated_usage_by_subscription_period", "fct_usage_by_month"}
    stack = list(wanted)
    while stack:
        for up in project.upstream_models(stack.pop()):
            if project.models[up].partitioned_by == "billing_monthly" and up not in wanted:
                wanted.add(up)
                stack.append(up)
    return [n for n in project.order() if n in wanted]


@pytest.fixture
def closed_month(tmp_path, monkeypatch):
    """October 2026 computed for mp-003 (one subscription period, proxy_hybrid): the seed snapshots,
    fct_usage_by_day partitions written by hand, then the month's models run as the monthly job runs them."""
    paths = resolve_paths(tmp_path / "data", PROJECT_ROOT / "seeds")
    monkeypatch.setenv("BILLING_DATA_DIR", str(paths.data_dir))
    monkeypatch.setenv("BILLING_SEEDS_DIR", str(paths.seeds_dir))
    for name, table in load_seeds(paths.seeds_dir).items():
        f = sqlmodels.seed_snapshot_path(paths, name)
        f.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, f)
    project = sqlmodels.load_project()
    daily = project.models["fct_usage_by_day"]
    # 2,048,000,000,000 bytes = 1907.3486328125 GiB: a half at the tenth decimal
    per_day = [2_048_000_000_000 // 4] * 4
    for i, usage in enumerate(per_day):
        day = OCT + timedelta(days=i)
        rows = [counter_day(day, "mp-003", "proxy_bytes", usage), counter_day(day, "mp-003", "proxy_accepted_shares", 2500)]
        sqlmodels.write_partition(paths, daily, Window(day, day + timedelta(days=1)), pa.Table.from_pylist(rows, schema=DAY_SCHEMA))
    for name in month_models(project):
        sqlmodels.run_model(paths, name, Window(OCT, NOV), project=project, threads=1)
    return paths, project


def test_billing_usage_shows_the_invoiced_quantity_rounded_half_up(closed_month, capsys):
    paths, project = closed_month
    rated = pq.read_table(sqlmodels.partition_file(paths, project.models["fct_rated_usage_by_subscription_period"], Window(OCT, NOV))).to_pylist()
    invoiced = {r["meter_id"]: r["quantity"] for r in rated if r["customer_id"] == "mp-003"}
    assert invoiced["proxy_bytes"] == Decimal("1907.348632813")  # half-up, as every invoice quantity

    assert main(["usage", "mp-003", "--month", "2026-10", "--format", "json"]) == 0
    shown = {r["meter"]: r for r in json.loads(capsys.readouterr().out)}
    assert Decimal(shown["proxy_bytes"]["quantity"]) == invoiced["proxy_bytes"]
    assert Decimal(shown["proxy_accepted_shares"]["quantity"]) == invoiced["proxy_accepted_shares"] == 10_000
    assert shown["proxy_bytes"]["base_quantity"] == "2048000000000" and shown["proxy_bytes"]["unit"] == "gib"
