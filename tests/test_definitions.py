"""The code location loads: assets, checks, jobs, schedules, sensors, resources."""

from __future__ import annotations

import dagster as dg

from billing_dags.definitions import defs as load_defs
from billing_dags.models.sqlmodels import load_project


def _defs() -> dg.Definitions:
    return load_defs() if callable(load_defs) else load_defs


def test_definitions_load_with_every_model_and_stage():
    defs = _defs()
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    tables = {n for n, m in load_project().models.items() if m.materialized == "table"}
    assert tables <= keys
    for stage in ("raw_samples", "invoices", "stripe_outbox", "stripe_meter_events", "warehouse_views", "seed_meters", "seed_customers"):
        assert stage in keys
    # dependencies are read from the SQL: usage by day reads the edges, the month reads the days
    assert dg.AssetKey("int_series_edges_by_day") in graph.get(dg.AssetKey("fct_usage_by_day")).parent_keys
    assert dg.AssetKey("fct_usage_by_day") in graph.get(dg.AssetKey("fct_usage_by_month")).parent_keys
    assert dg.AssetKey("raw_samples") in graph.get(dg.AssetKey("int_series_edges_by_day")).parent_keys
    assert dg.AssetKey("seed_prices") in graph.get(dg.AssetKey("fct_rated_usage_by_subscription_period")).parent_keys


def test_checks_schedules_sensors_and_jobs_are_registered():
    defs = _defs()
    graph = defs.resolve_asset_graph()
    checks = {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys}
    assert ("fct_usage_by_day", "no_negative_usage") in checks
    assert ("fct_usage_by_month", "daily_sum_equals_month") in checks
    assert ("invoices", "total_equals_sum_of_lines") in checks
    assert ("fct_usage_by_day", "grain_is_unique") in checks
    assert ("usage_events", "event_ids_unique_across_days") in checks  # billing_dags/defs/ingest/checks.py
    schedules = {s.name for s in defs.schedules}
    assert {"daily_usage_schedule", "monthly_invoice_draft_schedule", "monthly_invoice_finalization_schedule"} <= schedules
    assert "late_raw_data_sensor" in {s.name for s in defs.sensors}
    for job in ("daily_usage", "monthly_invoicing", "refresh_seeds_and_views"):
        assert defs.resolve_job_def(job) is not None


def test_every_asset_has_description_group_and_kinds():
    defs = _defs()
    for spec in defs.resolve_all_asset_specs():
        assert spec.description, spec.key
        assert spec.group_name and spec.group_name != "default", spec.key
        assert spec.kinds, spec.key


def test_partition_mapping_reaches_back_35_days_for_usage():
    defs = _defs()
    graph = defs.resolve_asset_graph()
    node = graph.get(dg.AssetKey("fct_usage_by_day"))
    mapping = graph.get_partition_mapping(dg.AssetKey("fct_usage_by_day"), dg.AssetKey("int_series_edges_by_day"))
    assert isinstance(mapping, dg.TimeWindowPartitionMapping)
    assert mapping.start_offset == -35 and mapping.end_offset == 0
    assert node.partitions_def is not None
