"""`python -m benchmarks.backfill`: a 30-day backfill one partition at a time vs two at a time (item 7).

Target: a 30-day backfill uses both cores (parallel partitions, no shared DuckDB file lock);
report the speed-up over one at a time.

Workload (cached under <out>/backfill-<N>c-<interval>s-<month>/, ``--out`` default benchmarks/out;
a second run with the same parameters reuses it): a simulated month
(`billing_dags.ingest.simulate.simulate_month`) for N customers (the first 50 from seeds/, more are
generated like benchmarks.monthly's seeds) at the given scrape interval, in the real raw layout.

Measured, each phase in its own process: the 30 (or 31) day partitions of
`int_series_edges_by_day` (independent per day; the Python fast path) computed one after another,
then with a `ProcessPoolExecutor` of --workers processes calling `run_model` per day, then the
same for `fct_usage_by_day` (each day reads the edges of up to 35 earlier days, which all exist by
then, so its days are independent too). The partitions of the parallel run are compared with the
sequential ones byte for byte. Every model run writes its own Parquet partition; no `.duckdb`
file is opened, so there is no lock to share. "Cores busy" is CPU seconds (the phase process and
its workers, counted from the start of the timed section) over wall seconds.

In the product the same backfill is launched from the Dagster UI, one run per partition
(`BackfillPolicy.multi_run(1)`); dagster.yaml's run queue lets at most 2 runs tagged
`dagster/backfill` (and 4 runs in all) be in progress at a time, the "2 at a time" measured here,
and each of those runs gives its partition its share of the cores (`WarehouseResource.threads_for`:
DuckDB's pool and the fast path's readers on 1 thread each on 2 cores) instead of all of them; the
parallel phase here uses the same rule, one at a time uses every core.

`figures()` (for `python -m benchmarks`), item 7: full = 500 customers at 60 s over 2026-10,
quick = 10 customers at 300 s (still 31 day partitions); 2 at a time against one at a time.
The figure holds when every parallel partition is byte-identical to the sequential one AND the
parallel run kept more than 1.5 cores busy on average (of the machine's 2); on a 1-core machine
it is reported without a verdict. In quick mode only the byte-identity is judged (the suite
treats item 7 as a correctness figure that must hold at any size, and 31 tiny partitions are
mostly per-run overhead): differing partitions do not hold, identical ones are reported without
a verdict.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date, timedelta
from pathlib import Path

from benchmarks.figures import DEFAULT_OUT, Figure
from benchmarks.proc import peak_rss_bytes
from billing_dags.core.calendar import month_days
from billing_dags.core.settings import PROJECT_ROOT, resolve_paths

MODELS = ["int_series_edges_by_day", "int_gauge_peaks_by_day", "fct_usage_by_day"]
FULL = {"customers": 500, "interval_s": 60}
QUICK = {"customers": 10, "interval_s": 300}
WORKERS = 2  # partitions at a time: the machine's cores, and dagster.yaml's backfill limit
BUSY_CORES = 1.5  # the parallel run must keep more than this many cores busy on average


def prepare(root: Path, n_customers: int, interval_s: int, month: date, log=print) -> tuple[Path, Path]:
    from billing_dags.defs.seeds.assets import write_seed_snapshots
    from billing_dags.ingest import raw
    from billing_dags.ingest.simulate import simulate_month
    from billing_dags.seeds.catalog import read_seed

    data_dir, seeds_dir = root / "data", root / "seeds"
    marker = root / "ready.json"
    # the series ids in the cached files: a change of raw.series_id's encoding simulates the month again
    key = {"customers": n_customers, "interval_s": interval_s, "month": month.isoformat(), "series_id_of_up": raw.series_id("up", {})}
    if marker.exists() and json.loads(marker.read_text()).get("key") == key:
        return data_dir, seeds_dir
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    if n_customers <= 50:
        shutil.copytree(PROJECT_ROOT / "seeds", seeds_dir)
    else:
        from benchmarks.monthly import write_seeds

        write_seeds(seeds_dir, n_customers, month, 0)
    paths = resolve_paths(data_dir, seeds_dir)
    write_seed_snapshots(paths)
    t0 = time.perf_counter()
    totals = simulate_month(paths, month, read_seed(seeds_dir, "customers"), interval_s=interval_s, n_customers=n_customers)
    log(
        f"workload: simulated {totals['days']} days, {totals['samples']:,} samples, {totals['series']:,} series, "
        f"{totals['bytes'] / 2**20:.0f} MB raw in {time.perf_counter() - t0:.1f}s"
    )
    marker.write_text(json.dumps({"key": key, "totals": totals}))
    return data_dir, seeds_dir


# --------------------------------------------------------------------------- phases (own process)


def _one(args: tuple[str, str, str, str, int | None]) -> tuple[str, float, int, int]:
    from billing_dags.models.sqlmodels import Window, run_model

    data_dir, seeds_dir, model, day, threads = args
    d = date.fromisoformat(day)
    t0 = time.perf_counter()
    r = run_model(resolve_paths(data_dir, seeds_dir), model, Window(d, d + timedelta(days=1)), threads=threads)
    return day, time.perf_counter() - t0, r.rows, peak_rss_bytes()


def phase(data_dir: str, seeds_dir: str, model: str, month: date, workers: int) -> dict:
    import resource

    # imported before the pool forks, so that the workers do not each pay for importing duckdb, pyarrow, sqlglot
    import billing_dags.models.fastpath
    import billing_dags.models.sqlmodels  # noqa: F401

    def cpu_s() -> float:
        return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))

    from billing_dags.defs.shared.resources import WarehouseResource

    # the threads a partition gets in the product: all cores alone, its share in a backfill run
    threads = WarehouseResource(backfill_parallel=workers).threads_for({"dagster/backfill": "benchmark"} if workers > 1 else {})
    days = [d.isoformat() for d in month_days(month)]
    jobs = [(data_dir, seeds_dir, model, d, threads) for d in days]
    cpu0 = cpu_s()  # not the imports above
    t0 = time.perf_counter()
    if workers == 1:
        results = [_one(j) for j in jobs]
    else:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_one, jobs))
    wall = time.perf_counter() - t0
    return {
        "model": model,
        "workers": workers,
        "seconds": wall,
        "partitions": len(results),
        "rows": sum(r[2] for r in results),
        "sum_partition_s": sum(r[1] for r in results),
        "cpu_s": cpu_s() - cpu0,  # the pool's workers are joined (and so counted) when it shuts down
        "peak_rss_bytes": max([peak_rss_bytes()] + [r[3] for r in results]),
    }


def run_phase(paths, model: str, month: date, workers: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.backfill",
            "--phase",
            str(paths.data_dir),
            str(paths.seeds_dir),
            model,
            str(workers),
            "--month",
            month.strftime("%Y-%m"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=paths.data_dir.parent,  # the workload's folder, not the repository
    )
    if proc.returncode:
        raise SystemExit(f"backfill phase {model} x{workers} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def digests(paths, model: str) -> dict[str, str]:
    base = paths.models / model
    return {str(f.relative_to(base)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(base.rglob("data.parquet"))}


# --------------------------------------------------------------------------- measurement, table, figure


def measure(out: Path, n_customers: int, interval_s: int, month: date, workers: int = WORKERS, log=print) -> dict:
    """Prepare (or reuse) the workload under ``out``, run each model one at a time then ``workers`` at a time."""
    root = Path(out).resolve() / f"backfill-{n_customers}c-{interval_s}s-{month.strftime('%Y-%m')}"
    data_dir, seeds_dir = prepare(root, n_customers, interval_s, month, log=log)
    paths = resolve_paths(data_dir, seeds_dir)
    n_days = len(month_days(month))
    models = []
    for model in MODELS:
        # one at a time first (usage needs every day's edges, which the sequential edges run leaves behind)
        shutil.rmtree(paths.models / model, ignore_errors=True)
        log(f"  {model}: {n_days} partitions one at a time ...")
        seq = run_phase(paths, model, month, 1)
        ref = digests(paths, model)
        shutil.rmtree(paths.models / model, ignore_errors=True)
        log(f"  {model}: {workers} at a time ...")
        par = run_phase(paths, model, month, workers)
        got = digests(paths, model)
        models.append({"model": model, "seq": seq, "par": par, "identical": got == ref and len(ref) == n_days})
    seq_s, par_s = sum(m["seq"]["seconds"] for m in models), sum(m["par"]["seconds"] for m in models)
    return {
        "customers": n_customers,
        "interval_s": interval_s,
        "month": month.strftime("%Y-%m"),
        "days": n_days,
        "workers": workers,
        "cores": os.cpu_count() or 1,
        "totals": json.loads((root / "ready.json").read_text())["totals"],
        "models": models,
        "seq_s": seq_s,
        "par_s": par_s,
        "seq_busy": sum(m["seq"]["cpu_s"] for m in models) / seq_s,
        "par_busy": sum(m["par"]["cpu_s"] for m in models) / par_s,
        "identical": all(m["identical"] for m in models),
    }


def report(m: dict, console) -> None:
    """The detailed table of ``python -m benchmarks.backfill``."""
    from rich.table import Table

    info, w = m["totals"], m["workers"]
    t = Table(
        title=f"{m['days']}-day backfill of {m['month']}: {m['customers']} customers, {info['series']:,} series, "
        f"{info['samples']:,} samples at {m['interval_s']} s; {m['cores']} cores"
    )
    for col in ("model", "one at a time (s)", f"{w} at a time (s)", "speed-up", "CPU s (1 / par)", "peak RSS per process (MB, 1 / par)", "byte-identical"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in m["models"]:
        seq, par = r["seq"], r["par"]
        t.add_row(
            r["model"],
            f"{seq['seconds']:.1f}",
            f"{par['seconds']:.1f}",
            f"{seq['seconds'] / par['seconds']:.2f}x",
            f"{seq['cpu_s']:.0f} / {par['cpu_s']:.0f}",
            f"{seq['peak_rss_bytes'] / 2**20:.0f} / {par['peak_rss_bytes'] / 2**20:.0f}",
            "yes" if r["identical"] else "NO",
        )
    t.add_row("both", f"{m['seq_s']:.1f}", f"{m['par_s']:.1f}", f"{m['seq_s'] / m['par_s']:.2f}x", "", "", "")
    console.print(t)
    console.print(f"CPU use: one at a time {m['seq_busy']:.2f} cores busy on average, {w} at a time {m['par_busy']:.2f}")


def figure(m: dict, quick: bool) -> Figure:
    """Item 7. ``met``: all parallel partitions byte-identical to the sequential ones and more than 1.5 cores
    busy on average in the parallel run; None on a 1-core machine. Quick: False if the partitions differ, else None."""
    info = m["totals"]
    if not m["identical"]:
        met = False
    elif quick or m["cores"] < 2:
        met = None
    else:
        met = m["par_busy"] > BUSY_CORES
    return Figure(
        item=7,
        figure=(
            f"{m['days']}-day backfill of the daily models ({m['customers']:,} customers, {info['series']:,} series, "
            f"{info['samples']:,} samples at {m['interval_s']} s), {m['workers']} partitions at a time vs one at a time"
            + (", quick size (judged: byte-identical only)" if quick else "")
        ),
        ours=f"{m['par_s']:.1f} s, {m['par_busy']:.2f} cores busy" + ("" if m["identical"] else ", partitions DIFFER"),
        reference=f"{m['seq_s']:.1f} s one at a time ({m['seq_busy']:.2f} cores busy)",
        ratio=f"{m['seq_s'] / m['par_s']:.2f}x",
        target="uses both cores; speed-up reported",
        met=met,
    )


def figures(quick: bool, out: Path, console) -> list[Figure]:
    size = QUICK if quick else FULL
    m = measure(out, size["customers"], size["interval_s"], date(2026, 10, 1), log=console.print)
    return [figure(m, quick)]


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.backfill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--customers", type=int, default=FULL["customers"], help="customers simulated (default 500)")
    ap.add_argument("--interval", type=int, default=FULL["interval_s"], help="scrape interval in seconds (default 60)")
    ap.add_argument("--month", default="2026-10", help="YYYY-MM (default 2026-10)")
    ap.add_argument("--workers", type=int, default=WORKERS, help="parallel partitions (default 2: the machine's cores)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR", help="folder for the cached workload (default benchmarks/out)")
    ap.add_argument("--phase", nargs=4, metavar=("DATA", "SEEDS", "MODEL", "WORKERS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    month = date.fromisoformat(args.month + "-01")
    if args.phase:
        data, seeds, model, workers = args.phase
        print(json.dumps(phase(data, seeds, model, month, int(workers))))
        return

    from rich.console import Console

    console = Console(width=130)
    m = measure(args.out, args.customers, args.interval, month, args.workers, log=console.print)
    report(m, console)
    if not m["identical"]:
        raise SystemExit("parallel partitions differ from the sequential ones")


if __name__ == "__main__":
    main()
