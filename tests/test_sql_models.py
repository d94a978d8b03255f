"""SQL models on small fixture rows: dim_series resolution, edges (NaN, duplicates), half-open
windows of every table model, partition independence; model parsing errors; no literal dates."""

from __future__ import annotations

import re
import textwrap
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest
from sql_helpers import DAY_MS, Runner, day_window, ms, next_day, run_days, usage_month_table

from billing_dags.core.settings import SQL_MODELS_DIR
from billing_dags.models import sqlmodels
from billing_dags.models.sqlmodels import ModelError, Window, parse_model

D0 = date(2025, 3, 30)  # the chain crosses into April
NAN = float("nan")
LLM_002 = "806fa31f757683af82faa077aa2c16c873ab6ecfe914edf145812061acdd50d4"

SERIES = {
    1: ("stratum_bytes_sent_total", {"client_id": "miner-003", "instance": "a"}, ms(D0, 1)),
    2: ("stratum_bytes_received_total", {"client_id": "miner-003", "instance": "a"}, ms(D0, 1)),
    3: ("llm_tokens_output_total", {"api_key_hash": LLM_002, "model": "claude-3-5-sonnet"}, ms(D0, 2)),
    4: ("stratum_accepted_shares_total", {"client_id": "miner-999"}, ms(D0, 3)),  # no such customer
    5: ("node_cpu_seconds_total", {"client_id": "miner-003"}, ms(D0, 4)),  # no meter reads this metric
    6: ("iot_active_devices", {"customer_id": "iot-001"}, ms(D0, 5)),
}


@pytest.fixture
def runner():
    with Runner() as r:
        yield r


# --- dim_series -------------------------------------------------------------------------------


def test_dim_series_resolves_customer_meter_and_dimension(runner):
    runner.set_raw({}, SERIES)
    rows = {r["series_id"]: r for r in runner.query("dim_series", None).to_pylist()}

    def pick(sid):
        return (rows[sid]["meter_id"], rows[sid]["customer_id"], rows[sid]["dimension"], rows[sid]["kind"])

    assert pick(1) == ("proxy_bytes", "mp-003", "", "counter")
    assert pick(2) == ("proxy_bytes", "mp-003", "", "counter")  # a meter made of two metrics
    assert pick(3) == ("llm_output_tokens", "llm-002", "claude-3-5-sonnet", "counter")
    assert pick(4) == ("proxy_accepted_shares", None, "", "counter")
    assert rows[4]["customer_label_value"] == "miner-999"
    assert pick(5)[:2] == (None, None)
    assert pick(6) == ("iot_devices", "iot-001", "", "gauge")
    assert len(rows) == len(SERIES)


def test_dim_series_one_row_per_series_with_first_seen_minimum(runner):
    """raw_series has a row per series and day seen; dim_series keeps one, with the earliest first_seen."""
    runner.set_raw({}, {1: SERIES[1]})
    runner.con.execute("insert into raw_series select series_id, metric, labels, first_seen - 86400000 from raw_series")
    runner.con.execute("insert into raw_series select series_id, metric, labels, first_seen + 5 * 86400000 from raw_series")
    rows = runner.query("dim_series", None).to_pylist()
    assert len(rows) == 1
    assert rows[0]["first_seen_ms"] == ms(D0, 1) - DAY_MS


def test_unknown_customer_is_excluded_from_usage(runner):
    samples = {
        1: [(ms(D0, 1), 100.0), (ms(D0, 2), 300.0)],
        2: [(ms(D0, 1), 10.0)],
        4: [(ms(D0, 3), 5000.0), (ms(D0, 4), 6000.0)],  # miner-999: not a customer
        5: [(ms(D0, 4), 1.0)],  # not a meter
    }
    chain = run_days(samples, SERIES, None, [D0], runner=runner)
    rows = chain.days[D0]
    assert [(r["customer_id"], r["meter_id"], r["usage"], r["series"]) for r in rows] == [
        ("mp-003", "proxy_bytes", Decimal(310), 2)  # 100 + 200 (sent) + 10 (received)
    ]
    assert all(r["customer_id"] is not None for r in rows)
    # the edges still see every series (data is kept, only billing excludes it)
    assert {r["series_id"] for r in chain.edges[D0]} == {1, 2, 4, 5}


