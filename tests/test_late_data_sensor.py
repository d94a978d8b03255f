"""The late-data sensor on a real Dagster instance: it reruns what changed once, and then settles."""

from __future__ import annotations

import os
import shutil
import time
from datetime import date, timedelta

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import copy_small_seeds

from billing_dags.core import durable
from billing_dags.definitions import defs as load_defs
from billing_dags.ingest import raw
from billing_dags.ingest.events import event_files

FIRST = date(2026, 11, 9)
DAYS = [FIRST + timedelta(days=i) for i in range(4)]  # 11-09 .. 11-12
LATE = date(2026, 11, 10)
INGEST = {"raw_samples", "remote_write_samples", "usage_events", "usage_reports"}


class Deployment:
    """The code location's definitions, a persistent instance in tmp_path, and the sensor's cursor."""

    def __init__(self, tmp_path):
        self.defs = load_defs()
        self.instance = dg.DagsterInstance.from_config(str(tmp_path / "dagster_home"))
        self.job = self.defs.resolve_job_def("daily_usage")
        self.sensor = self.defs.resolve_sensor_def("late_raw_data_sensor")
        self.cursor = None
        self.runs: list[dict] = []  # what each executed run request materialized

    def close(self):
        self.instance.dispose()

    def evaluate(self) -> list[dg.RunRequest]:
        with dg.build_sensor_context(
            instance=self.instance,
            cursor=self.cursor,
            definitions=self.defs,
            resources={"warehouse": self.defs.resources["warehouse"]},
        ) as ctx:
            data = self.sensor.evaluate_tick(ctx)
        self.cursor = data.cursor
        return list(data.run_requests or [])

    def execute(self, request: dg.RunRequest) -> None:
        result = self.job.execute_in_process(
            instance=self.instance,
            partition_key=request.partition_key,
            asset_selection=request.asset_selection,
            tags=dict(request.tags),
        )
        assert result.success
        materialized: dict[str, set[str]] = {}
        for event in result.get_asset_materialization_events():
            key = event.asset_key.to_user_string()
            materialized.setdefault(key, set()).add(event.partition)
        self.runs.append(materialized)

    def operate(self, max_evaluations: int = 8) -> list[list[dg.RunRequest]]:
        """Evaluate the sensor and execute what it requests (the daemon's loop) until it requests
        nothing; the requests of each evaluation."""
        rounds = []
        for _ in range(max_evaluations):
            requests = self.evaluate()
            if not requests:
                return rounds
            rounds.append(requests)
            for r in requests:
                self.execute(r)
        pytest.fail(f"the sensor did not settle in {max_evaluations} evaluations: {[[_describe(r) for r in rs] for rs in rounds]}")


def _describe(r: dg.RunRequest) -> str:
    rng = r.partition_key_range
    days = r.partition_key or (f"{rng.start}..{rng.end}" if rng else "?")
    return f"{days} {sorted(k.to_user_string() for k in r.asset_selection or [])}"


@pytest.fixture(scope="module")
def computed(tmp_path_factory):
    """Seeds and four simulated days, every daily asset materialized through the daily_usage job (one
    run over the four days, as a backfill runs them), once per module; each test works on its own copy."""
    root = tmp_path_factory.mktemp("computed")
    with pytest.MonkeyPatch.context() as mp:
        (root / "dagster_home").mkdir()
        mp.setenv("DAGSTER_HOME", str(root / "dagster_home"))
        mp.setenv("BILLING_DATA_DIR", str(root / "data"))
        mp.setenv("BILLING_SEEDS_DIR", str(copy_small_seeds(root / "seeds")))
        for var in ("PROMETHEUS_URL", "STRIPE_API_KEY", "STRIPE_API_BASE", "BILLING_USAGE_EVENTS_DSN"):
            mp.delenv(var, raising=False)
        d = Deployment(root)
        try:
            assert d.defs.resolve_job_def("refresh_seeds_and_views").execute_in_process(instance=d.instance).success
            days = {"dagster/asset_partition_range_start": DAYS[0].isoformat(), "dagster/asset_partition_range_end": DAYS[-1].isoformat()}
            assert d.job.execute_in_process(tags=days, instance=d.instance).success
        finally:
            d.close()
    return root / "data"


@pytest.fixture
def deployment(computed, paths, tmp_path):
    """A copy of the computed days (file times kept) and a fresh instance, with the sensor stopped before."""
    shutil.copytree(computed, paths.data_dir, copy_function=shutil.copy2)
    d = Deployment(tmp_path)
    yield d
    d.close()


def _rewrite_same_bytes(f) -> None:
    data = f.read_bytes()
    tmp = f.with_name(f.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, f)
    later = time.time() + 2  # newer than anything computed, whatever the clock granularity
    os.utime(f, (later, later))


def _change_last_sample(f) -> None:
    """A late correction: the day's last sample of one series is one larger (order and schema kept)."""
    t = pq.read_table(f)
    values = t.column("value").to_pylist()
    values[-1] += 1.0
    t = t.set_column(t.schema.get_field_index("value"), "value", pa.array(values, pa.float64()))
    tmp = f.with_name(f.name + ".tmp")
    pq.write_table(t, tmp)
    os.replace(tmp, f)


