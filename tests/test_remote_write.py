"""The remote-write receiver: decoding, landing durability, and every HTTP answer (204/400/401/413/415/503)."""

from __future__ import annotations

import errno
import math
import os
import random
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import cramjam
import numpy as np
import pytest
import remote_write_corpus as corpus
import requests
from servers import serve_app

from billing_dags.ingest import raw
from billing_dags.ingest.remote_write.customers import CustomerResolver
from billing_dags.ingest.remote_write.decode import STALE_NAN_BITS, BadRequest, Decoder, TooLarge
from billing_dags.ingest.remote_write.landing import (
    OPEN_SUFFIX,
    SegmentWriter,
    read_segment,
    recover_orphans,
    sealed_segments,
)
from billing_dags.ingest.remote_write.server import WRITE_PATH, ReceiverConfig, create_app

STALE = struct.unpack("<d", struct.pack("<Q", STALE_NAN_BITS))[0]
T0 = 1_780_000_000_000  # 2026-05-28 UTC, ms
HEADERS = {"Content-Type": "application/x-protobuf", "Content-Encoding": "snappy", "X-Prometheus-Remote-Write-Version": "0.1.0"}


def series(name="stratum_submits_total", **labels):
    return {"__name__": name, "job": "proxy", **labels}


# --- decoding --------------------------------------------------------------------------------


def test_decode_counts_staleness_nonfinite_unknown_customers_and_metadata(small_seeds):
    dec = Decoder(CustomerResolver.from_seeds(small_seeds))
    body = corpus.body(
        [
            (series(client_id="miner-001"), [(T0, 1.0), (T0 + 1000, 2.0), (T0 + 2000, STALE)]),
            (series(client_id="ghost-9"), [(T0, 5.0)]),
            (series("node_load1", instance="a"), [(T0, math.nan), (T0 + 1, math.inf)]),
        ],
        metadata=[("stratum_submits_total", 1, "submits")],
    )
    b = dec.decode(body)
    assert b.samples == 6 and len(b.series) == 3
    assert (b.stale, b.nonfinite, b.unknown_customer) == (1, 2, 1)
    assert dict(b.unknown_customers) == {"ghost-9": 1}
    assert b.metadata == 1
    sid = raw.series_id("stratum_submits_total", {"job": "proxy", "client_id": "miner-001"})
    assert b.series[sid].metric == "stratum_submits_total"
    assert b.value.view(np.uint64)[2] == STALE_NAN_BITS  # the exact staleness bit pattern survives
    assert b.days == {T0 // raw.DAY_MS: {"samples": 6, "stale": 1, "nonfinite": 2, "unknown_customer": 1}}


def test_metadata_only_request_decodes_to_no_samples():
    b = Decoder().decode(corpus.body([], metadata=[("up", 2, "scrape ok")]))
    assert b.samples == 0 and b.metadata == 1


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: corpus.body([({"job": "x"}, [(T0, 1.0)])]), "no metric name"),
        (lambda: corpus.body([({"__name__": "", "job": "x"}, [(T0, 1.0)])]), "no metric name"),
        (lambda: corpus.body([({"job": "x", "__name__": "up"}, [(T0, 1.0)])], sort_labels=False), "unsorted"),
        (lambda: corpus.compress(_dup_labels()), "duplicate"),
        (lambda: b"\x10not snappy at all", "snappy"),
        (lambda: corpus.compress(b"\xff\xff\xff\xff\xff\xff\xff"), "protobuf"),
        (lambda: corpus.compress(b"\x0a\x05\x0a\x03\x0a\x01\xff"), "UTF-8"),  # invalid UTF-8 in a label
    ],
)
def test_bad_bodies_are_rejected_with_a_clear_message(make, message):
    with pytest.raises(BadRequest, match=message):
        Decoder().decode(make())