# --- int_series_edges_by_day -------------------------------------------------------------------


def test_edges_drop_nan_and_count_duplicates_once(runner):
    samples = {
        1: [
            (ms(D0, 1), 10.0),
            (ms(D0, 1), 10.0),  # duplicate (same series and ts): counted once
            (ms(D0, 2), NAN),
            (ms(D0, 3), float("inf")),
            (ms(D0, 4), 25.0),
            (ms(D0, 4), 25.0),
            (ms(D0, 5), float("-inf")),
        ],
        2: [(ms(D0, 6), NAN), (ms(D0, 7), NAN)],  # only dropped samples
    }
    chain = run_days(samples, SERIES, None, [D0], runner=runner)
    edges = {r["series_id"]: r for r in chain.edges[D0]}
    e1 = edges[1]
    assert (e1["samples"], e1["dropped_samples"]) == (2, 3)
    assert (e1["first_ts_ms"], e1["first_value"], e1["last_ts_ms"], e1["last_value"]) == (ms(D0, 1), 10.0, ms(D0, 4), 25.0)
    assert e1["in_day_increase"] == 15
    assert e1["resets"] == 0
    assert e1["peak"] == 25
    assert e1["max_gap_ms"] == 3 * 3_600_000
    e2 = edges[2]
    assert (e2["samples"], e2["dropped_samples"], e2["first_ts_ms"]) == (0, 2, None)
    day = chain.days[D0][0]
    assert (day["usage"], day["samples"], day["dropped_samples"]) == (Decimal(25), 2, 5)


def test_edges_gauge_integral_within_day(runner):
    """Gauge 4 at 00:00, 6 at 00:01, nothing else: 4 x 60,000 + 6 x 300,000 (staleness) = 2,040,000."""
    samples = {6: [(ms(D0), 4.0), (ms(D0, 0, 1), 6.0)]}
    chain = run_days(samples, SERIES, None, [D0], runner=runner)
    e = chain.edges[D0][0]
    assert e["in_day_integral"] == 2_040_000 and e["in_day_covered_ms"] == 360_000
    assert chain.days[D0][0]["gauge_peak"] == 6


# --- half-open windows --------------------------------------------------------------------------

BOUNDARY_SAMPLES = {
    1: [
        (ms(D0), 1.0),
        (ms(D0, 23, 59, 59, 999), 2.0),
        (ms(next_day(D0)), 4.0),
        (ms(next_day(D0), 23, 59, 59, 999), 8.0),
        (ms(next_day(D0, 2)), 16.0),
        (ms(next_day(D0, 2), 12), 32.0),
    ],
    6: [(ms(D0, 23, 58), 3.0), (ms(next_day(D0, 2), 0, 1), 5.0)],
}


def test_every_table_model_stays_inside_its_window(runner):
    """Each day's rows (and the samples they summarize) fall in [start, end); so do a month's."""
    days = [D0, next_day(D0), next_day(D0, 2)]
    chain = run_days(BOUNDARY_SAMPLES, SERIES, None, days, runner=runner)
    project = runner.project
    for d in days:
        w = day_window(d)
        for r in chain.edges[d]:
            assert r["day"] == d
            assert w.start_ms <= r["first_ts_ms"] <= r["last_ts_ms"] < w.end_ms
        assert chain.days[d] and all(r["day"] == d for r in chain.days[d])
        rolling = runner.run("fct_usage_30d_by_day", w)
        assert rolling.num_rows and set(rolling.column("day").to_pylist()) == {d}
    # the 00:00:00.000 sample is the first of its day, the 23:59:59.999 one the last of the previous
    e = {d: {r["series_id"]: r for r in chain.edges[d]} for d in days}
    assert e[D0][1]["last_ts_ms"] == ms(next_day(D0)) - 1 and e[next_day(D0)][1]["first_ts_ms"] == ms(next_day(D0))
    usage = [next(r["usage"] for r in chain.days[d] if r["meter_id"] == "proxy_bytes") for d in days]
    assert usage == [2, 6, 24]  # 1 + 1 | (4 - 2) + (8 - 4) | (16 - 8) + (32 - 16)
    # monthly models over a window that ends on a month boundary: March only has 30 and 31
    march = Window(date(2025, 3, 1), date(2025, 4, 1))
    month = runner.run("fct_usage_by_month", march)
    assert set(month.column("month").to_pylist()) == {march.start}
    assert next(r for r in month.to_pylist() if r["meter_id"] == "proxy_bytes")["usage"] == 2 + 6
    runner.run("dim_subscription_periods_by_month", march)
    runner.run("fct_usage_by_subscription_period", march)
    runner.run("fct_billable_usage_by_subscription_period", march)
    rated = runner.run("fct_rated_usage_by_subscription_period", march)
    lines = runner.run("fct_invoice_lines", march)
    for name, table in [("fct_usage_by_month", month), ("fct_rated_usage_by_subscription_period", rated), ("fct_invoice_lines", lines)]:
        sqlmodels.check_window(project.models[name], table, march)
        assert set(table.column("month").to_pylist()) == {march.start}


