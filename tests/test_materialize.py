"""End to end through Dagster: a simulated month materialized partition by partition on a tmp dir."""

from __future__ import annotations

import json
import math
from datetime import date, timedelta
from decimal import Decimal

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from billing_dags.definitions import defs as load_defs
from billing_dags.defs.ingest.sources import SimulationResource, simulated_sources
from billing_dags.defs.shared.partitions import billing_daily, billing_monthly
from billing_dags.defs.shared.resources import StripeResource, WarehouseResource
from billing_dags.ingest import raw

pytestmark = pytest.mark.acceptance

#: every asset of the code location, as loaded from the defs folder
ASSETS = load_defs().assets

MONTH = date(2026, 2, 1)  # 28 days keeps the test short
DAYS = [MONTH + timedelta(days=i) for i in range(28)]


def _resources(paths) -> dict:
    return {
        "warehouse": WarehouseResource(data_dir=str(paths.data_dir), seeds_dir=str(paths.seeds_dir)),
        **simulated_sources(SimulationResource(seed=7, interval_s=300)),
        "stripe": StripeResource(),
    }


def _keys(partitions_def) -> list[dg.AssetKey]:
    return [k for a in ASSETS if a.partitions_def == partitions_def for k in a.keys]


def _materialize(paths, instance, selection, partition_key=None, **kw):
    result = dg.materialize(ASSETS, selection=selection, partition_key=partition_key, resources=_resources(paths), instance=instance, **kw)
    assert result.success
    return result


@pytest.fixture(scope="module")
def month_run(tmp_path_factory):
    """One simulated February for five customers (one per set-up), every asset materialized."""
    import csv
    import shutil

    from billing_dags.core.settings import PROJECT_ROOT, resolve_paths

    root = tmp_path_factory.mktemp("month")
    seeds = root / "seeds"
    shutil.copytree(PROJECT_ROOT / "seeds", seeds)
    rows = list(csv.DictReader((PROJECT_ROOT / "seeds" / "customers.csv").open()))
    subs = list(csv.DictReader((PROJECT_ROOT / "seeds" / "subscriptions.csv").open()))
    picked = [next(r for r in rows if r["setup"] == s) for s in ("proxy", "iot", "testbed", "llm", "k8s")]
    hybrid = next(s["customer_id"] for s in subs if s["plan_id"] == "proxy_hybrid")
    picked[0] = next(r for r in rows if r["customer_id"] == hybrid)
    keep = {r["customer_id"] for r in picked}
    grants = list(csv.DictReader((PROJECT_ROOT / "seeds" / "credits.csv").open()))
    tokens = list(csv.DictReader((PROJECT_ROOT / "seeds" / "report_tokens.csv").open()))
    billing = list(csv.DictReader((PROJECT_ROOT / "seeds" / "customer_billing.csv").open(encoding="utf-8")))
    for name, table, fields in (
        ("customers.csv", picked, list(rows[0])),
        ("subscriptions.csv", [s for s in subs if s["customer_id"] in keep], list(subs[0])),
        ("credits.csv", [g for g in grants if g["customer_id"] in keep], list(grants[0])),
        ("report_tokens.csv", [r for r in tokens if r["customer_id"] in keep], list(tokens[0])),
        ("customer_billing.csv", [r for r in billing if r["customer_id"] in keep], list(billing[0])),
    ):
        with (seeds / name).open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(table)
    paths = resolve_paths(root / "data", seeds)
    instance = dg.DagsterInstance.ephemeral()
    _materialize(paths, instance, [k for a in ASSETS for k in a.keys if a.group_names_by_key.get(k) == "seeds"] + [dg.AssetKey("warehouse_views")])
    for day in DAYS:
        _materialize(paths, instance, _keys(billing_daily), partition_key=day.isoformat())
    result = _materialize(paths, instance, _keys(billing_monthly), partition_key=MONTH.isoformat())
    return paths, instance, result


