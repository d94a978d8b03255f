"""`python -m benchmarks.scale_day`: a day 10x the standard one on 1 and on 2 Celery workers, against the
embedded run of the same day (by hand; `--quick` is the smoke size tests/test_benchmarks.py runs).

Workloads (benchmarks/workload.py, cached under ``--out``): the big day (default 200,000 series at 15 s,
1.15 billion samples) and the standard day (20,000 series), both in the real raw layout; the day before
holds each series' last sample, and its edges and gauge peaks are computed once, untimed, as a day's
run finds them.

What runs: the daily models of the day (``int_series_edges_by_day``, ``int_gauge_peaks_by_day``,
``fct_usage_by_day``, with their checks) as a run of the ``daily_usage`` job, as the CLI launches it,
each run in a process of its own:

- ``bare``: the three models called directly (``run_model``), no Dagster: the work itself;
- ``in_process``: the embedded default (BILLING_EXECUTOR unset), a fresh SQLite instance;
- ``celery_1`` / ``celery_2``: BILLING_EXECUTOR=celery on 1, then 2 ``billing worker`` processes
  (concurrency 1 each, Redis on 127.0.0.1 on a free port).

With ``--shards N`` (the code location's BILLING_SHARDS) the day is N (day, shard) partitions, one run
each, launched at once, so 2 workers can split the day; without shards it is one partition and only
the edges and the gauge peaks (which do not depend on each other) can run on two workers at once.

Each mode runs the standard day, then the big day; ``--reps`` rounds of all modes, alternately, so a
busy neighbour slows all of them alike. Reported per run: wall seconds, CPU seconds of the run's
process and of each worker's process group, samples per second (of wall) per worker, the workers'
peak memory (the largest PSS of a worker's process tree, sampled every 0.2 s, and the largest single
process's VmHWM), and the cost per sample (CPU ns) of the big day against the standard day's in the
same mode. The daily models' output files are hashed after every run: every mode must publish the
same bytes. Needs Debian's `redis-server` and the `celery` extra.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

from benchmarks import workload
from benchmarks.celery_day import free_port, redis_ping, wait_until
from benchmarks.figures import DEFAULT_OUT
from benchmarks.proc import cpu_seconds
from billing_dags.core.settings import PROJECT_ROOT

STANDARD_SERIES = 20_000
BIG_SERIES = 200_000
QUICK_STANDARD, QUICK_BIG = 200, 2_000
MODELS = ("int_series_edges_by_day", "int_gauge_peaks_by_day", "fct_usage_by_day")
MODES = ("bare", "in_process", "celery_1", "celery_2")
#: targets: a worker's peak memory, and the big day's cost per sample against the standard day's
PEAK_MB_MAX, COST_RATIO_MAX = 1024, 1.25
MB = 2**20

#: one run of the day's models, in a process of its own: DATA SEEDS DAY MODE [PARTITION_KEY ...]
RUN = """
import json, sys, time
from pathlib import Path
from benchmarks.scale_day import MODELS as models
from billing_dags.core.settings import resolve_paths
data, seeds, day, mode, keys = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
paths = resolve_paths(data, seeds)
shards = getattr(paths, "shards", 1)
from datetime import date, timedelta
from benchmarks.scale_day import day_windows
from billing_dags.models.sqlmodels import load_project, run_model
project = load_project()
if mode in ("bare", "in_process"):
    # untimed, as a long-lived worker has it: the fast path's compiled kernels load (about 2 s of CPU
    # once per process), on the day before (its files come out the same)
    for m in models[:2]:
        run_model(paths, m, day_windows(paths, date.fromisoformat(day) - timedelta(days=1))[0], project=project)
if mode == "bare":
    windows = day_windows(paths, date.fromisoformat(day))
    start, cpu = time.perf_counter(), time.process_time()
    for window in windows:
        for m in models:
            run_model(paths, m, window, project=project)