def test_touching_raw_files_without_changing_them_requests_nothing(deployment, paths):
    for f in [*raw.sample_files(paths, LATE), *event_files(paths, LATE)]:
        _rewrite_same_bytes(f)
    assert deployment.operate() == []


def test_a_late_correction_reruns_the_models_of_the_affected_days_in_one_run_and_settles(deployment, paths):
    (samples,) = raw.sample_files(paths, LATE)
    _change_last_sample(samples)
    rounds = deployment.operate()
    assert len(rounds) == 1, [[_describe(r) for r in rs] for rs in rounds]
    (_request,) = rounds[0]
    (run,) = deployment.runs
    # no ingest reruns (it would pull the day from Prometheus again); every model day from the late
    # one to the newest computed one is recomputed, since later days read its edges and usage
    assert not INGEST & set(run), sorted(run)
    later = {d.isoformat() for d in DAYS if d >= LATE}
    assert run["int_series_edges_by_day"] == later
    assert run["fct_usage_by_day"] == later
    assert run["fct_usage_30d_by_day"] == later
    # the correction reached the usage and the sensor settled: touching again requests nothing
    assert deployment.operate() == []
    _rewrite_same_bytes(samples)
    assert deployment.operate() == []


# --- content, not time: billing_dags.models.late_data on hand-made partitions ----------------------------


def _computed_edges(paths, day: date) -> None:
    """Raw samples of ``day`` and an edges partition recorded as computed from them."""
    from billing_dags.models import late_data
    from billing_dags.models.sqlmodels import Window, load_project, partition_file

    project = load_project()
    model = project.models["int_series_edges_by_day"]
    window = Window(day, day + timedelta(days=1))
    start, _ = raw.day_bounds_ms(day)
    sid = raw.series_id("stratum_submits_total", {"client_id": "miner-001"})
    samples = pa.table({"series_id": [sid, sid], "ts": [start + 1000, start + 2000], "value": [1.0, 2.0]})
    series = pa.table(
        {"series_id": [sid], "metric": ["stratum_submits_total"], "labels": [[("client_id", "miner-001")]], "first_seen": [start + 1000]},
        schema=raw.SERIES_SCHEMA,
    )
    raw.write_day(paths, day, samples, series, "test")
    inputs = late_data.inputs_before(paths, project, model, window)
    part = partition_file(paths, model, window)
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(b"")
    late_data.record_inputs(paths, model, window, inputs)


def _late(paths, hashes=None):
    from billing_dags.models.late_data import late_model_days

    late, used = late_model_days(paths, hashes)
    return sorted((d.model, d.day.isoformat()) for d in late), used


def test_a_touched_or_identically_rewritten_raw_file_is_not_late_and_is_hashed_once(paths, monkeypatch):

    day = date(2026, 5, 1)
    _computed_edges(paths, day)
    assert _late(paths)[0] == []
    (f,) = raw.sample_files(paths, day)
    _rewrite_same_bytes(f)
    hashed = []
    real = durable.sha256_file
    monkeypatch.setattr(durable, "sha256_file", lambda p: hashed.append(p) or real(p))
    late, used = _late(paths)
    assert late == [] and hashed == [f]
    late, used = _late(paths, used)  # the next evaluation passes the hashes back: nothing is read again
    assert late == [] and hashed == [f]


def test_other_bytes_an_added_file_or_a_removed_one_make_the_day_late_but_retention_does_not(paths):
    day = date(2026, 5, 1)
    _computed_edges(paths, day)
    (f,) = raw.sample_files(paths, day)
    original = f.read_bytes()
    _change_last_sample(f)
    assert _late(paths)[0] == [("int_series_edges_by_day", "2026-05-01")]
    f.write_bytes(original)  # the correction undone: the content the partition was computed from
    assert _late(paths)[0] == []
    extra = f.with_name("part-late.parquet")
    extra.write_bytes(original)
    assert _late(paths)[0] == [("int_series_edges_by_day", "2026-05-01")]
    f.unlink()  # part-late.parquet stays: a file of the day went away
    assert _late(paths)[0] == [("int_series_edges_by_day", "2026-05-01")]
    extra.unlink()  # the whole raw day removed (retention): the models keep what they computed
    assert _late(paths)[0] == []


def test_rerun_ranges_run_from_the_first_late_day_through_the_computed_days_that_read_it():
    from billing_dags.models.late_data import rerun_ranges

    d = lambda i: date(2026, 11, i)  # noqa: E731
    computed = {d(i) for i in range(1, 13)}
    assert rerun_ranges(set(), computed, 35) == []
    assert rerun_ranges({d(10)}, computed, 35) == [(d(10), d(12))]
    assert rerun_ranges({d(3), d(5)}, computed, 1) == [(d(3), d(6))]
    # a day never computed (the schedule will compute it) splits the range; days after it that
    # read no late day directly are left to their own runs
    computed.discard(d(7))
    assert rerun_ranges({d(3), d(9)}, computed, 35) == [(d(3), d(6)), (d(9), d(12))]
    assert rerun_ranges({d(3)}, computed, 35) == [(d(3), d(6))]


