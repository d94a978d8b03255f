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

import json
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


# --------------------------------------------------------------------------- sharded (BILLING_SHARDS > 1)

#: shards of the sharded instance: enough to show that one late customer reruns one shard, not all
SHARDS = 4
_RUNS = """query($id: String!) { runsOrError(filter: {tags: [{key: "dagster/backfill", value: $id}]}) { ... on Runs {
  results { id status startTime endTime assetSelection { path } tags { key value } } } } }"""
_MATERIALIZATIONS = """query($k: AssetKeyInput!, $p: [String!]) { assetNodeOrError(assetKey: $k) { ... on AssetNode {
  assetMaterializations(partitions: $p) { partition runId timestamp metadataEntries { label
    ... on IntMetadataEntry { intValue } ... on JsonMetadataEntry { jsonString } } } } } }"""
_CHECKS = """query($k: AssetKeyInput!, $c: String!, $p: String) { assetCheckExecutions(assetKey: $k, checkName: $c, partition: $p, limit: 20) {
  runId status evaluation { partition success metadataEntries { label ... on JsonMetadataEntry { jsonString } } } } }"""
_SENSOR = {"repositoryLocationName": "billing_dags", "repositoryName": "__repository__", "sensorName": "late_raw_data_sensor"}


@pytest.fixture(scope="module")
def sharded_server(tmp_path_factory):
    """A real instance (webserver + daemon) of the code location with BILLING_SHARDS=4: the daily models are
    (day, shard) partitions of their own job, daily_shards; the ingest and the assets after the models stay daily."""
    from conftest import copy_small_seeds
    from servers import DagsterServer

    class Sharded(DagsterServer):
        def _instance_yaml(self) -> str:
            # a code server restarted on a loaded machine may take more than the default 180 s to start: the backfill
            # daemon then finds the location gone and fails the backfill (seen with 8 test sessions on 2 cores)
            return super()._instance_yaml() + "\ncode_servers:\n  local_startup_timeout: 900\n"

    root = tmp_path_factory.mktemp("sharded")
    with Sharded(root, seeds_dir=copy_small_seeds(root / "seeds"), env={"BILLING_SHARDS": str(SHARDS)}) as server:
        run = server.wait_run(server.launch_run("refresh_seeds_and_views"), RUN_TIMEOUT)
        assert run["status"] == "SUCCESS", server.run_errors(run["id"])
        yield server


@pytest.fixture(scope="module")
def sharded_day(sharded_server) -> tuple[str, dict]:
    """An operator's asset backfill of yesterday over the ingest, the (day, shard) models and the daily assets
    after them, from the asset graph (sharded_days_sensor requests the same after the schedule's ingest); the day
    and the finished backfill. (An earlier day would also run the later days of the models that look back.)"""
    server = sharded_server
    keys = server.asset_keys("daily_usage") + server.asset_keys("daily_shards")
    assert {"raw_samples", "fct_usage_by_day", "stripe_outbox"} <= {k["path"][-1] for k in keys}
    day = server.partition_keys("raw_samples")[-1]
    return day, server.wait_backfill(server.launch_asset_backfill(keys, [day]), 2 * RUN_TIMEOUT)


def _shard_file(server, model: str, day: str, shard: int):
    return server.data_dir / "models" / model / f"day={day}" / f"shard={shard}-of-{SHARDS}" / "data.parquet"


def _materializations(server, asset: str, partitions: list[str]) -> list[dict]:
    """The latest materialization of each of ``partitions``."""
    node = server.graphql(_MATERIALIZATIONS, {"k": {"path": [asset]}, "p": partitions})["assetNodeOrError"]
    latest: dict[str, dict] = {}
    for m in node["assetMaterializations"]:
        if m["partition"] not in latest or float(m["timestamp"]) > float(latest[m["partition"]]["timestamp"]):
            latest[m["partition"]] = m
    return list(latest.values())


