"""`python -m benchmarks`: the daily models against a plain DuckDB scan of the same Parquet.

Ratios are measured side by side in one run (the machine is shared and noisy): each step is
run --repeat times and the best wall time is kept. Peak memory is the process's max RSS.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

from rich.console import Console
from rich.table import Table

from billing_dags import raw, simulate
from billing_dags.defs.seeds.assets import write_seed_snapshots
from billing_dags.settings import PROJECT_ROOT, resolve_paths
from billing_dags.sqlmodels import Window, connect, load_project, run_model


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--interval", type=int, default=15, help="scrape interval in seconds (default 15)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", help="keep the generated data in this folder")
    args = parser.parse_args()
    console = Console()
    root = Path(args.keep or tempfile.mkdtemp(prefix="billing-bench-"))
    paths = resolve_paths(root / "data", PROJECT_ROOT / "seeds")
    write_seed_snapshots(paths)
    from billing_dags.seeds import read_seed

    customers = read_seed(paths.seeds_dir, "customers")
    day = date(2026, 10, 15)
    prev = date(2026, 10, 14)
    t0 = time.perf_counter()
    for d in (prev, day):
        figures = simulate.write_simulated_day(paths, d, customers, interval_s=args.interval)
    sim_s = time.perf_counter() - t0
    files = [str(f) for f in raw.sample_files(paths, day)]
    project = load_project()
    run_model(paths, "fct_series_edges_by_day", Window(prev, day), project=project)
    window = Window(day, date(2026, 10, 16))

    def scan_one() -> None:
        con = connect()
        con.execute("select sum(value) from read_parquet($f)", {"f": files}).fetchall()
        con.close()

    def scan_three() -> None:
        con = connect()
        con.execute("select sum(series_id), sum(ts), sum(value) from read_parquet($f)", {"f": files}).fetchall()
        con.close()

    def daily_models() -> None:
        run_model(paths, "fct_series_edges_by_day", window, project=project)
        run_model(paths, "fct_usage_by_day", window, project=project)

    rows = [
        ("DuckDB scan: sum(value)", best_of(args.repeat, scan_one)),
        ("DuckDB scan: series_id, ts, value", best_of(args.repeat, scan_three)),
        ("daily models: edges + usage by day", best_of(args.repeat, daily_models)),
    ]
    base = rows[1][1]
    table = Table(title=f"{figures['samples']:,} samples, {figures['series']} series, 1 UTC day at {args.interval} s")
    for col in ("step", "best wall (s)", "x 3-column scan"):
        table.add_column(col, justify="left" if col == "step" else "right")
    for name, secs in rows:
        table.add_row(name, f"{secs:.3f}", f"{secs / base:.2f}")
    console.print(table)
    console.print(
        f"raw bytes/sample: {figures['bytes'] / figures['samples']:.2f}; simulation of 2 days: {sim_s:.1f}s; "
        f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
