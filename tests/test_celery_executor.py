"""Runs on Celery workers (BILLING_EXECUTOR=celery): a real redis-server and two `billing worker` processes
on 127.0.0.1 execute the steps of a few simulated days and of their month, with the Dagster instance's
run, event-log and schedule storage on a real PostgreSQL server (dagster-postgres, as across machines),
and every partition and invoice is byte-identical to the embedded in-process run of the same days (SQLite
storage in DAGSTER_HOME). The settings are refused with the variable and the fix."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from servers import POSTGRES_BINDIRS, free_port, postgres_server, stop, wait_for

from billing_dags.core.settings import SettingsError, executor_settings, redact_url
from billing_dags.core.settings import resolve_paths as _resolve_paths

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"

#: the days run as one run over their range (as a backfill is), then their month
DAYS = ("2026-02-01", "2026-02-03")
MONTH = "2026-02-01"
SIMULATION = {"resources": {"simulation": {"config": {"seed": 7, "interval_s": 3600}}}}
#: invoices as of a fixed moment after the grace period: finalized, numbered, the same in both runs
MONTH_CONFIG = {"ops": {"invoices": {"config": {"as_of": "2026-03-10T00:00:00+00:00"}}}}
#: what the runs publish (landing/ holds the receiver's own stores; warehouse.duckdb holds only views)
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


def test_billing_worker_without_a_broker_exits_2_naming_the_variable(capsys, monkeypatch):
    from billing_dags.cli.main import main

    monkeypatch.delenv("BILLING_CELERY_BROKER", raising=False)
    monkeypatch.setenv("BILLING_EXECUTOR", "celery")
    assert main(["worker"]) == 2
    assert "needs BILLING_CELERY_BROKER" in capsys.readouterr().err
    monkeypatch.setenv("BILLING_EXECUTOR", "in_process")
    assert main(["worker"]) == 2
    assert "a worker runs the steps of the celery executor" in capsys.readouterr().err.replace("\n", " ")


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
def celery_worker(root: Path, name: str, env: dict):
    """`billing worker` as its own process (group); yields its log path once Celery reports it ready."""
    log_path = root / f"{name}.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "billing_dags.cli", "worker", "--name", f"{name}@%h"],
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


def _published(data_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(data_dir)): p.read_bytes() for top in PUBLISHED for p in sorted((data_dir / top).rglob("*")) if p.is_file()}


def _run_days_and_month(root: Path, seeds: Path, instance_yaml: str = SQLITE_INSTANCE):
    """The days (one run over their range) and the month, launched as the CLI launches runs, with the
    executor of BILLING_EXECUTOR (the caller sets the environment: BILLING_DATA_DIR, DAGSTER_HOME are
    set here) and the instance of ``instance_yaml``; returns the Dagster instance, the run ids and the
    wall time of the runs."""
    from billing_dags.cli.runs import definitions_of, execute
    from billing_dags.defs.seeds.assets import write_seed_snapshots

    (root / "home").mkdir(parents=True)
    (root / "home" / "dagster.yaml").write_text(instance_yaml)
    os.environ["DAGSTER_HOME"] = str(root / "home")
    paths = _resolve_paths(root / "data", seeds)
    write_seed_snapshots(paths)  # the seeds job's work, without its runs: the same files either way
    defs, instance = definitions_of(paths)
    start = time.perf_counter()
    execute(defs.resolve_job_def("daily_usage"), instance, "days", SIMULATION, partition_range=DAYS)
    execute(defs.resolve_job_def("monthly_invoicing"), instance, "month", MONTH_CONFIG, partition_key=MONTH)
    seconds = time.perf_counter() - start
    return instance, [r.run_id for r in instance.get_runs()], seconds


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


@pytest.mark.acceptance
@pytest.mark.integration
def test_days_and_month_on_two_celery_workers_with_postgres_storage_match_the_in_process_run_byte_for_byte(tmp_path, monkeypatch, small_seeds):
    if not Path(REDIS).exists():
        pytest.skip("redis-server is not installed (apt-get install -y --no-install-recommends redis-server); CI installs it")
    if not POSTGRES_BINDIRS:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install -y postgresql); CI installs them")
    pytest.importorskip("dagster_celery")
    pytest.importorskip("dagster_postgres")
    import psycopg

    from billing_dags.defs.shared.partitions import PARTITIONS_START

    for var in ("PROMETHEUS_URL", "STRIPE_API_KEY", "STRIPE_API_BASE", "BILLING_USAGE_EVENTS_DSN", "BILLING_EXECUTOR", "BILLING_CELERY_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    # every process loads the code location with the same seeds and partitions
    monkeypatch.setenv("BILLING_PARTITIONS_START", PARTITIONS_START[:7])
    monkeypatch.setenv("BILLING_DATA_DIR", str(tmp_path / "celery" / "data"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "celery" / "home"))
    with ExitStack() as stack:
        dsn = stack.enter_context(postgres_server(tmp_path / "pg"))
        # as documented: the instance's settings are env references, resolved by each worker from its own environment
        monkeypatch.setenv("DAGSTER_PG_PORT", dsn.split("port=")[1].split()[0])
        port = stack.enter_context(redis_server(tmp_path))
        broker = f"redis://127.0.0.1:{port}/0"
        env = {**os.environ, "BILLING_EXECUTOR": "celery", "BILLING_CELERY_BROKER": broker}
        env.pop("DAGSTER_HOME")  # a worker opens each run's instance from the reference its task carries
        workers = [stack.enter_context(celery_worker(tmp_path, name, env)) for name in ("w1", "w2")]
        # the embedded default, in a process of its own, while the workers start and run the same days
        baseline_log = (tmp_path / "in_process.log").open("wb")
        stack.callback(baseline_log.close)
        baseline = subprocess.Popen(
            [sys.executable, __file__, str(tmp_path / "in_process"), str(small_seeds)],
            env={k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"},
            stdout=baseline_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        stack.callback(stop, baseline)

        for proc, log in workers:
            wait_for(lambda p=proc, f=log: p.poll() is not None or " ready." in f.read_text(errors="replace"), 300, f"Celery worker {log.stem} ready")
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        monkeypatch.setenv("BILLING_EXECUTOR", "celery")
        monkeypatch.setenv("BILLING_CELERY_BROKER", broker)
        instance, run_ids, celery_s = _run_days_and_month(tmp_path / "celery", small_seeds, POSTGRES_INSTANCE)
        hosts = _celery_hosts_by_step(instance, run_ids)
        steps = {f"{r[:8]}:{e.step_key}" for r in run_ids for e in instance.all_logs(r) if e.dagster_event and e.dagster_event.is_step_success}
        storages = {type(s).__name__ for s in (instance.run_storage, instance.event_log_storage, instance.schedule_storage)}
        with psycopg.connect(dsn) as conn:
            in_pg = {
                r: conn.execute("select count(*) from event_logs where run_id = %s and step_key is not null", (r,)).fetchone()[0]
                for (r,) in conn.execute("select run_id from runs").fetchall()
            }
            schedule_tables = {t for (t,) in conn.execute("select tablename from pg_tables where tablename in ('jobs', 'job_ticks')").fetchall()}
        assert baseline.wait(600) == 0, (tmp_path / "in_process.log").read_text(errors="replace")[-3000:]

    print(f"\ndays {DAYS[0]}..{DAYS[1]} and the month on 2 Celery workers: {celery_s:.1f}s; {(tmp_path / 'in_process.log').read_text().splitlines()[-1]}")
    # every step of both runs ran on a worker, and both workers took steps
    assert steps and set(hosts) == steps, f"steps not run on a worker: {sorted(steps - set(hosts))}"
    assert {h.split("@")[0] for h in hosts.values()} == {"w1", "w2"}, hosts
    # the runs and every step's events (written by the workers) are in PostgreSQL, none in DAGSTER_HOME
    assert storages == {"PostgresRunStorage", "PostgresEventLogStorage", "PostgresScheduleStorage"}, storages
    assert sorted(in_pg) == sorted(run_ids) and all(in_pg.values()), in_pg
    assert schedule_tables == {"jobs", "job_ticks"}
    assert not [p.name for p in (tmp_path / "celery" / "home").rglob("*.db")]

    expected = _published(tmp_path / "in_process" / "data")
    got = _published(tmp_path / "celery" / "data")
    assert any(k.startswith("invoices/2026-02/") for k in expected) and any(k.startswith("models/fct_usage_by_day/day=2026-02-03/") for k in expected)
    assert sorted(got) == sorted(expected)
    differ = [k for k in expected if got[k] != expected[k]]
    assert not differ, f"files that differ from the in-process run: {differ}"


if __name__ == "__main__":
    # the in-process baseline of the test above, as a process of its own: ROOT SEEDS
    root, seeds = Path(sys.argv[1]), Path(sys.argv[2])
    os.environ["BILLING_DATA_DIR"] = str(root / "data")
    _, _, seconds = _run_days_and_month(root, seeds)
    print(f"in process: {seconds:.1f}s")
