"""The Python engine of int_series_edges_by_day (billing_dags/models/fastpath.py) against its SQL spec.

Every test runs both engines on the same raw partition and asserts the Arrow tables are equal:
same schema, rows and values, to the unit (DECIMAL(38, 9) sums included).
"""

from __future__ import annotations

from datetime import date

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing_dags.core.settings import STALENESS_MS
from billing_dags.ingest import raw, simulate
from billing_dags.models import fastpath
from billing_dags.models.sqlmodels import Window, load_project, run_model
from billing_dags.seeds.catalog import read_seed

DAY = date(2026, 3, 10)
WINDOW = Window(DAY, date(2026, 3, 11))
START, END = raw.day_bounds_ms(DAY)
STALE = np.array([simulate.STALE_NAN_BITS], dtype=np.uint64).view(np.float64)[0]


def both(paths) -> tuple[pa.Table, pa.Table]:
    sql = run_model(paths, "int_series_edges_by_day", WINDOW, engine="sql").table
    fast = run_model(paths, "int_series_edges_by_day", WINDOW).table  # the configured engine
    key = [("series_id", "ascending")]
    return sql.sort_by(key), fast.sort_by(key)


def assert_same(sql: pa.Table, fast: pa.Table) -> None:
    assert fast.schema == sql.schema
    assert fast.num_rows == sql.num_rows
    for name in sql.column_names:
        assert fast[name].equals(sql[name]), (name, sql[name].to_pylist()[:5], fast[name].to_pylist()[:5])
    assert fast.equals(sql)


def write_raw(paths, rows: list[tuple[int, int, float]], name: str = "part-test.parquet", row_group_size=None) -> None:
    """Write samples as given (sorted by series and ts, duplicates kept): write_day would dedup."""
    sid, ts, val = (list(c) for c in zip(*rows)) if rows else ([], [], [])
    t = pa.table({"series_id": pa.array(sid, pa.int64()), "ts": pa.array(ts, pa.int64()), "value": pa.array(val, pa.float64())})
    d = raw.samples_day_dir(paths, DAY)
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(t, d / name, row_group_size=row_group_size)


def test_the_model_is_configured_to_run_in_python():
    model = load_project().models["int_series_edges_by_day"]
    assert model.config["engine"] == "python"
    assert model.config["python"] == "billing_dags.models.fastpath:edges_by_day"


def test_simulated_day_equals_the_sql(paths):
    customers = read_seed(paths.seeds_dir, "customers")
    simulate.write_simulated_day(paths, DAY, customers, interval_s=60)
    sql, fast = both(paths)
    assert fast.num_rows > 20 and sum(fast["resets"].to_pylist()) >= 0
    assert_same(sql, fast)


def test_gauge_peaks_of_simulated_days_equal_the_sql(paths):
    """int_gauge_peaks_by_day: the compiled engine equals its SQL on two simulated days (the second
    with levels carried in from the first), with one and two threads."""
    from billing_dags.defs.seeds.assets import write_seed_snapshots

    write_seed_snapshots(paths)
    customers = read_seed(paths.seeds_dir, "customers")
    prev = Window(date(2026, 3, 9), DAY)
    for w in (prev, WINDOW):
        simulate.write_simulated_day(paths, w.start, customers, interval_s=60)
        run_model(paths, "int_series_edges_by_day", w)
    model = load_project().models["int_gauge_peaks_by_day"]
    key = [(c, "ascending") for c in ("customer_id", "meter_id", "dimension")]
    sql = run_model(paths, "int_gauge_peaks_by_day", WINDOW, engine="sql").table.sort_by(key)
    assert sql.num_rows >= 5 and all(r["gauge_held_ms"] > 0 for r in sql.to_pylist())
    for threads in (1, 2):
        fast = fastpath.gauge_peaks_by_day(paths, model, WINDOW, threads=threads).sort_by(key)
        assert_same(sql, fast)
    # a day cut into time slices (spilled, then swept slice by slice): 7 uneven ones, and one a minute,
    # whose cuts fall on the samples' own minutes
    for threads, slices in ((1, 7), (2, 1440)):
        assert_same(sql, fastpath.gauge_peaks(paths, model, WINDOW, threads=threads, slices=slices).sort_by(key))