def _dup_labels() -> bytes:
    req = corpus.write_request([])
    ts = req.timeseries.add()
    for k, v in [("__name__", "up"), ("job", "a"), ("job", "b")]:
        ts.labels.add(name=k, value=v)
    ts.samples.add(timestamp=T0, value=1)
    return req.SerializeToString()


def test_a_snappy_bomb_is_refused_before_decompression():
    dec = Decoder(max_decoded_bytes=1000)
    with pytest.raises(TooLarge):
        dec.decode(corpus.compress(b"\x00" * 5000))


# --- landing segments ------------------------------------------------------------------------


def _batch(dec, n=3, start=T0, client="miner-001"):
    return dec.decode(corpus.body([(series(client_id=client), [(start + i * 1000, float(i)) for i in range(n)])]))


def test_segments_round_trip_and_seal_with_a_day_index(tmp_path):
    dec = Decoder()
    w = SegmentWriter(tmp_path, max_segment_age_s=3600)
    for k in range(3):
        w.submit(_batch(dec, start=T0 + k * 10_000)).result(5)
    w.submit(_batch(dec, start=T0 + raw.DAY_MS, client="miner-002")).result(5)
    w.close()
    [seg] = sealed_segments(tmp_path)
    data = read_segment(seg.path)
    assert data.records == 4 and not data.torn and len(data.ts) == 12
    assert len(data.series) == 2  # each series' labels written once per segment
    day0 = raw.day_of_ms(T0).isoformat()
    day1 = raw.day_of_ms(T0 + raw.DAY_MS).isoformat()
    assert seg.days == [day0, day1]
    assert seg.index["days"][day0]["samples"] == 9 and seg.index["days"][day1]["samples"] == 3


def test_segments_rotate_by_size_and_age(tmp_path):
    dec = Decoder()
    w = SegmentWriter(tmp_path, max_segment_bytes=100, max_segment_age_s=0.3)
    w.submit(_batch(dec)).result(5)
    w.submit(_batch(dec)).result(5)  # the first is over 100 bytes: sealed before the second
    time.sleep(0.8)  # the second is sealed by age while idle
    assert len(sealed_segments(tmp_path)) == 2
    assert not list(tmp_path.glob(f"*{OPEN_SUFFIX}"))
    w.close()


