"""`python -m benchmarks.prometheus_pull`: pull one day of N series from a local Prometheus.

Backfills N counter series x 1 UTC day at --interval seconds with promtool, starts prometheus on
127.0.0.1 (its own tmp storage), runs the exact ingest of billing_dags.prometheus for that day
(what the raw_samples asset runs) and reports samples/s and peak RSS, with Prometheus's own
evaluation time for the same data beside it: the server-side time (stats=all) of the same raw
range-selector queries, and of one count_over_time over the whole day.
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

from billing_dags import prometheus as prom
from billing_dags import raw
from billing_dags.settings import PROJECT_ROOT, resolve_paths

DAY = date(2025, 6, 15)
METRIC = "stratum_accepted_shares_total"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_day(path: Path, n_series: int, interval_s: int, label_values: list[str]) -> int:
    """N counters of one day, streamed to an OpenMetrics file (the generator holds one series at a time)."""
    start, end = raw.day_bounds_ms(DAY)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"# TYPE {METRIC[:-6]} counter\n")
        for i in range(n_series):
            lv = prom.openmetrics_label_value(label_values[i % len(label_values)])
            head = f'{METRIC}{{client_id="{lv}",pool_host="pool-{i // len(label_values)}"}}'
            v = i * 1000
            lines = []
            for k, t in enumerate(range(start, end, interval_s * 1000)):
                v += (i * 7 + k * 13) % 50
                lines.append(f"{head} {v} {t // 1000}\n")
            f.writelines(lines)
            n += len(lines)
        f.write("# EOF\n")
    return n


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prometheus_pull", description=__doc__)
    parser.add_argument("--series", type=int, default=500, help="series to backfill and pull (default 500; try 2000)")
    parser.add_argument("--interval", type=int, default=15, help="scrape interval in seconds (default 15)")
    parser.add_argument("--chunk-s", type=int, default=3600, help="seconds of samples per request (default 3600)")
    parser.add_argument("--customers-per-query", type=int, default=10)
    parser.add_argument("--keep", help="keep the generated data in this folder (a rerun with the same --series/--interval reuses the backfilled TSDB)")
    parser.add_argument("--prometheus", default=shutil.which("prometheus") or "/usr/bin/prometheus")
    parser.add_argument("--promtool", default=shutil.which("promtool") or "/usr/bin/promtool")
    args = parser.parse_args()
    console = Console(width=170)
    root = Path(args.keep or tempfile.mkdtemp(prefix="billing-prom-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(root / "data", ignore_errors=True)
    paths = resolve_paths(root / "data", PROJECT_ROOT / "seeds")
    meters, label_values = prom.meters_and_label_values(paths.seeds_dir)
    meters = [m for m in meters if METRIC in m["metrics"].split()]

    tsdb = root / "tsdb"
    marker = root / "tsdb.params"
    params = f"{args.series} {args.interval} {DAY}"
    if args.keep and marker.exists() and marker.read_text() == params:
        n_samples = args.series * (86_400 // args.interval)
        console.print(f"reusing the backfilled TSDB in {tsdb} ({n_samples:,} samples)")
    else:
        t0 = time.perf_counter()
        om = root / "day.om"
        n_samples = write_day(om, args.series, args.interval, label_values)
        gen_s = time.perf_counter() - t0
        shutil.rmtree(tsdb, ignore_errors=True)
        backfill_s = prom.backfill(om, tsdb, args.promtool)
        om.unlink()
        marker.write_text(params)
        console.print(f"backfilled {args.series} series x 1 day at {args.interval}s = {n_samples:,} samples "
                      f"(generate {gen_s:.1f}s, promtool {backfill_s:.1f}s)")

    start, end = raw.day_bounds_ms(DAY)
    rss_before = _rss_mb()
    try:
        with prom.LocalPrometheus(tsdb, args.prometheus, log_file=root / "prometheus.log") as server:
            opts = prom.IngestOptions(chunk_s=args.chunk_s, customers_per_query=args.customers_per_query)
            with prom.PrometheusClient(server.url, timeout_s=300) as client:
                report = prom.ingest_day(client, paths, DAY, meters, label_values, opts)
            rss_after = _rss_mb()
            # Prometheus's own time for the same raw queries, and for one aggregate over the day
            server_eval = 0.0
            with prom.PrometheusClient(server.url, timeout_s=300) as client:
                for sel in prom.plan_selectors(meters, label_values, args.customers_per_query):
                    for a, b in prom.plan_chunks(start, end, args.chunk_s * 1000):
                        q, t = prom.exact_query(sel.promql(), a, b)
                        res = client.query(q, t, stats=True)
                        server_eval += float((res.stats or {}).get("timings", {}).get("execTotalTime", 0.0))
                res = client.query(f"count_over_time({METRIC}[1d])", end - 1, stats=True)
                count_eval = float((res.stats or {}).get("timings", {}).get("execTotalTime", 0.0))
                count_wall = res.seconds
                counted = sum(int(float(r["value"][1])) for r in res.result)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    assert report.samples == n_samples == counted, (report.samples, n_samples, counted)
    table = Table(title=f"Pull one day from Prometheus 2.42: {args.series} series at {args.interval}s, "
                        f"{args.chunk_s}s chunks, {args.customers_per_query} customers/query")
    for col in ("step", "samples", "wall s", "samples/s", "notes"):
        table.add_column(col, justify="right" if col != "step" and col != "notes" else "left")
    table.add_row("ingest_day (exact, to Parquet)", f"{report.samples:,}", f"{report.seconds:.2f}",
                  f"{report.samples / report.seconds:,.0f}",
                  f"{report.requests} requests, {report.query_seconds:.2f}s in HTTP+JSON; peak RSS {rss_after:.0f} MB "
                  f"(before {rss_before:.0f} MB); {report.bytes / max(report.samples, 1):.2f} bytes/sample")
    table.add_row("Prometheus server time, same raw queries", f"{n_samples:,}", f"{server_eval:.2f}",
                  f"{n_samples / server_eval:,.0f}" if server_eval else "-", "sum of execTotalTime (stats=all)")
    table.add_row(f"Prometheus count_over_time({METRIC}[1d])", f"{counted:,}", f"{count_eval:.2f}",
                  f"{counted / count_eval:,.0f}" if count_eval else "-", f"server side; {count_wall:.2f}s wall")
    console.print(table)


if __name__ == "__main__":
    main()
