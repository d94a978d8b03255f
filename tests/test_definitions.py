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


#: the seed snapshot assets (refresh_seeds_and_views materializes them with the warehouse views)
SEED_ASSETS = {
    "seed_anomaly_rules",
    "seed_credits",
    "seed_currencies",
    "seed_customer_billing",
    "seed_customers",
    "seed_issuer",
    "seed_meter_display",
    "seed_meters",
    "seed_plans",
    "seed_price_tiers",
    "seed_prices",
    "seed_report_fields",
    "seed_report_tokens",
    "seed_subscriptions",
    "seed_tax_rates",
    "seed_units",
}
#: everything the code location defines, by name: loading the defs folder finds exactly these
EXPECTED_ASSETS = SEED_ASSETS | {
    "allowance_notifications",
    "billing_metrics_textfile",
    "daily_summary",
    "dim_subscription_periods_by_month",
    "fct_anomaly_flags_by_day",
    "fct_billable_usage_by_subscription_period",
    "int_gauge_peaks_by_day",
    "fct_invoice_lines",
    "fct_rated_usage_by_subscription_period",
    "int_series_edges_by_day",
    "fct_usage_30d_by_day",
    "fct_usage_by_day",
    "fct_usage_by_month",
    "fct_usage_by_subscription_period",
    "invoices",
    "raw_retention",
    "raw_samples",
    "remote_write_samples",
    "stripe_meter_events",
    "stripe_outbox",
    "usage_events",
    "usage_reports",
    "warehouse_views",
}
EXPECTED_CHECKS = {
    "dim_subscription_periods_by_month:grain_is_unique",
    "fct_anomaly_flags_by_day:grain_is_unique",
    "fct_billable_usage_by_subscription_period:grain_is_unique",
    "int_gauge_peaks_by_day:grain_is_unique",
    "fct_invoice_lines:amounts_are_whole_minor_units",
    "fct_invoice_lines:grain_is_unique",
    "fct_rated_usage_by_subscription_period:grain_is_unique",
    "fct_rated_usage_by_subscription_period:unpriced_usage",
    "int_series_edges_by_day:grain_is_unique",
    "int_series_edges_by_day:scrape_completeness",
    "fct_usage_30d_by_day:grain_is_unique",
    "fct_usage_by_day:grain_is_unique",
    "fct_usage_by_day:no_negative_usage",
    "fct_usage_by_month:daily_sum_equals_month",
    "fct_usage_by_month:grain_is_unique",
    "fct_usage_by_subscription_period:grain_is_unique",
    "invoices:critical_flags_acknowledged",
    "invoices:every_customer_invoiced",
    "invoices:total_equals_sum_of_lines",
    "stripe_meter_events:reconciled_with_invoices",
    "usage_events:event_ids_unique_across_days",
    "usage_reports:event_ids_unique_across_days",
}
EXPECTED_JOBS = {
    "daily_usage": {
        "allowance_notifications",
        "daily_summary",
        "fct_anomaly_flags_by_day",
        "int_gauge_peaks_by_day",
        "int_series_edges_by_day",
        "fct_usage_30d_by_day",
        "fct_usage_by_day",
        "raw_samples",
        "remote_write_samples",
        "stripe_meter_events",
        "stripe_outbox",
        "usage_events",
        "usage_reports",
    },
    "monthly_invoicing": {
        "dim_subscription_periods_by_month",
        "fct_billable_usage_by_subscription_period",
        "fct_invoice_lines",
        "fct_rated_usage_by_subscription_period",
        "fct_usage_by_month",
        "fct_usage_by_subscription_period",
        "invoices",
    },
    "refresh_seeds_and_views": SEED_ASSETS | {"warehouse_views"},
    "raw_retention_job": {"raw_retention"},
    "billing_metrics_job": {"billing_metrics_textfile"},
}
EXPECTED_SCHEDULES = {
    "billing_metrics_schedule": "billing_metrics_job",
    "daily_usage_schedule": "daily_usage",
    "monthly_invoice_draft_schedule": "monthly_invoicing",
    "monthly_invoice_finalization_schedule": "monthly_invoicing",
    "raw_retention_schedule": "raw_retention_job",
}
EXPECTED_SENSORS = {"late_raw_data_sensor", "remote_write_landing_sensor", "usage_reports_sensor"}