def test_a_torn_tail_is_ignored_and_cut_by_recovery(tmp_path):
    dec = Decoder()
    w = SegmentWriter(tmp_path, max_segment_age_s=3600)
    w.submit(_batch(dec)).result(5)
    w.submit(_batch(dec, start=T0 + 60_000)).result(5)
    open_path = next(tmp_path.glob(f"*{OPEN_SUFFIX}"))
    # a live writer holds the lock: recovery leaves its segment alone
    assert recover_orphans(tmp_path) == []
    seg_fd = w._seg.fd
    w._seal_current = lambda: None  # stop the thread without sealing: what a SIGKILL leaves behind
    w.close()
    os.close(seg_fd)  # the process is gone: its lock with it
    good = open_path.stat().st_size
    rec = open_path.read_bytes()[8:]
    with open(open_path, "ab") as f:  # half of a third record, never acknowledged
        f.write(rec[: len(rec) // 3])
    assert read_segment(open_path).records == 2 and read_segment(open_path).torn
    [r] = recover_orphans(tmp_path)
    assert r["torn"] and r["torn_tail_bytes_dropped"] > 0 and r["records"] == 2
    [seg] = sealed_segments(tmp_path)
    assert seg.path.stat().st_size == good and read_segment(seg.path).records == 2


def test_a_failed_write_is_truncated_and_reported_as_disk_full(tmp_path, monkeypatch):
    from billing_dags.ingest.remote_write import landing

    dec = Decoder()
    w = SegmentWriter(tmp_path, max_segment_age_s=3600)
    w.submit(_batch(dec)).result(5)
    size = next(tmp_path.glob(f"*{OPEN_SUFFIX}")).stat().st_size
    real_write = os.write
    calls = {"n": 0}

    def full(fd, data):
        calls["n"] += 1
        real_write(fd, bytes(data)[:10])  # a partial write, then no space
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(landing.os, "write", full)
    with pytest.raises(landing.DiskFull):
        w.submit(_batch(dec, start=T0 + 5000)).result(5)
    monkeypatch.setattr(landing.os, "write", real_write)
    assert next(tmp_path.glob(f"*{OPEN_SUFFIX}")).stat().st_size == size
    w.submit(_batch(dec, start=T0 + 9000)).result(5)  # the writer carries on once space is back
    w.close()
    [seg] = sealed_segments(tmp_path)
    assert read_segment(seg.path).records == 2 and not read_segment(seg.path).torn


def _far_future_batch(dec):
    """A batch with a sample at 10000-01-01, built past the decoder (which refuses it)."""
    b = _batch(dec)
    b.ts = b.ts.copy()
    b.ts[-1] = 253_402_300_800_000
    return b


def test_the_writer_refuses_a_batch_it_could_not_index_and_keeps_writing(tmp_path):
    from billing_dags.ingest.remote_write.landing import Unindexable

    dec = Decoder()
    w = SegmentWriter(tmp_path, max_segment_bytes=1, max_segment_age_s=3600)  # sealed after every group
    with pytest.raises(Unindexable, match="253402300800000"):
        w.submit(_far_future_batch(dec)).result(5)
    w.submit(_batch(dec, start=T0 + 5000)).result(5)
    w.submit(_batch(dec, start=T0 + 9000)).result(5)
    w.close()
    data = [read_segment(s.path) for s in sealed_segments(tmp_path)]
    assert sorted(t for d in data for t in d.ts.tolist()) == [T0 + 5000, T0 + 6000, T0 + 7000, T0 + 9000, T0 + 10000, T0 + 11000]


def test_the_writer_survives_an_unexpected_error_and_nothing_acknowledged_is_lost(tmp_path, monkeypatch):
    from billing_dags.ingest.remote_write import landing

    dec = Decoder()
    real_seal = landing.seal
    calls = {"n": 0}

    def seal_fails_once(*args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug in sealing")
        return real_seal(*args)

    monkeypatch.setattr(landing, "seal", seal_fails_once)
    w = SegmentWriter(tmp_path, max_segment_bytes=1, max_segment_age_s=3600)
    w.submit(_batch(dec)).result(5)  # acknowledged; then its segment fails to seal
    w.submit(_batch(dec, start=T0 + 5000)).result(5)  # the writer is still there
    w.close()
    assert calls["n"] == 2
    recover_orphans(tmp_path)  # the segment that failed to seal is an orphan: recovery seals it
    data = [read_segment(s.path) for s in sealed_segments(tmp_path)]
    assert sorted(t for d in data for t in d.ts.tolist()) == [T0, T0 + 1000, T0 + 2000, T0 + 5000, T0 + 6000, T0 + 7000]


# --- the HTTP server -------------------------------------------------------------------------


@contextmanager
def receiver(tmp_path: Path, **overrides):
    config = ReceiverConfig(landing_dir=tmp_path / "landing", min_free_bytes=0, **overrides)
    app = create_app(config)
    with serve_app(app) as url:
        yield url, app


def post(url, body, headers=HEADERS, **kw):
    return requests.post(url + WRITE_PATH, data=body, headers=headers, timeout=10, **kw)


def good_body(start=T0, n=3):
    return corpus.body([(series(client_id="miner-001"), [(start + i * 1000, float(i)) for i in range(n)])])


def test_204_means_the_batch_is_in_a_fsynced_segment(tmp_path):
    with receiver(tmp_path, max_segment_age_s=3600) as (url, _app):
        r = post(url, good_body())
        assert r.status_code == 204
        # durable before the answer: the open segment already holds the record
        [open_path] = (tmp_path / "landing").glob(f"*{OPEN_SUFFIX}")
        data = read_segment(open_path)
        assert data.records == 1 and list(data.ts) == [T0, T0 + 1000, T0 + 2000]
        assert post(url, corpus.body([], metadata=[("up", 2, "")])).status_code == 204  # metadata only
        metrics = requests.get(url + "/metrics", timeout=5).text
        assert 'billing_remote_write_requests_total{code="204"} 2.0' in metrics
        assert "billing_remote_write_samples_total 3.0" in metrics
    # shutdown seals the segment
    [seg] = sealed_segments(tmp_path / "landing")
    assert seg.index["samples"] == 3


@pytest.mark.parametrize(
    ("body", "headers", "code", "message"),
    [
        (b"garbage", HEADERS, 400, "snappy"),
        (corpus.compress(b"\xff\x01\x02"), HEADERS, 400, "protobuf"),
        (corpus.body([({"job": "a"}, [(T0, 1.0)])]), HEADERS, 400, "metric name"),
        (corpus.body([({"job": "a", "__name__": "up"}, [(T0, 1.0)])], sort_labels=False), HEADERS, 400, "unsorted"),
        (corpus.compress(_dup_labels()), HEADERS, 400, "duplicate"),
        (good_body(), {**HEADERS, "Content-Type": "application/json"}, 415, "Content-Type"),
        (good_body(), {**HEADERS, "Content-Type": "application/x-protobuf;proto=io.prometheus.write.v2.Request"}, 415, "Content-Type"),
        (good_body(), {**HEADERS, "Content-Encoding": "gzip"}, 415, "Content-Encoding"),
        (good_body(), {k: v for k, v in HEADERS.items() if k != "Content-Encoding"}, 415, "Content-Encoding"),
    ],
)
def test_bad_requests_get_4xx_and_nothing_lands(tmp_path, body, headers, code, message):
    with receiver(tmp_path) as (url, _):
        r = post(url, body, headers)
        assert r.status_code == code and message in r.text
        assert post(url, good_body()).status_code == 204  # still serving
    [seg] = sealed_segments(tmp_path / "landing")
    assert seg.index["records"] == 1


def test_bearer_token(tmp_path):
    with receiver(tmp_path, token="s3cret-token") as (url, _):
        assert post(url, good_body()).status_code == 401
        assert post(url, good_body(), {**HEADERS, "Authorization": "Bearer wrong"}).status_code == 401
        r = post(url, good_body(), {**HEADERS, "Authorization": "Bearer s3cret-token"})
        assert r.status_code == 204


def test_413_past_the_body_limit(tmp_path):
    big = corpus.body([(series(client_id=f"c{i}"), [(T0, float(i))]) for i in range(400)])
    with receiver(tmp_path, max_body_bytes=len(big) - 1, max_decoded_bytes=1 << 20) as (url, _):
        assert post(url, big).status_code == 413
        # chunked (no Content-Length): cut off while streaming
        assert post(url, iter([big[:1000], big[1000:]])).status_code == 413
        assert post(url, corpus.compress(b"\x00" * (2 << 20))).status_code == 413  # decodes past the limit
        assert post(url, good_body()).status_code == 204


def test_503_when_the_disk_is_full(tmp_path, monkeypatch):
    with receiver(tmp_path) as (url, app):
        writer = app.state.receiver["writer"]
        writer.min_free_bytes = 1 << 62  # below the free-space reserve
        assert post(url, good_body()).status_code == 503
        writer.min_free_bytes = 0
        from billing_dags.ingest.remote_write import landing

        real = os.fdatasync

        def enospc(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(landing.os, "fdatasync", enospc)  # the write itself fails
        assert post(url, good_body(T0 + 10_000)).status_code == 503
        monkeypatch.setattr(landing.os, "fdatasync", real)
        assert post(url, good_body(T0 + 20_000)).status_code == 204
    data = read_segment(sealed_segments(tmp_path / "landing")[0].path)
    assert sorted(set(data.ts.tolist())) == [T0 + 20_000, T0 + 21_000, T0 + 22_000]  # nothing of the 503s


def test_503_over_the_in_flight_limit(tmp_path, monkeypatch):
    """The limit counts requests being decoded and written: a body still trickling in holds no slot."""
    held, decoding, release = good_body(T0 + 20_000), threading.Event(), threading.Event()
    decode = Decoder.decode

    def slow_decode(self, body):
        if body == held:
            decoding.set()
            release.wait(10)
        return decode(self, body)

    monkeypatch.setattr(Decoder, "decode", slow_decode)
    with receiver(tmp_path, max_in_flight=1) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        body = good_body()
        slow = socket.create_connection((host, int(port)))
        head = "".join(f"{k}: {v}\r\n" for k, v in HEADERS.items())
        slow.sendall(f"POST {WRITE_PATH} HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode() + body[:5])
        assert post(url, good_body(T0 + 10_000)).status_code == 204
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, url, held)
            assert decoding.wait(10)  # the first request holds the only slot while it is decoded
            assert post(url, good_body(T0 + 50_000)).status_code == 503
            release.set()
            assert first.result().status_code == 204
        slow.sendall(body[5:])
        assert slow.recv(100).startswith(b"HTTP/1.1 204")
        slow.close()
        assert post(url, good_body(T0 + 60_000)).status_code == 204


def test_fuzz_random_and_truncated_bodies_get_400_and_the_server_stays_up(tmp_path):
    rng = random.Random(1234)
    good = corpus.body([(series(client_id=f"c{i}"), [(T0 + j, float(j)) for j in range(5)]) for i in range(20)])
    raw_pb = cramjam.snappy.decompress_raw(good)
    dec = Decoder()
    with receiver(tmp_path) as (url, _):
        session = requests.Session()
        for i in range(150):
            kind = i % 3
            if kind == 0:
                body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
            elif kind == 1:
                body = good[: rng.randrange(0, len(good))]  # a truncated snappy block
            else:
                cut = bytes(raw_pb)[: rng.randrange(1, len(raw_pb))]  # truncated protobuf, valid snappy
                body = corpus.compress(cut)
            try:
                dec.decode(body)
                expected = {204}
            except (BadRequest, TooLarge):
                expected = {400, 413}
            r = session.post(url + WRITE_PATH, data=body, headers=HEADERS, timeout=10)
            assert r.status_code in expected, (i, r.status_code, r.text)
            if kind == 1:
                assert r.status_code == 400
        assert session.post(url + WRITE_PATH, data=good, headers=HEADERS, timeout=10).status_code == 204
        assert requests.get(url + "/-/ready", timeout=5).status_code == 200


def test_cli_rejects_a_bad_listen_address_and_token_file(tmp_path, capsys):
    from billing_dags.cli.main import main

    assert main(["--data-dir", str(tmp_path), "remote-write", "serve", "--listen", "localhost"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    assert main(["--data-dir", str(tmp_path), "remote-write", "serve", "--token-file", str(tmp_path / "missing")]) == 2
    assert "--token-file" in capsys.readouterr().err
    assert main(["--data-dir", str(tmp_path), "remote-write", "status"]) == 0
    assert '"pending_days": {}' in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--min-sample-time", "1960-01-01"], "earliest sample time"),
        (["--min-sample-time", "yesterday"], "--min-sample-time"),
        (["--max-sample-future", "-1"], "future margin"),
        (["--max-sample-future", "1e12"], "future margin"),
        (["--max-labels", "0"], "max_labels"),
        (["--max-label-value-bytes", "0"], "max_label_value_bytes"),
    ],
)
def test_cli_rejects_limits_that_could_open_the_window_or_refuse_everything(tmp_path, capsys, flags, message):
    from billing_dags.cli.main import main

    assert main(["--data-dir", str(tmp_path), "remote-write", "serve", *flags]) == 2
    assert message in capsys.readouterr().err