def test_late_events_request_the_models_reading_them_and_their_downstream_not_the_edges_nor_ingest(paths):
    from billing_dags.defs.ingest.sensors import rerun_plan
    from billing_dags.ingest.events import events_day_dir
    from billing_dags.models import late_data
    from billing_dags.models.sqlmodels import Window, load_project, partition_file

    project = load_project()
    day, nxt = date(2026, 5, 4), date(2026, 5, 5)
    f = events_day_dir(paths, day) / "part-usage_reports.parquet"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"first version")
    for d in (day, nxt):
        window = Window(d, d + timedelta(days=1))
        for name in late_data.raw_readers(project):
            model = project.models[name]
            inputs = late_data.inputs_before(paths, project, model, window)
            partition_file(paths, model, window).parent.mkdir(parents=True, exist_ok=True)
            partition_file(paths, model, window).write_bytes(b"")
            late_data.record_inputs(paths, model, window, inputs)
    asset_graph = load_defs().get_repository_def().asset_graph
    assert rerun_plan(paths, asset_graph)[0] == []
    f.write_bytes(b"second version")
    (request,), _, late = rerun_plan(paths, asset_graph)
    # the next day reads this day's gauge levels
    assert sorted((d.model, d.day.isoformat()) for d in late) == [
        ("fct_usage_by_day", "2026-05-04"),
        ("fct_usage_by_day", "2026-05-05"),
        ("int_gauge_peaks_by_day", "2026-05-04"),
        ("int_gauge_peaks_by_day", "2026-05-05"),
    ]
    assert request.partition_key_range == dg.PartitionKeyRange("2026-05-04", "2026-05-05")
    assert sorted(k.to_user_string() for k in request.asset_selection) == [
        "allowance_notifications",
        "daily_summary",
        "fct_anomaly_flags_by_day",
        "fct_usage_30d_by_day",
        "fct_usage_by_day",
        "int_gauge_peaks_by_day",
        "stripe_meter_events",
        "stripe_outbox",
    ]
    assert request.tags["billing/late_days"] == "2026-05-04,2026-05-05"
    # the same late content keeps its run key (requested once), however often it is touched; new content makes a new one
    _rewrite_same_bytes(f)
    assert rerun_plan(paths, asset_graph)[0][0].run_key == request.run_key
    f.write_bytes(b"third version")
    assert rerun_plan(paths, asset_graph)[0][0].run_key != request.run_key


def test_the_sensor_waits_while_a_run_writes_raw_days_or_daily_usage(paths):
    day = date(2026, 5, 1)
    _computed_edges(paths, day)
    (f,) = raw.sample_files(paths, day)
    _change_last_sample(f)
    defs = load_defs()
    sensor = defs.resolve_sensor_def("late_raw_data_sensor")
    instance = dg.DagsterInstance.ephemeral()

    def evaluate():
        with dg.build_sensor_context(instance=instance, definitions=defs, resources={"warehouse": defs.resources["warehouse"]}) as ctx:
            return sensor.evaluate_tick(ctx)

    other = dg.DagsterRun(job_name="refresh_seeds_and_views", run_id="a" * 36, status=dg.DagsterRunStatus.STARTED)
    ingest = dg.DagsterRun(
        job_name="__ASSET_JOB", run_id="b" * 36, status=dg.DagsterRunStatus.STARTED, asset_selection=frozenset({dg.AssetKey("usage_reports")})
    )
    instance.add_run(other)
    instance.add_run(ingest)
    data = evaluate()
    assert not data.run_requests and "waiting for 1 run(s)" in data.skip_message and "bbbbbbbb" in data.skip_message
    instance.delete_run(ingest.run_id)
    assert [r.partition_key for r in evaluate().run_requests] == ["2026-05-01"]


def test_the_record_holds_sizes_and_hashes_only_and_a_file_changed_during_the_run_is_late(paths):
    import json

    from billing_dags.models import late_data
    from billing_dags.models.sqlmodels import Window, load_project, partition_file

    day = date(2026, 5, 1)
    _computed_edges(paths, day)
    project = load_project()
    model = project.models["int_series_edges_by_day"]
    window = Window(day, day + timedelta(days=1))
    (f,) = raw.sample_files(paths, day)
    record = json.loads(late_data.inputs_path(paths, model, window).read_text())
    # the same bytes for the same inputs, whenever and however the partition was computed
    assert record["files"] == {f.relative_to(paths.data_dir).as_posix(): [f.stat().st_size, durable.sha256_file(f)]}
    inputs = late_data.inputs_before(paths, project, model, window)
    _rewrite_same_bytes(f)  # while the model runs: it may have read either version
    late_data.record_inputs(paths, model, window, inputs)
    assert partition_file(paths, model, window).exists()
    assert _late(paths)[0] == [("int_series_edges_by_day", "2026-05-01")]