def test_check_window_rejects_a_row_outside(runner):
    model = runner.project.models["fct_usage_by_month"]
    table = usage_month_table([{"month": date(2025, 4, 1), "customer_id": "x", "meter_id": "m", "kind": "counter", "period_ms": 1}])
    with pytest.raises(ModelError, match="outside its partition"):
        sqlmodels.check_window(model, table, Window(date(2025, 3, 1), date(2025, 4, 1)))


def test_days_in_any_order_and_reruns_give_the_same_rows(runner):
    """Rule 3: days computed in reverse order, then a rerun of one day, give identical results."""
    days = [D0, next_day(D0), next_day(D0, 2)]
    forward = run_days(BOUNDARY_SAMPLES, SERIES, None, days, runner=runner)
    runner.set_raw(BOUNDARY_SAMPLES, SERIES)
    for t in ("int_series_edges_by_day", "int_gauge_peaks_by_day", "fct_usage_by_day"):
        runner.con.execute(f"drop table if exists {t}")
    for d in reversed(days):
        runner.run("int_series_edges_by_day", day_window(d))
    for d in reversed(days):
        runner.run("int_gauge_peaks_by_day", day_window(d))
    backward = {d: runner.run("fct_usage_by_day", day_window(d)).to_pylist() for d in reversed(days)}
    rerun = runner.run("fct_usage_by_day", day_window(days[1])).to_pylist()

    def key(rows):
        return sorted(rows, key=lambda r: (r["customer_id"], r["meter_id"]))

    for d in days:
        assert key(backward[d]) == key(forward.days[d])
    assert key(rerun) == key(forward.days[days[1]])
    count = runner.con.execute("select count(*) from fct_usage_by_day where day = ?", [days[1]]).fetchall()[0][0]
    assert count == len(rerun)  # replaced, not appended


# --- parsing -------------------------------------------------------------------------------------

GOOD = """\
-- A test model.
/* config
materialized: table
partitioned_by: billing_daily
time_column: day
grain: [day, series_id]
*/
with samples as (
    select * from stg_raw__samples
    where ts_ms >= $start_ms and ts_ms < $end_ms
),

final as (
    select $start_date::date as day, series_id from samples
)

select * from final
"""


