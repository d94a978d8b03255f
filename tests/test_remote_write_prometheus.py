"""A real Prometheus scrapes a prometheus_client exporter and remote-writes to our receiver.

The samples in our compacted partitions equal what Prometheus itself stored for the same series
and interval, even though the receiver is SIGKILLed mid-stream and restarted: Prometheus retries,
nothing acknowledged is missing and nothing is counted twice.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests
from servers import free_port, receiver_command, stop, wait_for

from billing_dags.core.settings import PROJECT_ROOT, resolve_paths
from billing_dags.ingest import raw
from billing_dags.ingest.compaction import compact
from billing_dags.ingest.remote_write.decode import is_stale
from billing_dags.ingest.remote_write.landing import read_segment

PROMETHEUS = "/usr/bin/prometheus"
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not os.path.exists(PROMETHEUS), reason="needs /usr/bin/prometheus (apt-get install --no-install-recommends prometheus)"),
]
TOKEN = "it-token-123"


class Receiver:
    def __init__(self, data_dir: Path, port: int, token_file: Path, log: Path):
        self.cmd = receiver_command(data_dir, PROJECT_ROOT / "seeds", port, "--token-file", str(token_file), "--segment-max-age", "1")
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: requests.get(self.url + "/-/ready", timeout=1).ok, 60, "the receiver")  # a wait on a condition: 60 s only on a loaded machine

    def samples(self) -> float:
        text = requests.get(self.url + "/metrics", timeout=2).text
        return next(float(l.split()[-1]) for l in text.splitlines() if l.startswith("billing_remote_write_samples_total"))


def _send_failures(prom_url: str) -> float:
    """Samples Prometheus's remote-write queue has retried or given up on so far (its own counters)."""
    text = requests.get(prom_url + "/metrics", timeout=5).text
    names = ("prometheus_remote_storage_samples_retried_total", "prometheus_remote_storage_samples_failed_total")
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(names))


def landed(landing: Path) -> dict[tuple[int, int], float]:
    """Every sample durable in landing segments (open or sealed): a superset of what got 204."""
    out = {}
    for p in sorted(landing.glob("seg-*")):
        if p.suffix in (".open", ".seg"):
            d = read_segment(p)
            for s, t, v in zip(d.series_id.tolist(), d.ts.tolist(), d.value.tolist()):
                out[(s, t)] = v
    return out


@pytest.mark.acceptance
def test_partitions_equal_prometheus_storage_across_a_sigkill(tmp_path):
    from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

    data_dir = tmp_path / "data"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    # the exporter: counters for a known and an unknown customer, a gauge
    registry = CollectorRegistry()
    sent = Counter("stratum_bytes_sent", "bytes", ["client_id"], registry=registry)
    devices = Gauge("iot_devices_connected", "devices", ["tenant"], registry=registry)
    exp_port = free_port()
    exp_server, _ = start_http_server(exp_port, addr="127.0.0.1", registry=registry)
    stop_exporter = threading.Event()

    def tick():
        i = 0
        while not stop_exporter.wait(0.1):
            i += 1
            sent.labels("miner-001").inc(1000 + i)
            sent.labels("ghost-7").inc(3)
            devices.labels("tenant-01").set(i % 17)

    threading.Thread(target=tick, daemon=True).start()

    rw_port, prom_port = free_port(), free_port()
    receiver = Receiver(data_dir, rw_port, token_file, tmp_path / "receiver.log")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: exporter
    static_configs:
      - targets: ["127.0.0.1:{exp_port}"]
remote_write:
  - url: http://127.0.0.1:{rw_port}/api/v1/write
    authorization:
      credentials_file: {token_file}
    queue_config:
      capacity: 200
      max_samples_per_send: 20
      batch_send_deadline: 1s
      min_backoff: 100ms
      max_backoff: 1s
      max_shards: 2
    metadata_config:
      send_interval: 2s
