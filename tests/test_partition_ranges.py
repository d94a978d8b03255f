"""Runs over a partition range (a single-run backfill, "Materialize" of several partitions, `billing run`):
every asset processes every partition of the range in order and writes exactly what one run per
partition writes; a failed range run can be re-executed from failure; the CLI's runs can be re-executed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from datetime import date, timedelta
from pathlib import Path

import dagster as dg
import pytest
import yaml
from sql_helpers import duplicate_event

from billing_dags.core.settings import PROJECT_ROOT, resolve_paths
from billing_dags.defs.shared.partitions import billing_daily, billing_monthly

RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"
DAYS = [date(2026, 2, 1) + timedelta(days=i) for i in range(3)]
#: a fixed "now" for the invoices, so two runs of a month build the same documents
AS_OF = "2026-03-01T02:00:00+00:00"
#: files that record when they were written (the report store's receive times), not what was computed
TIMESTAMPED = ("landing/reports/",)
#: files whose records carry the time they were created (notifications' created_at), compared without it
CREATED_AT = ("notifications/",)


def _defs(data_dir: Path, seeds_dir: Path, monkeypatch) -> dg.Definitions:
    """The code location, its resources pointed at ``data_dir`` (they read the environment at run time)."""
    from billing_dags.definitions import defs

    monkeypatch.setenv("BILLING_DATA_DIR", str(data_dir))
    monkeypatch.setenv("BILLING_SEEDS_DIR", str(seeds_dir))
    return defs()


def _config(**invoices) -> dict:
    config = {"resources": {"simulation": {"config": {"seed": 7, "interval_s": 3600, "customers": 2}}}}
    if invoices:
        config["ops"] = {"invoices": {"config": invoices}}
    return config


def _run(defs, job: str, instance, *, key: str | None = None, first: str | None = None, last: str | None = None, config=None, ok=True):
    tags = {RANGE_START: first, RANGE_END: last} if first else None
    result = defs.resolve_job_def(job).execute_in_process(instance=instance, partition_key=key, tags=tags, run_config=config or _config(), raise_on_error=False)
    if ok:
        assert result.success, [e.step_failure_data.error.message for e in result.all_events if e.is_step_failure]
    return result


def _files(data_dir: Path) -> dict[str, str]:
    """Every data file (but the warehouse's DuckDB file and timestamped ones) by relative path: its SHA-256."""
    out = {}
    for p in sorted(data_dir.rglob("*")):
        rel = p.relative_to(data_dir).as_posix()
        if p.is_file() and not rel.startswith(TIMESTAMPED) and p.suffix not in (".duckdb", ".wal", ".lock"):
            data = p.read_bytes()
            if rel.startswith(CREATED_AT) and p.suffix == ".jsonl":
                records = [json.loads(line) for line in data.splitlines()]
                assert all(r.pop("created_at", None) for r in records), rel
                data = json.dumps(records, sort_keys=True).encode()
            out[rel] = hashlib.sha256(data).hexdigest()
    return out


def _materialized(instance, key: str) -> set[str]:
    records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=dg.AssetKey(key)), limit=1000).records
    return {r.partition_key for r in records}


def _keys(defs, partitions_def) -> list[str]:
    return [
        k.to_user_string()
        for k in defs.resolve_job_def("daily_usage" if partitions_def == billing_daily else "monthly_invoicing").asset_layer.executable_asset_keys
    ]


@pytest.fixture
def two_dirs(tmp_path, small_seeds, data_dir):
    """Two fresh data dirs over the same seeds, each with its seed snapshots."""
    return [tmp_path / "per_partition", tmp_path / "range"]