def write_models(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return root


def test_parse_model_reads_refs_params_and_config(tmp_path):
    path = write_models(tmp_path, {"marts/fct_x_by_day.sql": GOOD}) / "marts/fct_x_by_day.sql"
    m = parse_model(path)
    assert m.name == "fct_x_by_day" and m.description == "A test model."
    assert (m.materialized, m.partitioned_by, m.time_column, m.grain) == ("table", "billing_daily", "day", ("day", "series_id"))
    assert m.refs == {"stg_raw__samples"}  # CTE names are not dependencies
    assert m.params == {"start_ms", "end_ms", "start_date"}


def test_real_project_dependencies_come_from_the_sql():
    project = sqlmodels.load_project()
    assert project.upstream_models("fct_usage_by_day") == {
        "int_series_edges_by_day",
        "int_gauge_peaks_by_day",
        "dim_series",
        "stg_raw__events",
        "stg_raw__carry_in",
        "stg_seeds__customers",
        "stg_seeds__meters",
    }
    assert project.table_deps("fct_usage_by_day")[0] == {"int_series_edges_by_day", "int_gauge_peaks_by_day"}
    assert {"raw_series", "raw_events", "raw_carry_in", "seed_meters", "seed_customers"} <= project.table_deps("fct_usage_by_day")[1]
    order = project.order()
    assert order.index("int_series_edges_by_day") < order.index("int_gauge_peaks_by_day") < order.index("fct_usage_by_day")
    assert order.index("fct_usage_by_day") < order.index("fct_usage_by_month")
    assert order.index("fct_rated_usage_by_subscription_period") < order.index("fct_invoice_lines")


def test_unknown_table_is_an_error_naming_it(tmp_path):
    bad = GOOD.replace("from stg_raw__samples", "from raw_samplez")
    root = write_models(tmp_path / "models", {"marts/fct_x_by_day.sql": bad, "macros/m.sql": "select 1;\n"})
    with pytest.raises(ModelError, match=r"fct_x_by_day\.sql: reads raw_samplez.*neither a model"):
        sqlmodels.load_project(root)


def test_missing_config_block_is_an_error(tmp_path):
    text = re.sub(r"/\* config.*?\*/\n", "", GOOD, flags=re.S)
    path = write_models(tmp_path, {"marts/fct_x.sql": text}) / "marts/fct_x.sql"
    with pytest.raises(ModelError, match=r"fct_x\.sql: missing the /\* config"):
        parse_model(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("-- A test model.\n", ""), "first line must be a '-- description'"),
        (lambda t: t.replace("materialized: table", "materialized: tabel"), "materialized must be table or view"),
        (lambda t: t.replace("partitioned_by: billing_daily", "partitioned_by: hourly"), "partitioned_by must be one of"),
        (lambda t: t.replace("time_column: day\n", ""), "needs time_column"),
        (lambda t: t.replace("grain: [day, series_id]", "grain: [day"), "not valid YAML"),
        (lambda t: t.replace("select * from final", "select * fro final where"), "does not parse"),
    ],
)
def test_bad_model_files_are_errors_naming_the_file(tmp_path, edit, message):
    path = write_models(tmp_path, {"marts/fct_x.sql": edit(GOOD)}) / "marts/fct_x.sql"
    with pytest.raises(ModelError, match=re.escape(message)) as e:
        parse_model(path)
    assert "fct_x.sql" in str(e.value)


def test_unknown_parameter_is_an_error(tmp_path, runner):
    text = GOOD.replace("$end_ms", "$end_millis")
    path = write_models(tmp_path, {"marts/fct_x.sql": text}) / "marts/fct_x.sql"
    with pytest.raises(ModelError, match=r"unknown parameters \['end_millis'\]"):
        sqlmodels.query(runner.con, parse_model(path), day_window(D0))


# --- no literal dates or epochs in SQL -------------------------------------------------------------

SQL_FILES = sorted(SQL_MODELS_DIR.rglob("*.sql"))
LITERAL_TIME = [
    (re.compile(r"(?<![\d.])(19|20)\d{2}(?![\d])"), "a 4-digit year"),
    (re.compile(r"\d{4}-\d{2}-\d{2}"), "a date"),
    (re.compile(r"(?<!\d)(1[4-9]|2[0-2])\d{8}(\d{3})?(?!\d)"), "an epoch timestamp (s or ms)"),
    (re.compile(r"(?i)\b(date|timestamp|timestamptz)\s*'"), "a typed date/timestamp literal"),
]


def test_there_are_sql_models():
    assert len(SQL_FILES) >= 15


@pytest.mark.parametrize("path", SQL_FILES, ids=lambda p: str(p.relative_to(SQL_MODELS_DIR)))
def test_sql_has_no_literal_dates_or_epochs(path):
    """Partition bounds reach the SQL only as bound parameters ($start_ms, $start_date ...)."""
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        for pattern, what in LITERAL_TIME:
            m = pattern.search(line)
            assert not m, f"{path}:{lineno}: {what} {m.group(0)!r} in SQL; use a bound parameter"


