"""`billing export-metrics`: billing aggregates in Prometheus exposition format (seed 002), plus the
recording rules for the dashboards (prometheus/billing_recording_rules.yml, generated from seeds).

The file is meant for node_exporter's textfile collector (``--collector.textfile.directory``):
it is written to a temporary name in the same folder and renamed, so a scrape never sees half a
file. Grafana (grafana/billing_dashboard.json) reads these gauges:

- ``billing_usage_quantity{customer_id, meter_id, dimension, unit, period, month}`` in billing
  units; ``period`` is ``month`` (a closed month, final), ``month_to_date`` and ``projected`` (the
  open month, see billing_dags/billing/projection.py) or ``30d`` (rolling 30 days to the last computed day).
- ``billing_allowance_quantity{customer_id, meter_id, dimension, unit, pool}``: included quantity
  of the plan in force (not prorated).
- ``billing_projected_amount_minor{customer_id, currency, month}``: projected month-end charges.
- ``billing_invoice_total_minor{customer_id, currency, status, month}``: every stored invoice.
- ``billing_currency_minor_per_major{currency}``: divide a ``_minor`` amount by it for major units.
- ``billing_anomaly_flags{customer_id, meter_id, rule, severity, month}``: flags raised in the month.
- ``billing_projection_days{month, kind="elapsed|in_month"}`` and ``billing_export_timestamp_seconds``.

Exposition values are float64 by nature: money is exported as integer minor units (cents), exact
below 2^53; usage quantities are for display (invoices are the exact record).
"""

from __future__ import annotations

import json
import time
from datetime import date, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from billing_dags.billing import projection
from billing_dags.core import durable
from billing_dags.core.calendar import month_days, month_start, next_month, previous_month
from billing_dags.core.settings import PROJECT_ROOT, Paths
from billing_dags.models.sqlmodels import Window, billable_quantities

RULES_FILE = PROJECT_ROOT / "prometheus" / "billing_recording_rules.yml"
DASHBOARD_FILE = PROJECT_ROOT / "grafana" / "billing_dashboard.json"


def _model_rows(paths: Paths, model: str, key: str) -> list[dict]:
    f = paths.models / model / key / "data.parquet"
    return pq.read_table(f).to_pylist() if f.exists() else []


def _daily_usage(paths: Paths, start: date, end: date) -> pa.Table | None:
    """The computed fct_usage_by_day partitions of the days in [start, end), None when there are none."""
    files = [
        paths.models / "fct_usage_by_day" / f"day={d.isoformat()}" / "data.parquet" for d in (start + timedelta(days=i) for i in range((end - start).days))
    ]
    tables = [pq.read_table(f) for f in files if f.exists()]
    return pa.concat_tables(tables, promote_options="default") if tables else None


def _latest_30d(paths: Paths, before: date) -> date | None:
    """The last day before ``before`` whose rolling 30 days (fct_usage_30d_by_day) are computed."""
    folder = paths.models / "fct_usage_30d_by_day"
    days = sorted(date.fromisoformat(p.name[4:]) for p in folder.glob("day=*") if (p / "data.parquet").exists()) if folder.exists() else []
    days = [d for d in days if d < before]
    return days[-1] if days else None


