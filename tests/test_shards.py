"""Shards by customer (BILLING_SHARDS): the layout, its configuration, and results identical to the unsharded run.

"Partition identical" for shard files: for every daily model and day, the N shard files of the day,
concatenated and sorted by the model's grain, equal the unsharded day's file (same schema, same rows,
same values); every customer's rows are in exactly one shard, the shard of its label value; the raw
samples of a day's shards, concatenated and sorted by (series_id, ts), are the unsharded day's. Monthly
models, invoice lines, invoice files and the Stripe outbox are not sharded: byte-identical.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, date, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from seed_copies import copy_small_seeds

from billing_dags.core import shards
from billing_dags.core.settings import Paths, SettingsError, parse_shards, resolve_paths
from billing_dags.defs.seeds.assets import write_seed_snapshots
from billing_dags.ingest import events, raw, simulate
from billing_dags.models.sqlmodels import Window, load_project, model_files, partition_day, run_model, run_model_days
from billing_dags.seeds.catalog import read_seed

ROOT = Path(__file__).resolve().parent.parent
MONTH = date(2026, 11, 1)
THROUGH = date(2026, 11, 3)
AS_OF = "2026-12-10T00:00:00+00:00"


def test_shard_of_is_stable_and_spreads_customers():
    # a fixed value: the hash is BLAKE2b, the same on every machine and Python (never hash())
    assert shards.label_hash("miner-001") == int.from_bytes(__import__("hashlib").blake2b(b"miner-001", digest_size=8).digest(), "big")
    assert shards.shard_of("miner-001", 1) == 0
    spread = {shards.shard_of(f"customer-{i}", 8) for i in range(200)}
    assert spread == set(range(8))
    assert [s.key for s in shards.all_shards(12)][:3] == ["00", "01", "02"]
    assert shards.Shard(3, 8).dirname == "shard=3-of-8"
    assert shards.shard_of_dir("shard=3-of-8") == shards.Shard(3, 8)


def test_a_metric_shards_by_the_customer_label_of_its_first_meter(tmp_path):
    # seeds/meters.csv order: a metric two meters list takes the first row's label; no meters file, no labels
    seeds = copy_small_seeds(tmp_path / "seeds")
    paths = resolve_paths(tmp_path / "data", seeds)
    labels = raw.customer_labels(paths)
    assert labels["stratum_bytes_sent_total"] == labels["stratum_bytes_received_total"] == "client_id"
    text = (seeds / "meters.csv").read_text()
    (seeds / "meters.csv").write_text(text + "other_bytes,stratum_bytes_sent_total,counter,sum,byte,gib,pool_id,,other_bytes,Same metric\n")
    assert raw.customer_labels(paths)["stratum_bytes_sent_total"] == "client_id"
    (seeds / "meters.csv").unlink()
    assert raw.customer_labels(paths) == {}


@pytest.mark.parametrize("value", ["0", "-1", "eight", "2.5", "257", "٣"])
def test_bad_shard_counts_are_refused(value):
    with pytest.raises(SettingsError, match="BILLING_SHARDS") as e:
        parse_shards(value)
    assert "whole number of shards from 1 to 256" in str(e.value)


@pytest.mark.parametrize("value", ["0", "many"])
def test_cli_exits_2_on_bad_shards(tmp_path, value):
    env = {**os.environ, "BILLING_SHARDS": value, "BILLING_DATA_DIR": str(tmp_path / "data"), "DAGSTER_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "billing_dags.cli", "run", "--month", "2026-11"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert f"BILLING_SHARDS={value!r}" in proc.stderr and "e.g. BILLING_SHARDS=8" in proc.stderr
    assert "Traceback" not in proc.stderr


def _write_sim_day(tmp_path: Path, n: int) -> Path:
    seeds = copy_small_seeds(tmp_path / f"seeds{n}")
    paths = resolve_paths(tmp_path / f"data{n}", seeds)
    paths = type(paths)(paths.data_dir, paths.seeds_dir, n)
    from billing_dags.seeds.catalog import read_seed

    simulate.write_simulated_day(paths, THROUGH, read_seed(seeds, "customers"), seed=7, interval_s=600)
    simulate.write_simulated_usage_events(paths, THROUGH, read_seed(seeds, "customers"), seed=7)
    return paths


def test_one_shard_is_the_unsharded_layout_and_shards_concatenate_to_it(tmp_path):
    p1, p8 = _write_sim_day(tmp_path, 1), _write_sim_day(tmp_path, 8)
    one, eight = p1.data_dir, p8.data_dir
    files = sorted(p.relative_to(one).as_posix() for p in one.rglob("*.parquet"))
    assert files == [f"raw/{kind}/date=2026-11-03/part-simulate.parquet" for kind in ("events", "samples", "series")]
    sharded = sorted(p.relative_to(eight).as_posix() for p in eight.rglob("*.parquet"))
    assert len(sharded) == 24 and all("/shard=" in f and f.endswith("-of-8/part-simulate.parquet") for f in sharded)
    # what an invoice manifest records of the day: the unsharded files' names and hashes, whatever N
    assert raw.unsharded_sample_files(p8, THROUGH) == raw.unsharded_sample_files(p1, THROUGH)
    assert events.unsharded_event_files(p8, THROUGH) == events.unsharded_event_files(p1, THROUGH)
    assert len(events.unsharded_event_files(p1, THROUGH)) == 1
    for kind, keys in (("samples", ["series_id", "ts"]), ("series", ["series_id"]), ("events", ["ts", "event_id"])):
        whole = pq.read_table(one / f"raw/{kind}/date=2026-11-03/part-simulate.parquet")
        parts = pa.concat_tables(pq.read_table(f) for f in sorted((eight / f"raw/{kind}/date=2026-11-03").rglob("*.parquet")))
        assert _bits(parts.sort_by([(k, "ascending") for k in keys])).equals(_bits(whole))


def _bits(table: pa.Table) -> pa.Table:
    """``table`` with float columns as their bit patterns (NaN staleness markers compare equal to themselves)."""
    for i, field in enumerate(table.schema):
        if pa.types.is_floating(field.type):
            bits = table[i].combine_chunks().to_numpy(zero_copy_only=False).view("int64")
            table = table.set_column(i, field.name, pa.array(bits))
    return table


def _run(tmp_path: Path, n: int) -> Path:
    """A simulated start of a month (the warm-up day, THROUGH's days, the month's invoices) through `billing run`'s
    code on a real Dagster instance (DAGSTER_HOME), in its own process (the shards are read when the code location loads)."""
    root = tmp_path / f"n{n}"
    (root / "home").mkdir(parents=True)
    (root / "home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    seeds = copy_small_seeds(root / "seeds")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "PROMETHEUS_", "STRIPE_"))},
        "BILLING_SHARDS": str(n),
        "BILLING_DATA_DIR": str(root / "data"),
        "BILLING_SEEDS_DIR": str(seeds),
        "DAGSTER_HOME": str(root / "home"),
        "PYTHONPATH": str(ROOT),
    }
    script = (
        "from datetime import date\n"
        "import dagster as dg\n"
        "from billing_dags.cli.runs import run_month, dagster_instance\n"
        "from billing_dags.core.settings import resolve_paths\n"
        f"run_month(resolve_paths(), date(2026, 11, 1), interval_s=1800, as_of={AS_OF!r}, quiet=True, through=date(2026, 11, 3))\n"
        "keys = dagster_instance().get_materialized_partitions(dg.AssetKey('fct_usage_by_day'))\n"
        "print('PARTITIONS', ','.join(sorted(keys)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=1500, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (root / "partitions.txt").write_text(proc.stdout.split("PARTITIONS ", 1)[1].strip())
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    return _run(tmp, 1), _run(tmp, 8)


@pytest.mark.acceptance
def test_eight_shards_give_the_unsharded_invoices_and_models(runs):
    one, eight = runs
    # the (day, shard) partitions were materialized on the instance, each day's shards all there
    keys = set((eight / "partitions.txt").read_text().split(","))
    expected = {f"{d}|{s}" for d in ("2026-10-31", "2026-11-01", "2026-11-02", "2026-11-03") for s in shards.shard_keys(8)}
    assert {k for k in keys if not k.startswith("2026-10-31")} == {k for k in expected if not k.startswith("2026-10-31")}
    assert set((one / "partitions.txt").read_text().split(",")) >= {"2026-11-01", "2026-11-02", "2026-11-03"}

    # invoices, the outbox and every monthly model: byte for byte
    for folder in ("invoices", "outbox"):
        a = {p.relative_to(one / "data").as_posix(): p.read_bytes() for p in (one / "data" / folder).rglob("*") if p.is_file()}
        b = {p.relative_to(eight / "data").as_posix(): p.read_bytes() for p in (eight / "data" / folder).rglob("*") if p.is_file()}
        assert a and a.keys() == b.keys()
        assert [k for k in a if a[k] != b[k]] == []
    project = load_project()
    p1, p8 = (resolve_paths(one / "data", one / "seeds"), resolve_paths(eight / "data", eight / "seeds"))
    p8 = type(p8)(p8.data_dir, p8.seeds_dir, 8)
    from billing_dags.seeds.catalog import read_seed

    label = dict(zip(*(read_seed(one / "seeds", "customers")[c].to_pylist() for c in ("customer_id", "label_value"))))
    compared = 0
    for model in project.models.values():
        if model.materialized != "table" or model.partitioned_by == "none":
            continue
        if model.partitioned_by == "billing_monthly":
            for f in model_files(p1, model):
                assert f.read_bytes() == (p8.data_dir / f.relative_to(p1.data_dir)).read_bytes(), f
                compared += 1
            continue
        by_day: dict[date, list[Path]] = {}
        for f in model_files(p8, model):
            by_day.setdefault(partition_day(f), []).append(f)
        assert sorted(by_day) == sorted(partition_day(f) for f in model_files(p1, model)), model.name
        for f in model_files(p1, model):
            whole = pq.read_table(f)
            parts = [pq.read_table(x) for x in by_day[partition_day(f)]]
            assert len(parts) == 8
            for x, t in zip(by_day[partition_day(f)], parts):
                if "customer_id" in t.column_names:  # each customer in the shard of its label value only
                    shard = shards.shard_of_dir(x.parent.name)
                    assert {shards.shard_of(label[c], 8) for c in t["customer_id"].to_pylist() if c in label} <= {shard.index}
            grain = [(c, "ascending") for c in model.grain] or [(c, "ascending") for c in whole.column_names]
            assert pa.concat_tables(parts).sort_by(grain).equals(whole.sort_by(grain)), (model.name, f)
            compared += 1
    assert compared > 20


@pytest.mark.acceptance
def test_raw_files_of_a_sharded_run_list_per_shard(runs):
    _, eight = runs
    paths = type(resolve_paths(eight / "data"))(eight / "data", eight / "seeds", 8)
    day = date(2026, 11, 2)
    every = raw.sample_files(paths, day)
    assert len(every) == 8 and every == [f for s in shards.all_shards(8) for f in raw.sample_files(paths, day, s)]
    assert raw.raw_days(paths)[:1] == [date(2026, 10, 31)]


SHAPE_SCRIPT = """
import json
import dagster as dg
from billing_dags.definitions import defs as load
from billing_dags.defs.shared.partitions import SINGLE_RUN
defs = load() if callable(load) else load
graph = defs.resolve_asset_graph()
usage = graph.get(dg.AssetKey("fct_usage_by_day"))
p = usage.partitions_def
month = [k for k in p.get_partition_keys() if k.startswith("2026-11-")]
ranges = p.subset_with_partition_keys(month).get_partition_key_ranges(p)
edges = graph.get_parents_partitions(dg.AssetKey("fct_usage_by_day"), "2026-11-10|3").parent_partitions
monthly = graph.get_parents_partitions(dg.AssetKey("fct_usage_by_month"), "2026-11-01").parent_partitions
print(json.dumps({
    "policy": usage.backfill_policy == SINGLE_RUN,
    "dims": [d.name for d in p.partitions_defs],
    "ranges": [[r.start, r.end] for r in ranges],
    "edges": sorted(x.partition_key for x in edges if x.asset_key.to_user_string() == "int_series_edges_by_day"),
    "monthly": sorted(x.partition_key for x in monthly if x.asset_key.to_user_string() == "fct_usage_by_day"),
    "jobs": sorted(j.name for j in defs.resolve_all_job_defs() if j.name in ("daily_usage", "daily_shards")),
    "shards_tags": sorted({j.run_tags.get("billing/shards") for j in defs.resolve_all_job_defs() if not j.name.startswith("__")}),
}))
"""


def test_day_by_shard_partitions_their_dependencies_and_backfill_ranges(tmp_path):
    """BILLING_SHARDS=8: the daily models are (day, shard) partitions; a day reads its own shard's earlier days, a month
    every (day, shard) of it; a month's single-run backfill is one run per shard over the month's days; runs are tagged
    with the shards."""
    env = {**os.environ, "BILLING_SHARDS": "8", "BILLING_DATA_DIR": str(tmp_path / "data"), "DAGSTER_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("BILLING_EXECUTOR", None)
    proc = subprocess.run([sys.executable, "-c", SHAPE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    shape = json.loads(proc.stdout.strip().splitlines()[-1])
    assert shape["policy"] and shape["dims"] == ["day", "shard"] and shape["jobs"] == ["daily_shards", "daily_usage"]
    # every job's runs carry the shards they were launched with: a worker with other shards refuses their steps
    assert shape["shards_tags"] == ["8"]
    assert sorted(shape["ranges"]) == [[f"2026-11-01|{s}", f"2026-11-30|{s}"] for s in shards.shard_keys(8)]
    assert shape["edges"][-1] == "2026-11-10|3" and all(k.endswith("|3") for k in shape["edges"]) and len(shape["edges"]) == 36
    assert len(shape["monthly"]) == 30 * 8


@pytest.mark.acceptance
def test_warehouse_views_read_every_shard_once(runs):
    import duckdb

    from billing_dags.operations.warehouse import view_statements

    counts = []
    for root, n in zip(runs, (1, 8)):
        paths = type(resolve_paths(root / "data"))(root / "data", root / "seeds", n)
        con = duckdb.connect()
        for stmt in view_statements(paths):
            try:
                con.execute(stmt)
            except duckdb.Error:
                pass  # a view over a source this warehouse lacks (external pool shares), as `billing sql` skips it
        counts.append([con.execute(f"select count(*) from {v}").fetchone()[0] for v in ("raw_samples", "raw_series", "raw_events", "fct_usage_by_day")])
    assert counts[0] == counts[1] and counts[0][0] and counts[0][1] and counts[0][3]


def test_a_range_of_days_of_one_shard_computes_what_its_days_alone_compute(tmp_path):
    """A range run of a (day, shard) model that reads raw samples (``range_query`` models compute the range in
    one query) reads that shard's samples only, as a run of each day alone does, and gives the same rows."""
    seeds = copy_small_seeds(tmp_path / "seeds")
    days = [date(2026, 11, 2), THROUGH]
    per_day, ranged = Paths(tmp_path / "per_day", seeds, 8), Paths(tmp_path / "range", seeds, 8)
    for paths in (per_day, ranged):
        write_seed_snapshots(paths)
        for day in days:
            samples, series = simulate.simulate_day(day, read_seed(seeds, "customers"), seed=7, interval_s=60)
            # every submit counter jumps by 1,000 at noon: over the 200-a-minute rate rule
            submits = pa.array([m == "stratum_submits_total" for m in series["metric"].to_pylist()])
            spiked = pc.is_in(samples["series_id"], value_set=series.filter(submits)["series_id"])
            noon = int(datetime(day.year, day.month, day.day, 12, tzinfo=UTC).timestamp() * 1000)
            jump = pc.if_else(pc.and_(spiked, pc.greater_equal(samples["ts"], noon)), 1000.0, 0.0)
            samples = samples.set_column(2, "value", pc.add(samples["value"], jump))
            raw.write_day(paths, day, samples, series, source=simulate.SOURCE)
    project = load_project()
    flags = "fct_anomaly_flags_by_day"
    ups = [m for m in project.order() if m in _upstream(project, flags) and project.models[m].materialized == "table"]
    windows = [Window(d, date.fromordinal(d.toordinal() + 1), s) for s in shards.all_shards(8) for d in days]
    for paths in (per_day, ranged):
        for name in ups:
            if project.models[name].partitioned_by == "billing_daily":
                for w in windows:
                    run_model(paths, name, w, project=project)
            else:
                run_model(paths, name, None, project=project)
    for w in windows:
        run_model(per_day, flags, w, project=project)
    for s in shards.all_shards(8):
        # a worker may hold only its own shard's raw files: the others' are unreadable during its run
        others = [f for d in days for f in raw.sample_files(ranged, d) if f not in raw.sample_files(ranged, d, s)]
        kept = {f: f.read_bytes() for f in others}
        for f in others:
            f.write_bytes(b"not the shard's file")
        try:
            run_model_days(ranged, flags, [w for w in windows if w.shard == s], project=project)
        finally:
            for f, b in kept.items():
                f.write_bytes(b)
    rate = 0
    for w in windows:
        alone, together = (pq.read_table(model_files(p, project.models[flags], w.shard)[days.index(w.start)]) for p in (per_day, ranged))
        assert together.equals(alone), w
        rate += pc_count(alone, "rate_per_minute")
    assert rate, "the simulated days raise a rate flag (else this test compares nothing that reads raw samples)"


