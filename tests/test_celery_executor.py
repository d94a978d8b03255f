"""Runs on Celery workers (BILLING_EXECUTOR=celery), as docs/scale-out.md sets them up: a real redis-server
and two `billing worker` processes on 127.0.0.1 execute the steps of a few simulated days sharded 8 ways
(BILLING_SHARDS) and of their month, with the Dagster instance's run, event-log and schedule storage on a
real PostgreSQL server and the warehouse in a bucket of moto's S3 server (BILLING_DATA_URL), each process
with a working copy of its own (as on separate machines); every partition, invoice and outbox file is
byte-identical to the embedded run of the same days (one process, unsharded, a local folder, SQLite
storage in DAGSTER_HOME). The settings are refused with the variable and the fix."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from servers import POSTGRES_BINDIRS, S3_CREDENTIALS, free_port, moto_s3_server, postgres_server, stop, wait_for

from billing_dags.core import durable, shards, storage
from billing_dags.core.settings import Paths, SettingsError, executor_settings, partitions_start, redact_url
from billing_dags.core.settings import resolve_paths as _resolve_paths
from billing_dags.ingest import events, raw
from billing_dags.models import late_data

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"

#: the days run as `billing run` runs them (one run over their range; sharded, three), then their month
DAYS = ("2026-02-01", "2026-02-03")
#: the shards of the scaled run
SHARDS = 8
#: the steps that read the landing of the receivers (remote write, usage reports)
LANDING_STEPS = ("remote_write_samples", "usage_reports")
MONTH = "2026-02-01"
SIMULATION = {"resources": {"simulation": {"config": {"seed": 7, "interval_s": 3600}}}}
#: invoices as of a fixed moment after the grace period: finalized, numbered, the same in both runs
MONTH_CONFIG = {"ops": {"invoices": {"config": {"as_of": "2026-03-10T00:00:00+00:00"}}}}
#: what the runs publish (landing/ holds the receiver's own stores; warehouse.duckdb holds only views;
#: notifications carry their creation time)
PUBLISHED = ("raw", "models", "seeds", "invoices", "outbox", "reports")
#: the instance of the embedded run: SQLite files in DAGSTER_HOME (the default)
SQLITE_INSTANCE = "telemetry:\n  enabled: false\n"
#: the instance of the Celery run: the storage block of docs/scale-out.md, on the test's PostgreSQL
POSTGRES_INSTANCE = """telemetry:
  enabled: false
storage:
  postgres:
    postgres_db:
      hostname: 127.0.0.1
      port: {env: DAGSTER_PG_PORT}
      username: billing
      db_name: postgres
      scheme: postgresql+psycopg2
