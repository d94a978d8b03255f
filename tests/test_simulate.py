"""The simulator: deterministic, day-independent, raw-layout compliant, and realistic enough."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from billing_dags.core.settings import PROJECT_ROOT, resolve_paths
from billing_dags.ingest import raw, simulate
from billing_dags.seeds.catalog import load_seeds

MONTH = date(2024, 5, 1)
DAYS = [MONTH + timedelta(days=i) for i in range(31)]
# two customers of each set-up (customers.csv is ordered by setup); k8s customer-003 has a batch
# pod replaced on day 10 and miner-001 a second pool connection from day 3 to day 20 (seed 42)
ROWS = [0, 1, 10, 11, 20, 21, 30, 31, 42, 43]
COUNTERS_MS = {"container_cpu_usage_seconds_total"}
GAUGES = {
    "stratum_active_connections",
    "iot_storage_used_bytes",
    "iot_active_devices",
    "container_memory_working_set_bytes",
    "kubelet_volume_stats_used_bytes",
}


@pytest.fixture(scope="module")
def customers() -> pa.Table:
    return load_seeds(PROJECT_ROOT / "seeds")["customers"]


@pytest.fixture(scope="module")
def ten(customers) -> pa.Table:
    return customers.take(ROWS)


@pytest.fixture(scope="module")
def month(tmp_path_factory, ten):
    """One simulated month (10 customers) written with simulate_month and read back."""
    paths = resolve_paths(tmp_path_factory.mktemp("data"), PROJECT_ROOT / "seeds")
    seen: list[date] = []
    totals = simulate.simulate_month(paths, MONTH, ten, progress=seen.append)
    samples = {d: pq.read_table(raw.sample_files(paths, d)[0]) for d in DAYS}
    series = {d: pq.read_table(raw.series_day_dir(paths, d) / "part-simulate.parquet") for d in DAYS}
    return {"paths": paths, "totals": totals, "progress": seen, "samples": samples, "series": series}


def assert_same(a: pa.Table, b: pa.Table) -> None:
    """Equal tables, float values compared bit for bit (NaN payloads included)."""
    assert a.schema.names == b.schema.names and a.num_rows == b.num_rows
    for name in a.schema.names:
        x, y = a[name].combine_chunks(), b[name].combine_chunks()
        if pa.types.is_floating(x.type):
            assert np.array_equal(x.to_numpy().view(np.uint64), y.to_numpy().view(np.uint64)), name
        else:
            assert x.equals(y), name


def labels_of(series: pa.Table) -> dict[int, tuple[str, dict]]:
    return {r["series_id"]: (r["metric"], dict(r["labels"])) for r in series.to_pylist()}


def test_deterministic(ten):
    a = simulate.simulate_day(date(2024, 5, 10), ten)
    b = simulate.simulate_day(date(2024, 5, 10), ten)
    assert_same(a[0], b[0])
    assert a[1].equals(b[1])
    other = simulate.simulate_day(date(2024, 5, 10), ten, seed=7)[0]
    assert not np.array_equal(other["value"].to_numpy(), a[0]["value"].to_numpy())


def test_days_are_independent(ten, month):
    d1, d2 = date(2024, 5, 1), date(2024, 5, 2)
    later_first = [simulate.simulate_day(d, ten) for d in (d2, d1)][::-1]
    in_order = [simulate.simulate_day(d, ten) for d in (d1, d2)]
    for (s_a, r_a), (s_b, r_b) in zip(later_first, in_order):
        assert_same(s_a, s_b)
        assert r_a.equals(r_b)
    # any order, in parallel, equals the whole-month run (as written by write_day)
    picks = [DAYS[20], DAYS[3], DAYS[9], DAYS[30]]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda d: simulate.simulate_day(d, ten), picks))
    for d, (samples, series) in zip(picks, results):
        assert_same(samples, month["samples"][d])
        assert series.equals(month["series"][d].select(series.schema.names).cast(raw.SERIES_SCHEMA))


def test_month_totals_and_progress(month):
    totals = month["totals"]
    assert month["progress"] == DAYS
    assert totals["days"] == 31
    assert totals["samples"] == sum(t.num_rows for t in month["samples"].values())
    assert totals["series_days"] == sum(t.num_rows for t in month["series"].values())
    distinct = set().union(*(t["series_id"].to_pylist() for t in month["series"].values()))
    assert totals["series"] == len(distinct)
    assert totals["bytes"] > 0


def test_written_layout(month):
    for d in [*DAYS[:3], DAYS[9], DAYS[19]]:
        samples, series = month["samples"][d], month["series"][d]
        assert [(f.name, f.type) for f in samples.schema] == [(f.name, f.type) for f in raw.SAMPLES_SCHEMA]
        assert [(f.name, f.type) for f in series.schema] == [(f.name, f.type) for f in raw.SERIES_SCHEMA]
        sid, ts = samples["series_id"].to_numpy(), samples["ts"].to_numpy()
        assert np.all((sid[1:] > sid[:-1]) | ((sid[1:] == sid[:-1]) & (ts[1:] > ts[:-1]))), "sorted, unique"
        start, end = raw.day_bounds_ms(d)
        assert ts.min() >= start and ts.max() < end and np.all(ts % 60_000 == 0)
        assert set(np.unique(sid)) == set(series["series_id"].to_pylist())
        first = dict(zip(*np.unique(sid, return_index=True)))
        for r in series.to_pylist():
            assert r["first_seen"] == ts[first[r["series_id"]]]
            labels = dict(r["labels"])
            assert "__name__" not in labels
            assert raw.series_id(r["metric"], labels) == r["series_id"]


def test_values_are_integral_and_bounded(month):
    for d in (DAYS[0], DAYS[14]):
        samples, meta = month["samples"][d], labels_of(month["series"][d])
        v = samples["value"].to_numpy()
        sid = samples["series_id"].to_numpy()
        ok = ~np.isnan(v)
        assert np.all(v[ok] >= 0) and np.all(v[ok] < 2**53)
        ms = np.isin(sid, [k for k, (m, _) in meta.items() if m in COUNTERS_MS])
        assert np.all(v[ok & ~ms] == np.floor(v[ok & ~ms])), "integers except the CPU-seconds counter"
        cpu = v[ok & ms]
        assert len(cpu) and np.all(np.abs(cpu * 1000 - np.rint(cpu * 1000)) < 1e-6), "at most 3 decimals"
        assert np.any(cpu != np.floor(cpu))


def test_realism_occurs_in_a_month(month):
    stale_bits = np.uint64(simulate.STALE_NAN_BITS)
    resets = nans = stale = gaps = 0
    ids_by_day = {d: set(month["series"][d]["series_id"].to_pylist()) for d in DAYS}
    meta: dict[int, tuple[str, dict]] = {}
    for d in DAYS:
        meta.update(labels_of(month["series"][d]))
        samples = month["samples"][d]
        sid, ts = samples["series_id"].to_numpy(), samples["ts"].to_numpy()
        v = samples["value"].to_numpy()
        bits = v.view(np.uint64)
        stale += int(np.sum(bits == stale_bits))
        nans += int(np.sum(np.isnan(v) & (bits != stale_bits)))
        same = sid[1:] == sid[:-1]
        gaps += int(np.sum(same & (np.diff(ts) > 60_000)))
        counter = np.isin(sid, [k for k, (m, _) in meta.items() if m not in GAUGES])
        ok = ~np.isnan(v) & counter
        s2, v2 = sid[ok], v[ok]
        resets += int(np.sum((s2[1:] == s2[:-1]) & (v2[1:] < v2[:-1])))
    assert resets > 20, "counter resets"
    assert nans > 10, "NaN samples"
    assert stale > 10, "staleness markers (bit pattern 0x7ff0000000000002)"
    assert gaps > 10, "scrape gaps"

    # the unknown customer, every day
    unknown = [k for k, (_, lab) in meta.items() if lab.get("client_id") == simulate.UNKNOWN_CLIENT_ID]
    assert len(unknown) == 1 and all(unknown[0] in ids_by_day[d] for d in DAYS)

    # a k8s batch pod born on day 10 (and its predecessor stopped that day)
    born = [k for k in ids_by_day[DAYS[9]] - ids_by_day[DAYS[8]] if "pod" in meta[k][1]]
    assert born and all(meta[k][1]["pod"].startswith("batch-") for k in born)
    first_seen = {r["series_id"]: r["first_seen"] for r in month["series"][DAYS[9]].to_pylist()}
    assert all(first_seen[k] > raw.day_bounds_ms(DAYS[9])[0] for k in born)
    gone = [k for k in ids_by_day[DAYS[9]] - ids_by_day[DAYS[10]] if "pod" in meta[k][1]]
    assert gone

    # a miner's second pool connection: born on day 3, stopped on day 20 with a staleness marker
    pool_born = [k for k in ids_by_day[DAYS[2]] - ids_by_day[DAYS[1]] if "client_id" in meta[k][1]]
    pool_gone = [k for k in ids_by_day[DAYS[19]] - ids_by_day[DAYS[20]] if "client_id" in meta[k][1]]
    assert pool_born and set(pool_gone) == set(pool_born)
    day20 = month["samples"][DAYS[19]]
    last = day20.filter(pc.is_in(day20["series_id"], pa.array(pool_gone))).group_by("series_id").aggregate([("ts", "max")])
    for k, ts_max in zip(last["series_id"].to_pylist(), last["ts_max"].to_pylist()):
        row = day20.filter(pc.and_(pc.equal(day20["series_id"], k), pc.equal(day20["ts"], ts_max)))
        assert row["value"].to_numpy().view(np.uint64)[0] == stale_bits


def test_usage_magnitudes(month):
    """A month of rule-1 usage (first sample excluded) lands in the configured ranges."""
    meta: dict[int, tuple[str, dict]] = {}
    usage: dict[int, float] = {}
    for d in DAYS:
        meta.update(labels_of(month["series"][d]))
    prev: dict[int, float] = {}
    for d in DAYS:
        samples = month["samples"][d]
        sid, v = samples["series_id"].to_numpy(), samples["value"].to_numpy()
        ok = ~np.isnan(v)
        sid, v = sid[ok], v[ok]
        starts = np.r_[True, sid[1:] != sid[:-1]]
        before = np.array([prev.get(s, np.nan) for s in sid[starts]])
        p = np.r_[np.nan, v[:-1]]
        p[starts] = before
        delta = np.where(np.isnan(p), 0.0, np.where(v >= p, v - p, v))
        uniq, inv = np.unique(sid, return_inverse=True)
        for s, total in zip(uniq, np.bincount(inv, weights=delta)):
            usage[s] = usage.get(s, 0.0) + total
        ends = np.r_[sid[1:] != sid[:-1], True]
        prev.update(zip(sid[ends], v[ends]))

    def per_customer(metrics: set[str], label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for s, total in usage.items():
            metric, labels = meta[s]
            if metric in metrics and labels.get(label) != simulate.UNKNOWN_CLIENT_ID:
                out[labels[label]] = out.get(labels[label], 0.0) + total
        return out

    gib = 2**30
    proxy = per_customer({"stratum_bytes_sent_total", "stratum_bytes_received_total"}, "client_id")
    assert len(proxy) == 2 and all(1 * gib < x < 100 * gib for x in proxy.values())
    tokens = per_customer({"llm_tokens_input_total", "llm_tokens_output_total"}, "api_key_hash")
    assert len(tokens) == 2 and all(0.5e6 < x < 500e6 for x in tokens.values())
    cpu_h = per_customer({"container_cpu_usage_seconds_total"}, "namespace")
    assert len(cpu_h) == 2 and all(150 < x / 3600 < 10_000 for x in cpu_h.values())
    calls = per_customer({"pf_usage_api_calls"}, "tenant_id")
    assert len(calls) == 2 and all(2_000 < x < 800_000 for x in calls.values())


def test_write_simulated_day(tmp_path, customers):
    paths = resolve_paths(tmp_path / "data", PROJECT_ROOT / "seeds")
    figures = simulate.write_simulated_day(paths, date(2024, 5, 1), customers, n_customers=3, interval_s=300)
    assert figures["samples"] > 0 and figures["bytes"] > 0
    series = pq.read_table(raw.series_day_dir(paths, date(2024, 5, 1)) / "part-simulate.parquet")
    clients = {dict(r)["client_id"] for r in series["labels"].to_pylist()}
    assert clients == {"miner-001", "miner-002", "miner-003", simulate.UNKNOWN_CLIENT_ID}


def test_interval_sets_the_grid(ten):
    a = simulate.simulate_day(date(2024, 5, 2), ten, interval_s=60)[0]
    b = simulate.simulate_day(date(2024, 5, 2), ten, interval_s=15)[0]
    assert np.all(b["ts"].to_numpy() % 15_000 == 0)
    assert 3.8 < b.num_rows / a.num_rows < 4.2


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"n_customers": 51}, ["n_customers", "50", "pass a number"]),
        ({"n_customers": 0}, ["n_customers", "50"]),
        ({"interval_s": 0}, ["interval_s", "between 1 and 3600"]),
        ({"interval_s": -60}, ["interval_s", "between 1 and 3600"]),
        ({"interval_s": 1.5}, ["interval_s", "whole number"]),
    ],
)
def test_bad_input(customers, kwargs, words):
    with pytest.raises(ValueError, match=re.escape(words[0])) as e:
        simulate.simulate_day(date(2024, 5, 1), customers, **kwargs)
    for w in words:
        assert w in str(e.value)


def test_bad_month_and_setup(tmp_path, customers):
    paths = resolve_paths(tmp_path / "data", PROJECT_ROOT / "seeds")
    with pytest.raises(ValueError, match=r"month=2024-05-02 .* pass datetime.date\(2024, 5, 1\)"):
        simulate.simulate_month(paths, date(2024, 5, 2), customers)
    with pytest.raises(ValueError, match="n_customers"):
        simulate.simulate_month(paths, MONTH, customers, n_customers=99)
    assert not paths.raw_samples.exists(), "nothing written on bad input"
    odd = customers.slice(0, 1).set_column(2, "setup", pa.array(["mainframe"]))
    with pytest.raises(ValueError, match="setup 'mainframe'; use one of proxy, iot, testbed, llm, k8s"):
        simulate.simulate_day(MONTH, odd)


# --------------------------------------------------------------------------- usage events and usage reports

EVENT_DAY = date(2026, 2, 10)


def _index(customers: pa.Table, *ids: str) -> list[int]:
    all_ids = customers["customer_id"].to_pylist()
    return [all_ids.index(i) for i in ids]


def _label(customers: pa.Table, customer_id: str) -> str:
    return customers["label_value"].to_pylist()[_index(customers, customer_id)[0]]


def test_non_prometheus_customers_get_no_samples(customers):
    both = customers.take(_index(customers, "iot-001", "iot-010", "llm-001", "llm-010"))
    assert both["usage_source"].to_pylist() == ["prometheus", "usage_reports", "prometheus", "usage_events"]
    samples, series = simulate.simulate_day(EVENT_DAY, both, interval_s=300)
    keys = {v for labels in series["labels"].to_pylist() for k, v in labels if k in ("customer_id", "api_key_hash")}
    assert {_label(customers, "iot-001"), _label(customers, "llm-001")} <= keys
    assert not {_label(customers, "iot-010"), _label(customers, "llm-010")} & keys
    # the Prometheus customers' samples do not depend on the others being there
    alone = simulate.simulate_day(EVENT_DAY, customers.take(_index(customers, "iot-001", "llm-001")), interval_s=300)
    assert_same(alone[0], samples)
    assert alone[1].equals(series)


def test_usage_events_rows_are_deterministic_seed_003_rows(customers):
    rows = simulate.simulate_usage_events_rows(EVENT_DAY, customers)
    assert rows == simulate.simulate_usage_events_rows(EVENT_DAY, customers)
    assert rows != simulate.simulate_usage_events_rows(EVENT_DAY, customers, seed=7)
    assert rows != simulate.simulate_usage_events_rows(EVENT_DAY + timedelta(days=1), customers)
    assert {r["api_key_hash"] for r in rows} == {_label(customers, "llm-010")}  # the only usage_events customer
    assert set(rows[0]) == {"id", "api_key_hash", "tokens_input", "tokens_output", "provider", "model", "status", "created_at"}
    start, end = raw.day_bounds_ms(EVENT_DAY)
    ms = [int(r["created_at"].timestamp() * 1000) for r in rows]
    assert all(start <= t < end for t in ms) and ms == sorted(ms)
    ids = [r["id"] for r in rows]
    assert ids == sorted(set(ids))
    next_ids = {r["id"] for r in simulate.simulate_usage_events_rows(EVENT_DAY + timedelta(days=1), customers)}
    assert not set(ids) & next_ids, "ids are unique across days"
    assert {r["model"] for r in rows} <= set(simulate.LLM_MODELS)
    assert all(r["provider"] == simulate.LLM_PROVIDERS[r["model"]] for r in rows)
    assert all(isinstance(r["tokens_input"], int) and r["tokens_input"] > 0 for r in rows)
    statuses = {r["status"] for r in rows}
    assert statuses == {"success", "failed"}, "some rows failed (they must not bill)"
    # n_customers keeps the first N customers, as for the samples: llm-010 is row 40
    (i,) = _index(customers, "llm-010")
    assert simulate.simulate_usage_events_rows(EVENT_DAY, customers, n_customers=i) == []
    assert simulate.simulate_usage_events_rows(EVENT_DAY, customers, n_customers=i + 1) == rows


def test_usage_reports_are_deterministic_seed_001_reports(customers):
    from decimal import Decimal

    from billing_dags.ingest import usage_reports as ur

    reports = simulate.simulate_usage_reports(EVENT_DAY, customers)
    assert reports == simulate.simulate_usage_reports(EVENT_DAY, customers)
    assert reports != simulate.simulate_usage_reports(EVENT_DAY, customers, seed=7)
    assert [r["reported_at"] for r in reports] == [f"{EVENT_DAY}T{h:02d}:00:00Z" for h in range(24)]
    assert {r["customer_id"] for r in reports} == {"iot-010"}
    assert len({r["report_id"] for r in reports}) == 24 and all(r["interval_seconds"] == 3600 for r in reports)
    schema = ur.ReportSchema.from_seeds(PROJECT_ROOT / "seeds")
    for r in reports:
        assert set(r) == set(ur.ENVELOPE) | set(schema.fields)
        assert all(isinstance(v, Decimal) for k, v in r.items() if k in schema.fields)
        for name, spec in schema.fields.items():
            if spec.kind == "delta":
                assert r[name] == r[name].to_integral_value() and r[name] >= 0, name
        assert -r["postgres_size_mb"].as_tuple().exponent == 2
        assert r["total_devices"] >= r["active_devices"] > 0
        # what the endpoint does: parse_report accepts it (as of one second after reported_at)
        parsed = ur.parse_report(r, schema, now_ms=raw.day_bounds_ms(EVENT_DAY)[1])
        assert parsed.values == {k: v for k, v in r.items() if k in schema.fields}
    storage = [r["postgres_size_mb"] + r["influxdb_size_mb"] for r in reports]
    assert storage == sorted(storage) and storage[0] < storage[-1], "storage grows"
    devices = [int(r["active_devices"]) for r in reports]
    assert max(devices) - min(devices) <= 0.2 * max(devices) + 2, "devices drift slowly"
    (i,) = _index(customers, "iot-010")
    assert simulate.simulate_usage_reports(EVENT_DAY, customers, n_customers=i) == []


def test_simulated_rows_become_events_through_the_postgres_conversion(tmp_path, customers):
    from billing_dags.ingest import events

    paths = resolve_paths(tmp_path / "data", PROJECT_ROOT / "seeds")
    figures = simulate.write_simulated_usage_events(paths, EVENT_DAY, customers, seed=3)
    rows = simulate.simulate_usage_events_rows(EVENT_DAY, customers, seed=3)
    billed = [r for r in rows if r["status"] == "success"]
    assert figures["rows"] == len(rows) and figures["unbilled_rows"] == len(rows) - len(billed) > 0
    written = pq.read_table(events.events_day_dir(paths, EVENT_DAY) / "part-simulate.parquet").to_pylist()
    assert len(written) == sum((r["tokens_input"] > 0) + (r["tokens_output"] > 0) for r in billed)
    failed_ids = {str(r["id"]) for r in rows if r["status"] == "failed"}
    assert not {e["event_id"].split(":")[0] for e in written} & failed_ids
    assert {dict(e["attributes"])["status"] for e in written} == {"success"}


def test_the_rows_conversion_skips_statuses_that_do_not_bill():
    from billing_dags.ingest.postgres_events import UsageEventsTable, rows_to_batch

    key = "ab" * 32
    rows = [("1", 0, key, "gpt-4o", "openai", "success", "5", "1"), ("2", 0, key, "gpt-4o", "openai", "failed", "7", "0")]
    assert [e["event_id"] for e in rows_to_batch(rows, UsageEventsTable()).to_pylist()] == ["1:in", "1:out"]


def _event_seeds(small_seeds):
    """small_seeds plus llm-010 (usage_events) and iot-010 (usage_reports) with their subscriptions."""
    for name in ("customers.csv", "subscriptions.csv"):
        with (PROJECT_ROOT / "seeds" / name).open(newline="") as f:
            extra = [line for line in f.read().splitlines()[1:] if line.split(",")[0] in ("iot-010", "llm-010")]
        assert len(extra) == 2, name
        with (small_seeds / name).open("a", newline="") as f:
            f.write("\n".join(extra) + "\n")
    return small_seeds


def test_one_day_through_dagster_bills_the_simulated_events_and_reports(data_dir, small_seeds):
    """raw_samples, usage_events, usage_reports and the usage models for one day, against an independent Decimal sum."""
    from decimal import Decimal

    import dagster as dg

    from billing_dags.definitions import defs as load_defs
    from billing_dags.defs.ingest.sources import SimulationResource, simulated_sources
    from billing_dags.defs.shared.resources import StripeResource, WarehouseResource

    seeds = _event_seeds(small_seeds)
    paths = resolve_paths(data_dir, seeds)
    resources = {
        "warehouse": WarehouseResource(data_dir=str(paths.data_dir), seeds_dir=str(paths.seeds_dir)),
        **simulated_sources(SimulationResource(seed=7, interval_s=300)),
        "stripe": StripeResource(),
    }
    instance = dg.DagsterInstance.ephemeral()
    ASSETS = load_defs().assets
    seed_keys = [k for a in ASSETS for k in a.keys if a.group_names_by_key.get(k) == "seeds"]
    assert dg.materialize(ASSETS, selection=seed_keys, resources=resources, instance=instance).success
    names = ("raw_samples", "usage_events", "usage_reports", "int_series_edges_by_day", "int_gauge_peaks_by_day", "fct_usage_by_day")
    day_keys = [dg.AssetKey(n) for n in names]
    result = dg.materialize(ASSETS, selection=day_keys, partition_key=EVENT_DAY.isoformat(), resources=resources, instance=instance)
    assert result.success
    meta = {n: result.asset_materializations_for_node(n)[0].metadata for n in ("usage_events", "usage_reports")}
    assert meta["usage_events"]["source"].value == "simulate" and meta["usage_reports"]["source"].value == "simulate"
    assert meta["usage_reports"]["simulated_accepted"].value == 24 and meta["usage_reports"]["reports"].value == 24

    customers = load_seeds(seeds)["customers"]
    usage = pq.read_table(paths.models / "fct_usage_by_day" / f"day={EVENT_DAY}" / "data.parquet", partitioning=None).to_pylist()
    got = {(r["customer_id"], r["meter_id"], r["dimension"]): r for r in usage if r["customer_id"] in ("llm-010", "iot-010")}
    assert all(r["samples"] == 0 and r["series"] == 0 for r in got.values()), "no Prometheus series for them"

    # llm-010: billable tokens per model, summed from the simulated rows
    want: dict[tuple, Decimal] = {}
    for r in simulate.simulate_usage_events_rows(EVENT_DAY, customers, seed=7):
        if r["status"] != "success":
            continue
        for meter, column in (("llm_input_tokens", "tokens_input"), ("llm_output_tokens", "tokens_output")):
            if r[column]:
                k = ("llm-010", meter, r["model"])
                want[k] = want.get(k, Decimal(0)) + Decimal(r[column])
    assert {k: r["usage"] for k, r in got.items() if k[0] == "llm-010"} == want

    # iot-010: counters are the sum of the hourly fields of each meter
    reports = simulate.simulate_usage_reports(EVENT_DAY, customers, seed=7)
    assert len(reports) == 24
    counters = {
        "iot_mqtt_messages": ("mqtt_messages_published", "mqtt_messages_received"),
        "iot_mqtt_bytes": ("mqtt_bytes_sent", "mqtt_bytes_received"),
        "iot_http_requests": ("http_requests",),
        "iot_http_bytes": ("http_bytes_sent", "http_bytes_received"),
    }
    for meter, fields in counters.items():
        assert got[("iot-010", meter, "")]["usage"] == sum(Decimal(r[f]) for r in reports for f in fields), meter
        assert got[("iot-010", meter, "")]["events"] == 24

    # GAUGES (needs the gauge-event SQL of fct_usage_by_day): the peak is the highest reported level,
    # and each hourly level holds for its hour (the last one until midnight)
    hour_ms = 3_600_000
    gauges = {
        "iot_devices": [Decimal(r["active_devices"]) for r in reports],
        "iot_storage": [(r["postgres_size_mb"] + r["influxdb_size_mb"]) * 1_048_576 for r in reports],
    }
    for meter, levels in gauges.items():
        row = got[("iot-010", meter, "")]
        assert row["gauge_peak"] == max(levels), meter
        assert row["gauge_integral"] == sum(levels) * hour_ms, meter
        assert row["gauge_covered_ms"] == 24 * hour_ms, meter

    # the demo's closing lines read the same models
    from billing_dags.operations.reports import event_billed_lines

    events = sum(r["events"] for k, r in got.items() if k[0] == "llm-010")
    lines = event_billed_lines(paths, EVENT_DAY.replace(day=1))
    assert lines[0].startswith(f"iot-010 (usage reports): 24 reports, peak {max(gauges['iot_devices'])} devices, ")
    assert lines[1].startswith(f"llm-010 (usage_events): {events:,} events, ") and lines[1].endswith("invoice total no invoice")
    # support reads the evidence behind event usage from the warehouse: the reported numbers per event
    from billing_dags.operations.warehouse import open_warehouse

    con = open_warehouse(paths)
    try:
        per_source = dict(con.execute("select source, count(*) from raw_events group by source").fetchall())
        storage = con.execute(
            "select attributes['postgres_size_mb'], attributes['influxdb_size_mb'], quantity from stg_raw__events "
            "where customer_key = 'iot-010' and meter_id = 'iot_storage' order by ts_ms limit 1"
        ).fetchall()
    finally:
        con.close()
    assert per_source["usage_reports"] == sum(r["events"] for k, r in got.items() if k[0] == "iot-010")
    assert per_source["simulate"] == events
    pg_mb, influx_mb, quantity = storage[0]
    assert quantity == (Decimal(pg_mb) + Decimal(influx_mb)) * 1024 * 1024
