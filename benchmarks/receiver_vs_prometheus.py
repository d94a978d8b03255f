"""`python -m benchmarks.receiver_vs_prometheus`: our remote-write receiver against Prometheus's own (item 5).

Target: accepted samples/s, with fsync, at least that of Prometheus's own remote-write receiver
(`prometheus --web.enable-remote-write-receiver`, Debian package) on the same request corpus and
the same client, side by side.

Both servers run on 127.0.0.1 on free ports with their own temporary storage under
OUT/receiver-vs-prometheus (--out; removed after each run): `billing remote-write serve` (answers
204 only after the batch is appended to a landing segment and fsynced) and `/usr/bin/prometheus
--web.enable-remote-write-receiver` (appends to its head block and WAL; its WAL is not fsynced per
request). The corpus is built once (label sets like the five
set-ups, one sample per series per scrape 15 s apart, counters increasing, snappy block format)
and split into shards the way Prometheus's queue manager does: each series belongs to one shard,
each shard is one client connection sending its requests in order (Prometheus's TSDB rejects a
sample older than the series' last one, so a shared queue would not be a fair client). The same
client replays the same bodies against each server in turn, --rounds times, each round against
fresh servers; the first scrape's requests of each shard warm both up (series creation) and are
not timed. Reported: samples/s acknowledged (204), server CPU seconds, and our/Prometheus ratios.

Item 5 (``figures``): full is the defaults (10,000 series, 400 requests, 3 rounds), quick
2,000 series, 48 requests, 1 round.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import remote_write_corpus as corpus
import requests
from rich.console import Console
from rich.table import Table
from servers import free_port, receiver_command

from benchmarks.figures import DEFAULT_OUT, Figure, scratch
from benchmarks.proc import cpu_seconds
from billing_dags.core.settings import PROJECT_ROOT
from billing_dags.ingest.remote_write.proto import TimeSeries, WriteRequest

HEADERS = {"Content-Type": "application/x-protobuf", "Content-Encoding": "snappy", "X-Prometheus-Remote-Write-Version": "0.1.0"}
PROMETHEUS = "/usr/bin/prometheus"
INSTALL = "apt-get install -y --no-install-recommends prometheus"
FULL = {"series": 10_000, "requests": 400, "rounds": 3}
QUICK = {"series": 2_000, "requests": 48, "rounds": 1}


def sharded_corpus(n_series: int, samples_per_request: int, n_requests: int, shards: int, start_ms: int, interval_ms: int = 15_000):
    """[shard] -> [(body, samples)]: shard j owns the series i with i % shards == j; a shard's requests
    hold its series' samples scrape after scrape, samples_per_request per request."""
    import random

    rng = random.Random(7)
    labels = corpus.realistic_series(n_series, 7)
    templates = []
    for lab in labels:
        t = TimeSeries()
        for k, v in sorted(lab.items()):
            t.labels.add(name=k, value=v)
        templates.append(t)
    values = [float(rng.randrange(1_000_000)) for _ in labels]
    per_shard = n_requests // shards
    out = []
    for j in range(shards):
        mine = list(range(j, n_series, shards))
        bodies = []
        cursor = 0
        for _ in range(per_shard):
            req = WriteRequest()
            for _ in range(samples_per_request):
                scrape, k = divmod(cursor, len(mine))
                i = mine[k]
                values[i] += rng.randrange(0, 5000)
                ts = req.timeseries.add()
                ts.MergeFrom(templates[i])
                ts.samples.add(timestamp=start_ms + scrape * interval_ms + (i % 1000), value=values[i])
                cursor += 1
            bodies.append((corpus.compress(req.SerializeToString()), samples_per_request))
        out.append(bodies)
    return out


def _wait_ready(url: str, proc: subprocess.Popen, what: str) -> None:
    deadline = time.time() + 60
    while True:
        try:
            if requests.get(url + "/-/ready", timeout=1).ok:
                return
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"{what} did not start (exit code {proc.poll()})")
        time.sleep(0.1)


