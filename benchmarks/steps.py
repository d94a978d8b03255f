"""One benchmark step in its own process: `python -m benchmarks.steps STEP DATA_DIR [--repeat N] [--warmup N]`.

Prints one JSON line: best wall seconds over the repeats (after --warmup untimed runs, which load
the fast path's compiled code and warm the page cache), the process's peak RSS (so steps do not
share a peak), and step-specific figures. Run by `python -m benchmarks.daily` in the workload's folder
(any DATA_DIR works: nothing here assumes benchmarks/out).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import timedelta

from benchmarks.proc import peak_rss_bytes
from benchmarks.workload import DAY
from billing_dags.core.settings import PROJECT_ROOT, resolve_paths
from billing_dags.ingest import raw
from billing_dags.models.sqlmodels import Window, connect, load_project, partition_file, prepare, query, run_model

WINDOW = Window(DAY, DAY + timedelta(days=1))


def _scan(files: list[str], sql: str):
    def run():
        con = connect()
        con.execute("set enable_progress_bar = false")
        con.execute(sql.replace("$f", "read_parquet($f)"), {"f": files}).fetchall()
        con.close()

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=["scan1", "scan3", "fast", "fast_edges", "sql", "alternate"])
    ap.add_argument("data_dir")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=0, help="untimed runs before the timed ones")
    args = ap.parse_args()
    paths = resolve_paths(args.data_dir, PROJECT_ROOT / "seeds")
    files = [str(f) for f in raw.sample_files(paths, DAY)]
    project = load_project()
    extra: dict = {}
    if args.step == "scan1":
        fn = _scan(files, "select sum(value) from $f")
    elif args.step == "scan3":
        fn = _scan(files, "select sum(series_id), sum(ts), sum(value) from $f")
    elif args.step in ("fast", "fast_edges"):

        def fn():
            r = run_model(paths, "int_series_edges_by_day", WINDOW, project=project)
            extra["edges_rows"] = r.rows
            extra["edges_s"] = min(extra.get("edges_s", 1e9), r.seconds)
            if args.step == "fast":
                run_model(paths, "int_gauge_peaks_by_day", WINDOW, project=project)
                u = run_model(paths, "fct_usage_by_day", WINDOW, project=project)
                extra["usage_rows"] = u.rows
                extra["usage_s"] = min(extra.get("usage_s", 1e9), u.seconds)
    elif args.step == "alternate":
        # the 3-column scan and the daily models by turns in one process, so that a noisy neighbour
        # slows both alike: each round times one scan then one fast path (edges + gauge peaks + usage by day)
        scan = _scan(files, "select sum(series_id), sum(ts), sum(value) from $f")

        def timed(f) -> float:
            t0 = time.perf_counter()
            f()
            return time.perf_counter() - t0

        def models():
            run_model(paths, "int_series_edges_by_day", WINDOW, project=project)
            run_model(paths, "int_gauge_peaks_by_day", WINDOW, project=project)
            run_model(paths, "fct_usage_by_day", WINDOW, project=project)

        def fn():
            extra.setdefault("scan_s", []).append(timed(scan))
            extra.setdefault("fast_s", []).append(timed(models))
    else:  # the SQL reference: computed in memory (the fast step's partition file is left alone)
        model = project.models["int_series_edges_by_day"]

        def fn():
            con = connect()
            try:
                prepare(con, project, model.name, paths, WINDOW)
                extra["table"] = query(con, model, WINDOW)
            finally:
                con.close()

    for _ in range(args.warmup):
        fn()
    extra.clear()  # the step-specific figures (best edges_s, usage_s) of the timed runs only
    best = float("inf")
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    out = {"step": args.step, "seconds": best, "peak_rss_bytes": peak_rss_bytes()}
    if args.step == "sql":
        import pyarrow.parquet as pq

        sql = extra.pop("table").sort_by([("day", "ascending"), ("series_id", "ascending")])
        fast_file = partition_file(paths, project.models["int_series_edges_by_day"], WINDOW)
        fast = pq.read_table(fast_file)
        same = fast.num_rows == sql.num_rows and all(fast[c].equals(sql[c]) for c in sql.column_names)
        same = same and [f.type for f in fast.schema] == [f.type for f in sql.schema]
        out["equal_to_fast_path"] = bool(same)
        out["rows"] = sql.num_rows
        out["total_in_day_increase"] = str(sum(x for x in sql["in_day_increase"].to_pylist()))
    out.update(extra)
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