def test_a_range_run_of_daily_usage_materializes_every_asset_for_every_day_as_per_day_runs_do(two_dirs, small_seeds, monkeypatch):
    per_day, ranged = two_dirs
    instance = dg.DagsterInstance.ephemeral()
    defs = _defs(per_day, small_seeds, monkeypatch)
    _run(defs, "refresh_seeds_and_views", instance)
    for day in DAYS:
        _run(defs, "daily_usage", instance, key=day.isoformat())

    instance = dg.DagsterInstance.ephemeral()
    defs = _defs(ranged, small_seeds, monkeypatch)
    _run(defs, "refresh_seeds_and_views", instance)
    result = _run(defs, "daily_usage", instance, first=DAYS[0].isoformat(), last=DAYS[-1].isoformat())

    days = {d.isoformat() for d in DAYS}
    for key in _keys(defs, billing_daily):
        assert _materialized(instance, key) == days, key
    # each day's materialization carries that day's own metadata
    paths = {
        e.event_specific_data.materialization.partition: e.event_specific_data.materialization.metadata["path"].value
        for e in result.get_asset_materialization_events()
        if e.asset_key == dg.AssetKey("fct_usage_by_day")
    }
    assert {d: Path(p).parent.name for d, p in paths.items()} == {d: f"day={d}" for d in days}
    # every check ran over the range and passed
    evaluations = result.get_asset_check_evaluations()
    assert evaluations and all(e.passed for e in evaluations if e.blocking)
    assert {(e.asset_key.to_user_string(), e.check_name) for e in evaluations} >= {
        ("fct_usage_by_day", "no_negative_usage"),
        ("usage_events", "event_ids_unique_across_days"),
    }
    # a model's checks are recorded against each day of the range, as a run of one day records them
    assert sorted(e.partition for e in evaluations if e.asset_key == dg.AssetKey("fct_usage_by_day") and e.check_name == "grain_is_unique") == sorted(days)

    a, b = _files(per_day), _files(ranged)
    assert any(k.startswith("models/fct_usage_by_day/") for k in a)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_a_range_run_of_months_equals_one_run_per_month(two_dirs, small_seeds, monkeypatch):
    per_month, ranged = two_dirs
    instance = dg.DagsterInstance.ephemeral()
    defs = _defs(per_month, small_seeds, monkeypatch)
    _run(defs, "refresh_seeds_and_views", instance)
    # the last days of January and the first of February: enough usage to invoice both months
    _run(defs, "daily_usage", instance, first="2026-01-31", last="2026-02-01")
    shutil.copytree(per_month, ranged)

    for month in ("2026-01-01", "2026-02-01"):
        _run(defs, "monthly_invoicing", instance, key=month, config=_config(as_of=AS_OF))

    instance = dg.DagsterInstance.ephemeral()
    defs = _defs(ranged, small_seeds, monkeypatch)
    result = _run(defs, "monthly_invoicing", instance, first="2026-01-01", last="2026-02-01", config=_config(as_of=AS_OF))
    for key in _keys(defs, billing_monthly):
        assert _materialized(instance, key) == {"2026-01-01", "2026-02-01"}, key
    assert sorted(
        e.event_specific_data.materialization.partition for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey("invoices")
    ) == ["2026-01-01", "2026-02-01"]

    a, b = _files(per_month), _files(ranged)
    assert any(k.startswith("invoices/2026-01/") for k in a) and any(k.startswith("invoices/2026-02/") for k in a)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_a_failed_range_run_says_which_day_and_reexecutes_from_failure(tmp_path, small_seeds, data_dir, monkeypatch):
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    paths = resolve_paths(data_dir, small_seeds)
    instance = dg.DagsterInstance.ephemeral()
    defs = _defs(data_dir, small_seeds, monkeypatch)
    _run(defs, "refresh_seeds_and_views", instance)
    bad = duplicate_event(paths, (DAYS[1], DAYS[2]))
    result = _run(defs, "daily_usage", instance, first=DAYS[0].isoformat(), last=DAYS[-1].isoformat(), ok=False)
    assert not result.success
    failed = [e for e in result.get_asset_check_evaluations() if not e.passed and e.blocking]
    assert [(e.asset_key.to_user_string(), e.check_name) for e in failed] == [("usage_events", "event_ids_unique_across_days")]
    assert f"on {DAYS[1]} are also in its partition of {DAYS[2]}" in failed[0].description
    assert f"on {DAYS[2]} are also in its partition of {DAYS[1]}" in failed[0].description
    assert not _materialized(instance, "fct_usage_by_day")  # nothing downstream of the failed check ran

    for f in bad:  # the source's fix: the duplicate is gone
        f.unlink()
    recon = ReconstructableRepository.for_module("billing_dags.definitions", "defs", working_directory=str(PROJECT_ROOT))
    parent = instance.get_run_by_id(result.run_id)
    with dg.execute_job(  # as the UI does: the parent's tags (its partition range) and config
        recon.get_reconstructable_job("daily_usage"),
        instance=instance,
        tags=parent.tags,
        run_config=parent.run_config,
        reexecution_options=dg.ReexecutionOptions.from_failure(result.run_id, instance),
    ) as rerun:
        assert rerun.success, [e.step_failure_data.error.to_string() for e in rerun.all_events if e.is_step_failure] or rerun.all_events[-3:]
        assert rerun.dagster_run.tags[RANGE_START] == DAYS[0].isoformat() and rerun.dagster_run.tags[RANGE_END] == DAYS[-1].isoformat()
        ran = {e.step_key for e in rerun.all_events if e.is_step_success}
    assert "fct_usage_by_day" in ran and "raw_samples" not in ran  # from failure: the steps that had succeeded are not rerun
    assert _materialized(instance, "fct_usage_by_day") == {d.isoformat() for d in DAYS}


