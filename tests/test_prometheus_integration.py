"""Against a real Prometheus: backfilled with promtool, pulled by the raw_samples asset, billed exactly.

The fixture generates a few series at 60 s from 2025-02-28 20:00 to 2025-03-04 00:00 UTC (counter
resets, a 5-hour scrape gap, a series born mid-period, one that stops, label values with a quote,
a backslash and non-ASCII characters, samples off the minute grid so midnight falls between two
samples, and samples exactly at midnight), writes them as OpenMetrics, backfills them with
``promtool tsdb create-blocks-from openmetrics`` and starts ``prometheus`` on 127.0.0.1 with its
own storage path. The billed usage of 2025-03-01..03 must equal a Decimal computation made
directly from the generated samples.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import random
import shutil
import subprocess
import sys
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path

import dagster as dg
import prometheus_harness as harness
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from servers import HandlerServer

from billing_dags.core import shards
from billing_dags.core.settings import PROJECT_ROOT, resolve_paths
from billing_dags.definitions import defs as load_defs
from billing_dags.defs.ingest.sources import NoEvents, PrometheusSamples, ReceivedReports
from billing_dags.defs.shared.resources import StripeResource, WarehouseResource
from billing_dags.ingest import prometheus as prom
from billing_dags.ingest import raw

#: every asset of the code location, as loaded from the defs folder
ASSETS = load_defs().assets

pytestmark = pytest.mark.integration

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
if not (Path(PROMETHEUS).exists() and Path(PROMTOOL).exists()):
    pytest.skip(
        "prometheus/promtool not installed (apt-get install -y --no-install-recommends prometheus); CI installs them",
        allow_module_level=True,
    )

DAYS = [date(2025, 3, 1), date(2025, 3, 2), date(2025, 3, 3)]
START_MS = raw.day_bounds_ms(date(2025, 2, 28))[0] + 20 * 3_600_000
END_MS = raw.day_bounds_ms(date(2025, 3, 4))[0]  # inclusive: a sample exactly at 03-04 00:00
H = 3_600_000
QUOTED = 'mi"ner\\ü'  # quote, backslash, non-ASCII
ZURICH = "Zürich-矿工"
CUSTOMERS = {"miner-001": "mp-001", QUOTED: "mp-quote", ZURICH: "mp-zurich"}
PROBE_VALUES = ['a"b', "back\\slash", "new\nline", ZURICH, "miner-001", "miner-0.1", "x|y", ".*", 'a\\"b', "ü"]


def _counter(rng, ts, start_value, reset_at=None, step=(0, 50)):
    values, v = [], start_value
    for t in ts:
        if reset_at is not None and t >= reset_at and (not values or ts[len(values) - 1] < reset_at):
            v = rng.randint(0, 3)
        else:
            v += rng.randint(*step)
        values.append(float(v))
    return values


def _generate() -> list[tuple[dict, list[int], list[float]]]:
    rng = random.Random(20250301)
    grid = list(range(START_MS, END_MS + 1, 60_000))
    off = [t + 30_000 for t in grid if t + 30_000 < END_MS]
    d1, d2 = raw.day_bounds_ms(DAYS[0])[0], raw.day_bounds_ms(DAYS[1])[0]
    gap = [t for t in off if not (d1 + 13 * H <= t < d1 + 18 * H)]  # 5 hours without scrapes
    out = []
    # off the minute grid (midnight between two samples), a 5-hour gap and a reset on 03-02 10:00
    out.append(
        ({"__name__": "stratum_accepted_shares_total", "client_id": "miner-001", "pool_host": "eu1"}, gap, _counter(rng, gap, 1_000_000, reset_at=d2 + 10 * H))
    )
    # quote/backslash/non-ASCII label, values near 2**50, samples exactly at every midnight
    out.append(({"__name__": "stratum_accepted_shares_total", "client_id": QUOTED}, grid, _counter(rng, grid, 2**50, step=(0, 5000))))
    # born mid-period: its first value counts (rule 4)
    born = [t for t in off if t >= d2 + 7 * H + 13 * 60_000]
    out.append(({"__name__": "stratum_accepted_shares_total", "client_id": ZURICH}, born, _counter(rng, born, 5000)))
    # stops on 03-02 at noon, reset on 03-01 at 06:00
    gone = [t for t in grid if t <= d2 + 12 * H]
    out.append(({"__name__": "stratum_bytes_sent_total", "client_id": "miner-001"}, gone, _counter(rng, gone, 10**9, reset_at=d1 + 6 * H, step=(0, 10**6))))
    out.append(({"__name__": "stratum_bytes_received_total", "client_id": ZURICH}, born, _counter(rng, born, 0, step=(0, 10**5))))
    # no such customer: ingested, counted as unmatched, billed to nobody
    out.append(({"__name__": "stratum_accepted_shares_total", "client_id": "miner-unknown"}, grid, _counter(rng, grid, 7)))
    # no customer label at all: ingested and unmatched too (sharded by its series id)
    out.append(({"__name__": "stratum_bytes_received_total", "pool_host": "eu9"}, grid, _counter(rng, grid, 0, step=(0, 10**4))))
    # a gauge with a NaN sample
    gv = [float(rng.randint(0, 40)) for _ in grid]
    gv[340] = math.nan  # 2025-03-01 01:40
    out.append(({"__name__": "stratum_active_connections", "client_id": "miner-001"}, grid, gv))
    for i, v in enumerate(PROBE_VALUES):
        out.append(({"__name__": "escape_probe", "v": v}, grid[:10], [float(i)] * 10))
    return out


def _families(series) -> dict:
    fam: dict[str, tuple[str, list]] = {}
    for labels, ts, values in series:
        name = labels["__name__"]
        family, kind = (name[: -len("_total")], "counter") if name.endswith("_total") else (name, "gauge")
        fam.setdefault(family, (kind, []))[1].append((labels, ts, values))
    return fam


def _prometheus_with(root: Path, series: list):
    """A real Prometheus on 127.0.0.1 serving ``series``, backfilled with promtool into ``root``."""
    om = root / "data.om"
    harness.write_openmetrics(om, _families(series))
    harness.backfill(om, root / "tsdb", PROMTOOL)
    return harness.LocalPrometheus(root / "tsdb", PROMETHEUS, log_file=root / "prometheus.log")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    series = _generate()
    with _prometheus_with(tmp_path_factory.mktemp("prom"), series) as p:
        yield p, series


def _write_seeds(d: Path, customers: dict[str, str]) -> Path:
    """A copy of the seeds at ``d`` with ``customers`` ({label value: customer id}), each with mp-001's plan."""
    shutil.copytree(PROJECT_ROOT / "seeds", d)
    with (PROJECT_ROOT / "seeds" / "customers.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    base = next(r for r in rows if r["customer_id"] == "mp-001")
    picked = []
    for label, cid in customers.items():
        picked.append({**base, "customer_id": cid, "name": f"Customer {cid}", "label_value": label, "stripe_customer_id": f"cus_{cid.replace('-', '')}"})
    with (d / "customers.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(picked)
    # other seeds that name customers (subscriptions, credits...): mp-001's rows, copied to each test customer
    for f in sorted(d.glob("*.csv")):
        if f.name == "customers.csv":
            continue
        with f.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields, other = reader.fieldnames or [], list(reader)
        if "customer_id" not in fields:
            continue
        mine = [{**r, "customer_id": cid} for cid in customers.values() for r in other if r["customer_id"] == "mp-001"]
        with f.open("w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            w.writerows(mine)
    return d


@pytest.fixture
def seeds(tmp_path, monkeypatch) -> Path:
    d = _write_seeds(tmp_path / "seeds", CUSTOMERS)
    monkeypatch.setenv("BILLING_SEEDS_DIR", str(d))
    return d


def _assets(*names):
    return [
        a
        for a in ASSETS
        if any(k.to_user_string() in names for k in a.keys) or (a.partitions_def is None and any(k.to_user_string().startswith("seed_") for k in a.keys))
    ]


def _resources(paths, url, **prom_kw) -> dict:
    return {
        "warehouse": WarehouseResource(data_dir=str(paths.data_dir), seeds_dir=str(paths.seeds_dir)),
        "sample_source": PrometheusSamples(url=url, **prom_kw),
        "event_source": NoEvents(),
        "report_source": ReceivedReports(),
        "stripe": StripeResource(),
    }


PULL = dict(chunk_s=6 * 3600, customers_per_query=2)


def _run(paths, instance, url, names, partition_key=None, **kw):
    assets = _assets(*names)
    selection = [k for a in assets for k in a.keys if k.to_user_string() in names or (not names and a.partitions_def is None)]
    return dg.materialize(assets, selection=selection, partition_key=partition_key, resources=_resources(paths, url, **{**PULL, **kw}), instance=instance)


def _exact_reference(series, days, customers=CUSTOMERS) -> tuple[dict, dict]:
    """Usage per (day, customer, meter) from the generated samples: v - prev, or v after a reset or at birth."""
    meters = {
        "stratum_accepted_shares_total": "proxy_accepted_shares",
        "stratum_bytes_sent_total": "proxy_bytes",
        "stratum_bytes_received_total": "proxy_bytes",
    }
    usage: dict[tuple, Decimal] = {}
    peaks: dict[tuple, Decimal] = {}
    for labels, ts, values in series:
        customer = customers.get(labels.get("client_id"))
        if customer is None:
            continue
        prev = None
        for t, v in zip(ts, values):
            if math.isnan(v):
                continue
            day = raw.day_of_ms(t)
            if labels["__name__"] in meters and day in days:
                d = Decimal(int(v))
                key = (day, customer, meters[labels["__name__"]])
                usage[key] = usage.get(key, Decimal(0)) + (d if prev is None or d < prev else d - prev)
            if labels["__name__"] == "stratum_active_connections" and day in days:
                key = (day, customer, "proxy_connections")
                peaks[key] = max(peaks.get(key, Decimal(0)), Decimal(int(v)))
            prev = Decimal(int(v))
    return usage, peaks


def test_label_escaping_selects_exactly_that_value_on_a_real_server(server):
    p, _ = server
    t = START_MS + 5 * 60_000
    with prom.PrometheusClient(p.url) as client:
        for v in PROBE_VALUES:
            for matcher in (f"v={prom.promql_string(v)}", f"v=~{prom.promql_string(prom.regex_quote(v))}"):
                res = client.query(f"escape_probe{{{matcher}}}", t)
                assert [r["metric"]["v"] for r in res.result] == [v], (v, matcher)
        sel = prom.Selector("probe", "escape_probe", "v", ("miner-0.1", ".*", 'a"b'))
        res = client.query(sel.promql(), t)
        assert sorted(r["metric"]["v"] for r in res.result) == sorted(["miner-0.1", ".*", 'a"b'])
        rest = prom.Selector("probe", "escape_probe", "v", None, ("miner-0.1", ".*", 'a"b'))
        res = client.query(rest.promql(), t)
        assert sorted(r["metric"]["v"] for r in res.result) == sorted(set(PROBE_VALUES) - {"miner-0.1", ".*", 'a"b'})


def test_exact_fetch_returns_every_raw_sample_once(server):
    """Chunked range selectors: every generated sample of the day exactly once, midnight in the next day."""
    p, series = server
    day = DAYS[1]
    s, e = raw.day_bounds_ms(day)
    with prom.PrometheusClient(p.url) as client:
        col = prom.Collector()
        sel = prom.Selector("proxy_accepted_shares", "stratum_accepted_shares_total", "client_id", (QUOTED,))
        for a, b in prom.plan_chunks(s, e, 7 * 60_000 + 13):  # odd chunk length: boundaries fall on samples too
            for sid, metric, labels, ts, values in prom._fetch_exact(client, sel, a, b):
                col.add(sid, metric, labels, ts, values)
    added = col.samples
    samples, _ = col.tables()
    labels, ts, values = next(x for x in series if x[0].get("client_id") == QUOTED)
    want = [(t, v) for t, v in zip(ts, values) if s <= t < e]
    assert list(zip(samples["ts"].to_pylist(), samples["value"].to_pylist())) == want
    assert added == len(want)  # after the window cut, no chunk returned a sample another chunk returned


@pytest.mark.acceptance
def test_month_from_live_prometheus_equals_exact_usage(server, tmp_path, seeds):
    p, series = server
    paths = resolve_paths(tmp_path / "data", seeds)
    instance = dg.DagsterInstance.ephemeral()
    assert _run(paths, instance, p.url, ()).success  # seeds
    # out of order on purpose: 03-02 before 03-01, with nothing ingested before either
    reports = {}
    for day in (DAYS[1], DAYS[0], DAYS[2]):
        r = _run(paths, instance, p.url, ("raw_samples",), day.isoformat())
        assert r.success
        reports[day] = r.asset_materializations_for_node("raw_samples")[0].metadata
    # each day recorded its own carry-in (every series' last sample before it) and wrote nothing elsewhere
    assert reports[DAYS[0]]["carry_in_series"].value == 6  # miner-001 x3, quoted, unknown, no label (not Zürich: born later)
    assert reports[DAYS[1]]["carry_in_series"].value == 6
    assert reports[DAYS[2]]["carry_in_series"].value == 8  # + the two Zürich series; bytes_sent stopped on 03-02
    assert sorted(d.name for d in paths.raw_samples.iterdir()) == [f"date={d}" for d in DAYS]
    assert sorted(d.name for d in paths.raw_carry_in.iterdir()) == [f"date={d}" for d in DAYS]
    for day in DAYS:
        md = reports[day]
        assert md["unmatched_series"].value == 2
        assert "miner-unknown" in str(md["unmatched_examples"].value)
        assert md["non_finite_samples"].value == (1 if day == DAYS[0] else 0)
    assert reports[DAYS[2]]["series"].value == 7  # bytes_sent stopped on 03-02, the two Zürich series were born
    # the models: the days in order, then the month
    for day in DAYS:
        assert _run(paths, instance, p.url, ("int_series_edges_by_day", "int_gauge_peaks_by_day", "fct_usage_by_day"), day.isoformat()).success
    assert _run(paths, instance, p.url, ("fct_usage_by_month",), "2025-03-01").success

    usage, peaks = _exact_reference(series, set(DAYS))
    got_usage, got_peaks = {}, {}
    for day in DAYS:
        for r in pq.read_table(paths.models / "fct_usage_by_day" / f"day={day}" / "data.parquet").to_pylist():
            if r["kind"] == "counter":
                got_usage[(day, r["customer_id"], r["meter_id"])] = r["usage"]
            else:
                got_peaks[(day, r["customer_id"], r["meter_id"])] = r["gauge_peak"]
    assert {k: v for k, v in got_usage.items() if v} == {k: v for k, v in usage.items() if v}
    assert got_peaks == peaks
    month = pq.read_table(paths.models / "fct_usage_by_month" / "month=2025-03" / "data.parquet").to_pylist()
    by_month = {(r["customer_id"], r["meter_id"]): r["usage"] for r in month if r["kind"] == "counter"}
    want_month: dict[tuple, Decimal] = {}
    for (_day, c, m), v in usage.items():
        want_month[(c, m)] = want_month.get((c, m), Decimal(0)) + v
    assert by_month == want_month
    assert "mp-quote" in {c for c, _ in by_month} and "mp-zurich" in {c for c, _ in by_month}
    # the reset and the gap are there: the shares of miner-001 on 03-02 include a reset
    resets = {(r["customer_id"], r["meter_id"]): r["resets"] for r in month}
    assert resets[("mp-001", "proxy_accepted_shares")] == 1 and resets[("mp-001", "proxy_bytes")] == 1

    # a rerun of a day gives the same bytes (its carry-in too); with 02-28 ingested and its edges, 03-01 is unchanged
    files = [
        raw.samples_day_dir(paths, DAYS[1]) / "part-prometheus.parquet",
        raw.series_day_dir(paths, DAYS[1]) / "part-prometheus.parquet",
        raw.carry_in_day_dir(paths, DAYS[1]) / "part-prometheus.parquet",
    ]
    before = [f.read_bytes() for f in files]
    assert _run(paths, instance, p.url, ("raw_samples",), DAYS[1].isoformat()).success
    assert [f.read_bytes() for f in files] == before
    assert _run(paths, instance, p.url, ("raw_samples",), "2025-02-28").success
    for day in [date(2025, 2, 28), DAYS[0]]:
        assert _run(paths, instance, p.url, ("int_series_edges_by_day", "int_gauge_peaks_by_day"), day.isoformat()).success
    assert _run(paths, instance, p.url, ("fct_usage_by_day",), DAYS[0].isoformat()).success
    again = pq.read_table(paths.models / "fct_usage_by_day" / f"day={DAYS[0]}" / "data.parquet").to_pylist()
    assert {(DAYS[0], r["customer_id"], r["meter_id"]): r["usage"] for r in again if r["kind"] == "counter" and r["usage"]} == {
        k: v for k, v in usage.items() if k[0] == DAYS[0] and v
    }


def _failure_message(result) -> str:
    failures = [e for e in result.all_events if e.is_step_failure]
    assert failures
    return failures[0].event_specific_data.error.message + str(failures[0].event_specific_data.user_failure_data)


def test_bad_query_fails_the_partition_naming_meter_query_and_server(server, tmp_path, seeds):
    p, _ = server
    paths = resolve_paths(tmp_path / "data", seeds)
    instance = dg.DagsterInstance.ephemeral()
    assets = _assets("raw_samples")
    result = dg.materialize(
        assets,
        selection=["raw_samples"],
        partition_key=DAYS[0].isoformat(),
        instance=instance,
        raise_on_error=False,
        resources=_resources(paths, p.url, extra_matchers='job=~"("', **PULL),
    )
    assert not result.success
    msg = _failure_message(result)
    assert "meter proxy_bytes" in msg and p.url in msg and 'job=~"("' in msg and "bad_data" in msg
    assert not raw.sample_files(paths, DAYS[0])  # nothing written


def test_stopped_server_fails_the_partition_naming_meter_query_and_server(tmp_path, seeds):
    tsdb = tmp_path / "tsdb"
    tsdb.mkdir()
    with harness.LocalPrometheus(tsdb, PROMETHEUS) as p:
        url = p.url
    paths = resolve_paths(tmp_path / "data", seeds)
    result = dg.materialize(
        _assets("raw_samples"),
        selection=["raw_samples"],
        partition_key=DAYS[0].isoformat(),
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
        resources=_resources(paths, url, max_retries=2, backoff_s=0.01, **PULL),
    )
    assert not result.success
    msg = _failure_message(result)
    assert "unreachable" in msg and url in msg and "meter proxy_bytes" in msg and "query:" in msg and "3 attempts" in msg
    assert not raw.sample_files(paths, DAYS[0])


def test_range_mode_splits_under_the_point_limit(server):
    """query_range over a day at 5 s needs 17,280 points: split into requests Prometheus accepts."""
    p, _series = server
    s, e = raw.day_bounds_ms(DAYS[1])
    sel = prom.Selector("proxy_accepted_shares", "stratum_accepted_shares_total", "client_id", (QUOTED,))
    with prom.PrometheusClient(p.url) as client:
        items = list(prom._fetch_range(client, sel, s, e, 5_000))
        assert client.requests == 2
    ts = [t for *_, tsa, _ in items for t in tsa.tolist()]
    assert len(ts) == 17_280 and ts[0] == s and ts[-1] == e - 5_000


# --------------------------------------------------------------------------- a first month, days in any order

OCT_CUSTOMERS = {"miner-001": "mp-001", "miner-002": "mp-002"}
OCTOBER = [date(2026, 10, 1) + timedelta(days=i) for i in range(31)]
AROUND = [date(2026, 9, 30), date(2026, 10, 1), date(2026, 10, 2)]


def _october() -> list[tuple[dict, list[int], list[float]]]:
    """A few series at 60 s around the 2026-09/10 boundary (small: promtool backfills it in seconds)."""
    rng = random.Random(20261001)
    sep28, sep29, sep30, oct1, oct2 = (raw.day_bounds_ms(date(2026, 9, 28) + timedelta(days=i))[0] for i in range(5))

    def grid(a, b, offset=30_000):
        return list(range(a + offset, b, 60_000))

    shares = "stratum_accepted_shares_total"
    out = []
    # across the month boundary, off the minute grid
    a = grid(sep29 + 18 * H, oct2 + 6 * H)
    out.append(({"__name__": shares, "client_id": "miner-001"}, a, _counter(rng, a, 10**6)))
    # silent on 09-30, the day before the month: its last sample before 10-01 is on 09-29
    b = grid(sep28 + 20 * H, sep29 + 20 * H) + grid(oct1 + 6 * H, oct2)
    out.append(({"__name__": shares, "client_id": "miner-002"}, b, _counter(rng, b, 5 * 10**5)))
    # on the minute grid (a sample exactly at midnight), a reset on 10-01 at noon
    c = grid(sep30 + 20 * H, oct1 + 23 * H, offset=0)
    out.append(({"__name__": "stratum_bytes_sent_total", "client_id": "miner-001"}, c, _counter(rng, c, 10**9, reset_at=oct1 + 12 * H, step=(0, 10**6))))
    # born in the month: its first value counts (rule 4)
    d = grid(oct1 + 3 * H, oct2 + 2 * H)
    out.append(({"__name__": "stratum_bytes_received_total", "client_id": "miner-002"}, d, _counter(rng, d, 0, step=(0, 10**5))))
    # a gauge whose last sample (09-30 23:59:30) holds into 10-01, which has none of its samples
    g = grid(sep30 + 20 * H, oct1)
    out.append(({"__name__": "stratum_active_connections", "client_id": "miner-001"}, g, [float(rng.randint(1, 40)) for _ in g]))
    return out


@pytest.fixture(scope="module")
def october_server(tmp_path_factory):
    series = _october()
    with _prometheus_with(tmp_path_factory.mktemp("prom-october"), series) as p:
        yield p, series


@pytest.mark.acceptance
def test_billing_run_of_a_first_month_against_prometheus_on_an_empty_data_dir(october_server, tmp_path):
    """`billing run --month` (the real CLI, a subprocess) on an empty data dir bills the exact usage."""
    p, series = october_server
    seeds = _write_seeds(tmp_path / "seeds", OCT_CUSTOMERS)
    data = tmp_path / "data"
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROMETHEUS_", "STRIPE_", "BILLING_"))}
    # the invoices' JSON is checked, not their PDF (WeasyPrint costs seconds of CPU)
    env.update(PROMETHEUS_URL=p.url, BILLING_DATA_DIR=str(data), BILLING_SEEDS_DIR=str(seeds), DAGSTER_HOME=str(home), BILLING_INVOICE_PDF="0")
    proc = subprocess.run(
        [sys.executable, "-m", "billing_dags.cli.main", "run", "--month", "2026-10"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    usage, _ = _exact_reference(series, set(OCTOBER), OCT_CUSTOMERS)
    want: dict[tuple, Decimal] = {}
    for (_, c, m), v in usage.items():
        want[(c, m)] = want.get((c, m), Decimal(0)) + v
    month = pq.read_table(data / "models" / "fct_usage_by_month" / "month=2026-10" / "data.parquet").to_pylist()
    got = {(r["customer_id"], r["meter_id"]): r["usage"] for r in month if r["kind"] == "counter" and r["usage"]}
    assert got == {k: v for k, v in want.items() if v}
    assert {("mp-001", "proxy_accepted_shares"), ("mp-002", "proxy_accepted_shares"), ("mp-002", "proxy_bytes")} <= set(got)
    assert sorted(f.name for f in (data / "invoices" / "2026-10").glob("*.json")) == ["mp-001.json", "mp-002.json"]


def _usage_by_day(paths, day) -> list[dict]:
    return pq.read_table(paths.models / "fct_usage_by_day" / f"day={day}" / "data.parquet").to_pylist()


@pytest.mark.acceptance
def test_days_materialized_in_any_order_give_the_usage_of_days_in_order(october_server, tmp_path):
    """Rule 3: each day (raw_samples, its edges, its usage) materialized alone, in any order, on an empty data dir."""
    p, series = october_server
    seeds = _write_seeds(tmp_path / "seeds", OCT_CUSTOMERS)
    names = ("raw_samples", "int_series_edges_by_day", "int_gauge_peaks_by_day", "fct_usage_by_day")
    orders = {"in order": AROUND, "reverse": AROUND[::-1], "shuffled": [AROUND[1], AROUND[2], AROUND[0]]}
    results = {}
    for label, order in orders.items():
        paths = resolve_paths(tmp_path / label.replace(" ", "_"), seeds)
        instance = dg.DagsterInstance.ephemeral()
        assert _run(paths, instance, p.url, ()).success
        for day in order:
            assert _run(paths, instance, p.url, names, day.isoformat()).success, (label, day)
        results[label] = {day: _usage_by_day(paths, day) for day in AROUND}
        # a day's ingest writes inside its own partition only: nothing for a day nobody asked for
        written = {d.name for root in (paths.raw_samples, paths.raw_series) for d in root.iterdir()}
        assert written == {f"date={day}" for day in AROUND}, label
    assert results["reverse"] == results["in order"]
    assert results["shuffled"] == results["in order"]
    usage, _ = _exact_reference(series, set(AROUND), OCT_CUSTOMERS)
    got = {
        (day, r["customer_id"], r["meter_id"]): r["usage"] for day, rows in results["in order"].items() for r in rows if r["kind"] == "counter" and r["usage"]
    }
    assert got == {k: v for k, v in usage.items() if v}
    # the gauge's last sample of 09-30 (23:59:30) holds for the staleness limit (5 min), 4.5 min into 10-01
    _, _ts, values = next(s for s in series if s[0]["__name__"] == "stratum_active_connections")
    gauge = next(r for r in results["in order"][AROUND[1]] if r["meter_id"] == "proxy_connections")
    assert (gauge["gauge_covered_ms"], gauge["gauge_integral"]) == (270_000, Decimal(int(values[-1])) * 270_000)


# --------------------------------------------------------------------------- remote read (/api/v1/read)


def _ingest_files(url: str, root: Path, seeds: Path, days, read_api: str, chunks: bool = True, shards: int = 1, shard=None) -> tuple[dict, list, list]:
    """Every Parquet file ingest_day writes for ``days`` (relative path -> bytes), the reports and the log;
    with ``shards`` > 1, into that many shards (the day pulled once, or only ``shard``'s series)."""
    paths = dataclasses.replace(resolve_paths(root, seeds), shards=shards)
    meters, label_values = prom.meters_and_label_values(seeds)
    logs: list[str] = []
    with prom.PrometheusClient(url, read_api=read_api, remote_read_chunks=chunks) as client:
        opt = prom.IngestOptions(**PULL)
        reports = [prom.ingest_day(client, paths, day, meters, label_values, opt, log=logs.append, **({"shard": shard} if shard else {})) for day in days]
    files = {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*.parquet"))}
    return files, reports, logs


READ_DAYS = [date(2025, 2, 28), *DAYS, date(2025, 3, 4)]  # 03-04: only the samples exactly at its midnight


@pytest.mark.parametrize("chunks", [pytest.param(True, marks=pytest.mark.acceptance), False], ids=["xor-chunks", "samples"])
def test_remote_read_writes_the_raw_partitions_of_the_query_api_byte_for_byte(server, tmp_path, seeds, chunks):
    """Resets, the 5-hour gap, a NaN, samples exactly at midnight, 6-hour chunk bounds on samples: same bytes."""
    p, series = server
    via_query, q_reports, _ = _ingest_files(p.url, tmp_path / "query", seeds, READ_DAYS, "query")
    via_read, r_reports, _ = _ingest_files(p.url, tmp_path / "read", seeds, READ_DAYS, "remote_read", chunks)
    assert [r.read_api for r in q_reports] == ["query"] * 5 and [r.read_api for r in r_reports] == ["remote_read"] * 5
    assert sorted(via_read) == sorted(via_query) and len(via_read) >= 3 * len(READ_DAYS)  # samples, series, carry-in
    assert via_read == via_query
    by_day = {r.day: r for r in r_reports}
    assert by_day[DAYS[0]].non_finite_samples == 1
    # 03-04 holds exactly the samples at its midnight (the on-grid series), 03-03 none of them
    s4 = raw.day_bounds_ms(date(2025, 3, 4))[0]
    assert by_day[date(2025, 3, 4)].samples == sum(1 for _, ts, _ in series for t in ts if t == s4) > 0
    want = sum(1 for _, ts, _ in series for t in ts if raw.day_bounds_ms(DAYS[2])[0] <= t < s4)
    assert by_day[DAYS[2]].samples == want


#: miner-001 falls in shard 3 of 5, the quoted and the Zürich customers in 1, miner-unknown (no such customer) in 4,
#: the series without a customer label (by its series id) in 2, nothing in 0
SHARDS = 5


@pytest.mark.parametrize("read_api", ["remote_read", pytest.param("query", marks=pytest.mark.acceptance)])
def test_shard_pulls_write_the_files_of_one_pull_split_by_shard(server, tmp_path, seeds, read_api):
    """One pull per shard of label values writes, byte for byte, what one pull of the day split by shard
    writes: the same series (the unmatched ones included), samples and carry-in; each pull writes its own
    shard's files and touches no other file."""
    p, series = server
    days = [DAYS[0], DAYS[2]]  # a NaN and a carry-in of every series; two series born the day before
    assert [shards.shard_of(v, SHARDS) for v in ("miner-001", QUOTED, ZURICH, "miner-unknown")] == [3, 1, 1, 4]
    lab = next(dict(lab) for lab, _, _ in series if "client_id" not in lab and "v" not in lab)
    labelless = raw.series_id(lab.pop("__name__"), lab)
    assert shards.shard_of_series_id(labelless, SHARDS) == 2
    one, one_reports, _ = _ingest_files(p.url, tmp_path / "one", seeds, days, read_api, shards=SHARDS)
    assert len(one) == 4 * len(days) * SHARDS  # samples, series, carry-in and its series, every (day, shard)
    root = tmp_path / "per-shard"
    reports = []
    for shard in shards.all_shards(SHARDS):
        before = {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in root.rglob("*.parquet")}
        files, got, _ = _ingest_files(p.url, root, seeds, days, read_api, shards=SHARDS, shard=shard)
        reports.append(got)
        assert {f for f in files if f"/{shard.dirname}/" in f} == {f for f in one if f"/{shard.dirname}/" in f}, shard
        assert all(f"/{shard.dirname}/" in f for f in set(files) - {str(f.relative_to(root)) for f in before}), shard
        assert {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in before} == before, shard  # the other shards' files untouched
    assert files == one  # every file, byte for byte
    for i, day in enumerate(days):
        mine = [r[i] for r in reports]
        assert [r.read_api for r in mine] == [one_reports[i].read_api] * SHARDS == [read_api] * SHARDS
        for figure in ("series", "samples", "carry_in_series", "unmatched_series", "non_finite_samples"):
            assert sum(getattr(r, figure) for r in mine) == getattr(one_reports[i], figure), (day, figure)
        assert [r.unmatched_series for r in mine] == [0, 0, 1, 0, 1] and mine[0].series == 0
    ids = set()
    for name, data in one.items():
        if name.startswith("raw/series/"):
            ids.update(pq.read_table(pa.BufferReader(data))["series_id"].to_pylist())
    assert labelless in ids and len(ids) == 8


def test_the_raw_samples_asset_pulls_a_sharded_day_shard_by_shard(server, tmp_path, seeds, monkeypatch):
    """Sharded, the asset pulls each shard on its own (its metadata per shard) and writes the bytes of one pull split by shard."""
    p, _ = server
    monkeypatch.setenv("BILLING_SHARDS", str(SHARDS))
    files = {}
    for per_shard in (True, False):
        paths = resolve_paths(tmp_path / str(per_shard), seeds)
        instance = dg.DagsterInstance.ephemeral()
        assert _run(paths, instance, p.url, ()).success
        r = _run(paths, instance, p.url, ("raw_samples",), DAYS[0].isoformat(), pull_per_shard=per_shard)
        md = r.asset_materializations_for_node("raw_samples")[0].metadata
        files[per_shard] = {str(f.relative_to(paths.data_dir)): f.read_bytes() for f in sorted(paths.raw_samples.parent.rglob("*.parquet"))}
        assert md["unmatched_series"].value == 2 and md["series"].value == 6
        if per_shard:
            assert md["pulls"].value == SHARDS
            assert {k: v["unmatched_series"] for k, v in md["by_shard"].value.items()} == {"0": 0, "1": 0, "2": 1, "3": 0, "4": 1}
        else:
            assert "pulls" not in md
    assert len(files[True]) == 4 * SHARDS and files[True] == files[False]


@pytest.mark.acceptance
def test_remote_read_drops_stale_markers_as_range_selectors_do(tmp_path, seeds):
    """Stale markers (written over remote write, as scrapes make them) are not samples on either path;
    an ordinary NaN is, with the same bits."""
    import struct

    import numpy as np
    import remote_write_corpus as corpus
    import requests

    stale = struct.unpack("<d", struct.pack("<Q", prom.STALE_NAN_BITS))[0]
    day = DAYS[0]
    s, e = raw.day_bounds_ms(day)
    grid = list(range(s - 2 * H, e + 2 * 60_000, 60_000))  # samples exactly at both midnights
    shares, v = [], 1000.0
    for t in grid:
        v = 3.0 if t == s + 10 * H else v + 7  # a reset at 10:00
        value = stale if t in (s, s + 3 * H, s + 3 * H + 60_000, e) else math.nan if t == s + 5 * H else v
        shares.append((t, value))
    # a gauge whose last sample before the day is a stale marker: the carry-in is the sample before it
    gauge = [(t, stale if t == s - 60_000 else float(t % 7)) for t in grid if t < s + H]
    written = [
        ({"__name__": "stratum_accepted_shares_total", "client_id": "miner-001", "pool_host": "eu1"}, shares),
        ({"__name__": "stratum_active_connections", "client_id": "miner-001"}, gauge),
    ]
    tsdb = tmp_path / "tsdb"
    tsdb.mkdir()
    with harness.LocalPrometheus(tsdb, PROMETHEUS, log_file=tmp_path / "prometheus.log", extra_args=["--web.enable-remote-write-receiver"]) as p:
        resp = requests.post(
            p.url + "/api/v1/write",
            data=corpus.body(written),
            timeout=30,
            headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "snappy", "X-Prometheus-Remote-Write-Version": "0.1.0"},
        )
        assert resp.status_code == 204, resp.text
        for chunks in (True, False):  # remote read does send them, either way
            with prom.PrometheusClient(p.url, read_api="remote_read", remote_read_chunks=chunks) as client:
                got = client.remote_read([(prom.EQ, "__name__", "stratum_accepted_shares_total")], s, e)
                assert int((got.values.view(np.int64) == prom.STALE_NAN_BITS).sum()) == 4
        days = [day - timedelta(days=1), day, day + timedelta(days=1)]
        via_query, _, _ = _ingest_files(p.url, tmp_path / "query", seeds, days, "query")
        via_read, reports, _ = _ingest_files(p.url, tmp_path / "read", seeds, days, "remote_read")
        via_samples, _, _ = _ingest_files(p.url, tmp_path / "samples", seeds, days, "remote_read", chunks=False)
    assert via_read == via_query == via_samples
    r = reports[1]
    assert r.read_api == "remote_read" and r.non_finite_samples == 1 and r.carry_in_series == 2
    assert r.samples == sum(1 for t, v in shares if s <= t < e and v is not stale) + sum(1 for t, v in gauge if s <= t < e)
    samples = pq.read_table(
        tmp_path / "read" / raw.samples_day_dir(resolve_paths(tmp_path / "read", seeds), day).relative_to(tmp_path / "read") / "part-prometheus.parquet"
    )
    bits = np.asarray(samples["value"]).view(np.uint64)
    assert int((bits == prom.STALE_NAN_BITS).sum()) == 0 and int(np.isnan(samples["value"].to_numpy()).sum()) == 1


class _NoRemoteRead(HandlerServer):
    """A stub in front of a real Prometheus: 404 on /api/v1/read (as Thanos Query or a proxy
    without it answers), everything else passed through."""

    def __init__(self, upstream: str):
        from http.server import BaseHTTPRequestHandler

        import requests

        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _relay(self, method):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.paths.append(self.path)
                if self.path.startswith("/api/v1/read"):
                    status, data, ctype = 404, b"404 page not found\n", "text/plain"
                else:
                    r = requests.request(method, upstream + self.path, data=body, timeout=60, headers={"Content-Type": self.headers.get("Content-Type", "")})
                    status, data, ctype = r.status_code, r.content, r.headers.get("Content-Type", "")
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                self._relay("POST")

            def do_GET(self):
                self._relay("GET")

            def log_message(self, *a):
                pass

        super().__init__(Handler, poll_interval=0.05)


def test_auto_falls_back_to_the_query_api_when_the_server_has_no_remote_read(server, tmp_path, seeds):
    p, _ = server
    days = DAYS[:2]
    via_query, _, _ = _ingest_files(p.url, tmp_path / "query", seeds, days, "query")
    with _NoRemoteRead(p.url) as stub:
        via_auto, reports, logs = _ingest_files(stub.url, tmp_path / "auto", seeds, days, "auto")
        assert stub.paths.count("/api/v1/read") == 1  # asked once, then the query API for the rest
        with pytest.raises(prom.PrometheusError) as err:
            _ingest_files(stub.url, tmp_path / "forced", seeds, days[:1], "remote_read")
    assert via_auto == via_query
    assert [r.read_api for r in reports] == ["query", "query"]
    assert any("no remote read" in m and "HTTP 404" in m and stub.url in m for m in logs), logs
    msg = str(err.value)
    assert "/api/v1/read" in msg and "HTTP 404" in msg and stub.url in msg and "meter " in msg and "read_api" in msg
    assert not raw.sample_files(resolve_paths(tmp_path / "forced", seeds), days[0])


def test_the_raw_samples_asset_reads_over_remote_read_by_default(server, tmp_path, seeds):
    p, _ = server
    paths = resolve_paths(tmp_path / "data", seeds)
    instance = dg.DagsterInstance.ephemeral()
    assert _run(paths, instance, p.url, ()).success
    r = _run(paths, instance, p.url, ("raw_samples",), DAYS[0].isoformat())
    assert r.asset_materializations_for_node("raw_samples")[0].metadata["read_api"].value == "remote_read"
