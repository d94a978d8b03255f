"""What the Dagster UI shows is true: sync status, standard metadata, owners, code versions, descriptions."""

from __future__ import annotations

import os
import subprocess
import sys

import dagster as dg
from dagster._core.definitions.data_version import StaleStatus
from dagster._utils.test.data_versions import get_stale_status_resolver

from billing_dags.core.settings import PROJECT_ROOT
from billing_dags.definitions import defs as load_defs
from billing_dags.defs.ingest.sources import SimulationResource, simulated_sources
from billing_dags.defs.shared.resources import StripeResource, WarehouseResource

#: every asset of the code location, as loaded from the defs folder
ASSETS = load_defs().assets

DAYS = ["2026-02-01", "2026-02-02", "2026-02-03"]
DAILY = ["raw_samples", "int_series_edges_by_day", "int_gauge_peaks_by_day", "fct_usage_by_day"]
USAGE = dg.AssetKey("fct_usage_by_day")


def _resources(paths, seed=7) -> dict:
    return {
        "warehouse": WarehouseResource(data_dir=str(paths.data_dir), seeds_dir=str(paths.seeds_dir)),
        **simulated_sources(SimulationResource(seed=seed, interval_s=3600, customers=2)),
        "stripe": StripeResource(),
    }


def _materialize(paths, instance, names, partition_key=None, seed=7):
    resources = _resources(paths, seed)
    result = dg.materialize(ASSETS, selection=[dg.AssetKey(n) for n in names], partition_key=partition_key, resources=resources, instance=instance)
    assert result.success
    return result


def _status(instance, key: dg.AssetKey, day: str) -> StaleStatus:
    """The sync status the UI shows for one partition (Dagster's own resolver)."""
    return get_stale_status_resolver(instance, ASSETS).get_status(key, day)


def test_rerun_of_a_day_marks_later_days_unsynced_only_when_its_rows_changed(paths):
    instance = dg.DagsterInstance.ephemeral()
    _materialize(paths, instance, ["seed_customers", "seed_meters"])
    seed = instance.get_latest_materialization_event(dg.AssetKey("seed_meters")).asset_materialization
    assert seed.metadata["dagster/row_count"].value > 0 and "dagster/column_schema" in seed.metadata
    for day in DAYS:
        _materialize(paths, instance, DAILY, day)
    assert [_status(instance, USAGE, d) for d in DAYS] == [StaleStatus.FRESH] * 3

    # the same day again, the same rows: the later days that read it (lookback) stay synced
    _materialize(paths, instance, DAILY[:2], DAYS[0])
    assert [_status(instance, USAGE, d) for d in DAYS] == [StaleStatus.FRESH] * 3

    # different rows for that day: the days whose usage reads it are unsynced (lineage is kept)
    _materialize(paths, instance, DAILY[:2], DAYS[0], seed=8)
    assert _status(instance, USAGE, DAYS[0]) == StaleStatus.STALE
    assert _status(instance, USAGE, DAYS[1]) == StaleStatus.STALE

    # standard metadata on the materialization
    event = instance.get_latest_materialization_event(USAGE)
    meta = event.asset_materialization.metadata
    assert event.asset_materialization.partition == DAYS[2]
    assert meta["dagster/partition_row_count"].value > 0
    assert meta["dagster/row_count"].value >= meta["dagster/partition_row_count"].value
    assert meta["dagster/table_name"].value == "warehouse.main.fct_usage_by_day"
    columns = {c.name: c.type for c in meta["dagster/column_schema"].schema.columns}
    assert columns["usage"].startswith("decimal") and "meter_id" in columns
    assert not [k for k in meta if k.startswith("total_")]  # no sums across units
    by_meter = meta["totals_by_meter"].value.records
    assert by_meter and all(r.data["unit"] for r in by_meter)
    assert {r.data["meter_id"] for r in by_meter} <= {m.data["meter_id"] for m in by_meter}
    assert event.asset_materialization.tags.get("dagster/data_version")

    # checks: recorded with their partition, and executable alone on the published partition
    check = dg.AssetCheckKey(USAGE, "no_negative_usage")
    grain = dg.AssetCheckKey(USAGE, "grain_is_unique")
    history = instance.event_log_storage.get_asset_check_execution_history(check, limit=10)
    assert history[0].partition == DAYS[2]
    materializations = len(instance.fetch_materializations(USAGE, limit=100).records)
    # as the UI launches a check alone: the daily job subset to the checks, for one partition
    defs = dg.Definitions(assets=ASSETS, jobs=[dg.define_asset_job("daily", selection=DAILY)], resources=_resources(paths))
    job = defs.resolve_job_def("daily").get_subset(asset_selection=set(), asset_check_selection={check, grain})
    result = job.execute_in_process(partition_key=DAYS[1], instance=instance)
    assert result.success
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert set(evaluations) == {"no_negative_usage", "grain_is_unique"}
    assert all(e.passed for e in evaluations.values())
    assert evaluations["grain_is_unique"].description == "checked on the published partition"
    assert instance.event_log_storage.get_asset_check_execution_history(check, limit=1)[0].partition == DAYS[1]
    assert len(instance.fetch_materializations(USAGE, limit=100).records) == materializations  # nothing rewritten


def test_every_asset_has_owners_and_every_model_a_code_version():
    defs = load_defs()
    from billing_dags.models.sqlmodels import load_project

    tables = {n for n, m in load_project().models.items() if m.materialized == "table"}
    for spec in defs.resolve_all_asset_specs():
        assert spec.owners, spec.key
        if spec.key.to_user_string() in tables:
            assert spec.code_version, spec.key


def test_every_schedule_and_sensor_has_a_description():
    defs = load_defs()
    missing = [s.name for s in [*defs.schedules, *defs.sensors] if not s.description]
    assert not missing


def test_going_live_guide_names_every_schedule_and_sensor():
    guide = (PROJECT_ROOT / "docs" / "going-live.md").read_text()
    defs = load_defs()
    assert [s.name for s in [*defs.schedules, *defs.sensors] if f"`{s.name}`" not in guide] == []
    assert "docs/going-live.md" in (PROJECT_ROOT / "README.md").read_text()


def test_loading_the_code_location_prints_no_dagster_warnings():
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-W", "always", "-c", "import billing_dags.definitions as d; d.defs()"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "Warning:" in line]
    assert not warnings, "\n".join(warnings)
