"""Series identity: a series id is a hash of an injective encoding of the label set, and no writer
trusts the hash alone (two label sets with one id are refused, never merged)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests

from billing_dags import raw
from billing_dags.compaction import compact
from billing_dags.defs.seeds.assets import write_seed_snapshots
from billing_dags.remote_write import corpus
from billing_dags.remote_write.server import WRITE_PATH
from billing_dags.settings import PROJECT_ROOT, resolve_paths
from billing_dags.sqlmodels import Window, run_model
from servers import free_port

DAY = date(2026, 5, 28)
T0 = raw.day_bounds_ms(DAY)[0] + 3_600_000
HEADERS = {"Content-Type": "application/x-protobuf", "Content-Encoding": "snappy", "X-Prometheus-Remote-Write-Version": "0.1.0"}
VICTIM = {"__name__": "stratum_bytes_sent_total", "client_id": "miner-002", "instance": "x"}


# --- the attack through the real receiver process, then compaction and the usage models ----------


class ReceiverProcess:
    """``billing remote-write serve`` as its own process on a free 127.0.0.1 port."""

    def __init__(self, data_dir: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable, "-m", "billing_dags.cli", "--data-dir", str(data_dir), "--seeds-dir", str(PROJECT_ROOT / "seeds"),
            "remote-write", "serve", "--listen", f"127.0.0.1:{self.port}", "--min-free-bytes", "0",
        ]
        self.proc = subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, f"the receiver exited: {log.read_text()[-2000:]}"
            try:
                if requests.get(self.url + "/-/ready", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the receiver did not become ready"
            time.sleep(0.1)

    def post(self, series) -> requests.Response:
        return requests.post(self.url + WRITE_PATH, data=corpus.body(series), headers=HEADERS, timeout=10)

    def stop(self) -> None:
        """SIGTERM: the receiver seals its open segment on the way out."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def _raw_series(paths) -> dict[int, tuple[str, tuple]]:
    """Every series of data/raw/series: id -> (metric, labels), one label set per id."""
    out: dict[int, tuple[str, tuple]] = {}
    for f in raw.series_files(paths):
        for r in pq.read_table(f).to_pylist():
            assert out.setdefault(r["series_id"], (r["metric"], tuple(r["labels"]))) == (r["metric"], tuple(r["labels"]))
    return out


def _proxy_usage(paths) -> dict[str, object]:
    """The day's proxy_bytes usage per customer, computed by the real models."""
    write_seed_snapshots(paths)
    w = Window(DAY, date.fromordinal(DAY.toordinal() + 1))
    run_model(paths, "fct_series_edges_by_day", w)
    rows = run_model(paths, "fct_usage_by_day", w).table.to_pylist()
    return {r["customer_id"]: r["usage"] for r in rows if r["meter_id"] == "proxy_bytes"}


@pytest.mark.integration
def test_a_crafted_metric_name_does_not_merge_into_another_customers_series(tmp_path):
    data_dir = tmp_path / "data"
    paths = resolve_paths(data_dir, PROJECT_ROOT / "seeds")
    victim = [(VICTIM, [(T0, 100.0), (T0 + 1000, 200.0), (T0 + 2000, 300.0)])]
    # the old encoding joined name \x00 value \x01: this metric name hashed like the victim's labels
    crafted = "stratum_bytes_sent_total\x01client_id\x00miner-002\x01instance\x00x"
    # a label VALUE may hold any UTF-8, \x00 and \x01 included: it must still be another series
    crafted_value = {"__name__": "stratum_bytes_sent_total", "client_id": "miner-002\x01instance\x00x"}
    rx = ReceiverProcess(data_dir, tmp_path / "receiver.log")
    try:
        assert rx.post(victim).status_code == 204
        by_name = rx.post([({"__name__": crafted}, [(T0 + 1500, 1e15)])])
        by_value = rx.post([(crafted_value, [(T0 + 1500, 1e15)])])
    finally:
        rx.stop()
    compact(paths)
    usage = _proxy_usage(paths)
    assert usage["mp-002"] == 300  # the victim's own counter: 100 (a new series) + 100 + 100
    series = _raw_series(paths)
    assert series[raw.series_id("stratum_bytes_sent_total", {"client_id": "miner-002", "instance": "x"})] == (
        "stratum_bytes_sent_total", (("client_id", "miner-002"), ("instance", "x")))
    assert by_name.status_code == 400 and "series 0" in by_name.text and "metric name" in by_name.text
    assert by_value.status_code == 204  # its own series, billed to nobody (no customer has that label value)
    assert series[raw.series_id(crafted_value["__name__"], {"client_id": crafted_value["client_id"]})][1] == (
        ("client_id", "miner-002\x01instance\x00x"),)
    assert len(series) == 2