def test_a_blocking_model_check_failing_on_one_day_of_a_range_names_the_day_and_keeps_the_days_before(tmp_path, small_seeds, data_dir, monkeypatch):
    """Days are published in order; the failing day is not, and neither is any later one."""
    import billing_dags.defs.models.checks as checks

    instance = dg.DagsterInstance.ephemeral()
    defs = _defs(data_dir, small_seeds, monkeypatch)
    _run(defs, "refresh_seeds_and_views", instance)
    real = checks.run_audits

    def run_audits(paths, model, window, table, **kw):
        """DAYS[1] fails fct_usage_by_day's blocking audit no_negative_usage."""
        results = real(paths, model, window, table, **kw)
        if model.name != "fct_usage_by_day" or window.start != DAYS[1]:
            return results
        return [dataclasses.replace(r, failing_rows=1) if r.audit.name == "no_negative_usage" else r for r in results]

    monkeypatch.setattr(checks, "run_audits", run_audits)
    result = _run(defs, "daily_usage", instance, first=DAYS[0].isoformat(), last=DAYS[-1].isoformat(), ok=False)
    errors = [e.step_failure_data.error.message for e in result.all_events if e.is_step_failure and e.step_key == "fct_usage_by_day"]
    assert errors and f"fct_usage_by_day {DAYS[1]}: blocking check failed" in errors[0]
    assert _materialized(instance, "fct_usage_by_day") == {DAYS[0].isoformat()}
    models = Path(data_dir) / "models" / "fct_usage_by_day"
    assert sorted(p.name for p in models.iterdir()) == [f"day={DAYS[0]}"]


def test_cli_runs_carry_the_code_locations_origin_and_reexecute(tmp_path, small_seeds, data_dir, monkeypatch):
    """The UI re-executes a run by its origin's code location and repository: the CLI's runs name the workspace's."""
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    from billing_dags.cli import runs
    from billing_dags.cli.common import RunFailed

    paths = resolve_paths(data_dir, small_seeds)
    defs, instance = runs.definitions_of(paths)
    runs.execute(defs.resolve_job_def("refresh_seeds_and_views"), instance, "seeds")
    bad = duplicate_event(paths, (DAYS[0], DAYS[1]))
    with pytest.raises(RunFailed) as failed:
        runs.execute(
            defs.resolve_job_def("daily_usage"), instance, f"days {DAYS[0]} to {DAYS[1]}", _config(), partition_range=(DAYS[0].isoformat(), DAYS[1].isoformat())
        )
    assert f"days {DAYS[0]} to {DAYS[1]} failed" in str(failed.value) and f"rerun usage_events for {DAYS[1]}" in str(failed.value)
    run = instance.get_runs(filters=dg.RunsFilter(job_name="daily_usage"))[0]
    workspace = yaml.safe_load((PROJECT_ROOT / "workspace.yaml").read_text())["load_from"][0]["python_module"]
    origin = run.remote_job_origin
    assert origin.repository_origin.code_location_origin.location_name == workspace["location_name"]
    assert origin.repository_origin.repository_name == defs.get_repository_def().name
    assert origin.job_name == "daily_usage" and run.tags["billing/launched_by"] == "cli"
    assert (run.tags[RANGE_START], run.tags[RANGE_END]) == (DAYS[0].isoformat(), DAYS[1].isoformat())

    for f in bad:
        f.unlink()
    recon = ReconstructableRepository.for_module("billing_dags.definitions", "defs", working_directory=str(PROJECT_ROOT))
    with dg.execute_job(
        recon.get_reconstructable_job("daily_usage"),
        instance=instance,
        tags=run.tags,
        run_config=run.run_config,
        reexecution_options=dg.ReexecutionOptions.from_failure(run.run_id, instance),
    ) as rerun:
        assert rerun.success
    assert _materialized(instance, "fct_usage_by_day") == {DAYS[0].isoformat(), DAYS[1].isoformat()}


def test_every_partitioned_asset_backfills_in_one_run_and_runs_execute_in_process():
    from billing_dags.definitions import defs as load_defs

    defs = load_defs()
    graph = defs.resolve_asset_graph()
    partitioned = [graph.get(k) for k in graph.get_all_asset_keys() if graph.get(k).is_materializable and graph.get(k).partitions_def]
    assert partitioned
    for node in partitioned:
        assert node.backfill_policy == dg.BackfillPolicy.single_run(), node.key
    for name in ("daily_usage", "monthly_invoicing", "refresh_seeds_and_views"):
        assert defs.resolve_job_def(name).executor_def.name == dg.in_process_executor.name, name
