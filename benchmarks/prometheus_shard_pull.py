"""`python -m benchmarks.prometheus_shard_pull`: one pull of a day split into N shards, against N pulls of one shard each.

Backfills a day of counter series (the seeded customers' label values and a few that no customer has)
with promtool, starts prometheus on 127.0.0.1, and pulls the day into ``--shards`` shards two ways,
alternately, ``--rounds`` times: once for the whole day (``ingest_day``, split by shard as it writes),
and once per shard (``ingest_day(shard=...)``, each writing its own shard). Every pull runs in a
process of its own, so each has its own CPU time and peak RSS. Checks that both ways wrote the same
Parquet bytes, and prints wall, CPU, requests and peak RSS side by side (the N shard pulls summed,
and the largest of them).
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import prometheus_harness as harness
from rich.console import Console
from rich.table import Table

from benchmarks.prometheus_pull import DAY, METRIC, PROMETHEUS, PROMTOOL, missing_tools, prepare_tsdb
from billing_dags.core.settings import PROJECT_ROOT, resolve_paths
from billing_dags.core.shards import Shard
from billing_dags.ingest import prometheus as prom
from billing_dags.ingest import raw

#: label values no customer has: their series are unmatched (ingested, billed to nobody)
UNKNOWN = ["unknown-a", "unknown-b", "unknown-c"]


def _pull(url: str, data: str, shards: int, shard: int | None, read_api: str, customers_per_query: int) -> dict:
    """One pull in this (child) process: its figures, CPU seconds and peak RSS."""
    seeds = PROJECT_ROOT / "seeds"
    paths = dataclasses.replace(resolve_paths(data, seeds, sync=False), shards=shards)
    meters, label_values = prom.meters_and_label_values(seeds)
    meters = [m for m in meters if METRIC in m["metrics"].split()]
    if read_api == "remote_read":  # load the remote-read decoder (numba) before the clock runs
        with prom.PrometheusClient(url, read_api=read_api) as client:
            start, _ = raw.day_bounds_ms(DAY)
            client.remote_read([(prom.EQ, "__name__", METRIC)], start, start + 60_000, window=(start, start + 60_000))
    cpu0, t0 = time.process_time(), time.perf_counter()
    opt = prom.IngestOptions(customers_per_query=customers_per_query)
    with prom.PrometheusClient(url, timeout_s=300, read_api=read_api) as client:
        report = prom.ingest_day(client, paths, DAY, meters, label_values, opt, shard=None if shard is None else Shard(shard, shards))
    return {
        "wall": time.perf_counter() - t0,
        "cpu": time.process_time() - cpu0,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "samples": report.samples,
        "series": report.series,
        "unmatched": report.unmatched_series,
        "requests": report.requests,
        "http": report.query_seconds,
    }


def _in_process(pool, *args) -> dict:
    return pool.apply(_pull, args)


def _files(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*.parquet"))}


def measure(root: Path, *, series: int, interval: int, shards: int, rounds: int, read_api: str, customers_per_query: int, reuse: bool, log=print) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    _, label_values = prom.meters_and_label_values(PROJECT_ROOT / "seeds")
    n_samples = prepare_tsdb(root, series, interval, PROMTOOL, [*label_values, *UNKNOWN], reuse, log)
    ctx = multiprocessing.get_context("spawn")
    out = {"one": [], "shards": [], "samples": n_samples, "loads": []}
    with harness.LocalPrometheus(root / "tsdb", PROMETHEUS, log_file=root / "prometheus.log") as server:
        for r in range(rounds):
            for way in ("one", "shards") if r % 2 == 0 else ("shards", "one"):
                data = root / f"data-{way}"
                shutil.rmtree(data, ignore_errors=True)
                t0 = time.perf_counter()
                # a fresh process per pull (max tasks 1): its own peak RSS
                with ctx.Pool(1, maxtasksperchild=1) as pool:
                    if way == "one":
                        pulls = [_in_process(pool, server.url, str(data), shards, None, read_api, customers_per_query)]
                    else:
                        pulls = [_in_process(pool, server.url, str(data), shards, k, read_api, customers_per_query) for k in range(shards)]
                out[way].append({"pulls": pulls, "wall": time.perf_counter() - t0})
                out["loads"].append(os.getloadavg()[0])
                log(f"round {r + 1} {way}: {sum(p['wall'] for p in pulls):.2f} s wall in pulls, {sum(p['cpu'] for p in pulls):.2f} s CPU")
            if _files(root / "data-one") != _files(root / "data-shards"):
                raise RuntimeError("one pull split by shard and the shard pulls wrote different Parquet files")
    for config in root.glob("prometheus-*.yml"):
        config.unlink()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prometheus_shard_pull", description=__doc__)
    parser.add_argument("--series", type=int, default=1000)
    parser.add_argument("--interval", type=int, default=15)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="pairs of (one pull, N shard pulls), alternating (default 2)")
    parser.add_argument("--read-api", default="remote_read", choices=["remote_read", "query"])
    parser.add_argument("--customers-per-query", type=int, default=10)
    parser.add_argument("--keep", help="keep the generated data in this folder (a rerun with the same --series/--interval reuses the TSDB)")
    args = parser.parse_args()
    missing = missing_tools(PROMETHEUS, PROMTOOL)
    if missing:
        raise SystemExit(missing)
    console = Console(width=170)
    root = Path(args.keep or tempfile.mkdtemp(prefix="billing-shard-pull-"))
    try:
        m = measure(
            root,
            series=args.series,
            interval=args.interval,
            shards=args.shards,
            rounds=args.rounds,
            read_api=args.read_api,
            customers_per_query=args.customers_per_query,
            reuse=bool(args.keep),
            log=console.print,
        )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    table = Table(title=f"{args.series} series at {args.interval} s ({m['samples']:,} samples), {args.shards} shards, {args.read_api}")
    for col in ("round", "way", "pulls: wall s (sum)", "CPU s (sum)", "largest pull: wall / CPU s", "requests", "HTTP s", "peak RSS MB (largest)", "samples"):
        table.add_column(col, justify="left" if col in ("round", "way") else "right")
    for r in range(args.rounds):
        for way in ("one", "shards"):
            pulls = m[way][r]["pulls"]
            big = max(pulls, key=lambda p: p["samples"])
            table.add_row(
                str(r + 1),
                "one pull, split" if way == "one" else f"{len(pulls)} shard pulls",
                f"{sum(p['wall'] for p in pulls):.2f}",
                f"{sum(p['cpu'] for p in pulls):.2f}",
                f"{big['wall']:.2f} / {big['cpu']:.2f}",
                str(sum(p["requests"] for p in pulls)),
                f"{sum(p['http'] for p in pulls):.2f}",
                f"{max(p['rss_mb'] for p in pulls):.0f}",
                f"{sum(p['samples'] for p in pulls):,} (largest {big['samples']:,})",
            )
    console.print(table)
    console.print(f"load averages during the rounds: {', '.join(f'{x:.1f}' for x in m['loads'])} (2 shared cores: compare the rows, not absolute values)")


if __name__ == "__main__":
    main()
