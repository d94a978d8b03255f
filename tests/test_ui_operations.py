"""Integration: what operators do in the Dagster UI, driven over its GraphQL API against a real
instance (dagster-webserver + dagster-daemon; the session's `dagster_server`, tests/servers.py):
an asset backfill of several days from the Catalog or Lineage page, re-execution of a failed
backfill run from the failed step, and re-execution of a run made by `billing run`.

Days: an asset backfill of days D also targets the later days of the models that look back at D
(fct_usage_by_day reads 35 days of edges), up to the last partition (yesterday), in further runs.
So the tests take days near the end: the backfill the 4th and 3rd last partitions, the failed run
the last one, the CLI the month of the 60th last (tests/test_ui_browser.py takes the last two).
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.acceptance]

#: generous: a day of five customers takes seconds, but the machine may be loaded
RUN_TIMEOUT = 600


@pytest.fixture(scope="module")
def daily_assets(dagster_server) -> list[dict]:
    keys = dagster_server.asset_keys("daily_usage")
    assert {"raw_samples", "fct_usage_by_day", "stripe_outbox"} <= {k["path"][-1] for k in keys}
    return keys


@pytest.fixture(scope="module")
def days(dagster_server) -> list[str]:
    """The daily partition keys, oldest first (the last one is yesterday)."""
    keys = dagster_server.partition_keys("raw_samples")
    assert len(keys) > 60
    return keys


def failures(server, runs: list[dict]) -> str:
    return "\n".join(f"run {r['id']} {r['status']}:\n{server.run_errors(r['id'])}" for r in runs if r["status"] != "SUCCESS")


def test_asset_backfill_of_two_days_from_the_catalog_succeeds(dagster_server, daily_assets, days):
    server, picked = dagster_server, days[-4:-2]
    backfill = server.wait_backfill(server.launch_asset_backfill(daily_assets, picked), RUN_TIMEOUT)
    assert backfill["runs"], backfill
    assert backfill["status"] == "COMPLETED_SUCCESS" and all(r["status"] == "SUCCESS" for r in backfill["runs"]), (
        f"backfill {backfill['status']} {backfill['error']}\n{failures(server, backfill['runs'])}"
    )
    for day in picked:
        assert all(server.published(day).values()), (day, server.published(day))


def test_a_failed_backfill_run_is_reexecuted_from_the_failed_step(dagster_server, daily_assets, days):
    server, day = dagster_server, days[-1]
    # an obstacle where the day's usage partition goes (an earlier backfill may have written it): that
    # step fails, the ones before it succeed
    blocker = server.data_dir / "models" / "fct_usage_by_day" / f"day={day}"
    shutil.rmtree(blocker, ignore_errors=True)
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a folder")
    backfill = server.wait_backfill(server.launch_asset_backfill(daily_assets, [day]), RUN_TIMEOUT)
    [run] = backfill["runs"]
    assert run["status"] == "FAILURE", run
    errors = server.run_errors(run["id"])
    failed_steps = {line.split(":")[0].split()[-1] for line in errors.splitlines() if line.startswith("ExecutionStepFailureEvent")}
    assert failed_steps == {"fct_usage_by_day"}, errors
    assert server.published(day)["int_series_edges_by_day"]

    blocker.unlink()
    child = server.wait_run(server.reexecute(run["id"], "FROM_FAILURE"), RUN_TIMEOUT)
    assert child["status"] == "SUCCESS", server.run_errors(child["id"])
    assert all(server.published(day).values()), server.published(day)


def test_a_run_of_billing_run_is_reexecuted_from_the_ui(dagster_server, days):
    server, month = dagster_server, days[-60][:7]
    # the CLI with the instance's DAGSTER_HOME, warehouse and seeds; one customer scraped hourly keeps the month cheap
    cli = subprocess.run(
        [sys.executable, "-m", "billing_dags.cli.main", "run", "--month", month, "--customers", "1", "--interval", "3600"],
        cwd=server.project,
        env=server.env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert cli.returncode == 0, cli.stderr[-4000:]
    parents = server.runs("daily_usage", {"dagster/asset_partition_range_start": f"{month}-01"})
    assert len(parents) == 1, f"billing run made {len(parents)} runs of the range {month}-01.. (expected one)"
    [parent] = parents
    assert parent["status"] == "SUCCESS", parent

    # the re-execution does the work again: a day's usage partition removed meanwhile is back
    day = f"{month}-15"
    usage = server.data_dir / "models" / "fct_usage_by_day" / f"day={day}" / "data.parquet"
    usage.unlink()
    child = server.wait_run(server.reexecute(parent["id"], "ALL_STEPS"), RUN_TIMEOUT)
    assert child["status"] == "SUCCESS", server.run_errors(child["id"])
    tags = {t["key"]: t["value"] for t in child["tags"]}
    assert tags.get("dagster/asset_partition_range_start") == f"{month}-01", tags
    assert usage.exists()