else:
    import dagster as dg
    from billing_dags.cli.runs import definitions_of, execute
    defs, instance = definitions_of(paths)
    job = defs.resolve_job_def("daily_shards" if shards > 1 else "daily_usage")
    selection = [dg.AssetKey(m) for m in models]
    start, cpu = time.perf_counter(), time.process_time()
    for key in keys:
        execute(job, instance, key, partition_key=key, asset_selection=selection)
wall, cpu = time.perf_counter() - start, time.process_time() - cpu
hwm = next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
print("RESULT " + json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_rss_bytes": hwm}))
"""


# --------------------------------------------------------------------------- processes


def _group(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kb(pid: int) -> int:
    """Proportional set size: a page shared by a worker and the pool process it forked counts half in each."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Worker:
    """A `billing worker` process group; ``cpu()`` its CPU seconds so far; a sampler thread records the
    largest PSS of the whole tree and the largest VmHWM of any of its processes while ``watch`` is set."""

    def __init__(self, name: str, env: dict, root: Path):
        self.name, self.log, self.data_dir = name, root / f"{name}.log", env["BILLING_DATA_DIR"]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "billing_dags.cli", "worker", "--concurrency", "1", "--name", f"{name}@%h"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.peak_pss_kb = self.peak_hwm_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise SystemExit(f"worker {self.name} exited:\n{self.log.read_text(errors='replace')[-3000:]}")
        return " ready." in self.log.read_text(errors="replace")

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            pids = _group(self.proc.pid)
            self.peak_pss_kb = max(self.peak_pss_kb, sum(_pss_kb(p) for p in pids))
            self.peak_hwm_kb = max([self.peak_hwm_kb, *(_status_kb(p, "VmHWM") for p in pids)])

    def reset_peaks(self) -> None:
        """Peaks from now on (VmHWM cannot be reset: a process keeps its own; report the largest seen)."""
        self.peak_pss_kb = 0

    def cpu(self) -> float:
        total = 0.0
        for p in _group(self.proc.pid):
            try:
                total += cpu_seconds(p)
            except (OSError, IndexError, ValueError):
                pass
        return total

    def stop(self) -> None:
        self._stop.set()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass


# --------------------------------------------------------------------------- measuring


def _outputs(data_dir: Path, day: str) -> str:
    """One digest of the day's model files (every shard's), to compare the modes."""
    h = hashlib.sha256()
    for m in MODELS:
        for f in sorted((data_dir / "models" / m).rglob("*.parquet")):
            if f"day={day}" in str(f):
                h.update(str(f.relative_to(data_dir)).encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def day_windows(paths, day) -> list:
    """The model windows of one day: the day, or each of its shards when the layout is sharded."""
    from billing_dags.models.sqlmodels import Window

    if getattr(paths, "shards", 1) > 1:
        from billing_dags.core.shards import all_shards

        return [Window(day, day + timedelta(days=1), s) for s in all_shards(paths.shards)]
    return [Window(day, day + timedelta(days=1))]


def _partition_keys(day: str, shards: int) -> list[str]:
    """The partitions of one day: the day, or with shards its (day, shard) partitions of ``daily_shards``
    (one run each, so that workers can take different shards of the day at once)."""
    if shards <= 1:
        return [day]
    try:
        from billing_dags.core.shards import shard_keys
        from billing_dags.defs.shared.partitions import day_shard_key
    except ImportError:
        raise SystemExit(f"--shards {shards}: this tree has no customer shards (BILLING_SHARDS)") from None
    return [day_shard_key(day, k) for k in shard_keys(shards)]


def sharded(paths, shards: int, log=print):
    """The workload ``paths`` in the layout of ``shards`` shards by customer: each source's files of the
    day and of the day before written again through ``raw.write_day`` with BILLING_SHARDS set (cached
    beside the workload)."""
    import pyarrow.parquet as pq

    from billing_dags.core.settings import resolve_paths
    from billing_dags.defs.seeds.assets import write_seed_snapshots
    from billing_dags.ingest import raw

    root = paths.data_dir.parent.with_name(f"{paths.data_dir.parent.name}-shards{shards}")
    stamp = root / "sharded.json"
    previous = os.environ.get("BILLING_SHARDS")
    os.environ["BILLING_SHARDS"] = str(shards)
    try:
        sub = resolve_paths(root / "data", paths.seeds_dir)
    finally:
        if previous is None:
            os.environ.pop("BILLING_SHARDS")
        else:
            os.environ["BILLING_SHARDS"] = previous
    if getattr(sub, "shards", 1) != shards:
        raise SystemExit(f"--shards {shards}: this tree has no customer shards (BILLING_SHARDS)")
    if stamp.exists():
        return sub
    shutil.rmtree(root, ignore_errors=True)
    write_seed_snapshots(sub)
    t0 = time.perf_counter()
    for d in (workload.DAY - timedelta(days=1), workload.DAY):
        for f in sorted((paths.raw_samples / f"date={d.isoformat()}").glob("*.parquet")):
            series = pq.read_table(paths.raw_series / f"date={d.isoformat()}" / f.name)
            raw.write_day(sub, d, pq.read_table(f), series, f.stem.removeprefix("part-"))
        log(f"  sharded {d} into {shards} shards ({time.perf_counter() - t0:.0f}s)")
    stamp.write_text(json.dumps({"shards": shards}))
    return sub


def _run(mode: str, workload_paths, day: str, keys: list[str], env: dict, root: Path) -> dict:
    home = Path(tempfile.mkdtemp(prefix=f"home-{mode}-", dir=root))
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    run_env = {**env, "DAGSTER_HOME": str(home)}
    if not mode.startswith("celery"):
        run_env.pop("BILLING_EXECUTOR", None)
        run_env.pop("BILLING_CELERY_BROKER", None)
    argv = [sys.executable, "-c", RUN, str(workload_paths.data_dir), str(workload_paths.seeds_dir), day, mode]
    if len(keys) > 1 and mode != "bare":  # one run per (day, shard), launched at once
        from dagster import DagsterInstance

        with DagsterInstance.from_config(str(home)):  # its storage first: two processes creating it race on its schema
            pass
        procs = [subprocess.Popen([*argv, k], env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in keys]
        outs = [(p, *p.communicate()) for p in procs]
    else:
        p = subprocess.Popen([*argv, *keys], env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        outs = [(p, *p.communicate())]
    results = []
    for p, out, err in outs:
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if p.returncode or not lines:
            raise SystemExit(f"{mode} run of {day} failed:\n{err[-4000:]}")
        results.append(json.loads(lines[0][7:]))
    shutil.rmtree(home, ignore_errors=True)
    return {
        "wall_s": max(r["wall_s"] for r in results),
        "run_cpu_s": sum(r["cpu_s"] for r in results),
        "run_peak_rss_bytes": max(r["peak_rss_bytes"] for r in results),
    }


def measure(
    big: int,
    standard: int,
    reps: int = 1,
    shards: int = 1,
    modes: tuple[str, ...] = MODES,
    out: Path = DEFAULT_OUT,
    log=print,
) -> dict:
    redis_bin = shutil.which("redis-server")
    if not redis_bin and any(m.startswith("celery") for m in modes):
        raise SystemExit("redis-server is not installed (apt-get install -y --no-install-recommends redis-server)")
    days = {}
    for label, n in (("standard", standard), ("big", big)):
        paths = workload.standard(n, 15, log=log, out=out)
        if shards > 1:
            paths = sharded(paths, shards, log)
        prev = workload.DAY - timedelta(days=1)
        from billing_dags.models.sqlmodels import run_model

        for window in day_windows(paths, prev):  # the day before's edges and gauge peaks, which the day's usage reads
            for m in MODELS[:2]:
                run_model(paths, m, window)
        import pyarrow.parquet as pq

        files = sorted((paths.raw_samples / f"date={workload.DAY.isoformat()}").rglob("*.parquet"))
        samples = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        days[label] = {"paths": paths, "series": n, "samples": samples, "raw_bytes": sum(f.stat().st_size for f in files)}
        log(f"{label} day: {n:,} series, {samples:,} samples, {days[label]['raw_bytes'] / samples:.2f} B/sample raw")
    day = workload.DAY.isoformat()
    root = Path(tempfile.mkdtemp(prefix="scale-day-", dir=out))
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "DAGSTER_", "PROMETHEUS_", "STRIPE_"))}
    base_env.update(
        PYTHONPATH=os.pathsep.join([str(PROJECT_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        BILLING_SEEDS_DIR=str(PROJECT_ROOT / "seeds"),
        BILLING_PARTITIONS_START=f"{workload.DAY.replace(day=1) - timedelta(days=1):%Y-%m}",
    )
    if shards > 1:
        base_env["BILLING_SHARDS"] = str(shards)
        os.environ.update(BILLING_SHARDS=str(shards), BILLING_PARTITIONS_START=base_env["BILLING_PARTITIONS_START"])
    keys = _partition_keys(day, shards)
    rows: list[dict] = []
    workers: list[Worker] = []
    redis = None
    try:
        port = free_port()
        broker = f"redis://127.0.0.1:{port}/0"
        if redis_bin:
            redis = subprocess.Popen(
                [redis_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(root)],
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
            wait_until(lambda: redis_ping(port), 30, "redis-server")
        # untimed: the fast path's kernels compile (or load from their cache) once, the page cache warms
        _run("bare", days["standard"]["paths"], day, keys, {**base_env, "BILLING_DATA_DIR": str(days["standard"]["paths"].data_dir)}, root)
        for rep in range(reps):
            for label in ("standard", "big"):
                paths = days[label]["paths"]
                for mode in modes:
                    n_workers = int(mode.split("_")[1]) if mode.startswith("celery") else 0
                    env = {**base_env, "BILLING_DATA_DIR": str(paths.data_dir)}
                    if n_workers:
                        env.update(BILLING_EXECUTOR="celery", BILLING_CELERY_BROKER=broker)
                    # a worker loads the code location of one data folder: others go, missing ones start
                    keep = [w for w in workers if w.data_dir == str(paths.data_dir)][:n_workers]
                    for w in workers:
                        if w not in keep:
                            w.stop()
                    workers[:] = keep
                    if n_workers:
                        while len(workers) < n_workers:
                            workers.append(Worker(f"w{len(workers) + 1}-{label}-{rep + 1}", env, root))
                        t0 = time.perf_counter()
                        for w in workers:
                            wait_until(w.ready, 900, f"worker {w.name}")
                        log(f"  {n_workers} worker(s) ready in {time.perf_counter() - t0:.0f}s")
                        for w in workers:
                            w.reset_peaks()
                    before = [w.cpu() for w in workers]
                    r = _run(mode, paths, day, keys, env, root)
                    after = [w.cpu() for w in workers]
                    workers_cpu = [b - a for a, b in zip(before, after)]
                    samples = days[label]["samples"]
                    cpu = r["run_cpu_s"] + sum(workers_cpu)
                    row = {
                        "rep": rep + 1,
                        "mode": mode,
                        "day": label,
                        "series": days[label]["series"],
                        "samples": samples,
                        "wall_s": round(r["wall_s"], 2),
                        "run_cpu_s": round(r["run_cpu_s"], 2),
                        "workers_cpu_s": [round(c, 2) for c in workers_cpu],
                        "cpu_s": round(cpu, 2),
                        "cpu_ns_per_sample": round(cpu / samples * 1e9, 2),
                        "samples_per_s_per_worker": round(samples / r["wall_s"] / max(1, n_workers)),
                        "worker_peak_pss_mb": [round(w.peak_pss_kb / 1024) for w in workers],
                        "worker_peak_hwm_mb": [round(w.peak_hwm_kb / 1024) for w in workers],
                        "run_peak_rss_mb": round(r["run_peak_rss_bytes"] / MB),
                        "outputs": _outputs(paths.data_dir, day),
                        "load_1m": round(os.getloadavg()[0], 1),
                    }
                    rows.append(row)
                    log(json.dumps(row))
    finally:
        for w in workers:
            w.stop()
        if redis is not None:
            os.killpg(redis.pid, signal.SIGTERM)
            redis.wait(30)
        shutil.rmtree(root, ignore_errors=True)
    for v in days.values():  # what the day's models add to the warehouse, next to its raw samples
        v["model_bytes"] = {m: sum(f.stat().st_size for f in (v["paths"].data_dir / "models" / m).rglob("*.parquet") if f"day={day}" in str(f)) for m in MODELS}
    return {
        "days": {k: {kk: vv for kk, vv in v.items() if kk != "paths"} for k, v in days.items()},
        "shards": shards,
        "rows": rows,
        "summary": summarize(rows),
    }


def summarize(rows: list[dict]) -> dict:
    """Per mode, the best (least CPU) run of each day; the big day's cost per sample over the standard
    day's; each mode's CPU and wall against the embedded run's of the same day and round."""
    out: dict = {}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        best = {d: min((r for r in rows if r["mode"] == mode and r["day"] == d), key=lambda r: r["cpu_s"]) for d in ("standard", "big")}
        big, std = best["big"], best["standard"]
        out[mode] = {
            "big_wall_s": big["wall_s"],
            "big_cpu_s": big["cpu_s"],
            "samples_per_s_per_worker": big["samples_per_s_per_worker"],
            "worker_peak_pss_mb": max(big["worker_peak_pss_mb"], default=None),
            "worker_peak_hwm_mb": max(big["worker_peak_hwm_mb"], default=None),
            "run_peak_rss_mb": big["run_peak_rss_mb"],
            "cost_ratio_big_vs_standard": round(big["cpu_ns_per_sample"] / std["cpu_ns_per_sample"], 3),
            "wall_ratio_big_vs_standard": round((big["wall_s"] / big["samples"]) / (std["wall_s"] / std["samples"]), 3),
        }
    if "in_process" in out:
        for mode, s in out.items():
            pairs = [
                (r, e) for r in rows for e in rows if r["mode"] == mode and e["mode"] == "in_process" and r["rep"] == e["rep"] and r["day"] == e["day"] == "big"
            ]
            s["cpu_vs_in_process"] = [round(r["cpu_s"] / e["cpu_s"], 2) for r, e in pairs]
            s["wall_vs_in_process"] = [round(r["wall_s"] / e["wall_s"], 2) for r, e in pairs]
    out["identical_outputs"] = {d: len({r["outputs"] for r in rows if r["day"] == d}) == 1 for d in ("standard", "big")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scale_day", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"smoke size: {QUICK_BIG:,} series against {QUICK_STANDARD:,}")
    ap.add_argument("--series", type=int, default=None, help=f"series of the big day (default {BIG_SERIES:,})")
    ap.add_argument("--standard-series", type=int, default=None, help=f"series of the standard day (default {STANDARD_SERIES:,})")
    ap.add_argument("--reps", type=int, default=1, help="rounds of all modes (default 1)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"some of {','.join(MODES)}")
    ap.add_argument("--shards", type=int, default=1, help="BILLING_SHARDS of the code location (default 1: no shards)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="workloads and scratch (default benchmarks/out)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures there")
    args = ap.parse_args()
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if unknown := sorted(set(modes) - set(MODES)):
        ap.error(f"--modes: {', '.join(unknown)} not among {', '.join(MODES)}")
    big = args.series or (QUICK_BIG if args.quick else BIG_SERIES)
    standard = args.standard_series or (QUICK_STANDARD if args.quick else STANDARD_SERIES)
    args.out.mkdir(parents=True, exist_ok=True)
    result = measure(big, standard, args.reps, args.shards, modes, args.out)
    result["load_1m_at_end"] = round(os.getloadavg()[0], 1)
    print(json.dumps(result["summary"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if not all(result["summary"]["identical_outputs"].values()):
        raise SystemExit("the modes published different model files")


if __name__ == "__main__":
    main()