def test_gauge_peaks_hold_at_most_their_memory_budget_of_samples(paths, monkeypatch):
    """A day whose gauge samples exceed GAUGE_MEMORY_BYTES is swept in time slices, spilled in one pass:
    the samples held at once (Python-allocated arrays, as tracemalloc counts them) shrink with the budget,
    and the result is the same, to the unit."""
    import tracemalloc

    from billing_dags.defs.seeds.assets import write_seed_snapshots

    write_seed_snapshots(paths)
    monkeypatch.setattr(raw, "ROW_GROUP_TARGET", 5_000)  # many row groups, as a big day has
    simulate.write_simulated_day(paths, DAY, read_seed(paths.seeds_dir, "customers"), interval_s=15)
    run_model(paths, "int_series_edges_by_day", WINDOW)
    model = load_project().models["int_gauge_peaks_by_day"]

    def peak_bytes() -> tuple[pa.Table, int]:
        fastpath.gauge_peaks(paths, model, WINDOW, threads=1)  # warm: the first run's one-off allocations
        tracemalloc.start()
        try:
            out = fastpath.gauge_peaks(paths, model, WINDOW, threads=1)
            return out, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    whole, whole_peak = peak_bytes()
    budget = whole_peak // 8
    monkeypatch.setattr(fastpath, "GAUGE_MEMORY_BYTES", budget)
    sliced, sliced_peak = peak_bytes()
    assert sliced.equals(whole) and whole.num_rows >= 5
    assert sliced_peak < whole_peak / 3, (sliced_peak, whole_peak)


@pytest.mark.parametrize("threads", [1, 2])
def test_gauge_peaks_refuse_raw_rows_not_sorted_by_series(paths, threads):
    """The compiled gather checks the series order as it copies: the day's rows rewritten with the
    series in descending order (one row group) are a layout error naming the fix, not a wrong peak."""
    from billing_dags.defs.seeds.assets import write_seed_snapshots

    write_seed_snapshots(paths)
    simulate.write_simulated_day(paths, DAY, read_seed(paths.seeds_dir, "customers"), interval_s=60)
    run_model(paths, "int_series_edges_by_day", WINDOW)
    model = load_project().models["int_gauge_peaks_by_day"]
    assert fastpath.gauge_peaks_by_day(paths, model, WINDOW, threads=threads).num_rows > 0
    files = raw.sample_files(paths, DAY)
    t = pa.concat_tables([pq.read_table(f) for f in files])
    for f in files:
        f.unlink()
    t = t.sort_by([("series_id", "descending"), ("ts", "ascending")])
    pq.write_table(t, raw.samples_day_dir(paths, DAY) / "part-test.parquet", row_group_size=t.num_rows)
    with pytest.raises(raw.RawLayoutError, match=r"not sorted by series_id.*rewrite the day"):
        fastpath.gauge_peaks_by_day(paths, model, WINDOW, threads=threads)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_backfill_partition_on_its_share_of_the_cores_gives_the_same_bytes(paths, threads):
    from billing_dags.defs.seeds.assets import write_seed_snapshots

    write_seed_snapshots(paths)
    customers = read_seed(paths.seeds_dir, "customers")
    simulate.write_simulated_day(paths, DAY, customers, interval_s=60)
    for model in ("int_series_edges_by_day", "int_gauge_peaks_by_day", "fct_usage_by_day"):
        every_core = run_model(paths, model, WINDOW)
        first = every_core.path.read_bytes()
        limited = run_model(paths, model, WINDOW, threads=threads)
        assert limited.rows == every_core.rows > 0
        assert limited.path.read_bytes() == first


@pytest.mark.parametrize(
    ("tags", "parallel", "cores", "expected"),
    [
        ({}, 2, 2, None),  # a single run: every core
        ({"dagster/backfill": "abc"}, 2, 2, 1),
        ({"dagster/backfill": "abc"}, 2, 8, 4),
        ({"dagster/backfill": "abc"}, 4, 2, 1),  # never below one thread
        ({"dagster/backfill": "abc"}, 1, 8, None),  # one backfill run at a time: every core
        ({"dagster/backfill": "abc", "dagster/asset_partition_range_start": "2026-02-01"}, 2, 8, None),  # the range in one run
    ],
)
def test_threads_of_a_partition_run(monkeypatch, tags, parallel, cores, expected):
    from billing_dags.defs.shared.resources import WarehouseResource

    monkeypatch.setattr("os.cpu_count", lambda: cores)
    assert WarehouseResource(backfill_parallel=parallel).threads_for(tags) == expected


