"""Level meters and duplicates, in both engines: the SQL chain on fixture rows (tests/sql_helpers.py)
and the configured engines (the compiled fast path of int_series_edges_by_day and
int_gauge_peaks_by_day) on a data dir written with raw.write_day, each against figures worked out
by hand here.

* A duplicate (series, ts) with different values keeps the larger one: no counter reset is made up.
* The peak of a level meter is the peak over time of the customer's sum of series, not the sum of
  each series' peak; a level carried across midnight counts in the new day.
* An ``avg`` meter bills nothing for a period without a sample or event of its own.
"""

from __future__ import annotations

import csv
import shutil
import tempfile
from datetime import date
from decimal import Decimal
from pathlib import Path

import pyarrow.parquet as pq
import reference as ref
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sql_helpers import (
    DAILY_MODELS,
    SEEDS_DIR,
    Runner,
    day_window,
    month_window,
    ms,
    next_day,
    run_days,
    samples_table,
    seed_tables,
    series_table,
)
from test_anomaly_flags import POOL_SCHEMA

from billing_dags.core.settings import resolve_paths
from billing_dags.defs.seeds.assets import write_seed_snapshots
from billing_dags.ingest import raw
from billing_dags.models.sqlmodels import run_model

M = 60_000
D = date(2026, 10, 20)
GIB = 2**30


def fast_days(paths, samples_by_series, series_labels, days, months=()) -> dict:
    """Write each day's raw samples with raw.write_day, run the daily models with their configured
    engines (checking the compiled ones against their SQL), then the monthly models of ``months``.
    Returns {model: [rows of every run]}."""
    write_seed_snapshots(paths)
    # the fixtures' short ids become the ids of their labels (raw.write_day refuses any other)
    real = {s: raw.series_id(metric, labels) for s, (metric, labels, _) in series_labels.items()}
    samples_by_series = {real[s]: xs for s, xs in samples_by_series.items()}
    series_labels = {real[s]: v for s, v in series_labels.items()}
    out: dict[str, list] = {}
    for d in days:
        w = day_window(d)
        lo, hi = raw.day_bounds_ms(d)
        today = {s: [(t, v) for t, v in xs if lo <= t < hi] for s, xs in samples_by_series.items()}
        table = samples_table(today)
        ids = set(table["series_id"].to_pylist())
        raw.write_day(paths, d, table, series_table({s: l for s, l in series_labels.items() if s in ids}), "test")
        for name in DAILY_MODELS:
            got = run_model(paths, name, w).table
            if name != "fct_usage_by_day":  # the compiled engines equal their SQL, to the unit
                key = [(c, "ascending") for c in got.column_names if c in ("series_id", "customer_id", "meter_id", "dimension")]
                assert got.sort_by(key).equals(run_model(paths, name, w, engine="sql").table.sort_by(key)), (name, d)
                run_model(paths, name, w)  # the configured engine's partition stays
            out.setdefault(name, []).extend(got.to_pylist())
    for month in months:
        for name in (
            "fct_usage_by_month",
            "dim_subscription_periods_by_month",
            "fct_usage_by_subscription_period",
            "fct_billable_usage_by_subscription_period",
            "fct_rated_usage_by_subscription_period",
        ):
            out.setdefault(name, []).extend(run_model(paths, name, month).table.to_pylist())
    return out


def row(rows, customer, meter) -> dict:
    (r,) = [x for x in rows if x["customer_id"] == customer and x["meter_id"] == meter]
    return r


# --- duplicates: the larger value ------------------------------------------------------------------

CALLS = {1: ("pf_usage_api_calls", {"tenant_id": "tenant-001"}, ms(D))}
# a new counter (it starts at 0): 0, 1,190, then at 02:00 two values (2,000 and a stray 500), 2,870.
# Keeping 2,000: 1,190 + 810 + 870 = 2,870 calls. Keeping 500 would make up a reset: 1,190 + 500
# (counted from zero) + 2,370 = 4,060.
CALL_SAMPLES = {1: [(ms(D), 0.0), (ms(D, 1), 1190.0), (ms(D, 2), 2000.0), (ms(D, 2), 500.0), (ms(D, 3), 2870.0)]}


def test_a_duplicate_timestamp_keeps_the_larger_value_in_sql():
    with Runner() as r:
        chain = run_days(CALL_SAMPLES, CALLS, None, [D], runner=r)
        day = row(chain.days[D], "tb-001", "testbed_api_calls")
        assert (day["usage"], day["resets"]) == (2870, 0)
        assert day["duplicate_conflicts"] == 1
        r.set_table("external_pool_shares", POOL_SCHEMA.empty_table())
        flags = {(f["meter_id"], f["rule"]): f for f in r.run("fct_anomaly_flags_by_day", day_window(D)).to_pylist()}
        assert flags[("testbed_api_calls", "duplicate_conflicts")]["value"] == 1