class BillingCollector:
    """A prometheus_client custom collector over the warehouse; computed once, when built."""

    def __init__(self, paths: Paths, month: date | None = None, today: date | None = None):
        self.paths = paths
        self.today = today or projection.utc_today()
        self.month = month or month_start(self.today)
        self.families = self._build()

    def collect(self):
        return iter(self.families)

    def _build(self) -> list[GaugeMetricFamily]:
        paths, month, today = self.paths, self.month, self.today
        seeds = projection.seed_tables(paths)
        exponents = {c["currency"]: int(c["minor_unit_exponent"]) for c in seeds["currencies"].to_pylist()}

        usage = GaugeMetricFamily(
            "billing_usage_quantity",
            "Usage in the meter's billing unit; period=month (closed month, final), month_to_date and projected "
            "(open month: month-to-date x days in month / days computed for additive meters), 30d (rolling, to the last computed day)",
            labels=["customer_id", "meter_id", "dimension", "unit", "period", "month"],
        )
        allowance = GaugeMetricFamily(
            "billing_allowance_quantity",
            "Included quantity of the customer's plan in force in the month, in the meter's billing unit (not prorated)",
            labels=["customer_id", "meter_id", "dimension", "unit", "pool"],
        )
        projected = GaugeMetricFamily(
            "billing_projected_amount_minor",
            "Projected month-end charges of the open month in integer minor units (e.g. cents; exact below 2^53), projected, not an invoice; "
            "before prepaid credits and adjustments",
            labels=["customer_id", "currency", "month"],
        )
        invoices = GaugeMetricFamily(
            "billing_invoice_total_minor",
            "Invoice total in integer minor units (e.g. cents; exact below 2^53), per stored invoice",
            labels=["customer_id", "currency", "status", "month"],
        )
        per_major = GaugeMetricFamily(
            "billing_currency_minor_per_major",
            "Minor units per major unit of a currency (100 for usd, 1 for jpy): divide a _minor amount by it",
            labels=["currency"],
        )
        flags = GaugeMetricFamily(
            "billing_anomaly_flags",
            "Anomaly flags raised in the month (a condition lasting several days is raised once; seeds/anomaly_rules.csv); "
            "customer_id is empty for unmatched series",
            labels=["customer_id", "meter_id", "rule", "severity", "month"],
        )
        days = GaugeMetricFamily(
            "billing_projection_days",
            "Days of the open month: kind=elapsed (daily usage computed) and kind=in_month",
            labels=["month", "kind"],
        )
        stamp = GaugeMetricFamily("billing_export_timestamp_seconds", "When this file was written (Unix seconds)")

        def quantities(start: date, end: date) -> list[dict]:
            """The billable quantities of the computed days in [start, end), the window taken as one period."""
            table = _daily_usage(paths, start, end)
            return [] if table is None else billable_quantities(table, seeds, Window(start, end))

        state = projection.month_state(month, today)
        if state == "future":
            raise projection._error(f"month {month:%Y-%m} has not started yet (today is {today}); give the current month {today:%Y-%m} or an earlier one")
        closed = month if state == "closed" else previous_month(month)
        if (paths.models / "fct_usage_by_month" / f"month={closed:%Y-%m}" / "data.parquet").exists():  # the month was closed
            for r in quantities(closed, next_month(closed)):
                usage.add_metric([r["customer_id"], r["meter_id"], r["dimension"], r["unit"], "month", f"{closed:%Y-%m}"], float(r["quantity"]))
        if state == "open":
            computed, _ = projection.daily_partitions(paths, month)
            if computed:
                p = projection.project_month(paths, month, today)
                for u in p.usage:
                    for period in ("month_to_date", "projected"):
                        usage.add_metric([u["customer_id"], u["meter_id"], u["dimension"], u["unit"], period, f"{month:%Y-%m}"], float(u[period]))
                for cid, t in sorted(p.totals.items()):
                    projected.add_metric([cid, t["currency"], f"{month:%Y-%m}"], float(t["amount_minor"]))
                for a in p.allowances:
                    allowance.add_metric([a["customer_id"], a["meter_id"], a["dimension"], a["unit"], a["included_pool"] or ""], float(a["included_quantity"]))
                days.add_metric([f"{month:%Y-%m}", "elapsed"], float(p.days_elapsed))
                days.add_metric([f"{month:%Y-%m}", "in_month"], float(p.days_in_month))
        end_30d = _latest_30d(paths, min(today, next_month(month)))
        if end_30d is not None:
            for r in quantities(end_30d - timedelta(days=29), end_30d + timedelta(days=1)):
                usage.add_metric([r["customer_id"], r["meter_id"], r["dimension"], r["unit"], "30d", f"{end_30d:%Y-%m}"], float(r["quantity"]))
        for folder in sorted(paths.invoices.glob("[0-9][0-9][0-9][0-9]-[0-9][0-9]")) if paths.invoices.exists() else []:
            for f in sorted(folder.glob("*.json")):
                doc = json.loads(f.read_text())
                if "customer_id" not in doc or "total_minor" not in doc:
                    continue
                invoices.add_metric([doc["customer_id"], doc["currency"], doc["status"], folder.name], float(int(doc["total_minor"])))
        for currency, exp in sorted(exponents.items()):
            per_major.add_metric([currency], float(10**exp))
        counts: dict[tuple, int] = {}
        for d in month_days(month):
            for r in _model_rows(paths, "fct_anomaly_flags_by_day", f"day={d.isoformat()}"):
                key = (r["customer_id"] or "", r["meter_id"] or "", r["rule"], r["severity"])
                counts[key] = counts.get(key, 0) + 1
        for key, n in sorted(counts.items()):
            flags.add_metric([*key, f"{month:%Y-%m}"], float(n))
        stamp.add_metric([], time.time())
        return [usage, allowance, projected, invoices, per_major, flags, days, stamp]


