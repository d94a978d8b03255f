"""The billing_dags code location: thin; each domain lives in billing_dags/defs/<domain>/."""

import dagster as dg

from billing_dags.defs.ingest.assets import raw_samples
from billing_dags.defs.ingest.checks import INGEST_CHECKS
from billing_dags.defs.ingest.compaction import remote_write_landing_sensor, remote_write_samples
from billing_dags.defs.ingest.usage_events import usage_events
from billing_dags.defs.ingest.usage_reports import usage_reports, usage_reports_sensor
from billing_dags.defs.ingest.schedules import daily_usage_schedule
from billing_dags.defs.ingest.sensors import late_raw_data_sensor
from billing_dags.defs.invoicing.assets import invoices
from billing_dags.defs.invoicing.schedules import finalization_schedule, monthly_draft_schedule
from billing_dags.defs.jobs import build_jobs
from billing_dags.defs.models.assets import model_assets
from billing_dags.defs.seeds.assets import seed_assets
from billing_dags.defs.shared.resources import build_resources
from billing_dags.defs.stripe.assets import stripe_meter_events, stripe_outbox
from billing_dags.defs.reports.assets import billing_metrics_textfile, daily_summary, metrics_job, metrics_schedule
from billing_dags.defs.retention.assets import raw_retention, retention_job, retention_schedule
from billing_dags.defs.warehouse.assets import warehouse_views

ASSETS = [*seed_assets, raw_samples, remote_write_samples, usage_events, usage_reports, *model_assets, invoices, stripe_outbox, stripe_meter_events, warehouse_views, raw_retention, daily_summary, billing_metrics_textfile]


@dg.definitions
def defs() -> dg.Definitions:
    jobs = build_jobs(ASSETS)
    return dg.Definitions(
        assets=ASSETS,
        asset_checks=INGEST_CHECKS,
        jobs=[*jobs.values(), retention_job, metrics_job],
        schedules=[
            daily_usage_schedule(jobs["daily_usage"]),
            monthly_draft_schedule(jobs["monthly_invoicing"]),
            finalization_schedule(jobs["monthly_invoicing"]),
            retention_schedule,
            metrics_schedule,
        ],
        sensors=[late_raw_data_sensor(jobs["daily_usage"]), remote_write_landing_sensor(), usage_reports_sensor()],
        resources=build_resources(),
        # Every run executes its steps one after another in the run's own process. The default
        # (multiprocess) executor starts a Python process per step: ~2-4 s of imports each, 13 steps a
        # day, while a day's compute is ~2-5 s. The steps of a run depend on each other in a chain
        # (ingest -> edges -> usage -> outbox -> send, month -> rating -> lines -> invoices), so
        # parallel steps would gain little; DuckDB parallelises inside a step on every core instead.
        # A backfill is one run over the whole range (BackfillPolicy.single_run), so it too starts
        # one process.
        executor=dg.in_process_executor,
    )
