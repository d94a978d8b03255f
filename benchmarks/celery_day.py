"""`python -m benchmarks.celery_day`: one day of the daily job in process vs on two Celery workers (by hand).

Starts redis-server on 127.0.0.1 (a free port) and two `billing worker` processes (concurrency 1 each)
over one data folder, then runs one partition of `daily_usage` (every daily asset, one run, as the CLI
launches it) alternately with the default in-process executor and with BILLING_EXECUTOR=celery, each
run in a process of its own and on a day of its own (rep 1: days 1 and 2, rep 2: days 3 and 4 ...).
The seeds' customers (all of them, or the first N) are simulated at the given scrape interval.

Reported per run: wall seconds, CPU seconds of the run's process (in process: all the work) and of
each worker's process group (its main process and the process it forks for steps). The work of a
step is the same either way; the difference is what a step costs as a Celery task.
Needs Debian's `redis-server` and the `celery` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

from benchmarks.proc import cpu_seconds

RUN_ONE_DAY = """
import sys, time
from billing_dags.cli.runs import definitions_of, execute
from billing_dags.core.settings import resolve_paths
from billing_dags.defs.seeds.assets import write_seed_snapshots
data, seeds, day, interval, customers = sys.argv[1:6]
paths = resolve_paths(data, seeds)
write_seed_snapshots(paths)
defs, instance = definitions_of(paths)
sim = {"seed": 7, "interval_s": int(interval), "customers": int(customers) if customers != "all" else None}
start, cpu = time.perf_counter(), time.process_time()
execute(defs.resolve_job_def("daily_usage"), instance, "day", {"resources": {"simulation": {"config": sim}}}, partition_key=day)
print("RESULT", time.perf_counter() - start, time.process_time() - cpu)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def wait_until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def _group_cpu(pid: int) -> float:
    """CPU seconds of the process group led by ``pid`` (a worker and the processes it forked)."""
    pids = [pid] + [int(p) for p in subprocess.run(["pgrep", "-g", str(pid)], capture_output=True, text=True).stdout.split() if int(p) != pid]
    total = 0.0
    for p in pids:
        try:
            total += cpu_seconds(p)
        except (OSError, IndexError, ValueError):
            pass
    return total


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        except ProcessLookupError:
            pass


def measure(root: Path, seeds: Path, reps: int, interval: int, customers: str, first_day: date) -> list[dict]:
    redis_bin = shutil.which("redis-server")
    if not redis_bin:
        raise SystemExit("redis-server is not installed (apt-get install -y --no-install-recommends redis-server)")
    port = free_port()
    broker = f"redis://127.0.0.1:{port}/0"
    start = first_day.replace(day=1) - timedelta(days=1)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "DAGSTER_", "PROMETHEUS_", "STRIPE_"))}
    base_env.update(BILLING_SEEDS_DIR=str(seeds), BILLING_PARTITIONS_START=f"{start:%Y-%m}")
    procs: list[subprocess.Popen] = []
    try:
        redis = subprocess.Popen(
            [redis_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(root)],
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        procs.append(redis)
        wait_until(lambda: redis_ping(port), 30, "redis-server")
        worker_env = {**base_env, "BILLING_EXECUTOR": "celery", "BILLING_CELERY_BROKER": broker, "BILLING_DATA_DIR": str(root / "celery" / "data")}
        workers = []
        for i in (1, 2):
            log = (root / f"worker{i}.log").open("wb")
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "billing_dags.cli", "worker", "--name", f"bench{i}@%h"],
                    env=worker_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        procs.extend(workers)
        wait_until(lambda: all(" ready." in (root / f"worker{i}.log").read_text(errors="replace") for i in (1, 2)), 600, "the workers")
        rows, day = [], first_day
        for _ in range(reps):
            for mode in ("in_process", "celery"):
                env = {**base_env, "DAGSTER_HOME": str(root / mode / "home")}
                (root / mode / "home").mkdir(parents=True, exist_ok=True)
                (root / mode / "home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
                if mode == "celery":
                    env.update(BILLING_EXECUTOR="celery", BILLING_CELERY_BROKER=broker)
                before = [_group_cpu(w.pid) for w in workers]
                r = subprocess.run(
                    [sys.executable, "-c", RUN_ONE_DAY, str(root / mode / "data"), str(seeds), day.isoformat(), str(interval), customers],
                    env=env,
                    capture_output=True,
                    text=True,
                )
                after = [_group_cpu(w.pid) for w in workers]
                result = [line for line in r.stdout.splitlines() if line.startswith("RESULT")]
                if r.returncode or not result:
                    raise SystemExit(f"{mode} run of {day} failed:\n{r.stderr[-3000:]}")
                wall, cpu = (float(x) for x in result[0].split()[1:])
                workers_cpu = [b - a for a, b in zip(before, after)] if mode == "celery" else [0.0, 0.0]
                row = {
                    "executor": mode,
                    "day": day.isoformat(),
                    "wall_s": round(wall, 1),
                    "run_cpu_s": round(cpu, 1),
                    "workers_cpu_s": [round(c, 1) for c in workers_cpu],
                    "cpu_s": round(cpu + sum(workers_cpu), 1),
                    "load_1m": round(os.getloadavg()[0], 1),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
                day += timedelta(days=1)
        return rows
    finally:
        for proc in reversed(procs):
            _stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.celery_day", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2, help="pairs of runs (default 2)")
    ap.add_argument("--interval", type=int, default=60, help="scrape interval in seconds (default 60)")
    ap.add_argument("--customers", default="all", help="the first N customers of the seeds (default all)")
    ap.add_argument("--first-day", default="2026-02-01", help="the first day run (default 2026-02-01)")
    ap.add_argument("--seeds", default=None, help="seeds folder (default the project's)")
    args = ap.parse_args()
    from billing_dags.core.settings import PROJECT_ROOT

    seeds = Path(args.seeds or PROJECT_ROOT / "seeds").resolve()
    with tempfile.TemporaryDirectory(prefix="celery-day-") as tmp:
        rows = measure(Path(tmp), seeds, args.reps, args.interval, args.customers, date.fromisoformat(args.first_day))
    for mode in ("in_process", "celery"):
        mine = [r for r in rows if r["executor"] == mode]
        walls, cpus = [r["wall_s"] for r in mine], [r["cpu_s"] for r in mine]
        print(f"{mode}: wall {min(walls)}-{max(walls)} s, CPU {min(cpus)}-{max(cpus)} s")


if __name__ == "__main__":
    main()