"""
    )
    prom_url = f"http://127.0.0.1:{prom_port}"
    prom = None
    try:
        receiver.start()
        t_start = time.time()
        with open(tmp_path / "prometheus.log", "wb") as log:
            prom = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                    "--storage.remote.flush-deadline=2s",
                    "--storage.tsdb.retention.time=1d",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(lambda: requests.get(prom_url + "/-/ready", timeout=1).ok, 20, "prometheus")
        wait_for(lambda: receiver.samples() > 20, 20, "the first remote-write batches")
        seen = receiver.samples()
        wait_for(lambda: receiver.samples() >= seen + 40, 20, "batches still streaming in")

        # SIGKILL mid-stream; Prometheus keeps scraping and retries while the receiver is down
        stop(receiver.proc, signal.SIGKILL)
        killed_at = time.time()
        orphan_open = list((data_dir / "landing").glob("seg-*.open"))
        unsent = _send_failures(prom_url)
        wait_for(lambda: _send_failures(prom_url) > unsent, 30, "Prometheus to fail sending to the killed receiver")
        receiver.start()
        wait_for(lambda: receiver.samples() > 40, 30, "Prometheus to resend to the restarted receiver")
        t_end = time.time() - 1.0

        def series_caught_up() -> bool:
            got = landed(data_dir / "landing")
            per_series: dict[int, int] = {}
            for s, t in got:
                per_series[s] = max(per_series.get(s, 0), t)
            return bool(per_series) and len(per_series) >= 7 and min(per_series.values()) >= t_end * 1000

        wait_for(series_caught_up, 20, "Prometheus to deliver everything up to t_end")
        own = requests.get(prom_url + "/metrics", timeout=5).text  # Prometheus's own counters
        retried = sum(float(l.split()[-1]) for l in own.splitlines() if l.startswith("prometheus_remote_storage_samples_retried_total"))
        # what Prometheus itself stored for the exporter's series, raw, via a range selector
        window_s = math.ceil(t_end - t_start) + 1
        resp = requests.get(prom_url + "/api/v1/query", params={"query": f'{{job="exporter"}}[{window_s}s]', "time": f"{t_end:.3f}"}, timeout=10).json()
        assert resp["status"] == "success", resp
    finally:
        stop_exporter.set()
        exp_server.shutdown()
        if prom is not None:
            stop(prom)
        if receiver.proc is not None:
            stop(receiver.proc)  # SIGTERM: the open segment is sealed

    lo, hi = int(t_start * 1000) - 1000, int(t_end * 1000)
    expected: dict[tuple[int, int], float] = {}
    for r in resp["data"]["result"]:
        labels = dict(r["metric"])
        name = labels.pop("__name__")
        sid = raw.series_id(name, labels)
        for ts, v in r["values"]:
            t = round(float(ts) * 1000)
            if lo <= t <= hi:
                expected[(sid, t)] = float(v)
    assert len(expected) > 50

    before = landed(data_dir / "landing")  # everything durable, so everything acknowledged
    raw_paths = resolve_paths(data_dir, PROJECT_ROOT / "seeds")
    result = compact(raw_paths)
    assert not list((data_dir / "landing").glob("seg-*")), "every segment is compacted and removed"

    got: dict[tuple[int, int], float] = {}
    rows = 0
    for f in sorted(raw_paths.raw_samples.glob("date=*/part-remote_write.parquet")):
        t = pq.read_table(f)
        rows += t.num_rows
        for s, ts, v in zip(t["series_id"].to_pylist(), t["ts"].to_pylist(), t["value"].to_pylist()):
            got[(s, ts)] = v
    assert rows == len(got), "no (series, timestamp) is in the partitions twice"
    assert set(before) <= set(got), "a landed (acknowledged) sample is missing from the partitions"
    ours = {k: v for k, v in got.items() if lo <= k[1] <= hi and k[0] in {s for s, _ in expected} and not is_stale(v)}
    missing = set(expected) - set(ours)
    extra = set(ours) - set(expected)
    assert not missing and not extra, (len(missing), len(extra), sorted(missing)[:5])
    assert all(ours[k] == expected[k] or (math.isnan(ours[k]) and math.isnan(expected[k])) for k in expected)
    # the kill happened while Prometheus was sending: it retried, and the receiver sealed the torn segment
    assert retried > 0, "Prometheus retried the batches the dead receiver did not acknowledge"
    assert orphan_open, "the SIGKILL left an open segment behind"
    assert "recovered landing segment" in (tmp_path / "receiver.log").read_text()
    assert any(d["unknown_customer"] > 0 for d in result["days"]), "ghost-7 is reported as an unknown customer"
    assert killed_at < t_end
    shutil.rmtree(tmp_path / "tsdb", ignore_errors=True)
