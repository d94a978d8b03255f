"""The late-data sensor on a real Dagster instance: it reruns what changed once, and then settles."""

from __future__ import annotations

import os
import shutil
import time
from datetime import date, timedelta

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from billing_dags import raw
from billing_dags.definitions import defs as load_defs
from billing_dags.events import event_files
from conftest import copy_small_seeds

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
    """Seeds and four simulated days, every daily asset materialized through the daily_usage job,
    once per module; each test works on its own copy."""
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
            for day in DAYS:
                assert d.job.execute_in_process(partition_key=day.isoformat(), instance=d.instance).success
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
    (request,) = rounds[0]
    (run,) = deployment.runs
    # no ingest reruns (it would pull the day from Prometheus again); every model day from the late
    # one to the newest computed one is recomputed, since later days read its edges and usage
    assert not INGEST & set(run), sorted(run)
    later = {d.isoformat() for d in DAYS if d >= LATE}
    assert run["fct_series_edges_by_day"] == later
    assert run["fct_usage_by_day"] == later
    assert run["fct_usage_30d"] == later
    # the correction reached the usage and the sensor settled: touching again requests nothing
    assert deployment.operate() == []
    _rewrite_same_bytes(samples)
    assert deployment.operate() == []

