"""`python -m benchmarks`: the daily models against a plain DuckDB scan of the same Parquet.

Workload (benchmarks/workload.py): N series x 1 UTC day at a 15 s scrape interval in the real raw
layout, with resets, gaps, NaN and staleness markers; cached under benchmarks/out/. Quick by
default (2,000 series, 11.5M samples); ``--standard`` is the issue's workload (20,000 series,
115.2M samples). Every step runs in its own process (peak RSS per step, not shared) --repeat
times, keeping the best wall time; ratios are against the 3-column scan measured in the same run.

Steps: DuckDB scan of one column and of (series_id, ts, value); the daily models as configured
(fct_series_edges_by_day on the Python fast path, then fct_usage_by_day); the SQL reference of
fct_series_edges_by_day (DuckDB window functions), whose output is compared with the fast path's
to the unit; bytes per sample of the raw layout; cost growth at 1/4, 1/2 and all of the series.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import timedelta

from rich.console import Console
from rich.table import Table

from billing_dags import raw
from billing_dags.settings import PROJECT_ROOT
from billing_dags.sqlmodels import Window, run_model

from . import workload


def step(name: str, paths, repeat: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.steps", name, str(paths.data_dir), "--repeat", str(repeat)],
        capture_output=True, text=True, env=env, cwd=PROJECT_ROOT,
    )
    if proc.returncode:
        raise SystemExit(f"benchmark step {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def samples_of(paths) -> tuple[int, int]:
    import pyarrow.parquet as pq

    files = raw.sample_files(paths, workload.DAY)
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files), sum(f.stat().st_size for f in files)


def prepare_previous_day(paths) -> None:
    """D-1's edges (the small per-day file fct_usage_by_day reads instead of D-1's raw samples)."""
    prev = workload.DAY - timedelta(days=1)
    run_model(paths, "fct_series_edges_by_day", Window(prev, workload.DAY))


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--standard", action="store_true", help="the issue's workload: 20,000 series (115.2M samples)")
    ap.add_argument("--series", type=int, help="number of series (default 2,000; 20,000 with --standard)")
    ap.add_argument("--interval", type=int, default=15, help="scrape interval in seconds (default 15)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-sql", action="store_true", help="skip the SQL reference (slow, memory-hungry)")
    ap.add_argument("--reference-parts", type=int, choices=[1, 2, 4, 8],
                    help="run the SQL reference on this many of the 8 files of the day (default: all; 1 with "
                         "--standard, where all takes about 15 min and 7.7 GB on 2 cores)")
    args = ap.parse_args()
    console = Console(width=130)
    n_series = args.series or (20_000 if args.standard else 2_000)
    t0 = time.perf_counter()
    paths = workload.standard(n_series, args.interval, log=console.print)
    prepare_previous_day(paths)
    n_samples, n_bytes = samples_of(paths)
    console.print(f"workload ready in {time.perf_counter() - t0:.1f}s: {n_samples:,} samples, {n_series:,} series")

    rows = []
    for name, label in [
        ("scan1", "DuckDB scan: sum(value)"),
        ("scan3", "DuckDB scan: series_id, ts, value"),
        ("fast", "daily models: edges (fast path) + usage by day"),
    ]:
        console.print(f"  running {label} ...")
        rows.append((label, step(name, paths, args.repeat)))
    fast = rows[2][1]
    g = Table(title="cost growth: the daily models (edges fast path + usage by day) at 1/4, 1/2 and all series")
    for col in ("series", "samples", "wall (s)", "ns/sample", "peak RSS (MB)", "RSS bytes/sample"):
        g.add_column(col, justify="right")
    subsets = {}
    for parts in (workload.CHUNKS // 4, workload.CHUNKS // 2, workload.CHUNKS):
        sub = workload.subset(paths, parts) if parts < workload.CHUNKS else paths
        subsets[parts] = sub
        if parts < workload.CHUNKS:
            prepare_previous_day(sub)
        console.print(f"  cost growth: {parts}/{workload.CHUNKS} of the series ...")
        r = step("fast", sub, max(1, args.repeat - 1)) if parts < workload.CHUNKS else fast
        ns, _ = samples_of(sub)
        g.add_row(f"{n_series * parts // workload.CHUNKS:,}", f"{ns:,}", f"{r['seconds']:.2f}", f"{r['seconds'] / ns * 1e9:.1f}",
                  f"{r['peak_rss_bytes'] / 2**20:.0f}", f"{r['peak_rss_bytes'] / ns:.2f}")
    exact = None
    if not args.skip_sql:
        parts = args.reference_parts or (1 if args.standard else workload.CHUNKS)
        ref = subsets.get(parts) or workload.subset(paths, parts)
        if ref is not paths and parts not in subsets:
            prepare_previous_day(ref)
            step("fast_edges", ref, 1)  # the fast path's partition to compare with
        ns, _ = samples_of(ref)
        console.print(f"  running the SQL reference of the edges on {parts}/{workload.CHUNKS} of the series ({ns:,} samples) ...")
        sql = step("sql", ref, 1)
        exact = sql["equal_to_fast_path"]
        scope = "all" if parts == workload.CHUNKS else f"{parts}/{workload.CHUNKS} of the series, {ns:,} samples"
        rows.append((f"edges by the SQL reference (window functions; {scope})", sql))
    base = rows[1][1]["seconds"]
    t = Table(title=f"{n_samples:,} samples, {n_series:,} series, 1 UTC day at {args.interval} s (best of {args.repeat}; SQL: 1 run)")
    for col in ("step", "wall (s)", "x 3-column scan", "peak RSS (MB)"):
        t.add_column(col, justify="left" if col == "step" else "right")
    for label, r in rows:
        t.add_row(label, f"{r['seconds']:.2f}", f"{r['seconds'] / base:.2f}", f"{r['peak_rss_bytes'] / 2**20:.0f}")
    t.add_row("  of which edges (fast path)", f"{fast['edges_s']:.2f}", f"{fast['edges_s'] / base:.2f}", "")
    t.add_row("  of which usage by day", f"{fast['usage_s']:.2f}", f"{fast['usage_s'] / base:.2f}", "")
    console.print(t)
    console.print(g)
    console.print(f"raw layout: {n_bytes / n_samples:.2f} bytes/sample ({n_bytes / 2**20:.0f} MB for {n_samples:,} samples)")
    if exact is not None:
        console.print(f"fast path equals the SQL reference to the unit: {'yes' if exact else 'NO'} ({sql['rows']:,} rows, {scope})")

    if exact is False:
        raise SystemExit("the fast path differs from the SQL reference")


if __name__ == "__main__":
    main()