def _exact_counter_usage(values: list[float]) -> Decimal:
    """Independent reference: a new series counts its first value; then v - prev, or v after a reset."""
    total, prev = Decimal(0), None
    for v in values:
        if math.isnan(v) or math.isinf(v):
            continue
        d = Decimal(repr(v))
        total += d if prev is None or d < prev else d - prev
        prev = d
    return total


def test_month_usage_equals_independent_reference_from_raw(month_run):
    paths, _, _ = month_run
    series = pq.read_table(raw.series_files(paths)).to_pylist()
    meters = {"stratum_accepted_shares_total": "proxy_accepted_shares", "pf_usage_api_calls": "testbed_api_calls", "llm_tokens_input_total": "llm_input_tokens"}
    samples = pq.read_table([f for d in DAYS for f in raw.sample_files(paths, d)])
    by_meter: dict[str, Decimal] = {}
    for sid in {s["series_id"] for s in series if s["metric"] in meters and s["labels"] and dict(s["labels"]).get("client_id") != "miner-unknown"}:
        metric = next(s["metric"] for s in series if s["series_id"] == sid)
        t = samples.filter(pc.equal(samples["series_id"], sid)).sort_by("ts")
        by_meter[meters[metric]] = by_meter.get(meters[metric], Decimal(0)) + _exact_counter_usage(t["value"].to_pylist())
    month = pq.read_table(paths.models / "fct_usage_by_month" / "month=2026-02" / "data.parquet").to_pylist()
    got: dict[str, Decimal] = {}
    for r in month:
        if r["meter_id"] in by_meter:
            got[r["meter_id"]] = got.get(r["meter_id"], Decimal(0)) + r["usage"]
    assert set(got) == set(by_meter)
    for meter, expected in by_meter.items():
        assert got[meter] == expected, meter


def test_invoices_written_and_total_is_sum_of_lines(month_run):
    paths, _, result = month_run
    folder = paths.invoices / "2026-02"
    docs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    assert {d["customer_id"] for d in docs} == {"mp-003", "iot-001", "tb-001", "llm-001", "k8s-001"}
    for d in docs:
        assert d["total_minor"] == sum(line["amount_minor"] for line in d["lines"])
        assert (folder / f"{d['customer_id']}.html").exists() and (folder / f"{d['customer_id']}.csv").exists()
        assert d["period_start"] == "2026-02-01" and d["period_end"] == "2026-03-01"
    hybrid = next(d for d in docs if d["customer_id"] == "mp-003")
    assert hybrid["lines"][0]["line_type"] == "base_fee" and hybrid["lines"][0]["amount_minor"] == 500
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["daily_sum_equals_month"] is True
    assert checks["total_equals_sum_of_lines"] is True
    assert checks["amounts_are_whole_minor_units"] is True
    assert checks["every_customer_invoiced"] is True


def test_rerunning_a_day_and_the_month_reproduces_files_byte_for_byte(month_run):
    paths, instance, _ = month_run
    day = DAYS[10]
    usage_file = paths.models / "fct_usage_by_day" / f"day={day}" / "data.parquet"
    invoice_file = paths.invoices / "2026-02" / "k8s-001.json"
    before = usage_file.read_bytes(), invoice_file.read_bytes()
    _materialize(paths, instance, _keys(billing_daily), partition_key=day.isoformat())
    _materialize(paths, instance, _keys(billing_monthly), partition_key=MONTH.isoformat())
    assert (usage_file.read_bytes(), invoice_file.read_bytes()) == before