def _upstream(project, name: str) -> set[str]:
    out, todo = set(), [name]
    while todo:
        for up in project.upstream_models(todo.pop()):
            if up not in out:
                out.add(up)
                todo.append(up)
    return out


def pc_count(table: pa.Table, rule: str) -> int:
    return sum(1 for r in table["rule"].to_pylist() if r == rule)


def test_a_writer_of_one_shard_writes_its_files_only_and_refuses_another_shards_series(tmp_path):
    paths = type(resolve_paths(tmp_path / "data", copy_small_seeds(tmp_path / "seeds")))(tmp_path / "data", tmp_path / "seeds", 4)
    start, _ = raw.day_bounds_ms(THROUGH)
    labels = {v: {"client_id": v} for v in ("miner-001", "miner-002", "miner-003", "miner-004", "miner-005")}
    by_shard: dict[int, list[str]] = {}
    for v in labels:
        by_shard.setdefault(shards.shard_of(v, 4), []).append(v)
    (a, mine), (b, other) = sorted(by_shard.items())[:2]

    def tables(values):
        ids = [raw.series_id("stratum_accepted_shares_total", labels[v]) for v in values]
        samples = pa.table({"series_id": ids, "ts": [start] * len(ids), "value": [1.0] * len(ids)})
        metric = ["stratum_accepted_shares_total"] * len(ids)
        rows = {"series_id": ids, "metric": metric, "labels": [list(labels[v].items()) for v in values], "first_seen": [start] * len(ids)}
        series = pa.table(rows, schema=raw.SERIES_SCHEMA)
        return samples, series

    raw.write_day(paths, THROUGH, *tables(mine), "prometheus", shard=shards.Shard(a, 4))
    written = sorted(p.relative_to(paths.data_dir).as_posix() for p in paths.data_dir.rglob("*.parquet"))
    assert written == [f"raw/{kind}/date={THROUGH}/shard={a}-of-4/part-prometheus.parquet" for kind in ("samples", "series")]
    with pytest.raises(raw.RawLayoutError, match=f"1 of {len(mine) + 1} series written for shard {a} of 4 belong to other shards"):
        raw.write_day(paths, THROUGH, *tables([*mine, other[0]]), "prometheus", shard=shards.Shard(a, 4))
    with pytest.raises(raw.RawLayoutError, match="is not a shard of the 4 shard"):
        raw.write_day(paths, THROUGH, *tables(other), "prometheus", shard=shards.Shard(b, 8))
    assert sorted(p.relative_to(paths.data_dir).as_posix() for p in paths.data_dir.rglob("*.parquet")) == written