def test_sharded_asset_backfill_of_yesterday_runs_in_dependency_order_then_the_month(sharded_server, sharded_day):
    import pyarrow.parquet as pq

    server, (day, backfill) = sharded_server, sharded_day
    assert backfill["status"] == "COMPLETED_SUCCESS" and all(r["status"] == "SUCCESS" for r in backfill["runs"]), (
        f"backfill {backfill['status']} {backfill['error']}\n{failures(server, backfill['runs'])}"
    )
    runs = server.graphql(_RUNS, {"id": backfill["id"]})["runsOrError"]["results"]
    stage = {"raw_samples": 0, "fct_usage_by_day": 1, "stripe_outbox": 2}
    spans = {}
    for r in runs:
        for a in {p["path"][-1] for p in r["assetSelection"]} & set(stage):
            spans.setdefault(stage[a], []).append((r["startTime"], r["endTime"]))
    # every shard of the day's models after the day's ingest, the Stripe hand-off after every shard
    assert sorted(spans) == [0, 1, 2], runs
    assert max(e for _, e in spans[0]) <= min(s for s, _ in spans[1]) and max(e for _, e in spans[1]) <= min(s for s, _ in spans[2]), spans

    # each (day, shard) partition materialized, with its own rows and the table's rows (every shard published so far:
    # the run publishes the day's shards in order) as standard metadata
    cells = [f"{day}|{s}" for s in range(SHARDS)]
    rows = {s: pq.read_metadata(_shard_file(server, "fct_usage_by_day", day, s)).num_rows for s in range(SHARDS)}
    got = {m["partition"]: {e["label"]: e.get("intValue") for e in m["metadataEntries"]} for m in _materializations(server, "fct_usage_by_day", cells)}
    assert sorted(got) == cells
    for s in range(SHARDS):
        assert got[f"{day}|{s}"]["dagster/partition_row_count"] == rows[s]
        assert got[f"{day}|{s}"]["dagster/row_count"] == sum(rows[j] for j in range(s + 1)), (got, rows)
    # a check of a (day, shard) partition is recorded against that partition and names every shard it covered
    for cell in cells:
        [execution] = server.graphql(_CHECKS, {"k": {"path": ["fct_usage_by_day"]}, "c": "grain_is_unique", "p": cell})["assetCheckExecutions"]
        assert execution["status"] == "SUCCEEDED" and execution["evaluation"]["partition"] == cell, execution
        meta = {e["label"]: e.get("jsonString") for e in execution["evaluation"]["metadataEntries"]}
        if "by_partition" in meta:  # a run over several partitions: one entry per (day, shard)
            assert cell in json.loads(meta["by_partition"]), meta

    # the monthly stage, sharded, runs through the daemon (its month: the last one ended; it reads every (day, shard) of it)
    month = server.partition_keys("fct_usage_by_month")[-1]
    run = server.wait_run(server.launch_run("monthly_invoicing", month), RUN_TIMEOUT)
    assert run["status"] == "SUCCESS", server.run_errors(run["id"])


def test_sharded_late_data_reruns_only_the_changed_shard_in_one_backfill_and_settles(sharded_server, sharded_day):
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    server, (day, backfill) = sharded_server, sharded_day
    assert backfill["status"] == "COMPLETED_SUCCESS", backfill
    cells = [f"{day}|{s}" for s in range(SHARDS)]
    before = {m["partition"]: m["runId"] for m in _materializations(server, "fct_usage_by_day", cells)}
    # a late correction of one series, in the one shard its customer is in
    raw_day = server.data_dir / "raw" / "samples" / f"date={day}"
    late = next(s for s in range(SHARDS) if pq.read_metadata(raw_day / f"shard={s}-of-{SHARDS}" / "part-simulate.parquet").num_rows)
    f = raw_day / f"shard={late}-of-{SHARDS}" / "part-simulate.parquet"
    t = pq.read_table(f)
    values = t.column("value").to_pylist()
    values[-1] += 1.0
    pq.write_table(t.set_column(t.schema.get_field_index("value"), "value", pa.array(values, pa.float64())), f.with_name("late.tmp"))
    os.replace(f.with_name("late.tmp"), f)

    ids = _sensor_backfill_succeeds(server, _SENSOR, "late raw data")
    # the late shard's (day, shard) partitions and the day's Stripe hand-off, nothing else: no ingest, no other shard
    after = {m["partition"]: m["runId"] for m in _materializations(server, "fct_usage_by_day", cells)}
    assert {c for c in cells if after[c] != before[c]} == {f"{day}|{late}"}, (before, after)
    rerun_assets = {p["path"][-1] for r in server.graphql(_RUNS, {"id": ids[0]})["runsOrError"]["results"] for p in r["assetSelection"]}
    assert "stripe_outbox" in rerun_assets and not rerun_assets & {"raw_samples", "usage_events", "usage_reports", "remote_write_samples"}, rerun_assets

    # settled: evaluated again (with the cursor of its last tick), the sensor requests nothing
    cursor = server.graphql(
        "query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) { ... on Sensor { sensorState { ticks(limit: 1) { cursor } } } } }", {"s": _SENSOR}
    )["sensorOrError"]["sensorState"]["ticks"][0]["cursor"]
    tick = server.graphql(
        "mutation($s: SensorSelector!, $c: String) { sensorDryRun(selectorData: $s, cursor: $c) { __typename ... on DryRunInstigationTick {"
        " evaluationResult { skipReason runRequests { runKey } error { message } } } } }",
        {"s": _SENSOR, "c": cursor},
    )["sensorDryRun"]["evaluationResult"]
    assert not tick["runRequests"] and not tick["error"] and "no raw day file changed" in tick["skipReason"], tick


