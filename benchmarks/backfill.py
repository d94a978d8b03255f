"""`python -m benchmarks.backfill`: a 30-day backfill one partition at a time vs two at a time (issue 7, item 7).

Target: a 30-day backfill uses both cores (parallel partitions, no shared DuckDB file lock);
report the speed-up over one at a time.

Workload (cached under benchmarks/out/backfill-<N>c-<interval>s-<month>/): a simulated month
(`billing_dags.simulate.simulate_month`) for N customers (the first 50 from seeds/, more are
generated like benchmarks.monthly's seeds) at the given scrape interval, in the real raw layout.

Measured, each phase in its own process: the 30 (or 31) day partitions of
`fct_series_edges_by_day` (independent per day; the Python fast path) computed one after another,
then with a `ProcessPoolExecutor` of --workers processes calling `run_model` per day, then the
same for `fct_usage_by_day` (each day reads the edges of up to 35 earlier days, which all exist by
then, so its days are independent too). The partitions of the parallel run are compared with the
sequential ones byte for byte. Every model run writes its own Parquet partition; no `.duckdb`
file is opened, so there is no lock to share.
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

from billing_dags.settings import PROJECT_ROOT, resolve_paths

OUT = PROJECT_ROOT / "benchmarks" / "out"
MODELS = ["fct_series_edges_by_day", "fct_usage_by_day"]


def _days(month: date) -> list[date]:
    end = (month + timedelta(days=32)).replace(day=1)
    return [month + timedelta(days=i) for i in range((end - month).days)]


def prepare(root: Path, n_customers: int, interval_s: int, month: date, log=print) -> tuple[Path, Path]:
    from billing_dags.defs.seeds.assets import write_seed_snapshots
    from billing_dags.seeds import read_seed
    from billing_dags.simulate import simulate_month

    data_dir, seeds_dir = root / "data", root / "seeds"
    marker = root / "ready.json"
    key = {"customers": n_customers, "interval_s": interval_s, "month": month.isoformat()}
    if marker.exists() and json.loads(marker.read_text()).get("key") == key:
        return data_dir, seeds_dir
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    if n_customers <= 50:
        shutil.copytree(PROJECT_ROOT / "seeds", seeds_dir)
    else:
        from .monthly import write_seeds

        write_seeds(seeds_dir, n_customers, month, 0)
    paths = resolve_paths(data_dir, seeds_dir)
    write_seed_snapshots(paths)
    t0 = time.perf_counter()
    totals = simulate_month(paths, month, read_seed(seeds_dir, "customers"), interval_s=interval_s, n_customers=n_customers)
    log(f"workload: simulated {totals['days']} days, {totals['samples']:,} samples, {totals['series']:,} series, "
        f"{totals['bytes'] / 2**20:.0f} MB raw in {time.perf_counter() - t0:.1f}s")
    marker.write_text(json.dumps({"key": key, "totals": totals}))
    return data_dir, seeds_dir


# --------------------------------------------------------------------------- phases (own process)


def _hwm_bytes() -> int:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it is not inherited from the parent across fork/exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _one(args: tuple[str, str, str, str]) -> tuple[str, float, int, int]:
    from billing_dags.sqlmodels import Window, run_model

    data_dir, seeds_dir, model, day = args
    d = date.fromisoformat(day)
    t0 = time.perf_counter()
    r = run_model(resolve_paths(data_dir, seeds_dir), model, Window(d, d + timedelta(days=1)))
    return day, time.perf_counter() - t0, r.rows, _hwm_bytes()


def phase(data_dir: str, seeds_dir: str, model: str, month: date, workers: int) -> dict:
    import resource

    # imported before the pool forks, so that the workers do not each pay for importing duckdb, pyarrow, sqlglot
    import billing_dags.fastpath  # noqa: F401
    import billing_dags.sqlmodels  # noqa: F401

    days = [d.isoformat() for d in _days(month)]
    jobs = [(data_dir, seeds_dir, model, d) for d in days]
    t0 = time.perf_counter()
    if workers == 1:
        results = [_one(j) for j in jobs]
    else:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_one, jobs))
    wall = time.perf_counter() - t0
    cpu = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "model": model, "workers": workers, "seconds": wall, "partitions": len(results), "rows": sum(r[2] for r in results),
        "sum_partition_s": sum(r[1] for r in results),
        "cpu_s": sum(u.ru_utime + u.ru_stime for u in cpu),
        "peak_rss_bytes": max([_hwm_bytes()] + [r[3] for r in results]),
    }


def run_phase(paths, model: str, month: date, workers: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.backfill", "--phase", str(paths.data_dir), str(paths.seeds_dir), model, str(workers),
         "--month", month.strftime("%Y-%m")],
        capture_output=True, text=True, env=env, cwd=PROJECT_ROOT,
    )
    if proc.returncode:
        raise SystemExit(f"backfill phase {model} x{workers} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def digests(paths, model: str) -> dict[str, str]:
    base = paths.models / model
    return {str(f.relative_to(base)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(base.rglob("data.parquet"))}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.backfill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--customers", type=int, default=500, help="customers simulated (default 500)")
    ap.add_argument("--interval", type=int, default=60, help="scrape interval in seconds (default 60)")
    ap.add_argument("--month", default="2026-10", help="YYYY-MM (default 2026-10)")
    ap.add_argument("--workers", type=int, default=2, help="parallel partitions (default 2: the machine's cores)")
    ap.add_argument("--phase", nargs=4, metavar=("DATA", "SEEDS", "MODEL", "WORKERS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    month = date.fromisoformat(args.month + "-01")
    if args.phase:
        data, seeds, model, workers = args.phase
        print(json.dumps(phase(data, seeds, model, month, int(workers))))
        return

    from rich.console import Console
    from rich.table import Table

    console = Console(width=130)
    root = OUT / f"backfill-{args.customers}c-{args.interval}s-{args.month}"
    data_dir, seeds_dir = prepare(root, args.customers, args.interval, month, log=console.print)
    paths = resolve_paths(data_dir, seeds_dir)
    info = json.loads((root / "ready.json").read_text())["totals"]
    rows, identical = [], {}
    for model in MODELS:
        # one at a time first (usage needs every day's edges, which the sequential edges run leaves behind)
        shutil.rmtree(paths.models / model, ignore_errors=True)
        console.print(f"  {model}: {len(_days(month))} partitions one at a time ...")
        seq = run_phase(paths, model, month, 1)
        ref = digests(paths, model)
        shutil.rmtree(paths.models / model, ignore_errors=True)
        console.print(f"  {model}: {args.workers} at a time ...")
        par = run_phase(paths, model, month, args.workers)
        got = digests(paths, model)
        identical[model] = got == ref and len(ref) == len(_days(month))
        rows.append((model, seq, par))
    t = Table(title=f"{len(_days(month))}-day backfill of {args.month}: {args.customers} customers, {info['series']:,} series, "
                    f"{info['samples']:,} samples at {args.interval} s; {os.cpu_count()} cores")
    for col in ("model", "one at a time (s)", f"{args.workers} at a time (s)", "speed-up", "CPU s (1 / par)", "peak RSS per process (MB, 1 / par)", "byte-identical"):
        t.add_column(col, justify="left" if col == "model" else "right")
    tot_seq = tot_par = 0.0
    for model, seq, par in rows:
        tot_seq += seq["seconds"]
        tot_par += par["seconds"]
        t.add_row(model, f"{seq['seconds']:.1f}", f"{par['seconds']:.1f}", f"{seq['seconds'] / par['seconds']:.2f}x",
                  f"{seq['cpu_s']:.0f} / {par['cpu_s']:.0f}", f"{seq['peak_rss_bytes'] / 2**20:.0f} / {par['peak_rss_bytes'] / 2**20:.0f}",
                  "yes" if identical[model] else "NO")
    t.add_row("both", f"{tot_seq:.1f}", f"{tot_par:.1f}", f"{tot_seq / tot_par:.2f}x", "", "", "")
    console.print(t)
    console.print(f"CPU use: one at a time {sum(s['cpu_s'] for _, s, _ in rows) / tot_seq:.2f} cores busy on average, "
                  f"{args.workers} at a time {sum(p['cpu_s'] for _, _, p in rows) / tot_par:.2f}")
    if not all(identical.values()):
        raise SystemExit("parallel partitions differ from the sequential ones")


if __name__ == "__main__":
    main()