def test_a_month_is_refused_while_a_shard_of_a_day_with_raw_input_has_no_usage(tmp_path):
    """Sharded, the monthly usage sums every (day, shard) partition of the month: a (day, shard) with raw samples
    or raw events and no fct_usage_by_day partition is named (DAY|SHARD); a day without raw input needs none."""
    from billing_dags.models.completeness import missing_period_days, require_computed_inputs
    from billing_dags.models.sqlmodels import ModelError, partition_dir

    paths = Paths(tmp_path / "data", tmp_path / "seeds", 2)
    project = load_project()
    usage, month = project.models["fct_usage_by_day"], project.models["fct_usage_by_month"]
    first, second = shards.all_shards(2)

    def touch(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")

    for d in (1, 2, 3):
        for s in (first, second):
            touch(raw.samples_day_dir(paths, date(2026, 2, d)) / s.dirname / "part-sim.parquet")
            if (d, s) != (2, second):
                touch(partition_dir(paths, usage) / f"day=2026-02-0{d}" / s.dirname / "data.parquet")
    touch(events.events_day_dir(paths, date(2026, 2, 4)) / first.dirname / "part-postgres.parquet")  # events only
    window = Window(date(2026, 2, 1), date(2026, 3, 1))
    assert missing_period_days(paths, project, month, window) == {"fct_usage_by_day": [f"2026-02-02|{second.key}", f"2026-02-04|{first.key}"]}
    with pytest.raises(ModelError, match=r"2 day\(s\) with raw input have no fct_usage_by_day partition"):
        require_computed_inputs(paths, project, month, window)
    touch(partition_dir(paths, usage) / "day=2026-02-02" / second.dirname / "data.parquet")
    touch(partition_dir(paths, usage) / "day=2026-02-04" / first.dirname / "data.parquet")
    require_computed_inputs(paths, project, month, window)  # complete: nothing raised


def test_a_day_is_refused_while_an_earlier_day_it_reads_has_raw_samples_and_no_edges(tmp_path):
    """fct_usage_by_day reads 35 earlier days of edges: an earlier day with raw samples and no edges partition is
    named (its counters would be billed whole as new), unless the day's own carry-in holds that day's files."""
    from billing_dags.models.completeness import missing_lookback_days, require_computed_inputs
    from billing_dags.models.sqlmodels import ModelError, partition_dir

    paths = Paths(tmp_path / "data", tmp_path / "seeds", 1)
    project = load_project()
    edges, peaks, usage = (project.models[m] for m in ("int_series_edges_by_day", "int_gauge_peaks_by_day", "fct_usage_by_day"))

    def touch(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")

    for d in (7, 8, 9, 10):
        touch(raw.samples_day_dir(paths, date(2026, 2, d)) / "part-sim.parquet")
        touch(partition_dir(paths, peaks) / f"day=2026-02-{d:02d}" / "data.parquet")
        if d != 8:
            touch(partition_dir(paths, edges) / f"day=2026-02-{d:02d}" / "data.parquet")
    window = Window(date(2026, 2, 10), date(2026, 2, 11))
    assert missing_lookback_days(paths, project, usage, window) == {"int_series_edges_by_day": ["2026-02-08"]}
    with pytest.raises(ModelError, match=r"1 of those days have raw samples and no int_series_edges_by_day partition \(2026-02-08\)"):
        require_computed_inputs(paths, project, usage, window)
    touch(raw.carry_in_day_dir(paths, date(2026, 2, 10)) / "part-sim.parquet")  # the day's carry-in holds Feb 8's file
    assert missing_lookback_days(paths, project, usage, window) == {}


SENSOR_SCRIPT = """
import json
from datetime import UTC, datetime, timedelta
import dagster as dg
from billing_dags.definitions import defs as load
from billing_dags.core import shards
from billing_dags.core.settings import resolve_paths
from billing_dags.defs.shared.resources import WarehouseResource
from billing_dags.ingest import raw
from billing_dags.models.sqlmodels import load_project, partition_dir

defs = load() if callable(load) else load
sensor = defs.resolve_sensor_def("sharded_days_sensor")
paths = resolve_paths()
today = datetime.now(UTC).date()
yesterday = today - timedelta(days=1)
both = shards.all_shards(2)

def touch(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")

def tick(cursor):
    with dg.build_sensor_context(instance=dg.DagsterInstance.get(), cursor=cursor, definitions=defs, resources={"warehouse": WarehouseResource()}) as ctx:
        got = sensor(ctx)
        if isinstance(got, dg.SkipReason):
            return {"skip": got.skip_message}, ctx.cursor
        [request] = got
        cells = {k.to_user_string(): sorted(request.asset_graph_subset.get_partitions_subset(k).get_partition_keys())
                 for k in request.asset_graph_subset.asset_keys}
        return {"cells": cells, "tags": request.tags}, ctx.cursor

out = []
state, cursor = tick(None)
out.append(state)
for s in both:
    touch(raw.samples_day_dir(paths, yesterday) / s.dirname / "part-simulate.parquet")
touch(raw.samples_day_dir(paths, today) / both[0].dirname / "part-simulate.parquet")  # the day under way
state, cursor = tick(cursor)
out.append(state)
state, cursor = tick(cursor)  # its backfill failed, or has not run yet: not requested again
out.append(state)
project = load_project()
for name, model in project.models.items():
    if model.partitioned_by == "billing_daily" and model.materialized == "table":
        for s in both:
            touch(partition_dir(paths, model) / f"day={yesterday}" / s.dirname / "data.parquet")
state, cursor = tick(cursor)
out.append(state)
print(json.dumps({"yesterday": yesterday.isoformat(), "ticks": out}))
"""


def test_the_sharded_days_sensor_requests_ingested_days_once_and_settles(tmp_path):
    """BILLING_SHARDS=2, the sensor evaluated tick after tick: nothing to do on an empty warehouse; yesterday
    ingested (both shards) is one asset backfill of its (day, shard) models and its daily assets after them, never
    its ingest and never today (still under way); the same cells are not requested twice; computed, it settles."""
    env = {**os.environ, "BILLING_SHARDS": "2", "BILLING_DATA_DIR": str(tmp_path / "data"), "DAGSTER_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("BILLING_EXECUTOR", None)
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    proc = subprocess.run([sys.executable, "-c", SENSOR_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    got = json.loads(proc.stdout.strip().splitlines()[-1])
    day, (empty, requested, again, settled) = got["yesterday"], got["ticks"]
    assert "has its usage computed" in empty["skip"]
    cells = [f"{day}|0", f"{day}|1"]
    assert requested["cells"] == {
        **dict.fromkeys(("int_series_edges_by_day", "int_gauge_peaks_by_day", "fct_usage_by_day", "fct_usage_30d_by_day", "fct_anomaly_flags_by_day"), cells),
        **{a: [day] for a in ("stripe_outbox", "stripe_meter_events", "allowance_notifications", "daily_summary")},
    }
    assert requested["tags"]["billing/reason"] == "ingested days without usage" and requested["tags"]["billing/partitions"] == ",".join(cells)
    assert "requested already" in again["skip"] and cells[0] in again["skip"]
    assert "has its usage computed" in settled["skip"]