def test_partitioned_models_filter_on_bound_parameters():
    project = sqlmodels.load_project()
    for m in project.models.values():
        if m.partitioned_by != "none":
            assert m.params & {"start_ms", "start_date"} and m.params & {"end_ms", "end_date"}, m.name


def test_a_gauge_going_down_is_not_a_reset_but_a_counter_dropping_is(runner):
    """Resets are a counter notion: devices going from 9 to 3 is not a restart."""
    d = D0
    samples = {
        6: [(ms(d, 1), 9.0), (ms(d, 2), 3.0), (ms(d, 3), 5.0)],
        1: [(ms(d, 1), 100.0), (ms(d, 2), 7.0), (ms(d, 3), 9.0)],
    }
    chain = run_days(samples, {6: SERIES[6], 1: SERIES[1]}, None, [d], runner=runner)
    by_meter = {r["meter_id"]: r for r in chain.days[d]}
    assert by_meter["iot_devices"]["resets"] == 0
    assert by_meter["proxy_bytes"]["resets"] == 1
    assert by_meter["proxy_bytes"]["usage"] == 100 + 7 + 2  # new series counts its first value


def test_a_partition_failing_its_grain_or_a_blocking_check_is_never_published(tmp_path):
    """The previous partition stays, byte for byte, and no temporary file is left."""
    import os

    from billing_dags.core.settings import Paths

    paths = Paths(tmp_path / "data", tmp_path / "seeds")
    model = sqlmodels.load_project().models["fct_usage_by_month"]
    march = Window(date(2025, 3, 1), date(2025, 4, 1))
    row = {"month": march.start, "customer_id": "x", "meter_id": "m", "kind": "counter", "period_ms": 1, "usage": Decimal(1)}
    dest = sqlmodels.write_partition(paths, model, march, usage_month_table([row]))
    before = dest.read_bytes()
    with pytest.raises(ModelError, match=r"fct_usage_by_month: 1 keys of its grain .* customer_id=x, meter_id=m.*nothing was written"):
        sqlmodels.write_partition(paths, model, march, usage_month_table([{**row, "usage": Decimal(2)}, {**row, "usage": Decimal(3)}]))
    assert dest.read_bytes() == before and os.listdir(dest.parent) == ["data.parquet"]

    def refuse(table):
        raise ModelError("no_negative_usage failed")

    with pytest.raises(ModelError, match="no_negative_usage"):
        sqlmodels.write_partition(paths, model, march, usage_month_table([{**row, "usage": Decimal(-1)}]), refuse)
    assert dest.read_bytes() == before and os.listdir(dest.parent) == ["data.parquet"]


def test_sessions_share_a_database_but_never_each_others_objects():
    """Model runs take cursors of one DuckDB database per process; each works in a schema of its own,
    dropped with the session, so two runs (also in threads at once) never see each other's views."""
    import threading

    import duckdb

    seen = {}

    def run(x: int) -> None:
        with sqlmodels.session() as con:
            con.execute(f"create or replace macro plus(v) as v + {x}")
            con.execute("create view raw_samples as select plus(0) as x")
            barrier.wait(timeout=30)
            seen[x] = con.sql("select x from raw_samples").fetchall()

    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=run, args=(x,)) for x in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert seen == {1: [(1,)], 2: [(2,)]}
    with sqlmodels.session() as con:
        with pytest.raises(duckdb.CatalogException):
            con.sql("select * from raw_samples").fetchall()
        assert con.sql("select count(*) from duckdb_schemas() where schema_name like 'session_%'").fetchall() == [(1,)]


def test_a_seed_edited_in_place_is_read_again(tmp_path):
    """Seeds are parsed once per content: an edit of the same size, at once, is seen."""
    import shutil

    from billing_dags.core.settings import PROJECT_ROOT
    from billing_dags.seeds.catalog import read_seed

    seeds = tmp_path / "seeds"
    shutil.copytree(PROJECT_ROOT / "seeds", seeds)
    first = read_seed(seeds, "meters")
    text = (seeds / "meters.csv").read_text()
    meter = first["meter_id"][0].as_py()
    edited = meter[:-1] + ("x" if meter[-1] != "x" else "y")
    (seeds / "meters.csv").write_text(text.replace(meter, edited, 1))
    assert read_seed(seeds, "meters")["meter_id"][0].as_py() == edited
    assert read_seed(seeds, "meters").equals(read_seed(seeds, "meters"))