def test_a_duplicate_timestamp_keeps_the_larger_value_in_the_fast_path(paths):
    got = fast_days(paths, CALL_SAMPLES, CALLS, [D])
    day = row(got["fct_usage_by_day"], "tb-001", "testbed_api_calls")
    assert (day["usage"], day["resets"]) == (2870, 0)
    assert [e["duplicate_conflicts"] for e in got["int_series_edges_by_day"]] == [1] == [day["duplicate_conflicts"]]


def test_ingest_keeps_different_values_of_a_timestamp_and_identical_ones_once(paths):
    sid = raw.series_id(*CALLS[1][:2])
    t = samples_table({sid: [(ms(D, 2), 500.0), (ms(D, 2), 2000.0), (ms(D, 2), 500.0), (ms(D, 1), 7.0)]})
    raw.write_day(paths, D, t, series_table({sid: CALLS[1]}), "test")
    (f,) = raw.sample_files(paths, D)
    assert pq.read_table(f).to_pylist() == [
        {"series_id": sid, "ts": ms(D, 1), "value": 7.0},
        {"series_id": sid, "ts": ms(D, 2), "value": 500.0},
        {"series_id": sid, "ts": ms(D, 2), "value": 2000.0},
    ]


# --- peak of the customer's sum ----------------------------------------------------------------------

D2 = next_day(D)
DEVICES = {
    11: ("iot_active_devices", {"customer_id": "iot-001", "instance": "a"}, ms(D)),
    12: ("iot_active_devices", {"customer_id": "iot-001", "instance": "b"}, ms(D)),
}


def _pods() -> dict:
    """Every 4 minutes on D: instance a holds 3 devices, 9 at 10:00; b holds 0, 6 at 20:00. On D2
    only b reports, 6 at 00:00; a's last sample (3 at 23:56) holds until 00:01 of D2."""
    a, b = [], []
    for i in range(360):
        t = ms(D) + i * 4 * M
        a.append((t, 9.0 if t == ms(D, 10) else 3.0))
        b.append((t, 6.0 if t == ms(D, 20) else 0.0))
    b.append((ms(D2), 6.0))
    return {11: a, 12: b}


PODS = _pods()
# by hand: D peaks at 9 (10:00: 9 + 0; 20:00: 3 + 6), not 9 + 6 = 15; on D2 at 00:00 a's 3 (carried
# in, 23:56 + 5 min) and b's 6 hold together: 9, where each series' own peak in D2 gives 6 only
PEAK_D, PEAK_D2 = 9, 9


def test_peak_of_the_customers_sum_in_sql():
    chain = run_days(PODS, DEVICES, None, [D, D2])
    assert row(chain.days[D], "iot-001", "iot_devices")["gauge_peak"] == PEAK_D
    assert row(chain.days[D2], "iot-001", "iot_devices")["gauge_peak"] == PEAK_D2
    assert row(chain.month, "iot-001", "iot_devices")["gauge_peak"] == max(PEAK_D, PEAK_D2)
    # the time some level holds: D whole; D2 from a's carry-in and b's 00:00 sample, 5 minutes
    assert row(chain.days[D], "iot-001", "iot_devices")["gauge_held_ms"] == 86_400_000
    assert row(chain.days[D2], "iot-001", "iot_devices")["gauge_held_ms"] == 5 * M


def test_peak_of_the_customers_sum_in_the_fast_path(paths):
    got = fast_days(paths, PODS, DEVICES, [D, D2], months=[month_window(2026, 10)])
    days = {r["day"]: r for r in got["fct_usage_by_day"] if r["meter_id"] == "iot_devices"}
    assert (days[D]["gauge_peak"], days[D2]["gauge_peak"]) == (PEAK_D, PEAK_D2)
    assert row(got["fct_usage_by_month"], "iot-001", "iot_devices")["gauge_peak"] == 9
    # iot_starter: 10 devices included, so the true peak of 9 bills nothing (15 would have billed 5 x $2)
    assert row(got["fct_rated_usage_by_subscription_period"], "iot-001", "iot_devices")["quantity"] == 9
    assert row(got["fct_rated_usage_by_subscription_period"], "iot-001", "iot_devices")["amount_minor"] == 0