def test_sharded_days_sensor_computes_an_ingested_day_unattended_and_settles(sharded_server, sharded_day):
    """Sharded, every day unattended: the schedule's run ingests the day (its ingest assets only), then
    sharded_days_sensor requests one asset backfill of every (day, shard) of it and its Stripe hand-off; once that
    has succeeded, the sensor requests nothing more."""
    from datetime import date, timedelta

    server, (day, _) = sharded_server, sharded_day
    earlier = (date.fromisoformat(day) - timedelta(days=1)).isoformat()
    ingest = [k for k in server.asset_keys("daily_usage") if k["path"][-1] in ("raw_samples", "remote_write_samples", "usage_events", "usage_reports")]
    run = server.wait_run(server.launch_run("daily_usage", earlier, assets=ingest), RUN_TIMEOUT)
    assert run["status"] == "SUCCESS", server.run_errors(run["id"])
    cells = [f"{earlier}|{s}" for s in range(SHARDS)]
    assert not any(_shard_file(server, "fct_usage_by_day", earlier, s).exists() for s in range(SHARDS))

    sensor = {**_SENSOR, "sensorName": "sharded_days_sensor"}
    ids = _sensor_backfill_succeeds(server, sensor, "ingested days without usage")
    assert all(_shard_file(server, "fct_usage_by_day", earlier, s).exists() for s in range(SHARDS))
    assert sorted(m["partition"] for m in _materializations(server, "fct_usage_by_day", cells)) == cells
    assert [m["partition"] for m in _materializations(server, "stripe_outbox", [earlier])] == [earlier]
    rerun_assets = {p["path"][-1] for r in server.graphql(_RUNS, {"id": ids[0]})["runsOrError"]["results"] for p in r["assetSelection"]}
    assert not rerun_assets & {"raw_samples", "usage_events", "usage_reports", "remote_write_samples"}, rerun_assets

    def settled():
        tick = server.graphql(
            "mutation($s: SensorSelector!) { sensorDryRun(selectorData: $s, cursor: null) { __typename ... on DryRunInstigationTick {"
            " evaluationResult { skipReason runRequests { runKey } error { message } } } } }",
            {"s": sensor},
        )["sensorDryRun"]["evaluationResult"]
        assert not tick["runRequests"] and not tick["error"], tick
        return "has its usage computed" in (tick["skipReason"] or "")

    server.wait(settled, RUN_TIMEOUT, "the sensor to find nothing left to compute (the late-data sensor may rerun the later day first)")


def _sensor_backfill_succeeds(server, sensor: dict, reason: str) -> list[str]:
    """Start ``sensor``; it requests one asset backfill tagged ``billing/reason: reason``, which succeeds: its id (a list of one)."""
    started = server.graphql("mutation($s: SensorSelector!) { startSensor(sensorSelector: $s) { __typename } }", {"s": sensor})
    assert started["startSensor"]["__typename"] == "Sensor", started
    ids = server.wait(lambda: _backfills_tagged(server, "billing/reason", reason), RUN_TIMEOUT, "the sensor to request a backfill")
    assert len(ids) == 1, ids
    backfill = server.wait_backfill(ids[0], 2 * RUN_TIMEOUT)
    assert backfill["status"] == "COMPLETED_SUCCESS" and all(r["status"] == "SUCCESS" for r in backfill["runs"]), (
        f"backfill {backfill['status']} {backfill['error']}\n{failures(server, backfill['runs'])}"
    )
    return ids


def _backfills_tagged(server, key: str, value: str) -> list[str]:
    data = server.graphql("{ partitionBackfillsOrError(limit: 50) { ... on PartitionBackfills { results { id tags { key value } } } } }")
    return [b["id"] for b in data["partitionBackfillsOrError"]["results"] if {"key": key, "value": value} in b["tags"]]