def test_a_process_with_a_session_database_can_fork_and_start_programs():
    """After a session opened this process's shared database, starting a program with a preexec_fn
    (which runs fork handlers in the child) must not crash the child, and a forked child that opens
    a session works on a database of its own."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import os, subprocess, sys
        from billing_dags.models import sqlmodels
        with sqlmodels.session() as con:
            con.execute("select 1").fetchall()
        proc = subprocess.run([sys.executable, "-c", "print('child ok')"], preexec_fn=lambda: None, capture_output=True, text=True)
        assert proc.returncode == 0 and "child ok" in proc.stdout, (proc.returncode, proc.stderr[-2000:])
        pid = os.fork()
        if pid == 0:
            with sqlmodels.session() as con:
                ok = con.execute("select 41 + 1").fetchall() == [(42,)]
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        with sqlmodels.session() as con:
            assert con.execute("select 2").fetchall() == [(2,)]
        print("parent ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "parent ok" in proc.stdout, proc.stderr[-3000:]


# --- the tree: layers, subjects, names that state their grain --------------------------------------

STG_SAMPLES = "-- Raw samples.\n/* config\nmaterialized: view\n*/\nselect * from raw_samples\n"


def test_models_are_found_in_subject_folders_and_audits_macros_analyses_are_not_models(tmp_path):
    root = write_models(
        tmp_path / "models",
        {
            "staging/raw/stg_raw__samples.sql": STG_SAMPLES,
            "marts/usage/fct_x_by_day.sql": GOOD,
            "marts/usage/audits/fct_x_by_day__never.sql": "-- Never.\n/* audit\nblocking: true\n*/\nselect * from fct_x_by_day where false\n",
            "analyses/a.sql": "select * from nowhere\n",
            "macros/m.sql": "create or replace macro one() as 1;\n",
        },
    )
    project = sqlmodels.load_project(root)
    assert set(project.models) == {"stg_raw__samples", "fct_x_by_day"}
    model = project.models["fct_x_by_day"]
    assert (model.layer, model.group) == ("marts", "usage")  # the subject folder is the Dagster group


def test_the_tree_reads_staging_intermediate_marts_by_subject():
    """staging/<source>/stg_<source>__*, intermediate/<subject>/int_*, marts/<subject>/fct_* and dim_*;
    a layer reads only its own and earlier layers, and the dimensions (dim_*, views every layer above
    staging may join: dim_series resolves a series to its meter and customer)."""
    project = sqlmodels.load_project()
    prefix = {"staging": ("stg_",), "intermediate": ("int_",), "marts": ("fct_", "dim_")}
    rank = {layer: i for i, layer in enumerate(sqlmodels.LAYERS)}
    for m in project.models.values():
        rel = m.path.relative_to(SQL_MODELS_DIR).parts
        assert len(rel) == 3 and rel[0] in rank, f"{m.path}: a model sits in <layer>/<subject>/"
        assert m.name.startswith(prefix[m.layer]), m.name
        if m.layer == "staging":
            assert m.name.startswith(f"stg_{rel[1]}__"), f"{m.name} belongs in staging/{m.name[4:].split('__')[0]}/"
        dims = {n for n in project.models if n.startswith("dim_")} if m.layer != "staging" else set()
        for up in project.upstream_models(m.name) - dims:
            assert rank[project.models[up].layer] <= rank[m.layer], f"{m.name} ({m.layer}) reads {up} ({project.models[up].layer})"


def test_every_table_model_name_states_its_grain():
    """A daily model ends in _by_day; a monthly one in _by_month, _by_subscription_period or names its
    row (invoice lines); and the name's grain is in the model's grain."""
    project = sqlmodels.load_project()
    suffix_key = {"_by_day": "day", "_by_month": "month", "_by_subscription_period": "period_start", "_lines": "line_number"}
    for m in project.models.values():
        if m.materialized != "table":
            continue
        suffix = next((s for s in suffix_key if m.name.endswith(s)), None)
        assert suffix, f"{m.name}: the name states no grain ({', '.join(m.grain)})"
        assert suffix_key[suffix] in m.grain, f"{m.name}: grain ({', '.join(m.grain)}) has no {suffix_key[suffix]}"
        if m.partitioned_by == "billing_daily":
            assert suffix == "_by_day", m.name


# --- lookbacks: declared once, in the config ------------------------------------------------------


def test_lookback_parameters_come_from_the_models_lookback_days():
    w = day_window(D0)
    assert w.params(29)["lookback_start_date"] == date(2025, 3, 1)
    assert w.params(35)["lookback_start_ms"] == w.start_ms - 35 * DAY_MS
    assert w.params()["lookback_start_date"] == D0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("grain: [day, series_id]", "grain: [day, series_id]\nlookback_days: 3"), "reads no earlier day"),
        (lambda t: t.replace("where ts_ms >= $start_ms", "where ts_ms >= $lookback_start_ms"), "declares no lookback_days"),
        (
            lambda t: t.replace("grain: [day, series_id]", "grain: [day, series_id]\nlookback_days: -1").replace(
                "where ts_ms >= $start_ms", "where ts_ms >= $lookback_start_ms"
            ),
            "whole number of days",
        ),
    ],
)
def test_a_lookback_is_declared_once_in_the_config_and_read_as_a_parameter(tmp_path, edit, message):
    path = write_models(tmp_path, {"marts/fct_x_by_day.sql": edit(GOOD)}) / "marts/fct_x_by_day.sql"
    with pytest.raises(ModelError, match=re.escape(message)):
        parse_model(path)


def test_no_model_reaches_back_past_its_declared_lookback():
    """Days before the window in the SQL ($start_date - interval N day) stay within lookback_days."""
    for m in sqlmodels.load_project().models.values():
        for n in re.findall(r"\$start_date::date\s*-\s*interval\s+(\d+)\s+day", m.sql):
            assert int(n) <= m.lookback_days, f"{m.path}: reads {n} days back, lookback_days is {m.lookback_days}"


def test_the_rolling_30_days_read_the_lookback_days_and_no_more(runner):
    """fct_usage_30d_by_day sums the day and its 29 days before (lookback_days: 29), not the 30th."""
    model = runner.project.models["fct_usage_30d_by_day"]
    assert model.lookback_days == 29
    end = date(2025, 4, 30)
    days = [date.fromordinal(end.toordinal() - k) for k in range(31)]
    row = {
        "customer_id": "x",
        "meter_id": "m",
        "dimension": "",
        "kind": "counter",
        "gauge_integral": None,
        "gauge_covered_ms": None,
        "gauge_peak": None,
        "samples": 1,
        "resets": 0,
    }
    import pyarrow as pa

    rows = [{**row, "day": d, "usage": Decimal(2) ** i} for i, d in enumerate(sorted(days))]
    sqlmodels.create_table(runner.con, "fct_usage_by_day", pa.Table.from_pylist(rows))
    got = runner.query("fct_usage_30d_by_day", day_window(end)).to_pylist()
    assert [r["usage"] for r in got] == [sum(Decimal(2) ** i for i in range(1, 31))]  # not the oldest day (2 ** 0)


# --- audits: SQL next to the models that returns the failing rows ---------------------------------

#: every audit of the project: its model, name and whether it blocks publishing (Dagster shows these checks)
AUDITS = {
    ("int_series_edges_by_day", "scrape_completeness"): False,
    ("fct_usage_by_day", "no_negative_usage"): True,
    ("fct_usage_by_month", "daily_sum_equals_month"): True,
    ("fct_rated_usage_by_subscription_period", "unpriced_usage"): False,
    ("fct_invoice_lines", "amounts_are_whole_minor_units"): True,
}


def test_the_projects_audits_sit_next_to_their_models():
    from billing_dags.models.audits import load_audits

    audits = load_audits()
    assert {(a.model, a.name): a.blocking for found in audits.values() for a in found} == AUDITS
    project = sqlmodels.load_project()
    for found in audits.values():
        for a in found:
            assert a.path.parent == project.models[a.model].path.parent / "audits"
            assert a.path.name == f"{a.model}__{a.name}.sql" and a.description


AUDIT = (
    "-- Nothing negative.\n/* audit\nblocking: true\n*/\nwith x as (\n    select * from fct_x_by_day\n),\n\nfinal as (\n    select * from x where "
    "series_id < 0\n)\n\nselect * from final\n"
)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("fct_x_by_day_never.sql", AUDIT, "named <model>__<audit>.sql"),
        ("fct_y_by_day__never.sql", AUDIT, "audits fct_y_by_day, which is not a table model"),
        ("fct_x_by_day__never.sql", AUDIT.replace("-- Nothing negative.\n", ""), "'-- description'"),
        ("fct_x_by_day__never.sql", AUDIT.replace("blocking: true", "blocking: yes please"), "blocking: true"),
        ("fct_x_by_day__never.sql", AUDIT.replace("/* audit", "/* config"), "missing the /* audit"),
        ("fct_x_by_day__never.sql", AUDIT.replace("from x", "from nowhere"), "reads nowhere"),
    ],
)
def test_bad_audit_files_are_errors_naming_the_file(tmp_path, name, text, message):
    from billing_dags.models.audits import load_audits

    root = write_models(
        tmp_path / "models",
        {
            "staging/raw/stg_raw__samples.sql": STG_SAMPLES,
            "marts/usage/fct_x_by_day.sql": GOOD,
            f"marts/usage/audits/{name}": text,
        },
    )
    with pytest.raises(ModelError, match=re.escape(message)) as e:
        load_audits(root)
    assert name in str(e.value)


def test_an_audit_sits_next_to_its_model(tmp_path):
    from billing_dags.models.audits import load_audits

    root = write_models(
        tmp_path / "models",
        {
            "staging/raw/stg_raw__samples.sql": STG_SAMPLES,
            "marts/usage/fct_x_by_day.sql": GOOD,
            "marts/billing/audits/fct_x_by_day__never.sql": AUDIT,
        },
    )
    with pytest.raises(ModelError, match=r"an audit sits next to its model, in .*marts/usage/audits"):
        load_audits(root)


def test_audits_return_the_failing_rows_of_the_rows_under_audit(tmp_path):
    """The model's name stands for the rows under audit; other models are read from their partitions."""
    import pyarrow as pa

    from billing_dags.core.settings import Paths
    from billing_dags.models.audits import run_audits

    paths = Paths(tmp_path / "data", tmp_path / "seeds")
    project = sqlmodels.load_project()
    day = project.models["fct_usage_by_day"]
    month = project.models["fct_usage_by_month"]
    march = Window(date(2025, 3, 1), date(2025, 4, 1))
    key = {"customer_id": "x", "meter_id": "m", "dimension": "", "kind": "counter", "gauge_integral": None, "gauge_peak": None}
    days = usage_month_table([{**key, "month": date(2025, 3, d), "usage": Decimal(d), "period_ms": 1} for d in (1, 2)])
    days = days.rename_columns(["day" if c == "month" else c for c in days.column_names])
    for d in (1, 2):
        sqlmodels.write_partition(paths, day, day_window(date(2025, 3, d)), days.filter(pa.compute.equal(days["day"], date(2025, 3, d))))

    good = usage_month_table([{**key, "month": march.start, "usage": Decimal(3), "period_ms": 1}])
    bad = usage_month_table([{**key, "month": march.start, "usage": Decimal(4), "period_ms": 1}])
    [ok] = run_audits(paths, month, march, good, project=project)
    [failed] = run_audits(paths, month, march, bad, project=project)
    assert (ok.audit.name, ok.passed, ok.rows_checked) == ("daily_sum_equals_month", True, 1)
    assert not failed.passed and failed.failing_rows == 1 and failed.audit.blocking
    assert failed.examples[0]["usage_of_days"].startswith("3") and failed.examples[0]["usage_of_month"].startswith("4")
    [negative] = run_audits(
        paths,
        day,
        day_window(date(2025, 3, 1)),
        days.slice(0, 1).set_column(days.column_names.index("usage"), "usage", pa.array([Decimal(-1)], days.schema.field("usage").type)),
    )
    assert (negative.audit.name, negative.failing_rows) == ("no_negative_usage", 1)