"""


# --------------------------------------------------------------------------- settings (no server)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"BILLING_EXECUTOR": "celry"}, "BILLING_EXECUTOR='celry' is not one of in_process, multiprocess, celery, k8s_job"),
        ({"BILLING_EXECUTOR": "celery"}, "BILLING_EXECUTOR=celery needs BILLING_CELERY_BROKER, which is not set; set it to the Celery broker's URL"),
        ({"BILLING_EXECUTOR": "celery", "BILLING_CELERY_BROKER": "127.0.0.1:6379"}, "BILLING_CELERY_BROKER='127.0.0.1:6379' is not a URL"),
        ({"BILLING_EXECUTOR": "celery", "BILLING_CELERY_BROKER": "http://h:6379"}, "http:// is not a Celery broker transport"),
        ({"BILLING_EXECUTOR": "celery", "BILLING_CELERY_BROKER": "redis://:s3cret@h:63x9/0"}, "BILLING_CELERY_BROKER='redis://:***@h:63x9/0' has a port"),
        (
            {"BILLING_EXECUTOR": "celery", "BILLING_CELERY_BROKER": "redis://h:6379/0", "BILLING_CELERY_BACKEND": "h:6379"},
            "BILLING_CELERY_BACKEND='h:6379' is not a URL",
        ),
    ],
)
def test_bad_executor_settings_name_the_variable_and_the_fix(env, expected):
    with pytest.raises(SettingsError) as e:
        executor_settings(env)
    assert expected in str(e.value) and "s3cret" not in str(e.value)


def test_the_default_is_in_process_and_a_redis_broker_keeps_the_results():
    assert executor_settings({}).kind == "in_process"
    assert executor_settings({"BILLING_EXECUTOR": "multiprocess"}).kind == "multiprocess"
    redis = executor_settings({"BILLING_EXECUTOR": "celery", "BILLING_CELERY_BROKER": "redis://127.0.0.1:6379/0"})
    assert (redis.broker_var, redis.backend_var) == ("BILLING_CELERY_BROKER", "BILLING_CELERY_BROKER")
    amqp = executor_settings({"BILLING_EXECUTOR": "celery", "BILLING_CELERY_BROKER": "amqp://guest@127.0.0.1//"})
    assert amqp.backend_var is None and amqp.backend({}) == "rpc://"
    assert redact_url("redis://user:pw@h:6379/0") == "redis://user:***@h:6379/0" and redact_url("redis://h:6379/0") == "redis://h:6379/0"


def test_the_code_location_refuses_a_bad_executor_setting_when_it_loads(monkeypatch):
    from billing_dags.defs.shared import executor

    monkeypatch.setenv("BILLING_EXECUTOR", "celery")
    monkeypatch.delenv("BILLING_CELERY_BROKER", raising=False)
    with pytest.raises(SettingsError, match="needs BILLING_CELERY_BROKER"):
        executor.build_executor()
    monkeypatch.delenv("BILLING_EXECUTOR")
    assert executor.build_executor().name == "in_process"


def test_the_kubernetes_job_executor_is_chosen_by_name_or_refused_naming_the_extra():
    from billing_dags.defs.shared.executor import build_executor

    settings = executor_settings({"BILLING_EXECUTOR": "k8s_job"})
    try:
        import dagster_k8s  # noqa: F401  (only the image of deploy/Dockerfile installs it)
    except ImportError:
        with pytest.raises(SettingsError, match=r"BILLING_EXECUTOR=k8s_job needs dagster-k8s.*billing_dags\[k8s\]"):
            build_executor(settings)
    else:
        assert build_executor(settings).name == "k8s"


def test_the_celery_executor_reads_its_urls_from_the_environment_not_from_config():
    pytest.importorskip("dagster_celery")
    from billing_dags.defs.shared.executor import build_executor, celery_executor_config

    settings = executor_settings({"BILLING_EXECUTOR": "celery", "BILLING_CELERY_BROKER": "redis://:pw@127.0.0.1:6379/0"})
    config = celery_executor_config(settings)
    assert config["broker"] == {"env": "BILLING_CELERY_BROKER"} and config["backend"] == {"env": "BILLING_CELERY_BROKER"}
    assert "pw" not in repr(config)
    assert build_executor(settings).name == "celery"


def test_a_worker_takes_the_landing_steps_with_a_shared_folder_or_when_it_holds_the_landing():
    from billing_dags.core.settings import LANDING_OP_TAGS, worker_queues

    assert worker_queues(False, {}) == ["dagster", "billing-landing"]
    assert worker_queues(False, {"BILLING_DATA_URL": "s3://warehouse/billing"}) == ["dagster"]
    assert worker_queues(True, {"BILLING_DATA_URL": "s3://warehouse/billing"}) == ["dagster", "billing-landing"]
    assert LANDING_OP_TAGS == {"dagster-celery/queue": "billing-landing"}


def test_billing_worker_without_a_broker_exits_2_naming_the_variable(capsys, monkeypatch):
    from billing_dags.cli.main import main

    monkeypatch.delenv("BILLING_CELERY_BROKER", raising=False)
    monkeypatch.setenv("BILLING_EXECUTOR", "celery")
    assert main(["worker"]) == 2
    assert "needs BILLING_CELERY_BROKER" in capsys.readouterr().err
    monkeypatch.setenv("BILLING_EXECUTOR", "in_process")
    assert main(["worker"]) == 2
    assert "a worker runs the steps of the celery executor" in capsys.readouterr().err.replace("\n", " ")


def _step_of_a_run_launched_with(tags: dict, paths):
    """One cheap step (a day's usage reports) executed here, by this process's code location and settings, of a
    run created with ``tags``: as a worker executes a step of a run that another process launched."""
    import dagster as dg
    from dagster._core.execution.api import execute_run_iterator
    from dagster._core.storage.tags import PARTITION_NAME_TAG

    from billing_dags.cli.runs import QUIET_LOGS, definitions_of, runnable_job

    defs, instance = definitions_of(paths)
    job = defs.resolve_job_def("daily_usage")
    selection = frozenset({dg.AssetKey("usage_reports")})
    runnable = runnable_job(job).get_subset(asset_selection=selection)
    run = instance.create_run_for_job(
        job_def=runnable.get_definition(),
        run_config=QUIET_LOGS,
        tags={**job.run_tags, **tags, PARTITION_NAME_TAG: "2026-02-01"},
        asset_selection=selection,
    )
    list(execute_run_iterator(runnable, run, instance))
    run = instance.get_run_by_id(run.run_id)
    errors = []
    for entry in instance.all_logs(run.run_id):
        error = getattr(entry.dagster_event.event_specific_data, "error", None) if entry.dagster_event else None
        while error is not None:
            errors.append(error.message)
            error = error.cause
    return run.status.value, " ".join(errors)


@pytest.mark.parametrize(
    ("launched", "expected"),
    [
        ({"billing/shards": "8"}, "launched with BILLING_SHARDS=8, but this process has BILLING_SHARDS=1"),
        ({"billing/data_url": "s3://warehouse/billing"}, "launched with BILLING_DATA_URL=s3://warehouse/billing, but this process has BILLING_DATA_URL unset"),
    ],
)
def test_a_step_refuses_a_run_launched_with_other_shards_or_another_warehouse(paths, monkeypatch, launched, expected):
    """A worker started with another BILLING_SHARDS or BILLING_DATA_URL than where runs are launched would compute
    its steps in another layout or folder (a month invoiced from no usage, silently): its steps fail, naming the
    variable and the fix. Runs launched with this process's settings run."""
    monkeypatch.delenv("BILLING_SHARDS", raising=False)
    monkeypatch.delenv("BILLING_DATA_URL", raising=False)
    monkeypatch.delenv("BILLING_EXECUTOR", raising=False)
    status, error = _step_of_a_run_launched_with(launched, paths)
    assert status == "FAILURE" and expected in error, (status, error)
    assert "set the same" in error and "on every worker" in error
    assert _step_of_a_run_launched_with({}, paths)[0] == "SUCCESS"


# --------------------------------------------------------------------------- the real thing


def _ping(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith(b"+PONG")


@contextmanager
def redis_server(root: Path):
    """redis-server on 127.0.0.1, on a free port (redis has no port 0: bind a socket, release it, start
    redis on it, and retry with another port when redis lost the race for it); yields the port once it
    answers PING. No persistence: the broker's queue lives as long as the test."""
    for _ in range(3):
        port = free_port()
        log = (root / f"redis-{port}.log").open("wb")
        proc = subprocess.Popen(
            [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(root)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for(lambda p=proc, n=port: p.poll() is not None or _ping(n), 30, f"redis-server on port {port}", step=0.05)
            if proc.poll() is None:
                yield port
                return
        finally:
            stop(proc)
            log.close()
    raise AssertionError(f"redis-server did not start: {(root / f'redis-{port}.log').read_text()[-2000:]}")


@contextmanager
def celery_worker(root: Path, name: str, env: dict, concurrency: int = 1, *flags: str):
    """`billing worker` as its own process (group), ``concurrency`` steps at once; yields it and its log path."""
    log_path = root / f"{name}.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "billing_dags.cli", "worker", "--name", f"{name}@%h", "--concurrency", str(concurrency), *flags],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield proc, log_path
    finally:
        stop(proc)
        log.close()


def _published(data_dir: Path) -> dict[str, Path]:
    """{key: path} of what a run published under ``data_dir``."""
    files = {p.relative_to(data_dir).as_posix(): p for top in PUBLISHED for p in sorted((data_dir / top).rglob("*")) if p.is_file()}
    return {k: p for k, p in files.items() if storage.is_mirrored(k)}


def _run_days_and_month(days: tuple[str, str]) -> float:
    """The days (as `billing run` runs them: one run over their range; sharded, the ingest, the (day, shard)
    models and the assets after them) and their month, launched as the CLI launches runs, with the executor,
    shards, warehouse and Dagster instance of the environment; returns the wall time of the runs."""
    from billing_dags.cli.runs import definitions_of, execute, execute_days
    from billing_dags.defs.seeds.assets import write_seed_snapshots

    paths = _resolve_paths()
    write_seed_snapshots(paths)  # the seeds job's work, without its runs: the same files either way
    defs, instance = definitions_of(paths)
    start = time.perf_counter()
    first, last = (date.fromisoformat(d) for d in days)
    execute_days(defs, instance, [date.fromordinal(d) for d in range(first.toordinal(), last.toordinal() + 1)], SIMULATION)
    execute(defs.resolve_job_def("monthly_invoicing"), instance, "month", MONTH_CONFIG, partition_key=MONTH)
    return time.perf_counter() - start


def _launch(name: str, root: Path, env: dict, instance_yaml: str) -> subprocess.Popen:
    """``_run_days_and_month`` in a process of its own (this file as a script), its log in root/NAME.log."""
    home = root / name / "home"
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text(instance_yaml)
    log = (root / f"{name}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, __file__, *DAYS],
        env={**env, "DAGSTER_HOME": str(home)},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    return proc


def _celery_hosts_by_step(instance, run_ids) -> dict[str, str]:
    hosts = {}
    for run_id in run_ids:
        for entry in instance.all_logs(run_id):
            event = entry.dagster_event
            if event is not None and event.is_engine_event and event.step_key:
                worker = event.engine_event_data.metadata.get("Celery worker")
                if worker is not None:
                    hosts[f"{run_id[:8]}:{event.step_key}"] = worker.value
    return hosts


def _sorted_rows(table: pa.Table) -> pa.Table:
    """``table`` sorted by every column but nested ones (a series' labels: its id is a column), float columns as
    their bit patterns (NaN staleness markers equal themselves)."""
    for i, field in enumerate(table.schema):
        if pa.types.is_floating(field.type):
            table = table.set_column(i, field.name, pa.array(table[i].combine_chunks().to_numpy(zero_copy_only=False).view("int64")))
    return table.sort_by([(f.name, "ascending") for f in table.schema if not pa.types.is_nested(f.type)])


def _differences(expected: dict[str, Path], sharded: Paths) -> list[str]:
    """Keys of the unsharded run's files that the sharded warehouse ``sharded`` does not hold the same.

    A file both hold is compared byte for byte. A day's file that the sharded layout keeps as shard files
    (``.../date=D/shard=K-of-N/NAME``, ``.../day=D/shard=K-of-N/data.parquet``): the raw samples and events
    byte for byte as the invoice manifests record them (the shards written again as the one unsharded file),
    the other files (series, carry-in, the daily models) row for row (the shards concatenated); the inputs a
    daily model's partition was computed from (``inputs.json``), which name its shard's files, as records of
    the files as they are (no partition is late)."""
    got = _published(sharded.data_dir)
    by_unsharded: dict[str, list[Path]] = {}
    for key, path in got.items():
        if shards.shard_of_dir(path.parent.name) is not None:
            by_unsharded.setdefault(f"{Path(key).parent.parent.as_posix()}/{path.name}", []).append(path)
    differ = sorted(set(got) - set(expected) - {p.relative_to(sharded.data_dir).as_posix() for ps in by_unsharded.values() for p in ps})
    manifested: dict[str, str] = {}
    for day in sorted({date.fromisoformat(k.split("/")[2].removeprefix("date=")) for k in expected if k.startswith(("raw/samples/", "raw/events/"))}):
        manifested.update(raw.unsharded_sample_files(sharded, day))
        manifested.update(events.unsharded_event_files(sharded, day))
    late = {f"models/{d.model}/day={d.day}/{late_data.INPUTS_FILE}" for d in late_data.late_model_days(sharded)[0]}
    for key, path in expected.items():
        if key in got:
            same = got[key].read_bytes() == path.read_bytes()
        elif key in manifested:
            same = manifested[key] == durable.sha256_file(path)
        elif key.endswith(f"/{late_data.INPUTS_FILE}"):
            # what a partition was computed from: its own shard's raw files, all as they are now (not late)
            same = len(by_unsharded.get(key, ())) == sharded.shards and key not in late
        elif key in by_unsharded and len(by_unsharded[key]) == sharded.shards:
            parts = pa.concat_tables(pq.read_table(f, partitioning=None) for f in sorted(by_unsharded[key]))
            same = _sorted_rows(parts).equals(_sorted_rows(pq.read_table(path, partitioning=None)))
        else:
            same = False
        if not same:
            differ.append(key)
    return differ


@pytest.mark.acceptance
@pytest.mark.integration
def test_a_sharded_month_on_two_celery_workers_over_s3_matches_the_embedded_run_byte_for_byte(tmp_path, monkeypatch, small_seeds):
    """The scaled mode as docs/scale-out.md sets it up, against the embedded default: the days and their month
    with BILLING_SHARDS=8, run on two `billing worker` processes (a real redis-server broker), the Dagster
    instance on a real PostgreSQL server, the warehouse in a bucket of moto's S3 server (BILLING_DATA_URL),
    each worker and the launching process with a working copy of its own (as on three machines), the steps
    reading the receivers' landing on the worker of its machine (--landing); and the same days and month in
    one process, unsharded, on a local folder with SQLite storage."""
    if not Path(REDIS).exists():
        pytest.skip("redis-server is not installed (apt-get install -y --no-install-recommends redis-server); CI installs it")
    if not POSTGRES_BINDIRS:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install -y postgresql); CI installs them")
    for module in ("dagster_celery", "dagster_postgres", "boto3", "moto.server"):
        pytest.importorskip(module)
    import boto3
    import dagster as dg
    import psycopg

    # what every process shares: the seeds, the partitions, no real sources
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "AWS_", "PROMETHEUS_", "STRIPE_", "DAGSTER_"))}
    base.update(BILLING_SEEDS_DIR=str(small_seeds), BILLING_PARTITIONS_START=partitions_start(seeds_dir=small_seeds).isoformat()[:7])
    with ExitStack() as stack:
        # the embedded default, in a process of its own, while the servers and workers start and run the same days
        embedded = _launch("in_process", tmp_path, {**base, "BILLING_DATA_DIR": str(tmp_path / "in_process" / "data")}, SQLITE_INSTANCE)
        stack.callback(stop, embedded)

        endpoint = stack.enter_context(moto_s3_server())
        boto3.client("s3", endpoint_url=endpoint, **_boto(S3_CREDENTIALS)).create_bucket(Bucket="warehouse")
        dsn = stack.enter_context(postgres_server(tmp_path / "pg"))
        port = stack.enter_context(redis_server(tmp_path))
        # as documented: the instance's settings are env references, resolved by each process from its own environment
        scaled = {
            **base,
            **S3_CREDENTIALS,
            "AWS_ENDPOINT_URL": endpoint,
            "BILLING_DATA_URL": "s3://warehouse/billing",
            "BILLING_SHARDS": str(SHARDS),
            "BILLING_EXECUTOR": "celery",
            "BILLING_CELERY_BROKER": f"redis://127.0.0.1:{port}/0",
            "DAGSTER_PG_PORT": dsn.split("port=")[1].split()[0],
        }
        # each worker with a working copy of its own, as on two machines; w2 runs two steps at once, whose processes
        # share its copy; w1 is on the machine of the receivers' landing (a worker opens each run's instance from
        # the reference its task carries)
        workers = [
            stack.enter_context(celery_worker(tmp_path, name, {**scaled, "BILLING_DATA_DIR": str(tmp_path / name / "copy")}, concurrency, *flags))
            for name, concurrency, flags in (("w1", 1, ["--landing"]), ("w2", 2, []))
        ]
        for proc, log in workers:
            wait_for(lambda p=proc, f=log: p.poll() is not None or " ready." in f.read_text(errors="replace"), 300, f"Celery worker {log.stem} ready")
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        launcher = _launch("celery", tmp_path, {**scaled, "BILLING_DATA_DIR": str(tmp_path / "celery" / "copy")}, POSTGRES_INSTANCE)
        stack.callback(stop, launcher)
        assert launcher.wait(900) == 0, (tmp_path / "celery.log").read_text(errors="replace")[-5000:]

        monkeypatch.setenv("DAGSTER_PG_PORT", scaled["DAGSTER_PG_PORT"])
        with dg.DagsterInstance.from_config(str(tmp_path / "celery" / "home")) as instance:
            run_ids = [r.run_id for r in instance.get_runs()]
            hosts = _celery_hosts_by_step(instance, run_ids)
            steps = {f"{r[:8]}:{e.step_key}" for r in run_ids for e in instance.all_logs(r) if e.dagster_event and e.dagster_event.is_step_success}
            storages = {type(s).__name__ for s in (instance.run_storage, instance.event_log_storage, instance.schedule_storage)}
            sharded_keys = instance.get_materialized_partitions(dg.AssetKey("fct_usage_by_day"))
        with psycopg.connect(dsn) as conn:
            in_pg = {
                r: conn.execute("select count(*) from event_logs where run_id = %s and step_key is not null", (r,)).fetchone()[0]
                for (r,) in conn.execute("select run_id from runs").fetchall()
            }
            schedule_tables = {t for (t,) in conn.execute("select tablename from pg_tables where tablename in ('jobs', 'job_ticks')").fetchall()}
        # another machine: an empty working copy of the bucket
        for k, v in {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(k, v)
        check = storage.WorkingCopy(storage.S3Store("s3://warehouse/billing"), tmp_path / "check")
        check.pull()
        assert embedded.wait(900) == 0, (tmp_path / "in_process.log").read_text(errors="replace")[-5000:]

    print(f"\n{(tmp_path / 'celery.log').read_text().splitlines()[-1]}; {(tmp_path / 'in_process.log').read_text().splitlines()[-1]}")
    # every step of every run ran on a worker, and both workers took steps
    assert steps and set(hosts) == steps, f"steps not run on a worker: {sorted(steps - set(hosts))}"
    assert {h.split("@")[0] for h in hosts.values()} == {"w1", "w2"}, hosts
    # the steps that read the receivers' landing (local to its machine with a bucket) ran on the landing's machine only
    landing = {step: host for step, host in hosts.items() if step.split(":")[1] in LANDING_STEPS}
    assert len(landing) == len(LANDING_STEPS) and {h.split("@")[0] for h in landing.values()} == {"w1"}, landing
    # the (day, shard) partitions of every day were materialized
    day_keys = [date.fromordinal(d).isoformat() for d in range(date.fromisoformat(DAYS[0]).toordinal(), date.fromisoformat(DAYS[1]).toordinal() + 1)]
    assert set(sharded_keys) == {f"{d}|{s}" for d in day_keys for s in shards.shard_keys(SHARDS)}
    # the runs and every step's events (written by the workers) are in PostgreSQL, none in DAGSTER_HOME
    assert storages == {"PostgresRunStorage", "PostgresEventLogStorage", "PostgresScheduleStorage"}, storages
    assert sorted(in_pg) == sorted(run_ids) and all(in_pg.values()), in_pg
    assert schedule_tables == {"jobs", "job_ticks"}
    assert not [p.name for p in (tmp_path / "celery" / "home").rglob("*.db")]

    expected = _published(tmp_path / "in_process" / "data")
    assert any(k.startswith("invoices/2026-02/") for k in expected) and any(k.startswith(f"models/fct_usage_by_day/day={DAYS[1]}/") for k in expected)
    assert any(k.startswith("outbox/") for k in expected) and any(k.startswith("models/fct_usage_by_month/") for k in expected)
    differ = _differences(expected, Paths(tmp_path / "check", small_seeds, SHARDS))
    assert not differ, f"files that differ from the embedded run: {differ}"


def _boto(env: dict) -> dict:
    return {"aws_access_key_id": env["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"], "region_name": env["AWS_REGION"]}


if __name__ == "__main__":
    # one side of the test above, as a process of its own (its environment says which): FIRST_DAY LAST_DAY
    seconds = _run_days_and_month((sys.argv[1], sys.argv[2]))
    mode = "in process" if os.environ.get("BILLING_EXECUTOR", "in_process") == "in_process" else "on 2 Celery workers"
    print(f"days {sys.argv[1]}..{sys.argv[2]} and the month {mode}, {os.environ.get('BILLING_SHARDS', '1')} shard(s): {seconds:.1f}s")