def test_edge_cases_equal_the_sql(paths):
    m = 60_000
    rows = []
    # a counter with a reset, a gap longer than staleness, NaN, Inf, a staleness marker
    vals = [10, 15, 15, 3, float("nan"), 9, float("inf"), STALE, 12]
    rows += [(1, START + i * m * (7 if i == 6 else 1), v) for i, v in enumerate(vals)]
    # duplicates of (series, ts): the larger finite value is kept, each such ts is one conflict
    rows += [(2, START, 5.0), (2, START, 4.0), (2, START + m, 7.0), (2, START + m, float("nan")), (2, START + m, 6.0), (2, START + 2 * m, 8.0)]
    # a series entirely NaN / stale
    rows += [(3, START + i * m, float("nan") if i % 2 else STALE) for i in range(4)]
    # fractional values: short decimals, 1/3 (more than 9 decimals), tiny, halves at 1e-9
    rows += [(4, START + i * m, v) for i, v in enumerate([0.1, 0.2, 1 / 3, 1e-10, 2.5e-9, 12345678.123456789, 0.7, -1.5e-9])]
    # integers near and beyond 2**53, and a counter big enough to wrap int64 products
    rows += [(5, START + i * m, float(v)) for i, v in enumerate([2**53 - 1, 2**53, 2**53 + 2, 2**60, 1e20, 3])]
    rows += [(6, START + i * 15_000, 1e15 + i * 1_000_003.0) for i in range(5760)]
    # a single sample, at the last millisecond of the day
    rows += [(7, END - 1, 42.0)]
    # negative gauge values, fractional with 3 decimals (cpu seconds) large enough for scale 3 only
    rows += [(8, START + i * 15_000, v) for i, v in enumerate([-5.0, -2.0, 3.25, 1234567890.123, 1234567891.5])]
    # a series id at the extremes of int64
    rows += [(-(2**63), START, 1.0), (-(2**63), START + m, 2.0), (2**63 - 1, START + 5, 7.0)]
    rows.sort(key=lambda r: (r[0], r[1]))
    write_raw(paths, rows)
    sql, fast = both(paths)
    assert_same(sql, fast)
    by_id = {r["series_id"]: r for r in fast.to_pylist()}
    assert by_id[3]["samples"] == 0 and by_id[3]["dropped_samples"] == 4 and by_id[3]["peak"] is None
    assert by_id[2]["first_value"] == 5.0 and by_id[2]["samples"] == 3 and by_id[2]["duplicate_conflicts"] == 2
    assert by_id[7]["in_day_covered_ms"] == 1 and by_id[7]["max_gap_ms"] == 0


def test_several_files_and_row_groups(paths):
    """Sources whose series overlap are merged; disjoint ones stream row group by row group."""
    rng = np.random.default_rng(7)
    rows_a, rows_b = [], []
    for s in range(40):
        ts = START + np.sort(rng.choice(86_400, size=200, replace=False)) * 1000
        vals = np.cumsum(rng.integers(0, 1000, size=200)).astype(float)
        vals[rng.random(200) < 0.02] = np.nan
        for t, v in zip(ts.tolist(), vals.tolist()):
            (rows_a if (s < 20 or t % 2) else rows_b).append((s * 1_000_003 - 20_000_000, t, v))
    rows_b.append((rows_a[0][0], rows_a[0][1], -1.0))  # a duplicate across sources, smaller
    write_raw(paths, sorted(rows_a), "part-a.parquet", row_group_size=1000)
    write_raw(paths, sorted(rows_b), "part-b.parquet", row_group_size=700)
    sql, fast = both(paths)
    assert_same(sql, fast)