def start_ours(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = receiver_command(root / "data", PROJECT_ROOT / "seeds", port, "--segment-max-age", "600")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    _wait_ready(url, proc, "billing remote-write serve")
    return proc, url


def start_prometheus(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    (root / "prometheus.yml").write_text("global:\n  scrape_interval: 15s\n")
    cmd = [
        PROMETHEUS,
        f"--config.file={root / 'prometheus.yml'}",
        f"--storage.tsdb.path={root / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--web.enable-remote-write-receiver",
        "--storage.tsdb.retention.time=10y",
        "--log.level=warn",
    ]
    with open(root / "prometheus.log", "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    _wait_ready(url, proc, "prometheus")
    return proc, url


def replay(url: str, shards: list[list[tuple[bytes, int]]], warm: int, pid: int) -> dict:
    """Warm-up (the first ``warm`` requests of every shard, untimed), then every shard's rest on its own connection."""
    sessions = [requests.Session() for _ in shards]
    codes: dict[int, int] = {}
    lock = threading.Lock()

    def send(j: int, bodies) -> None:
        for body, _n in bodies:
            r = sessions[j].post(url + "/api/v1/write", data=body, headers=HEADERS, timeout=120)
            with lock:
                codes[r.status_code] = codes.get(r.status_code, 0) + 1

    def run(part) -> float:
        threads = [threading.Thread(target=send, args=(j, part(b))) for j, b in enumerate(shards)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - t0

    run(lambda b: b[:warm])
    warm_codes = dict(codes)
    codes.clear()
    cpu0, client0 = cpu_seconds(pid), time.process_time()
    wall = run(lambda b: b[warm:])
    cpu, client = cpu_seconds(pid) - cpu0, time.process_time() - client0
    samples = sum(n for b in shards for _, n in b[warm:])
    if set(codes) != {204} or set(warm_codes) != {204}:
        raise RuntimeError(f"{url}: not every request was accepted: warm-up {warm_codes}, timed {codes}")
    return {"samples": samples, "requests": sum(codes.values()), "seconds": wall, "cpu_s": cpu, "client_cpu_s": client}


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def prometheus_version() -> str | None:
    """The first line of ``prometheus --version``, or None when it is not installed."""
    if not Path(PROMETHEUS).exists():
        return None
    return subprocess.run([PROMETHEUS, "--version"], capture_output=True, text=True).stdout.splitlines()[0]


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def measure(
    out: Path,
    *,
    series: int = FULL["series"],
    samples_per_request: int = 2000,
    requests: int = FULL["requests"],
    concurrency: int = 8,
    rounds: int = FULL["rounds"],
    log=print,
) -> dict:
    """Both receivers, ``rounds`` times each on fresh servers with storage under ``out``.

    Returns the per-round results (``runs``), per receiver the best and median samples/s and the
    median samples per server CPU second, and the ours/Prometheus ratios (of the medians, per round,
    per CPU second)."""
    version = prometheus_version()
    if version is None:
        raise RuntimeError(f"{PROMETHEUS} not found: {INSTALL}")
    t0 = time.perf_counter()
    start_ms = (int(time.time() * 1000) // 3_600_000 - 1) * 3_600_000  # an hour ago, on the hour: inside Prometheus's head
    shards = sharded_corpus(series, samples_per_request, requests, concurrency, start_ms)
    n_bodies = sum(map(len, shards))
    kib = sum(len(b) for s in shards for b, _ in s) / n_bodies / 1024
    warm = max(1, -(-(series // concurrency) // samples_per_request))  # one scrape of each shard's series
    log(
        f"corpus: {n_bodies} requests x {samples_per_request} samples over {series:,} series in {concurrency} shards, "
        f"{kib:.1f} KiB/request, built in {time.perf_counter() - t0:.1f}s; {warm} request(s) per shard warm up, untimed"
    )
    runs: dict[str, list[dict]] = {"ours": [], "prometheus": []}
    # on the disk of `out` (the project's by default): fsync costs what it costs for data/
    work = scratch(out, "receiver-vs-prometheus")
    try:
        for rnd in range(rounds):
            for name, start in (("ours", start_ours), ("prometheus", start_prometheus)):
                root = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
                try:
                    proc, url = start(root)
                    try:
                        r = replay(url, shards, warm, proc.pid)
                    finally:
                        stop(proc)
                finally:
                    shutil.rmtree(root, ignore_errors=True)
                runs[name].append(r)
                log(
                    f"  round {rnd + 1}, {name}: {r['samples'] / r['seconds']:,.0f} samples/s (server {r['cpu_s']:.2f} CPU s, "
                    f"client {r['client_cpu_s']:.2f} CPU s, wall {r['seconds']:.2f} s)"
                )
    finally:
        try:
            work.rmdir()  # only when empty: nothing is kept
        except OSError:
            pass
    m = {"version": version, "requests": n_bodies, "timed_samples": runs["ours"][0]["samples"], "runs": runs}
    for name, rs in runs.items():
        rates = [r["samples"] / r["seconds"] for r in rs]
        m[name] = {"best": max(rates), "median": _median(rates), "per_cpu": _median([r["samples"] / r["cpu_s"] for r in rs])}
    m["ratio"] = m["ours"]["median"] / m["prometheus"]["median"]
    m["per_round"] = [o["samples"] / o["seconds"] / (p["samples"] / p["seconds"]) for o, p in zip(runs["ours"], runs["prometheus"])]
    m["per_cpu_ratio"] = m["ours"]["per_cpu"] / m["prometheus"]["per_cpu"]
    return m


def figures(quick: bool, out: Path, console: Console) -> list[Figure]:
    """Item 5: our receiver's accepted samples/s (fsynced) against Prometheus's own."""
    size = QUICK if quick else FULL
    target = ">= Prometheus's own (1.0x)"

    def figure(n_requests: int) -> str:
        return (
            f"remote-write receiver, accepted samples/s with fsync: {size['series']:,} series, {n_requests} requests x 2,000 "
            f"samples, 8 connections, same corpus and client"
        )

    if prometheus_version() is None:
        return [Figure(5, figure(size["requests"]), f"not measured: prometheus not installed ({INSTALL})", "-", "-", target, None)]
    m = measure(out, **size, log=console.print)
    rounds = len(m["per_round"])
    spread = f"median of {rounds} rounds, per round {min(m['per_round']):.2f}-{max(m['per_round']):.2f}x Prometheus" if rounds > 1 else "1 round"
    version = m["version"].split()[2] if m["version"].startswith("prometheus, version ") else m["version"]
    return [
        Figure(
            5,
            figure(m["requests"]),
            f"{m['ours']['median']:,.0f} samples/s ({spread})",
            f"{m['prometheus']['median']:,.0f} samples/s (Prometheus {version} --web.enable-remote-write-receiver, WAL not fsynced per request)",
            f"{m['ratio']:.2f}x",
            target,
            m["ratio"] >= 1,
        )
    ]


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.receiver_vs_prometheus", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, default=FULL["series"])
    ap.add_argument("--samples-per-request", type=int, default=2000, help="Prometheus max_samples_per_send (default 2000)")
    ap.add_argument("--requests", type=int, default=FULL["requests"], help="requests in the corpus (default 400: 800,000 samples)")
    ap.add_argument("--concurrency", type=int, default=8, help="shards = client connections (default 8)")
    ap.add_argument("--rounds", type=int, default=FULL["rounds"], help="rounds of (ours, Prometheus), fresh servers each (default 3)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the servers' storage goes under OUT/receiver-vs-prometheus (default {DEFAULT_OUT})")
    args = ap.parse_args()
    console = Console(width=130)
    try:
        m = measure(
            args.out,
            series=args.series,
            samples_per_request=args.samples_per_request,
            requests=args.requests,
            concurrency=args.concurrency,
            rounds=args.rounds,
            log=console.print,
        )
    except RuntimeError as e:
        raise SystemExit(str(e)) from None
    t = Table(
        title=f"remote write, same corpus and client: {args.concurrency} connections, {args.samples_per_request} samples/request, "
        f"{m['timed_samples']:,} timed samples per run; {m['version']}"
    )
    for col in ("receiver", "samples/s (best)", "samples/s (median)", "samples per CPU s", "durable at 204"):
        t.add_column(col, justify="left" if col in ("receiver", "durable at 204") else "right")
    for name, label, durable in (
        ("ours", "billing remote-write serve", "yes: landing segment fdatasync'ed"),
        ("prometheus", "prometheus --web.enable-remote-write-receiver", "no: WAL written, not fsynced per request"),
    ):
        f = m[name]
        t.add_row(label, f"{f['best']:,.0f}", f"{f['median']:,.0f}", f"{f['per_cpu']:,.0f}", durable)
    console.print(t)
    console.print(
        f"ours / Prometheus: {m['ratio']:.2f} (medians), per round {', '.join(f'{x:.2f}' for x in m['per_round'])}; per CPU second {m['per_cpu_ratio']:.2f}"
    )
    console.print(f"target (ours >= Prometheus): {'met' if m['ratio'] >= 1 else 'MISSED'}")


if __name__ == "__main__":
    main()
