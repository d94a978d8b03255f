"""`billing export-metrics` (Prometheus exposition), the Grafana dashboard and the recording rules."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import date, timedelta
from decimal import Decimal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_projection import DAYS, GIB, OCT, TODAY, day_row, oct_paths, write_days  # noqa: F401 (fixture)

from billing_dags.billing import projection
from billing_dags.cli.main import main
from billing_dags.models.sqlmodels import Window, run_model
from billing_dags.operations import metrics_export
from billing_dags.seeds.catalog import load_seeds

SEP = date(2026, 9, 1)
WEIRD = 'gpt"4\\o\nx'  # a label value needing every escape of the exposition format


@pytest.fixture
def warehouse(oct_paths):
    """October (open) as in test_projection, plus a closed September, a 30-day rollup, an invoice, flags."""
    paths = oct_paths
    write_days(
        paths,
        {
            SEP + timedelta(days=i): [
                day_row(SEP + timedelta(days=i), "mp-003", "proxy_bytes", usage=GIB),
                day_row(SEP + timedelta(days=i), "mp-003", "proxy_accepted_shares", usage=500),
            ]
            for i in range(30)
        },
    )
    # a dimension value with a quote, a backslash and a newline (the library escapes it)
    f = paths.models / "fct_usage_by_day" / f"day={OCT.isoformat()}" / "data.parquet"
    t = pq.read_table(f)
    extra = pa.Table.from_pylist([day_row(OCT, "llm-001", "llm_input_tokens", usage=3_000_000, dimension=WEIRD)], schema=t.schema)
    pq.write_table(pa.concat_tables([t, extra]), f)
    run_model(paths, "fct_usage_by_month", Window(SEP, OCT))
    run_model(paths, "fct_usage_30d_by_day", Window(DAYS[-1], TODAY))
    inv = paths.invoices / "2026-09" / "mp-003.json"
    inv.parent.mkdir(parents=True)
    inv.write_text(json.dumps({"customer_id": "mp-003", "currency": "usd", "status": "finalized", "total": "7.30", "total_minor": 730, "lines": []}))
    flags = paths.models / "fct_anomaly_flags_by_day"
    for day in (DAYS[2], DAYS[3]):
        (flags / f"day={day}").mkdir(parents=True)
        pq.write_table(
            pa.Table.from_pylist(
                [
                    {
                        "day": day,
                        "customer_id": "mp-003",
                        "meter_id": "proxy_bytes",
                        "rule": "allowance_used",
                        "value": Decimal("0.8"),
                        "threshold": Decimal("0.8"),
                        "severity": "warning",
                    }
                ]
            ),
            flags / f"day={day}" / "data.parquet",
        )
    return paths


def samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        out.setdefault(fam.name, []).extend(fam.samples)
    return out


def value(s, name, **labels) -> float:
    hits = [x.value for x in s[name] if all(x.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0]


def test_export_parses_and_matches_usage_invoices_and_projection(warehouse, tmp_path):
    out = tmp_path / "textfile" / "billing.prom"
    text = metrics_export.export_metrics(warehouse, OCT, out, today=TODAY).decode()
    assert out.read_text() == text and [p.name for p in out.parent.iterdir()] == ["billing.prom"]  # renamed, no temp left
    s = samples(text)
    q = dict(customer_id="mp-003", meter_id="proxy_bytes", unit="gib")
    # closed September: 30 x 1 GiB; October so far 20 GiB, projected 20 x 31 / 10 = 62 GiB
    assert value(s, "billing_usage_quantity", period="month", month="2026-09", **q) == 30
    assert value(s, "billing_usage_quantity", period="month_to_date", month="2026-10", **q) == 20
    assert value(s, "billing_usage_quantity", period="projected", month="2026-10", **q) == 62
    # 30 days to 2026-10-10: September 11..30 (20 GiB) + October 1..10 (20 GiB)
    assert value(s, "billing_usage_quantity", period="30d", **q) == 40
    assert value(s, "billing_usage_quantity", period="month", meter_id="proxy_accepted_shares", customer_id="mp-003") == 15000
    # projected bill, exact minor units, equal to the projection computed on its own
    report = projection.usage_report(warehouse, "mp-003", OCT, TODAY)
    assert value(s, "billing_projected_amount_minor", customer_id="mp-003", currency="usd") == report["projected_total_minor"] == 945
    doc = json.loads((warehouse.invoices / "2026-09" / "mp-003.json").read_text())
    assert value(s, "billing_invoice_total_minor", customer_id="mp-003", month="2026-09", status="finalized", currency="usd") == doc["total_minor"]
    assert value(s, "billing_allowance_quantity", customer_id="mp-003", meter_id="proxy_bytes") == 12
    assert value(s, "billing_currency_minor_per_major", currency="jpy") == 1
    assert value(s, "billing_currency_minor_per_major", currency="usd") == 100
    assert value(s, "billing_anomaly_flags", customer_id="mp-003", rule="allowance_used", severity="warning") == 2
    assert value(s, "billing_projection_days", kind="elapsed") == 10
    # label values are escaped by the library and come back intact
    assert value(s, "billing_usage_quantity", customer_id="llm-001", dimension=WEIRD, period="month_to_date") == 3
    assert "_minor" in text and "exact below 2^53" in text


def test_export_command_writes_a_prom_file_and_rejects_bad_input(warehouse, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(projection, "utc_today", lambda: TODAY)
    out = tmp_path / "billing.prom"
    assert main(["export-metrics", "-o", str(out)]) == 0  # default: the current month
    assert value(samples(out.read_text()), "billing_projected_amount_minor", customer_id="mp-003") == 945
    assert main(["export-metrics", "--month", "2026-09"]) == 0  # closed month, to stdout
    s = samples(capsys.readouterr().out)
    assert "billing_projected_amount_minor" not in s or not s["billing_projected_amount_minor"]
    assert value(s, "billing_usage_quantity", period="month", customer_id="mp-003", meter_id="proxy_bytes") == 30
    assert main(["export-metrics", "--month", "2026-12"]) == 2
    assert "has not started yet" in capsys.readouterr().err
    assert main(["export-metrics", "-o", str(tmp_path / "billing.txt")]) == 2
    assert "ending in .prom" in capsys.readouterr().err.replace("\n", " ")


def test_dashboard_loads_and_every_metric_it_queries_is_exported(warehouse):
    dash = json.loads(metrics_export.DASHBOARD_FILE.read_text())
    assert dash["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["customer"]["definition"] == "label_values(billing_usage_quantity, customer_id)"
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert all(t["datasource"]["uid"] == "${datasource}" for p in dash["panels"] for t in p["targets"])
    referenced = {m for e in [*exprs, variables["customer"]["definition"]] for m in re.findall(r"\bbilling_[a-z_]+", e)}
    exported = set(samples(metrics_export.export_metrics(warehouse, OCT, today=TODAY).decode()))
    assert referenced and referenced <= exported, referenced - exported
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for wanted in ("projected bill", "allowance", "invoice totals by month", "anomal", "historical"):
        assert wanted in titles


def test_recording_rules_file_is_generated_from_the_seeds():
    seeds = load_seeds(metrics_export.PROJECT_ROOT / "seeds")
    assert metrics_export.RULES_FILE.read_text() == metrics_export.render_recording_rules(seeds), (
        "prometheus/billing_recording_rules.yml is out of date: run python -m billing_dags.operations.metrics_export --write-rules"
    )
    rules = metrics_export.recording_rules(seeds)["groups"][0]["rules"]
    records = [r["record"] for r in rules]
    assert len(records) == len(set(records))
    for m in seeds["meters"].to_pylist():
        rule = next(r for r in rules if r.get("labels", {}).get("meter_id") == m["meter_id"])
        assert m["customer_label"] in rule["expr"]
        assert m["dimension_label"] in rule["expr"] if m["dimension_label"] else True
    assert "billing never uses increase()" in metrics_export.RULES_FILE.read_text()


@pytest.mark.skipif(not shutil.which("promtool", path="/usr/bin:/usr/local/bin"), reason="promtool not installed")
def test_recording_rules_pass_promtool():
    done = subprocess.run(
        ["promtool", "check", "rules", str(metrics_export.RULES_FILE)], capture_output=True, text=True, env={"PATH": "/usr/bin:/usr/local/bin"}
    )
    assert done.returncode == 0, done.stdout + done.stderr
