"""Hostile remote-write input against the real receiver, started as its own process.

Each attack gets a 4xx naming what is wrong, a legitimate writer keeps getting 204 before and
after it, the receiver restarts cleanly whatever it was sent, and every sample it acknowledged is
in the raw partitions after `billing remote-write compact`. A landing segment that cannot be
indexed (crafted on disk) is quarantined at start-up — its bytes kept, shown by `status` — and
its indexable samples are still compacted.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import remote_write_corpus as corpus
import requests
from servers import free_port, receiver_command, stop, wait_for

from billing_dags.core.settings import PROJECT_ROOT, resolve_paths
from billing_dags.ingest import raw
from billing_dags.ingest.remote_write.decode import Batch, SeriesInfo
from billing_dags.ingest.remote_write.landing import FILE_MAGIC, REC_HEADER, REC_MAGIC, encode_record

pytestmark = pytest.mark.integration

SEEDS = PROJECT_ROOT / "seeds"
HEADERS = {"Content-Type": "application/x-protobuf", "Content-Encoding": "snappy", "X-Prometheus-Remote-Write-Version": "0.1.0"}
LEGIT = {"__name__": "stratum_submits_total", "job": "proxy", "client_id": "miner-001"}
LEGIT_SID = raw.series_id(LEGIT["__name__"], {k: v for k, v in LEGIT.items() if k != "__name__"})
YEAR_10000_MS = 253_402_300_800_000  # 10000-01-01T00:00Z: what stopped the receiver for good
BEFORE_YEAR_1_MS = -62_135_596_800_001


def now_ms() -> int:
    return int(time.time() * 1000)


class Receiver:
    """`billing remote-write serve` in its own process group, on a free loopback port."""

    def __init__(self, tmp_path: Path, *extra: str):
        self.data_dir = tmp_path / "data"
        self.log = tmp_path / "receiver.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = receiver_command(self.data_dir, SEEDS, self.port, "--segment-max-age", "0.5", *extra)
        self.proc: subprocess.Popen | None = None
        self.session = requests.Session()

    def start(self) -> Receiver:
        with open(self.log, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def ready():
            assert self.proc.poll() is None, f"the receiver exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}"
            return requests.get(self.url + "/-/ready", timeout=1).ok

        wait_for(ready, 30, "the receiver")
        return self

    def stop(self) -> None:
        stop(self.proc)

    @property
    def stopped_cleanly(self) -> bool:
        """Exited on SIGTERM after sealing (uvicorn re-raises the signal once it has shut down)."""
        return self.proc.returncode in (0, -signal.SIGTERM) and not list(self.landing.glob("seg-*.open"))

    def post(self, body: bytes) -> requests.Response:
        return self.session.post(self.url + "/api/v1/write", data=body, headers=HEADERS, timeout=5)

    def metric(self, name: str) -> float:
        text = requests.get(self.url + "/metrics", timeout=5).text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))

    @property
    def landing(self) -> Path:
        return self.data_dir / "landing"


def cli(capsys, data_dir: Path, *args: str) -> tuple[int, str]:
    """`billing remote-write ARGS` (in this process: the command's own code, without a second start-up)."""
    from billing_dags.cli.main import main

    capsys.readouterr()
    code = main(["--data-dir", str(data_dir), "--seeds-dir", str(SEEDS), "remote-write", *args])
    return code, capsys.readouterr().out


def compacted(data_dir: Path) -> set[tuple[int, int]]:
    """(series_id, ts) of every sample in the remote-write raw partitions."""
    paths = resolve_paths(data_dir, SEEDS)
    out: set[tuple[int, int]] = set()
    for part in sorted(paths.raw_samples.glob("date=*/part-remote_write.parquet")):
        t = pq.read_table(part)
        out.update(zip(t["series_id"].to_pylist(), t["ts"].to_pylist()))
    return out


def legit_body(ts: int) -> bytes:
    return corpus.body([(LEGIT, [(ts, 1.0), (ts + 1, 2.0)])])


def with_metadata(series) -> bytes:
    """The same series with a metadata entry: the protobuf fallback decodes it, not the compiled reader."""
    return corpus.body(series, metadata=[("up", 1, "x")])


OUT_OF_WINDOW = [YEAR_10000_MS, 2**62, 2**63 - 1, BEFORE_YEAR_1_MS, -(2**63), -1, 0, 946_684_799_999]  # the last: 1999-12-31


def test_out_of_window_timestamps_get_400_and_the_receiver_keeps_serving_and_restarts(tmp_path, capsys):
    rx = Receiver(tmp_path).start()
    acked: set[tuple[int, int]] = set()
    figures = {"attacks": 0, "attack_400": 0, "5xx": 0, "legit_204": 0}
    base = now_ms() - 3_600_000
    try:
        k = 0
        for ts in [*OUT_OF_WINDOW, "future"]:
            for make in (corpus.body, with_metadata):  # the compiled reader and the protobuf fallback
                bad_ts = now_ms() + 86_400_000 if ts == "future" else ts
                other = {**LEGIT, "client_id": "miner-002"}
                r = rx.post(make([(other, [(base, 1.0)]), (LEGIT, [(base + 5, 3.0), (bad_ts, 4.0)])]))
                figures["attacks"] += 1
                figures["5xx"] += r.status_code >= 500
                assert r.status_code == 400, (ts, r.status_code, r.text)
                figures["attack_400"] += 1
                assert "series 1" in r.text and str(bad_ts) in r.text and "--min-sample-time" in r.text, r.text
                k += 1
                good_ts = base + 10_000 * k
                r = rx.post(legit_body(good_ts))
                assert r.status_code == 204, r.text
                acked.update({(LEGIT_SID, good_ts), (LEGIT_SID, good_ts + 1)})
                figures["legit_204"] += 1
        # past two more segment seals (every 0.5 s): the writer still answers
        sealed = len(list(rx.landing.glob("seg-*.seg")))

        def one_more_write_sealed():
            nonlocal k
            k += 1
            r = rx.post(legit_body(base + 10_000 * k))
            figures["5xx"] += r.status_code >= 500
            assert r.status_code == 204, r.text
            acked.update({(LEGIT_SID, base + 10_000 * k), (LEGIT_SID, base + 10_000 * k + 1)})
            figures["legit_204"] += 1
            return len(list(rx.landing.glob("seg-*.seg"))) >= sealed + 2

        wait_for(one_more_write_sealed, 10, "two more sealed segments", step=0.05)
        assert rx.metric("billing_remote_write_out_of_window_samples_total") == figures["attacks"]
        assert rx.metric('billing_remote_write_requests_total{code="400"}') == figures["attacks"]
    finally:
        rx.stop()
    assert rx.stopped_cleanly and list(rx.landing.glob("seg-*.seg"))
    rx.start()  # a clean restart after every one of those inputs
    assert rx.post(legit_body(base + 10_000 * (k + 1))).status_code == 204
    acked.update({(LEGIT_SID, base + 10_000 * (k + 1)), (LEGIT_SID, base + 10_000 * (k + 1) + 1)})
    rx.stop()
    assert rx.stopped_cleanly
    assert cli(capsys, rx.data_dir, "compact")[0] == 0
    found = compacted(rx.data_dir)
    assert acked <= found, len(acked - found)
    assert all(t >= 946_684_800_000 and t < now_ms() + 600_000 for _, t in found)
    print(f"\ntimestamps: {figures}, acknowledged {len(acked)}, found after compaction {len(acked & found)}")


def _series_defs_record(records: list[tuple[list, list[int], list[int], list[float]]]) -> bytes:
    out = b""
    for defs, sids, tss, vals in records:
        infos = {sid: SeriesInfo(sid, metric, tuple(labels.items()), "unmetered", None) for sid, metric, labels in defs}
        batch = Batch(infos, np.array(sids, dtype=np.int64), np.array(tss, dtype=np.int64), np.array(vals, dtype=np.float64))
        out += encode_record(batch, [d[0] for d in defs])
    return out


def test_a_segment_that_cannot_be_indexed_is_quarantined_and_the_receiver_starts(tmp_path, capsys):
    rx = Receiver(tmp_path)
    rx.landing.mkdir(parents=True)
    base = now_ms() - 7_200_000
    labels = {k: v for k, v in LEGIT.items() if k != "__name__"}
    # what the receiver wrote before it checked timestamps: acknowledged samples, then one at year 10000
    stuck = FILE_MAGIC + _series_defs_record(
        [
            ([(LEGIT_SID, LEGIT["__name__"], labels)], [LEGIT_SID] * 3, [base, base + 1000, base + 2000], [1.0, 2.0, 3.0]),
            ([], [LEGIT_SID, LEGIT_SID], [base + 3000, YEAR_10000_MS], [4.0, 5.0]),
            ([], [LEGIT_SID], [base + 4000], [6.0]),
        ]
    )
    (rx.landing / "seg-20261101T000000000000Z-999-000001.open").write_bytes(stuck)
    # a record whose CRC is right but whose payload is not a record (garbage written by anything)
    junk = b"\x01\x00\x00\x00\xff\xff\xff\x7fnot json"
    corrupt = FILE_MAGIC + REC_HEADER.pack(REC_MAGIC, len(junk), zlib.crc32(junk)) + junk
    (rx.landing / "seg-20261101T000000000000Z-999-000002.open").write_bytes(corrupt)
    rx.start()  # before: exit 3 (OverflowError: date value out of range), every restart
    try:
        assert rx.post(legit_body(base + 60_000)).status_code == 204
    finally:
        rx.stop()
    assert rx.stopped_cleanly
    code, status = cli(capsys, rx.data_dir, "status")
    assert code == 0
    quarantined = {q["segment"]: q for q in json.loads(status)["quarantined_segments"]}
    assert set(quarantined) == {"seg-20261101T000000000000Z-999-000001", "seg-20261101T000000000000Z-999-000002"}
    assert str(YEAR_10000_MS) in quarantined["seg-20261101T000000000000Z-999-000001"]["reason"]
    assert quarantined["seg-20261101T000000000000Z-999-000001"]["salvaged_samples"] == 5
    kept = {p.name: p.read_bytes() for p in (rx.landing / "quarantine").iterdir() if p.suffix in (".open", ".seg")}
    assert sorted(kept.values()) == sorted([stuck, corrupt])  # every byte kept
    assert cli(capsys, rx.data_dir, "compact")[0] == 0
    found = compacted(rx.data_dir)
    salvaged = {(LEGIT_SID, base + d) for d in (0, 1000, 2000, 3000, 4000)}
    assert salvaged | {(LEGIT_SID, base + 60_000), (LEGIT_SID, base + 60_001)} <= found
    assert not any(t == YEAR_10000_MS for _, t in found)
    assert cli(capsys, rx.data_dir, "compact")[0] == 0  # and again: nothing left to trip on


def test_oversized_labels_get_400_naming_the_label_and_the_receiver_keeps_serving(tmp_path):
    rx = Receiver(tmp_path).start()
    base = now_ms() - 600_000
    attacks = {
        "value": {**LEGIT, "huge": "v" * (1 << 20)},
        "name": {**LEGIT, "n" * 2000: "x"},
        "count": {**LEGIT, **{f"l{i:03d}": "x" for i in range(100)}},
        "metric": {**LEGIT, "__name__": "m" * 5000},
    }
    figures = {"attacks": 0, "5xx": 0}
    try:
        for i, (what, labels) in enumerate(attacks.items()):
            for make in (corpus.body, with_metadata):
                r = rx.post(make([(LEGIT, [(base, 1.0)]), (labels, [(base + i, 1.0)])]))
                figures["attacks"] += 1
                figures["5xx"] += r.status_code >= 500
                assert r.status_code == 400, (what, r.status_code, r.text[:200])
                assert "series 1" in r.text and "limit" in r.text, r.text[:300]
                assert len(r.text) < 1000  # the message names the label, it does not echo it
                assert {"value": "'huge'", "name": "'nnnn", "count": "103 labels", "metric": "'__name__'"}[what] in r.text
                assert rx.post(legit_body(base + 1000 * (i + 1))).status_code == 204
        # at the limits themselves: accepted
        edge = {**LEGIT, "a" * 1024: "b" * 2048, **{f"l{i:02d}": "x" for i in range(60)}}
        assert rx.post(corpus.body([(edge, [(base, 1.0)])])).status_code == 204
    finally:
        rx.stop()
    assert rx.stopped_cleanly
    print(f"\nlabels: {figures}")


def test_the_series_cache_is_bounded_in_bytes():
    from billing_dags.ingest.remote_write.decode import Decoder, Limits

    limit = 4 << 20
    dec = Decoder(limits=Limits(max_cache_bytes=limit))
    t = now_ms()
    dec.decode(corpus.body([({"__name__": "up"}, [(t, 1.0)])]))  # loads the compiled reader: not the cache's memory
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(300):  # 300 new series of 60 labels x 2000 bytes: 36 MB of labels
        labels = {"__name__": "up", **{f"l{j:02d}": f"{i:06d}" + "v" * 1994 for j in range(60)}}
        dec.decode(corpus.body([(labels, [(t, 1.0)])]))
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert 0 < dec.cache_bytes <= limit
    assert held < 2 * limit, held  # what the decoder really holds, not only what it counts


def test_salvage_never_merges_two_label_sets_a_segment_gives_one_id(tmp_path):
    # a crafted segment defines one id twice with different labels, and holds a sample at year 10000:
    # the salvaged segment must not carry the id's samples under one of the two label sets
    from billing_dags.ingest.remote_write.landing import read_segment, recover_orphans

    base = now_ms() - 7_200_000
    labels = {k: v for k, v in LEGIT.items() if k != "__name__"}
    other = {**labels, "instance": "someone-else"}
    path = tmp_path / "seg-20261101T000000000000Z-999-000003.open"
    path.write_bytes(
        FILE_MAGIC
        + _series_defs_record(
            [
                ([(LEGIT_SID, LEGIT["__name__"], labels)], [LEGIT_SID], [base], [1.0]),
                ([(LEGIT_SID, LEGIT["__name__"], other)], [LEGIT_SID], [base + 1000], [1e15]),
                ([(7, "other_metric", {})], [7, 7], [base, YEAR_10000_MS], [2.0, 3.0]),
            ]
        )
    )
    (entry,) = [r for r in recover_orphans(tmp_path) if r.get("quarantined")]
    assert entry["salvaged_samples"] == 1  # only series 7's sample in the window
    salvaged = read_segment(next(tmp_path.glob(f"{entry['salvaged_segment']}.*")))
    assert LEGIT_SID not in salvaged.series_id.tolist()
    assert (tmp_path / "quarantine" / path.name).exists() and not path.exists()  # both label sets kept there