def test_stripe_outbox_has_one_event_per_customer_meter_day_and_flags_old_days(month_run):
    paths, _, _ = month_run
    rows = pq.read_table(paths.outbox / f"date={DAYS[5]}" / "outbox.parquet").to_pylist()
    # February 2026 is more than 35 days ago: Stripe would refuse it, so it is flagged, never sent
    assert rows and {r["status"] for r in rows} == {"too_old"}
    keys = [(r["customer_id"], r["meter_id"], r["dimension"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert len({r["identifier"] for r in rows}) == len(rows)


def test_warehouse_views_answer_adhoc_queries(month_run):
    paths, _, _ = month_run
    from billing_dags.operations.warehouse import open_warehouse

    con = open_warehouse(paths)
    n = con.execute("select count(distinct day) from fct_usage_by_day").fetchall()[0][0]
    unmatched = con.execute("select count(*) from dim_series where meter_id is not null and customer_id is null").fetchall()[0][0]
    con.close()
    assert n == 28
    assert unmatched >= 1  # the simulator's miner-unknown matches no customer and is billed to nobody


def test_unpriced_model_usage_is_reported_not_silently_dropped(month_run):
    """A token model with no price row shows up in the unpriced_usage check of fct_rated_usage_by_subscription_period."""
    import duckdb

    from billing_dags.models.audits import run_audits
    from billing_dags.models.sqlmodels import Window, load_project, partition_file

    paths, _, _ = month_run
    window = Window(MONTH, date(2026, 3, 1))
    rated = load_project().models["fct_rated_usage_by_subscription_period"]
    rows = pq.read_table(partition_file(paths, rated, window))

    def unpriced_usage():
        return next(r for r in run_audits(paths, rated, window, rows) if r.audit.name == "unpriced_usage")

    usage_file = partition_file(paths, load_project().models["fct_usage_by_month"], window)
    original = usage_file.read_bytes()
    con = duckdb.connect()
    try:
        assert unpriced_usage().passed
        con.execute(
            f"copy ((select * replace ('mystery-model' as dimension) from read_parquet('{usage_file}', hive_partitioning = false) "
            f"where meter_id = 'llm_input_tokens' limit 1) union all by name (select * from read_parquet('{usage_file}', hive_partitioning = false))) "
            f"to '{usage_file}.tmp' (format parquet)"
        )
        usage_file.with_name(usage_file.name + ".tmp").replace(usage_file)
        result = unpriced_usage()
        assert not result.passed and not result.audit.blocking
        assert result.examples == ({"customer_id": "llm-001", "meter_id": "llm_input_tokens", "dimension": "mystery-model"},)
    finally:
        usage_file.write_bytes(original)
        con.close()


def test_dispute_ties_raw_evidence_to_the_bill_and_exports_a_pack(month_run, tmp_path):
    from billing_dags.operations.disputes import DisputeError, build_dispute, export_evidence
    from billing_dags.operations.warehouse import open_warehouse

    paths, _, _ = month_run
    dispute = build_dispute(paths, "mp-003", MONTH, by="hour")
    counters = dict(dispute.tie_out["meters"].items())
    assert {"proxy_bytes", "proxy_accepted_shares"} <= set(counters)
    assert all(t["ties_out"] for t in counters.values()), counters
    # only this customer's series are in the evidence (the unknown miner and other customers are not)
    series = pq.read_table(raw.series_files(paths)).to_pylist()
    mine = {s["series_id"] for s in series if dict(s["labels"]).get("client_id") == "miner-003"}
    assert set(dispute.evidence["series_id"].to_pylist()) <= mine
    assert len({b["bucket"] for b in dispute.breakdown}) > 28 * 20  # hourly buckets over the month
    files = export_evidence(dispute, tmp_path / "pack")
    assert {f.name for f in files} == {"raw_samples.parquet", "breakdown_by_hour.csv", "events.csv", "reproduce.sql", "tie_out.json"}
    con = open_warehouse(paths)
    try:
        again = con.sql((tmp_path / "pack" / "reproduce.sql").read_text()).to_arrow_table()
    finally:
        con.close()
    assert again.column("increase").to_pylist() == dispute.evidence.column("increase").to_pylist()
    with pytest.raises(DisputeError, match="no raw samples of meter 'nope'"):
        build_dispute(paths, "mp-003", MONTH, meter_id="nope")
    with pytest.raises(DisputeError, match="--by 'week'"):
        build_dispute(paths, "mp-003", MONTH, by="week")


def test_daily_summary_report_totals_match_the_usage_partition(month_run, capsys):
    from billing_dags.cli.main import main

    paths, _, _ = month_run
    day = DAYS[12]
    md = (paths.data_dir / "reports" / "daily" / f"{day}.md").read_text()
    usage = pq.read_table(paths.models / "fct_usage_by_day" / f"day={day}" / "data.parquet", partitioning=None).to_pylist()
    byte_meters = {"proxy_bytes", "iot_mqtt_bytes", "iot_http_bytes", "testbed_network", "k8s_network"}
    expected = sum(r["usage"] for r in usage if r["meter_id"] in byte_meters)
    assert f"- Bytes transferred: {expected.normalize():,f}" in md
    assert "## Top 10 customers by bytes" in md and "## Anomalies" in md
    where = ["--data-dir", str(paths.data_dir), "--seeds-dir", str(paths.seeds_dir)]
    assert main([*where, "report", "daily", "--date", str(day)]) == 0
    assert capsys.readouterr().out == md
    assert main([*where, "report", "daily", "--date", "2026-02-30"]) == 2
    assert "--date '2026-02-30' is not YYYY-MM-DD" in capsys.readouterr().err


def test_metrics_textfile_asset_writes_parseable_exposition(month_run):
    from prometheus_client.parser import text_string_to_metric_families

    paths, instance, _ = month_run
    _materialize(paths, instance, [dg.AssetKey("billing_metrics_textfile")])
    text = (paths.data_dir / "metrics" / "billing.prom").read_text()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert "billing_currency_minor_per_major" in names


def test_a_customer_with_usage_and_no_invoice_fails_the_blocking_check_unless_a_flag_names_why(paths, small_seeds):
    """mp-nosub has usage in October 2026 and no subscription: no invoice line can bill it. Without a flag
    naming it (the outside_subscription rules removed), the invoices asset fails its blocking check."""
    from test_projection import DAY_SCHEMA, day_row

    with (small_seeds / "customers.csv").open("a") as f:
        f.write("mp-nosub,Miner no subscription,proxy,miner-nosub,usd,,prometheus\n")
    rules = (small_seeds / "anomaly_rules.csv").read_text().splitlines(keepends=True)
    (small_seeds / "anomaly_rules.csv").write_text("".join(r for r in rules if not r.startswith("outside_subscription")))
    day = date(2026, 10, 5)
    f = paths.models / "fct_usage_by_day" / f"day={day}" / "data.parquet"
    f.parent.mkdir(parents=True)
    rows = [day_row(day, "mp-001", "proxy_bytes", usage=2**30), day_row(day, "mp-nosub", "proxy_bytes", usage=2 * 2**30)]
    pq.write_table(pa.Table.from_pylist(rows, schema=DAY_SCHEMA), f)
    instance = dg.DagsterInstance.ephemeral()
    _materialize(paths, instance, [k for a in ASSETS for k in a.keys if a.group_names_by_key.get(k) == "seeds"])
    month = _keys(billing_monthly)
    result = dg.materialize(ASSETS, selection=month, partition_key="2026-10-01", resources=_resources(paths), instance=instance, raise_on_error=False)
    assert not result.success
    check = next(e for e in result.get_asset_check_evaluations() if e.check_name == "every_customer_invoiced")
    assert check.passed is False and check.blocking
    assert check.metadata["unbilled"].value == {"mp-nosub": "usage in the month, no subscription, no invoice"}
    assert sorted(p.stem for p in (paths.invoices / "2026-10").glob("*.json")) == ["iot-001", "k8s-001", "llm-001", "mp-001", "tb-001"]

    # the daily flag (as fct_anomaly_flags_by_day raises it) names why mp-nosub has no invoice: the check passes
    flag = {
        "day": day,
        "customer_id": "mp-nosub",
        "meter_id": "proxy_bytes",
        "rule": "outside_subscription",
        "value": Decimal(2 * 2**30),
        "threshold": Decimal(0),
        "severity": "critical",
        "rule_description": "",
        "detail": "",
    }
    f = paths.models / "fct_anomaly_flags_by_day" / f"day={day}" / "data.parquet"
    f.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([flag]), f)
    result = _materialize(paths, instance, [dg.AssetKey("invoices")], partition_key="2026-10-01")
    check = next(e for e in result.get_asset_check_evaluations() if e.check_name == "every_customer_invoiced")
    assert check.passed is True
    assert check.metadata["not_invoiced_with_reason"].value == {"mp-nosub": "flagged outside_subscription on proxy_bytes"}


def test_run_model_days_writes_every_day_as_run_model_does(month_run, tmp_path):
    """Every daily model over the last week of the month in one call per model (one session, its inputs
    read once), in the order a range run takes them: each partition has the bytes the month's runs
    (run_model, a day at a time) wrote, the earlier days' partitions read as they are; validate sees each day."""
    import shutil

    from billing_dags.core.settings import Paths
    from billing_dags.models.sqlmodels import Window, load_project, partition_file, run_model_days

    paths, _, _ = month_run
    copy = Paths(tmp_path / "data", paths.seeds_dir)
    shutil.copytree(paths.data_dir, copy.data_dir)
    project = load_project()
    windows = [Window(d, d + timedelta(days=1)) for d in DAYS[-7:]]
    daily = [n for n in project.order() if project.models[n].materialized == "table" and project.models[n].partitioned_by == "billing_daily"]
    assert {"int_series_edges_by_day", "int_gauge_peaks_by_day", "fct_usage_by_day", "fct_anomaly_flags_by_day"} <= set(daily)
    for name in daily:
        model = project.models[name]
        for w in windows:
            partition_file(copy, model, w).unlink()
        seen = []
        results = run_model_days(copy, name, windows, project=project, validate=lambda w, t, seen=seen: seen.append((w, len(t))))
        assert [r.window for r in results] == windows and seen == [(r.window, r.rows) for r in results]
        for w in windows:
            assert partition_file(copy, model, w).read_bytes() == partition_file(paths, model, w).read_bytes(), (name, w)


def test_run_model_days_stops_at_the_first_failing_day(month_run, tmp_path):
    import shutil

    from billing_dags.core.settings import Paths
    from billing_dags.models.sqlmodels import ModelError, Window, load_project, partition_file, run_model_days

    paths, _, _ = month_run
    copy = Paths(tmp_path / "data", paths.seeds_dir)
    shutil.copytree(paths.data_dir, copy.data_dir)
    model = load_project().models["fct_usage_30d_by_day"]
    windows = [Window(d, d + timedelta(days=1)) for d in DAYS[:6]]
    for w in windows:
        partition_file(copy, model, w).unlink()

    def refuse_the_fourth(window, table):
        if window == windows[3]:
            raise ModelError("refused")

    with pytest.raises(ModelError, match="refused"):
        run_model_days(copy, model.name, windows, validate=refuse_the_fourth)
    assert [partition_file(copy, model, w).exists() for w in windows] == [True, True, True, False, False, False]


@pytest.mark.parametrize("where", ["validate", "before"])
def test_a_range_query_model_stops_at_the_first_failing_day(month_run, tmp_path, where):
    """A model computing its days in one query (range_query) publishes the days before a refused one, as
    a day-by-day run does, whether its checks (validate) or its input checks (before) refuse it."""
    import shutil

    from billing_dags.core.settings import Paths
    from billing_dags.models.sqlmodels import ModelError, Window, load_project, partition_file, run_model_days

    paths, _, _ = month_run
    copy = Paths(tmp_path / "data", paths.seeds_dir)
    shutil.copytree(paths.data_dir, copy.data_dir)
    model = load_project().models["fct_anomaly_flags_by_day"]
    assert model.config.get("range_query")
    windows = [Window(d, d + timedelta(days=1)) for d in DAYS[:6]]
    for w in windows:
        partition_file(copy, model, w).unlink()

    def refuse_the_fourth(window, table=None):
        if window == windows[3]:
            raise ModelError("refused")

    with pytest.raises(ModelError, match="refused"):
        run_model_days(copy, model.name, windows, **{where: refuse_the_fourth})
    assert [partition_file(copy, model, w).exists() for w in windows] == [True, True, True, False, False, False]
    for w in windows[:3]:
        assert partition_file(copy, model, w).read_bytes() == partition_file(paths, model, w).read_bytes()