def build_registry(paths: Paths, month: date | None = None, today: date | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BillingCollector(paths, month, today))
    return registry


def export_metrics(paths: Paths, month: date | None = None, output: Path | None = None, today: date | None = None) -> bytes:
    """The exposition text; with ``output`` also published durably (temp file, fsync, rename)."""
    text = generate_latest(build_registry(paths, month, today))
    if output is not None:
        durable.write_bytes(Path(output), text)
    return text


# --- recording rules for the dashboards ---------------------------------------------------------

RULES_HEADER = """\
# Prometheus recording rules for the billing dashboards, one per meter of seeds/meters.csv.
# GENERATED from the seeds by `python -m billing_dags.cli.metrics --write-rules`; do not edit
# (tests/test_metrics_export.py fails when this file and the seeds disagree).
#
# For dashboards only: billing never uses increase() or rate() (DESIGN rule 1). increase()
# extrapolates and returns non-integers for integer counters; invoices are computed from the raw
# samples, exactly, by billing_dags. These series are a live approximation of the same meters.
"""


def recording_rules(seeds: dict) -> dict:
    """One rule group: per meter, the last hour's usage summed by the customer (and dimension) label.

    Counters: ``increase(m[1h])`` (several metrics: one rule per metric first, then their sum,
    since increase() over a ``__name__`` regex fails on equal label sets). Gauges: peak
    (``max_over_time``) for ``max``, hourly average (``avg_over_time``; for ``unit_hours`` this is
    the unit-hours of that hour) for the others; series of a customer are added, like the models do.
    """
    per_metric, per_meter = [], []
    seen_metric: set[str] = set()
    for m in seeds["meters"].to_pylist() if hasattr(seeds["meters"], "to_pylist") else seeds["meters"]:
        by = m["customer_label"] + (f", {m['dimension_label']}" if m.get("dimension_label") else "")
        metrics = m["metrics"].split()
        if m["kind"] == "counter":
            fn, suffix = "increase", "increase1h"
        elif m["aggregation"] == "max":
            fn, suffix = "max_over_time", "max1h"
        else:
            fn, suffix = "avg_over_time", {"unit_hours": "unit_hours1h"}.get(m["aggregation"], "avg1h")
        labels = {"meter_id": m["meter_id"], "unit": m["unit"], "aggregation": m["aggregation"]}
        if len(metrics) == 1:
            expr = f"sum by ({by}) ({fn}({metrics[0]}[1h]))"
        else:
            names = []
            for metric in metrics:
                record = f"billing:{metric}:{suffix}"
                names.append(record)
                if record not in seen_metric:
                    seen_metric.add(record)
                    per_metric.append({"record": record, "expr": f"sum by ({by}) ({fn}({metric}[1h]))"})
            expr = f'sum by ({by}) ({{__name__=~"{"|".join(names)}"}})'  # metric names have no regex metacharacters
        per_meter.append({"record": f"billing:{m['meter_id']}:{suffix}", "expr": expr, "labels": labels})
    return {"groups": [{"name": "billing_dashboards", "interval": "1m", "rules": per_metric + per_meter}]}


def render_recording_rules(seeds: dict) -> str:
    return RULES_HEADER + yaml.safe_dump(recording_rules(seeds), sort_keys=False, width=200)
