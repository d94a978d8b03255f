"""`python -m benchmarks.remote_write`: the remote-write receiver and compaction on this machine.

A corpus of realistic WriteRequests (label sets like the five set-ups, one sample per series per
scrape, counters increasing, snappy block format) is replayed over loopback by a concurrent client
against `billing remote-write serve` running in its own process. Reported: samples/s acknowledged
(every 204 means appended and fsynced), the receiver's CPU and the share of it spent decoding
(snappy + the compiled protobuf reader + columns, measured per request with thread CPU time), fsync calls (group
commit), then compaction samples/s of the landed segments into raw day partitions, and decoding
alone in one process for reference.
"""

from __future__ import annotations

import argparse
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path

import remote_write_corpus as corpus
import requests

from benchmarks.proc import cpu_seconds
from benchmarks.receiver_vs_prometheus import HEADERS, start_ours, stop
from billing_dags.core.settings import PROJECT_ROOT, resolve_paths
from billing_dags.ingest.compaction import compact
from billing_dags.ingest.remote_write.decode import Decoder

START_MS = 1_780_000_000_000


def _metric(url: str, name: str) -> float:
    text = requests.get(url + "/metrics", timeout=5).text
    return sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith((name + " ", name + "{")))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.remote_write", description=__doc__)
    parser.add_argument("--series", type=int, default=10_000)
    parser.add_argument("--samples-per-request", type=int, default=2000, help="Prometheus max_samples_per_send (default 2000)")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8, help="client connections (Prometheus shards)")
    parser.add_argument("--keep", help="keep the data dir here")
    args = parser.parse_args()

    root = Path(args.keep or tempfile.mkdtemp(prefix="billing-rw-bench-"))
    paths = resolve_paths(root / "data", PROJECT_ROOT / "seeds")
    t0 = time.perf_counter()
    bodies = corpus.request_stream(args.series, args.samples_per_request, args.requests, START_MS)
    total_samples = args.samples_per_request * args.requests
    body_bytes = sum(map(len, bodies))
    print(
        f"corpus: {args.requests} requests x {args.samples_per_request} samples over {args.series} series, "
        f"{body_bytes / len(bodies) / 1024:.1f} KiB/request compressed, built in {time.perf_counter() - t0:.1f}s"
    )

    # decoding alone, one thread, for reference
    dec = Decoder()
    for b in bodies[:20]:
        dec.decode(b)  # warm the series cache as a long-running receiver has it
    t0 = time.process_time()
    n = 0
    for b in bodies[:100]:
        n += dec.decode(b).samples
    decode_alone = n / (time.process_time() - t0)

    proc, url = start_ours(root)
    try:
        # warm-up: the series cache fills on the first scrape's worth of requests
        warm = max(1, args.series // args.samples_per_request)
        s = requests.Session()
        for b in bodies[:warm]:
            assert s.post(url + "/api/v1/write", data=b, headers=HEADERS, timeout=30).status_code == 204
        work: queue.Queue = queue.Queue()
        for b in bodies[warm:]:
            work.put(b)
        codes: list[int] = []
        lock = threading.Lock()

        def client() -> None:
            sess = requests.Session()
            while True:
                try:
                    b = work.get_nowait()
                except queue.Empty:
                    return
                r = sess.post(url + "/api/v1/write", data=b, headers=HEADERS, timeout=60)
                with lock:
                    codes.append(r.status_code)

        cpu0 = cpu_seconds(proc.pid)
        dec0 = _metric(url, "billing_remote_write_decode_cpu_seconds_total")
        fs0 = _metric(url, "billing_remote_write_fsyncs")
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(proc.pid) - cpu0
        decode_cpu = _metric(url, "billing_remote_write_decode_cpu_seconds_total") - dec0
        fsyncs = _metric(url, "billing_remote_write_fsyncs") - fs0
        accepted = sum(1 for c in codes if c == 204) * args.samples_per_request
        assert all(c == 204 for c in codes), {c: codes.count(c) for c in set(codes)}
    finally:
        stop(proc)  # SIGTERM seals the open segment

    landing_bytes = sum(p.stat().st_size for p in paths.landing.glob("seg-*.seg"))
    t0 = time.perf_counter()
    result = compact(paths)
    compact_s = time.perf_counter() - t0
    raw_bytes = sum(p.stat().st_size for p in paths.raw_samples.glob("date=*/part-remote_write.parquet"))

    print(
        f"receiver: {accepted:,} samples acknowledged (fsynced) in {wall:.2f}s over {args.concurrency} connections "
        f"= {accepted / wall:,.0f} samples/s, {len(codes) / wall:.0f} requests/s"
    )
    print(
        f"receiver CPU: {cpu:.2f}s ({cpu / wall:.0%} of one core); decoding {decode_cpu:.2f}s = {decode_cpu / cpu:.0%} of it; "
        f"{fsyncs:.0f} fsyncs for {len(codes)} requests (group commit)"
    )
    print(f"decoding alone (one thread, warm series cache): {decode_alone:,.0f} samples/s")
    print(f"landing: {landing_bytes / total_samples:.1f} bytes/sample; raw parquet: {raw_bytes / max(result['new_samples'], 1):.2f} bytes/sample")
    print(
        f"compaction: {result['landing_samples']:,} samples ({result['new_samples']:,} new) in {compact_s:.2f}s "
        f"= {result['landing_samples'] / compact_s:,.0f} samples/s"
    )
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