def test_the_code_location_defines_exactly_these_assets_checks_jobs_schedules_and_sensors():
    repo = _defs().get_repository_def()
    graph = repo.asset_graph
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == EXPECTED_ASSETS
    assert {f"{k.asset_key.to_user_string()}:{k.name}" for k in graph.asset_check_keys} == EXPECTED_CHECKS
    jobs = {j.name: {k.to_user_string() for k in j.asset_layer.executable_asset_keys} for j in repo.get_all_jobs()}
    assert jobs.pop("__ASSET_JOB") == EXPECTED_ASSETS
    assert jobs == EXPECTED_JOBS
    assert {s.name: s.job_name for s in repo.schedule_defs} == EXPECTED_SCHEDULES
    assert {s.name for s in repo.sensor_defs} == EXPECTED_SENSORS
    # by default (BILLING_EXECUTOR unset) every run of every job runs its steps in the run's own process
    assert {j.executor_def.name for j in repo.get_all_jobs()} == {"in_process"}


def test_the_environment_chooses_the_usage_sources(monkeypatch):
    from billing_dags.defs.ingest import sources

    for var in ("PROMETHEUS_URL", "BILLING_USAGE_EVENTS_DSN"):
        monkeypatch.delenv(var, raising=False)

    def chosen() -> dict:
        return {k: type(v).__name__ for k, v in sources.usage_sources().items() if k.endswith("_source")}

    assert chosen() == {"sample_source": "SimulatedSamples", "event_source": "SimulatedEvents", "report_source": "SimulatedReports"}
    monkeypatch.setenv("BILLING_USAGE_EVENTS_DSN", "postgresql://billing@127.0.0.1/app")
    assert chosen() == {"sample_source": "SimulatedSamples", "event_source": "PostgresEvents", "report_source": "SimulatedReports"}
    monkeypatch.setenv("PROMETHEUS_URL", "http://127.0.0.1:9090")
    assert chosen() == {"sample_source": "PrometheusSamples", "event_source": "PostgresEvents", "report_source": "ReceivedReports"}
    monkeypatch.delenv("BILLING_USAGE_EVENTS_DSN")
    assert chosen() == {"sample_source": "PrometheusSamples", "event_source": "NoEvents", "report_source": "ReceivedReports"}


def test_the_ingest_assets_read_only_the_warehouse_and_their_source():
    graph = _defs().resolve_asset_graph()
    needs = {name: graph.get(dg.AssetKey(name)).assets_def.required_resource_keys - {"io_manager"} for name in ("raw_samples", "usage_events", "usage_reports")}
    assert needs == {
        "raw_samples": {"warehouse", "sample_source"},
        "usage_events": {"warehouse", "event_source"},
        "usage_reports": {"warehouse", "report_source"},
    }


def test_any_sample_source_bound_by_configuration_feeds_raw_samples(paths):
    """A source the assets have never heard of: raw_samples calls it for each day of the run."""
    from billing_dags.defs.ingest.sources import SampleSource
    from billing_dags.defs.shared.resources import WarehouseResource

    class RecordedSamples(SampleSource):
        def write_day(self, context, paths, day) -> dict:
            return {"source": "recorded", "day": day.isoformat()}

    assets = [a for a in _defs().assets if dg.AssetKey("raw_samples") in a.keys]
    resources = {
        "warehouse": WarehouseResource(data_dir=str(paths.data_dir), seeds_dir=str(paths.seeds_dir)),
        "sample_source": RecordedSamples(),
    }
    result = dg.materialize(assets, partition_key="2026-10-02", resources=resources, instance=dg.DagsterInstance.ephemeral())
    meta = result.asset_materializations_for_node("raw_samples")[0].metadata
    assert meta["source"].value == "recorded" and meta["day"].value == "2026-10-02"