def test_random_values_of_every_kind(paths):
    rng = np.random.default_rng(3)
    rows = []
    for s in range(60):
        n = int(rng.integers(1, 400))
        ts = START + np.sort(rng.choice(86_400_000 // 250, size=n, replace=False)) * 250
        kind = s % 6
        if kind == 0:
            v = np.cumsum(rng.integers(0, 10**12, size=n)).astype(float)  # bytes counter
        elif kind == 1:
            v = np.round(np.cumsum(rng.random(n) * 10), 3)  # cpu seconds
        elif kind == 2:
            v = rng.normal(0, 1e6, n)  # arbitrary doubles
        elif kind == 3:
            v = rng.integers(-(2**53), 2**53, size=n).astype(float)
        elif kind == 4:
            v = np.round(rng.random(n) * 1e6, 6)
        else:
            v = np.where(rng.random(n) < 0.3, np.nan, rng.integers(0, 50, size=n).astype(float))
        v[rng.random(n) < 0.05] = np.nan
        resets = rng.random(n) < 0.05
        v[resets] = v[resets] / 7
        rows += [(int(rng.integers(-(2**62), 2**62)) if s % 10 == 0 else s, int(t), float(x)) for t, x in zip(ts, v)]
    rows.sort(key=lambda r: (r[0], r[1]))
    write_raw(paths, rows, row_group_size=3000)
    sql, fast = both(paths)
    assert_same(sql, fast)


# one step of a counter: ms since the previous sample, what it adds, whether the counter restarts from
# zero first (a reset: the step is then the whole value), and a second copy of the sample at the same ts
_STEP = st.tuples(st.integers(1, 3_600_000), st.integers(0, 10**12), st.booleans(), st.sampled_from([None, 0, -1]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(series=st.lists(st.tuples(st.sampled_from([1, 1000]), st.lists(_STEP, min_size=1, max_size=40)), min_size=1, max_size=4))
def test_the_counter_rule_of_the_engine_equals_the_sql(paths, series):
    """The counter rule (increase, resets, duplicates) has two implementations, the SQL model and the
    compiled engine: equal on any counter, integer or with 3 decimals."""
    rows = []
    for sid, (scale, steps) in enumerate(series, 1):
        t, units = START, 0
        for gap, add, reset, duplicate in steps:
            t += gap
            if t >= END:
                break
            units = add if reset else units + add
            rows.append((sid, t, units / scale))
            if duplicate is not None:  # the same ts again: an equal or a smaller value (a conflict)
                rows.append((sid, t, (units + duplicate) / scale))
    write_raw(paths, sorted(rows))
    sql, fast = both(paths)
    assert_same(sql, fast)


def test_empty_day(paths):
    write_raw(paths, [])
    sql, fast = both(paths)
    assert_same(sql, fast)


def test_timestamps_going_back_raise_a_clear_error(paths):
    write_raw(paths, [(9, START + 2000, 1.0), (9, START + 1000, 2.0)])
    with pytest.raises(raw.RawLayoutError, match=r"series 9 go back in time.*part-test.parquet|part-test.parquet.*series 9 go back in time"):
        fastpath.edges_by_day(paths, None, WINDOW)


def test_unsorted_series_raise_a_clear_error(paths):
    write_raw(paths, [(5, START, 1.0), (3, START, 2.0), (5, START + 1, 3.0)])
    with pytest.raises(raw.RawLayoutError, match="not sorted by"):
        fastpath.edges_by_day(paths, None, WINDOW)


def test_exact_value_scales_match_duckdb():
    """The scale rule (k = rint(v * 10**s) when it round-trips) agrees with exact_value()."""
    rng = np.random.default_rng(11)
    vals = np.concatenate(
        [
            [round(float(x), int(d)) for x, d in zip(rng.random(3000) * 10.0 ** rng.integers(-3, 15, 3000), rng.integers(0, 10, 3000))],
            rng.normal(0, 1e9, 500),
            [0.0, -0.0, 2.0**53, 2.0**53 + 2, 1e-9, 5e-10, 4194303.999999999, 1e22],
        ]
    )
    assert list(fastpath._nano_of(vals)) == list(fastpath._duckdb_nano(vals))


def test_staleness_and_day_end_bound_the_gauge_integral(paths):
    write_raw(paths, [(1, START, 2.0), (1, START + 10 * 60_000, 4.0), (1, END - 1000, 8.0)])
    sql, fast = both(paths)
    assert_same(sql, fast)
    row = fast.to_pylist()[0]
    assert row["in_day_covered_ms"] == 2 * STALENESS_MS + 1000


def test_exact_sums_that_overflow_int64_and_mixed_scales(paths):
    """Sums far past int64 (limbs), resets at huge values, values with no common decimal scale."""
    rows = []
    # a sawtooth counter near 2**53: a reset every other sample, integral ~2**53 x 86.4M ms
    rows += [(1, START + i * 15_000, float(2**53 - (i % 2) * 7 - i)) for i in range(5760)]
    # negative huge gauge (fast path, scale 0) and a gauge at scale 9 (|v| < 2**20)
    rows += [(2, START + i * 15_000, -float(2**52 + i * 3)) for i in range(5760)]
    rows += [(3, START + i * 15_000, round(((i * 7919) % 1000) / 1000 + (i % 9) * 1e-9, 9)) for i in range(5760)]
    # no common scale: integers above 2**40 and fractions in one series (each value at its own scale)
    rows += [(4, START + i * 60_000, v) for i, v in enumerate([2.0**45, 0.5, 2.0**45 + 1, 1e-9, 3.0, 2.0**52, 0.125, 7.0])]
    # the same, with a duplicate timestamp (the sample-by-sample path) and a value no scale fits
    rows += [(5, START + (i // 2) * 60_000, v) for i, v in enumerate([2.0**45, 0.5, 0.25, 1 / 3, 2.0**45 + 1, 0.001])]
    rows.sort(key=lambda r: (r[0], r[1]))
    write_raw(paths, rows)
    sql, fast = both(paths)
    assert_same(sql, fast)
    by_id = {r["series_id"]: r for r in fast.to_pylist()}
    assert by_id[1]["resets"] > 2000 and by_id[1]["in_day_integral"] > 2**63


def test_rows_outside_the_window_and_many_small_series(paths):
    """Rows of the days around are ignored; thousands of tiny series fill more than one output buffer."""
    m = 60_000
    rows = [(1, START - 2 * m, 5.0), (1, START - m, 9.0), (1, START, 3.0), (1, START + m, 4.0), (1, END, 1.0), (1, END + m, 2.0)]
    rows += [(2, START - m, 1.0), (2, END + 5, 2.0)]  # nothing inside the day: no row
    rows += [(3, START - m, float("nan")), (3, START + m, float("nan"))]  # one dropped sample inside
    rows += [(10 + i, START + (i % 50) * m + j * 1000, float(i + j * (i % 3))) for i in range(3000) for j in range(1 + i % 3)]
    rows.sort(key=lambda r: (r[0], r[1]))
    write_raw(paths, rows, row_group_size=2500)
    sql, fast = both(paths)
    assert_same(sql, fast)
    assert 2 not in fast["series_id"].to_pylist()


def test_series_cut_by_decoding_batches(paths, monkeypatch):
    """Row groups are decoded a few rows at a time: series running over batch ends come out whole."""
    monkeypatch.setattr(fastpath, "BATCH_ROWS", 7)
    rng = np.random.default_rng(5)
    rows = []
    for s in range(30):
        n = int(rng.integers(1, 40))
        ts = START + np.sort(rng.choice(86_400, size=n, replace=False)) * 1000
        v = np.cumsum(rng.integers(0, 100, size=n)).astype(float)
        v[rng.random(n) < 0.1] = np.nan
        v[rng.random(n) < 0.1] /= 3
        rows += [(s, int(t), float(x)) for t, x in zip(ts, v)]
        if s % 7 == 0:  # a duplicate of (series, ts)
            rows.append((s, int(ts[0]), 0.5))
    rows.sort(key=lambda r: (r[0], r[1]))
    write_raw(paths, rows, row_group_size=100)
    sql, fast = both(paths)
    assert_same(sql, fast)


def test_layout_errors_inside_later_batches(paths, monkeypatch):
    monkeypatch.setattr(fastpath, "BATCH_ROWS", 4)
    rows = [(1, START + i, 1.0) for i in range(10)] + [(2, START + 5, 1.0), (2, START + 4, float("nan"))]
    write_raw(paths, rows)
    with pytest.raises(raw.RawLayoutError, match=r"series 2 go back in time \(" + str(START + 5)):
        fastpath.edges_by_day(paths, None, WINDOW)
    rows = [(1, START + i, 1.0) for i in range(10)] + [(3, START, 1.0), (2, START, 1.0)]
    write_raw(paths, rows)
    with pytest.raises(raw.RawLayoutError, match="series 2 follows series 3"):
        fastpath.edges_by_day(paths, None, WINDOW)