# random step functions: a few series of one customer, samples in the last and first minutes of two
# days (so levels overlap, expire and cross midnight), duplicates, negative and fractional values
_values = st.one_of(st.integers(-50, 10**6).map(float), st.decimals(-1000, 10**6, places=3).map(float))
_series = st.lists(st.tuples(st.integers(-20 * M, 20 * M), _values), min_size=0, max_size=12)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(_series, min_size=1, max_size=4))
def test_peak_of_the_sum_equals_the_brute_force_reference(tracks):
    midnight = ms(D2)
    samples = {20 + i: [(midnight + dt, v) for dt, v in xs] for i, xs in enumerate(tracks)}
    labels = {s: ("iot_active_devices", {"customer_id": "iot-001", "instance": str(s)}, ms(D)) for s in samples}
    want = {}
    for d in (D, D2):
        lo, hi = raw.day_bounds_ms(d)
        want[d] = ref.peak_of_sum([(xs, ref.last_before(xs, lo)) for xs in samples.values()], lo, hi)
    chain = run_days(samples, labels, None, [D, D2])
    with tempfile.TemporaryDirectory() as tmp:
        seeds = Path(tmp) / "seeds"
        shutil.copytree(SEEDS_DIR, seeds)
        fast = fast_days(resolve_paths(Path(tmp) / "data", seeds), samples, labels, [D, D2])
    for d in (D, D2):
        sql_rows = [r for r in chain.days[d] if r["meter_id"] == "iot_devices"]
        fast_rows = [r for r in fast["fct_usage_by_day"] if r["meter_id"] == "iot_devices" and r["day"] == d]
        for rows in (sql_rows, fast_rows):
            got = rows[0]["gauge_peak"] if rows else None
            assert got == (want[d] if want[d] is not None else (0 if rows else None)), (d, rows, want[d])


# --- avg of a month without data ------------------------------------------------------------------

OCT31, NOV1 = date(2026, 10, 31), date(2026, 11, 1)
STORAGE = {31: ("iot_storage_used_bytes", {"customer_id": "iot-001"}, ms(OCT31))}
# 25 GiB all of Oct 31 (every minute); the last sample at 23:59 holds 4 minutes into November (the
# staleness limit is 5), which has no sample at all
STORED = {31: [(ms(OCT31) + i * M, float(25 * GIB)) for i in range(1440)]}
# by hand, iot_starter (5 GiB included, $0.20 per GiB-month) with iot_storage as an `avg` meter:
# November bills nothing (the carried 4 minutes alone were 25 GiB on average: (25 - 5) x $0.20 =
# $4.00); October's average is 25 GiB over the covered time: $4.00
NOV_AMOUNT, OCT_AMOUNT = 0, 400


def avg_seeds(dest: Path) -> Path:
    shutil.copytree(SEEDS_DIR, dest, dirs_exist_ok=True)
    path = dest / "meters.csv"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        if r["meter_id"] == "iot_storage":
            r["aggregation"] = "avg"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return dest


def _storage_line(rated) -> dict:
    return row(rated, "iot-001", "iot_storage")


def test_an_avg_month_without_a_sample_bills_nothing_in_sql(tmp_path):
    seeds = seed_tables(avg_seeds(tmp_path / "seeds"))
    with Runner(seeds) as r:
        run_days(STORED, STORAGE, seeds, [OCT31, NOV1], runner=r)
        rated = {}
        for month in (month_window(2026, 10), month_window(2026, 11)):
            for name in ("dim_subscription_periods_by_month", "fct_usage_by_subscription_period", "fct_billable_usage_by_subscription_period"):
                r.run(name, month)
            rated[month.start] = r.run("fct_rated_usage_by_subscription_period", month).to_pylist()
        r.set_table("external_pool_shares", POOL_SCHEMA.empty_table())
        nov = r.rows("select * from fct_usage_by_subscription_period where month = '2026-11-01' and meter_id = 'iot_storage'")
        flags = {(f["meter_id"], f["rule"]): f for f in r.run("fct_anomaly_flags_by_day", day_window(NOV1)).to_pylist()}
    assert nov[0]["observations"] == 0 and nov[0]["gauge_covered_ms"] == 4 * M
    assert _storage_line(rated[NOV1])["amount_minor"] == NOV_AMOUNT
    assert _storage_line(rated[OCT31.replace(day=1)])["amount_minor"] == OCT_AMOUNT
    # November 1st: a level held 4 of 1,440 minutes: 1,436 / 1,440 = 99.7222... % uncovered
    low = flags[("iot_storage", "low_coverage")]
    assert low["value"] == Decimal("99.722222222") and low["severity"] == "warning"


def test_an_avg_month_without_a_sample_bills_nothing_in_the_fast_path(tmp_path):
    paths = resolve_paths(tmp_path / "data", avg_seeds(tmp_path / "seeds"))
    got = fast_days(paths, STORED, STORAGE, [OCT31, NOV1], months=[month_window(2026, 10), month_window(2026, 11)])
    by_month = {r["month"]: r for r in got["fct_rated_usage_by_subscription_period"] if r["customer_id"] == "iot-001" and r["meter_id"] == "iot_storage"}
    assert by_month[NOV1]["amount_minor"] == NOV_AMOUNT
    assert by_month[date(2026, 10, 1)]["amount_minor"] == OCT_AMOUNT
