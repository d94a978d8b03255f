"""`python -m benchmarks.prometheus_pull`: pull one day of N series from a local Prometheus.

Backfills N counter series x 1 UTC day at --interval seconds with promtool, starts prometheus on
127.0.0.1 (its own tmp storage), runs the exact ingest of billing_dags.ingest.prometheus for that day
(what the raw_samples asset runs) in one process: over the query API (range selectors, JSON) once
and over remote read (/api/v1/read, protobuf) three times (the fastest counts), checks all wrote the
same Parquet bytes, and reports samples/s and peak RSS of each, with Prometheus's own evaluation
time for the same data beside them: the server-side time (stats=all) of the same raw range-selector
queries (the smallest of three sums), and of one count_over_time over the whole day.

Item 6 (``figures``): 1,000 series at 15 s (quick: 100 at 60 s), the backfilled TSDB
cached under OUT/prometheus-pull-<series>x<interval>s.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import prometheus_harness as harness
from rich.console import Console
from rich.table import Table

from benchmarks.figures import Figure, scratch
from billing_dags.core.settings import PROJECT_ROOT, resolve_paths
from billing_dags.ingest import prometheus as prom
from billing_dags.ingest import raw

DAY = date(2025, 6, 15)
METRIC = "stratum_accepted_shares_total"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
INSTALL = "apt-get install -y --no-install-recommends prometheus"
FULL = {"series": 1_000, "interval": 15}
QUICK = {"series": 100, "interval": 60}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_day(path: Path, n_series: int, interval_s: int, label_values: list[str]) -> int:
    """N counters of one day, streamed to an OpenMetrics file (the generator holds one series at a time)."""
    start, end = raw.day_bounds_ms(DAY)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"# TYPE {METRIC[:-6]} counter\n")
        for i in range(n_series):
            lv = harness.openmetrics_label_value(label_values[i % len(label_values)])
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


def missing_tools(prometheus: str, promtool: str) -> str | None:
    """What to install when prometheus or promtool is not there, else None."""
    missing = [Path(p).name for p in (prometheus, promtool) if not Path(p).exists()]
    return f"{' and '.join(missing)} not installed ({INSTALL})" if missing else None


def prepare_tsdb(root: Path, n_series: int, interval_s: int, promtool: str, label_values: list[str], reuse: bool, log=print) -> int:
    """Backfill ``root/tsdb`` with the day (or, with ``reuse``, keep the one backfilled with the same
    parameters); returns the number of samples."""
    tsdb, marker = root / "tsdb", root / "tsdb.params"
    params = f"{n_series} {interval_s} {DAY}"
    n_samples = n_series * (86_400 // interval_s)
    if reuse and tsdb.is_dir() and marker.exists() and marker.read_text() == params:
        log(f"reusing the backfilled TSDB in {tsdb} ({n_samples:,} samples)")
        return n_samples
    marker.unlink(missing_ok=True)
    t0 = time.perf_counter()
    om = root / "day.om"
    n_samples = write_day(om, n_series, interval_s, label_values)
    gen_s = time.perf_counter() - t0
    shutil.rmtree(tsdb, ignore_errors=True)
    backfill_s = harness.backfill(om, tsdb, promtool)
    om.unlink()
    marker.write_text(params)
    log(f"backfilled {n_series} series x 1 day at {interval_s}s = {n_samples:,} samples (generate {gen_s:.1f}s, promtool {backfill_s:.1f}s)")
    return n_samples


def _exec_time(res: prom.QueryResult) -> float:
    return float((res.stats or {}).get("timings", {}).get("execTotalTime", 0.0))


def _ingest(url: str, paths, meters, label_values, opts: prom.IngestOptions, read_api: str) -> tuple[prom.IngestReport, dict]:
    """ingest_day of DAY over ``read_api``; the report and the Parquet files written (relative path -> bytes)."""
    with prom.PrometheusClient(url, timeout_s=300, read_api=read_api) as client:
        report = prom.ingest_day(client, paths, DAY, meters, label_values, opts)
    if report.read_api != read_api:
        raise RuntimeError(f"asked for {read_api}, read over {report.read_api}")
    files = {str(f.relative_to(paths.data_dir)): f.read_bytes() for f in sorted(paths.data_dir.rglob("*.parquet"))}
    return report, files


def measure(
    root: Path,
    *,
    series: int = FULL["series"],
    interval: int = FULL["interval"],
    chunk_s: int = 3600,
    customers_per_query: int = 10,
    prometheus: str = PROMETHEUS,
    promtool: str = PROMTOOL,
    reuse: bool = True,
    rounds: int = 3,
    log=print,
) -> dict:
    """Backfill (or reuse) the day in ``root/tsdb``; ask Prometheus for its own evaluation time of the
    exact mode's queries (``rounds`` times, the smallest sum); then ingest the day with ingest_day
    over the query API (JSON, once) and over remote read (``rounds`` times, the fastest), one after
    the other in this process, each into its own data dir, and check all wrote the same bytes.
    Returns the figures."""
    root.mkdir(parents=True, exist_ok=True)
    for d in ("data", "data-query", "data-remote-read"):
        shutil.rmtree(root / d, ignore_errors=True)
    seeds = PROJECT_ROOT / "seeds"
    meters, label_values = prom.meters_and_label_values(seeds)
    meters = [m for m in meters if METRIC in m["metrics"].split()]
    n_samples = prepare_tsdb(root, series, interval, promtool, label_values, reuse, log)
    tsdb = root / "tsdb"

    start, end = raw.day_bounds_ms(DAY)
    rss_before = _rss_mb()
    opts = prom.IngestOptions(chunk_s=chunk_s, customers_per_query=customers_per_query)
    try:
        with harness.LocalPrometheus(tsdb, prometheus, log_file=root / "prometheus.log") as server:
            # Prometheus's own time for the same raw queries, and for one aggregate over the day (first:
            # it also brings the TSDB into the page cache for both pulls)
            evals = []
            with prom.PrometheusClient(server.url, timeout_s=300) as client:
                for _ in range(rounds):
                    total = 0.0
                    for sel in prom.plan_selectors(meters, label_values, customers_per_query):
                        for a, b in prom.plan_chunks(start, end, chunk_s * 1000):
                            q, t = prom.exact_query(sel.promql(), a, b)
                            total += _exec_time(client.query(q, t, stats=True))
                    evals.append(total)
                server_eval = min(evals)
                res = client.query(f"count_over_time({METRIC}[1d])", end - 1, stats=True)
                counted = sum(int(float(r["value"][1])) for r in res.result)
                # load the remote-read decoder (numba) before the clock runs, as orjson is loaded for the JSON path
                client.read_api, client.remote_read_ok = "remote_read", True
                client.remote_read([(prom.EQ, "__name__", METRIC)], start, start + 60_000, window=(start, start + 60_000))
            query, query_files = _ingest(server.url, resolve_paths(root / "data-query", seeds), meters, label_values, opts, "query")
            rss_query = _rss_mb()
            remotes = []
            for i in range(rounds):  # each into a fresh data dir; the best round is the figure
                shutil.rmtree(root / "data-remote-read", ignore_errors=True)
                got, files = _ingest(server.url, resolve_paths(root / "data-remote-read", seeds), meters, label_values, opts, "remote_read")
                remotes.append(got)
                if i == 0:
                    remote_files = files
                elif files != remote_files:
                    raise RuntimeError("two remote reads of the same day wrote different Parquet files")
            remote = min(remotes, key=lambda r: r.seconds)
            rss_after = _rss_mb()
    finally:
        for config in root.glob("prometheus-*.yml"):  # LocalPrometheus's, one per port
            config.unlink()
    if not query.samples == remote.samples == n_samples == counted:
        raise RuntimeError(
            f"samples: ingested {query.samples:,} (query API) and {remote.samples:,} (remote read), backfilled {n_samples:,}, counted by Prometheus {counted:,}"
        )
    if remote_files != query_files:
        raise RuntimeError("remote read and the query API wrote different Parquet files for the same day")
    return {
        "series": series,
        "interval": interval,
        "chunk_s": chunk_s,
        "customers_per_query": customers_per_query,
        "report": query,
        "remote": remote,
        "identical_files": len(query_files),
        "samples": n_samples,
        "rss_before_mb": rss_before,
        "rss_query_mb": rss_query,
        "rss_after_mb": rss_after,
        "server_eval_s": server_eval,
        "server_evals_s": evals,
        "load": os.getloadavg()[0],
        "remote_rounds_s": [r.seconds for r in remotes],
        "count_eval_s": _exec_time(res),
        "count_wall_s": res.seconds,
        "counted": counted,
    }


def figures(quick: bool, out: Path, console: Console) -> list[Figure]:
    """Item 6: one day pulled from Prometheus over the query API (JSON) and over remote read, against
    Prometheus's own evaluation of the same queries, in one run."""
    size = QUICK if quick else FULL
    n_samples = size["series"] * (86_400 // size["interval"])
    day = f"one day of {size['series']:,} series at {size['interval']} s ({n_samples:,} samples) through ingest_day (exact, to Parquet)"
    missing = missing_tools(PROMETHEUS, PROMTOOL)
    if missing:
        return [Figure(6, f"Prometheus pull: {day}", f"not measured: {missing}", "-", "-", "reported as a ratio", None)]
    # the backfilled TSDB is cached per workload; the ingested Parquet is not kept
    root = scratch(out, f"prometheus-pull-{size['series']}x{size['interval']}s")
    try:
        m = measure(root, **size, log=console.print)
    finally:
        for d in ("data", "data-query", "data-remote-read"):
            shutil.rmtree(root / d, ignore_errors=True)
    q, r, ev = m["report"], m["remote"], m["server_eval_s"]
    reference = (
        (f"{m['samples'] / ev:,.0f} samples/s (Prometheus's evaluation of the same queries: {ev:.2f} s, sum of execTotalTime, stats=all)") if ev else "-"
    )

    def ours(rep: prom.IngestReport) -> str:
        return f"{rep.samples / rep.seconds:,.0f} samples/s ({rep.seconds:.2f} s wall, {rep.query_seconds:.2f} s of it in HTTP, {rep.requests} requests)"

    return [
        Figure(
            6,
            f"Prometheus pull over the query API (JSON): {day}",
            ours(q),
            reference,
            f"our wall = {q.seconds / ev:.1f}x its evaluation time" if ev else "-",
            "reported as a ratio",
            None,
        ),
        Figure(
            6,
            f"Prometheus pull over remote read (/api/v1/read, same run, same Parquet bytes): {day}",
            ours(r) + f"; {q.seconds / r.seconds:.1f}x faster than JSON",
            reference,
            (f"our wall = {r.seconds / ev:.1f}x its evaluation time (best of {len(m['remote_rounds_s'])}, load {m['load']:.1f})") if ev else "-",
            "<= 3x Prometheus's evaluation time",
            (r.seconds <= 3 * ev) if ev else None,
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prometheus_pull", description=__doc__)
    parser.add_argument("--series", type=int, default=500, help="series to backfill and pull (default 500; the suite's full run: 1000)")
    parser.add_argument("--interval", type=int, default=15, help="scrape interval in seconds (default 15)")
    parser.add_argument("--chunk-s", type=int, default=3600, help="seconds of samples per request (default 3600)")
    parser.add_argument("--customers-per-query", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="remote-read pulls and evaluations of the queries; the best of each counts (default 3)")
    parser.add_argument("--keep", help="keep the generated data in this folder (a rerun with the same --series/--interval reuses the backfilled TSDB)")
    parser.add_argument("--prometheus", default=PROMETHEUS)
    parser.add_argument("--promtool", default=PROMTOOL)
    args = parser.parse_args()
    missing = missing_tools(args.prometheus, args.promtool)
    if missing:
        raise SystemExit(missing)
    console = Console(width=170)
    root = Path(args.keep or tempfile.mkdtemp(prefix="billing-prom-bench-"))
    try:
        m = measure(
            root,
            series=args.series,
            interval=args.interval,
            chunk_s=args.chunk_s,
            customers_per_query=args.customers_per_query,
            prometheus=args.prometheus,
            promtool=args.promtool,
            reuse=bool(args.keep),
            rounds=args.rounds,
            log=console.print,
        )
    except RuntimeError as e:
        raise SystemExit(str(e)) from None
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    server_eval, counted = m["server_eval_s"], m["counted"]
    table = Table(
        title=f"Pull one day from Prometheus 2.42: {args.series} series at {args.interval}s, {args.chunk_s}s chunks, {args.customers_per_query} customers/query"
    )
    for col in ("step", "samples", "wall s", "samples/s", "x eval", "notes"):
        table.add_column(col, justify="right" if col not in ("step", "notes") else "left")
    for label, report, rss in (
        ("ingest_day over the query API (JSON)", m["report"], m["rss_query_mb"]),
        ("ingest_day over remote read", m["remote"], m["rss_after_mb"]),
    ):
        table.add_row(
            label,
            f"{report.samples:,}",
            f"{report.seconds:.2f}",
            f"{report.samples / report.seconds:,.0f}",
            f"{report.seconds / server_eval:.1f}x" if server_eval else "-",
            f"{report.requests} requests, {report.query_seconds:.2f}s in HTTP (until the body is read); peak RSS {rss:.0f} MB "
            f"(before {m['rss_before_mb']:.0f} MB); {report.bytes / max(report.samples, 1):.2f} bytes/sample",
        )
    table.add_row(
        "Prometheus server time, same raw queries",
        f"{m['samples']:,}",
        f"{server_eval:.2f}",
        f"{m['samples'] / server_eval:,.0f}" if server_eval else "-",
        "1.0x",
        "sum of execTotalTime (stats=all)",
    )
    table.add_row(
        f"Prometheus count_over_time({METRIC}[1d])",
        f"{counted:,}",
        f"{m['count_eval_s']:.2f}",
        f"{counted / m['count_eval_s']:,.0f}" if m["count_eval_s"] else "-",
        "",
        f"server side; {m['count_wall_s']:.2f}s wall",
    )
    console.print(table)
    console.print(
        f"remote read rounds: {', '.join(f'{x:.2f}' for x in m['remote_rounds_s'])} s; evaluation sums: "
        f"{', '.join(f'{x:.2f}' for x in m['server_evals_s'])} s; load average {m['load']:.1f} (2 shared cores: read the ratios)"
    )


if __name__ == "__main__":
    main()
