"""Streamed remote-read responses: the XOR chunk decoder (billing_dags.ingest.remote_write.xor) against a
reference encoder written from Prometheus's tsdb/chunkenc/xor.go, the frames' CRC-32C, and a
streamed response read by the client as the same rows as a samples response."""

from __future__ import annotations

import math
import random
import struct

import cramjam
import numpy as np
import pytest

from billing_dags.ingest import prometheus as prom
from billing_dags.ingest.remote_write import xor
from billing_dags.ingest.remote_write.proto import ChunkedReadResponse, ReadRequest

MASK = (1 << 64) - 1
STALE_BITS = prom.STALE_NAN_BITS


class _Bits:
    def __init__(self):
        self.bits: list[int] = []

    def write(self, value: int, n: int) -> None:
        self.bits.extend((value >> i) & 1 for i in range(n - 1, -1, -1))

    def data(self) -> bytes:
        bits = self.bits + [0] * (-len(self.bits) % 8)
        return bytes(int("".join(map(str, bits[i : i + 8])), 2) for i in range(0, len(bits), 8))


def _uvarint(x: int) -> list[int]:
    out = []
    while x >= 0x80:
        out.append((x & 0x7F) | 0x80)
        x >>= 7
    return [*out, x]


def _fbits(v: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", v))[0]


def xor_chunk(samples: list[tuple[int, int]]) -> bytes:
    """[(ts ms, value bits)] as Prometheus's xorAppender writes them."""
    w = _Bits()
    leading, trailing = 0xFF, 0
    t_prev = v_prev = t_delta = 0
    for i, (t, v) in enumerate(samples):
        if i == 0:
            for b in _uvarint(((t << 1) ^ (t >> 63)) & MASK):  # binary.PutVarint (zigzag)
                w.write(b, 8)
            w.write(v, 64)
        else:
            if i == 1:
                t_delta = t - t_prev
                for b in _uvarint(t_delta):
                    w.write(b, 8)
            else:
                d = t - t_prev
                dod = d - t_delta
                t_delta = d
                if dod == 0:
                    w.write(0, 1)
                else:
                    for prefix, plen, size in ((0b10, 2, 14), (0b110, 3, 17), (0b1110, 4, 20), (0b1111, 4, 64)):
                        if size == 64 or -((1 << (size - 1)) - 1) <= dod <= 1 << (size - 1):
                            w.write(prefix, plen)
                            w.write(dod & ((1 << size) - 1), size)
                            break
            delta = v ^ v_prev
            if delta == 0:
                w.write(0, 1)
            else:
                w.write(1, 1)
                lead = min(64 - delta.bit_length(), 31)
                trail = (delta & -delta).bit_length() - 1
                if leading != 0xFF and lead >= leading and trail >= trailing:
                    w.write(0, 1)
                    w.write(delta >> trailing, 64 - leading - trailing)
                else:
                    leading, trailing = lead, trail
                    sig = 64 - lead - trail
                    w.write(1, 1)
                    w.write(lead, 5)
                    w.write(sig & 63, 6)
                    w.write(delta >> trail, sig)
        t_prev, v_prev = t, v
    return struct.pack(">H", len(samples)) + w.data()


def _series(rng: random.Random, n: int) -> list[tuple[int, int]]:
    t = rng.choice([0, 1_749_945_600_000, 1_749_945_600_000 + rng.randint(1, 999), 2**40 + 17])
    v = rng.random() * 1e6
    out = []
    for _ in range(n):
        kind = rng.random()
        t += rng.choice([15_000, 15_000, 15_000, 15_001, 14_999, 60_000, 1, 3_600_000, 86_400_000 * 40, 8_191, 8_193, 131_073])
        if kind < 0.4:
            v += rng.randint(0, 50)  # a counter
        elif kind < 0.5:
            v = rng.uniform(-1e300, 1e300)
        elif kind < 0.6:
            v = rng.choice([math.nan, math.inf, -math.inf, -0.0, 0.0, 5e-324])
        out.append((t, _fbits(v)))
    for i in rng.sample(range(n), k=min(3, n)):
        out[i] = (out[i][0], STALE_BITS)
    if n > 2:
        out[1] = (out[1][0], out[0][1])  # an unchanged value
    return out


@pytest.mark.parametrize("seed", range(40))
def test_xor_chunks_decode_to_the_samples_encoded(seed):
    rng = random.Random(seed)
    chunks = [_series(rng, rng.choice([1, 2, 3, 120, 240])) for _ in range(rng.randint(1, 5))]
    counts, ts, values = xor.decode_chunks([xor_chunk(c) for c in chunks])
    assert counts.tolist() == [len(c) for c in chunks]
    assert ts.tolist() == [t for c in chunks for t, _ in c]
    assert values.view(np.uint64).tolist() == [v for c in chunks for _, v in c]


def test_a_truncated_chunk_is_refused():
    data = xor_chunk(_series(random.Random(1), 120))
    with pytest.raises(ValueError, match="does not decode"):
        xor.decode_chunks([data[: len(data) // 2]])
    with pytest.raises(ValueError, match="shorter than its header"):
        xor.decode_chunks([b"\x00"])


def _frame(payload: bytes, crc: int | None = None) -> bytes:
    size = bytes(_uvarint(len(payload)))
    return size + struct.pack(">I", xor.crc32c(payload) if crc is None else crc) + payload


def test_frames_and_their_crc32c():
    assert xor.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert xor.frames(_frame(b"abc") + _frame(b"") + _frame(b"x" * 300)) == [b"abc", b"", b"x" * 300]
    with pytest.raises(ValueError, match="checksum"):
        xor.frames(_frame(b"abc", crc=1))
    with pytest.raises(ValueError, match="truncated"):
        xor.frames(_frame(b"abcdef")[:-2])


def _one_series(labels: dict) -> tuple[ChunkedReadResponse, object]:
    """A ChunkedReadResponse holding one series with ``labels`` (sorted by name), and that series."""
    msg = ChunkedReadResponse()
    cs = msg.chunked_series.add()
    for k, v in sorted(labels.items()):
        cs.labels.add(name=k, value=v)
    return msg, cs


def _streamed(series: list[tuple[dict, list[list[tuple[int, int]]]]]) -> bytes:
    """One frame per (series, chunk list) entry, as Prometheus streams them."""
    body = b""
    for labels, chunk_lists in series:
        msg, cs = _one_series(labels)
        for samples in chunk_lists:
            cs.chunks.add(min_time_ms=samples[0][0], max_time_ms=samples[-1][0], type=xor.XOR, data=xor_chunk(samples))
        cs.chunks.add(min_time_ms=0, max_time_ms=1, type=2, data=b"\x01\x02")  # a histogram chunk: not float samples
        body += _frame(msg.SerializeToString())
    return body


def test_a_streamed_response_gives_the_rows_of_a_samples_response():
    """A series split over two frames, chunks reaching outside [a, b), stale markers: the rows of the JSON path."""
    from test_prometheus_unit import FakePrometheus

    a, b = 1_000_000, 2_000_000
    labels = {"__name__": "m_total", "client_id": "c1", "job": "j"}
    first = [(a - 15, _fbits(1.0)), (a, _fbits(2.0)), (a + 10, STALE_BITS)]
    second = [(a + 20, _fbits(3.0)), (b - 1, _fbits(4.0)), (b, _fbits(5.0)), (b + 10, _fbits(6.0))]
    other = [(a + 5, STALE_BITS), (a + 6, _fbits(math.nan))]
    body = _streamed([(labels, [first]), (labels, [second]), ({**labels, "pool": "x"}, [other])])
    sel = prom.Selector("m", "m_total", "client_id", ("c1",), (), 'job="j"')
    with FakePrometheus([(200, body, {"Content-Type": "application/x-streamed-protobuf; proto=prometheus.ChunkedReadResponse"})]) as fake:
        client = prom.PrometheusClient(fake.url, read_api="remote_read")
        rows = list(prom._fetch_exact(client, sel, a, b))
    req = ReadRequest.FromString(bytes(cramjam.snappy.decompress_raw(fake.requests[0]["body"])))
    assert list(req.accepted_response_types) == [1, 0]  # chunks first, samples second
    got = [(labels, ts.tolist(), values.view(np.uint64).tolist()) for _, _, labels, ts, values in rows]
    assert got == [
        ((("client_id", "c1"), ("job", "j")), [a, a + 20, b - 1], [_fbits(2.0), _fbits(3.0), _fbits(4.0)]),
        ((("client_id", "c1"), ("job", "j"), ("pool", "x")), [a + 6], [_fbits(float("nan"))]),
    ]


def test_a_corrupt_stream_fails_naming_the_server():
    from test_prometheus_unit import FakePrometheus

    body = _frame(b"\x0a\x05garbage-that-is-not-a-message")
    sel = prom.Selector("m", "m_total", "client_id", ("c1",))
    with (
        FakePrometheus([(200, body, {"Content-Type": "application/x-streamed-protobuf"})]) as fake,
        pytest.raises(prom.PrometheusError, match="cannot be decoded") as err,
    ):
        list(prom._fetch_exact(prom.PrometheusClient(fake.url, read_api="remote_read"), sel, 0, 1000))
    assert fake.url in str(err.value) and "meter m" in str(err.value)


# --------------------------------------------------------------------------- the compiled reader (xor.read_stream)


def _crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def test_crc32c_eight_bytes_a_step_equals_the_bitwise_definition():
    rng = random.Random(7)
    for n in [*range(40), 255, 1000, 4099]:
        data = rng.randbytes(n)
        assert xor.crc32c(data) == _crc32c_bitwise(data), n


def _reference_rows(body: bytes, a: int, b: int) -> list[tuple[bytes, list[int], list[int], bool]]:
    """The protobuf runtime's reading of a streamed response, cut to [a, b) as the pull cuts it:
    (label bytes, ts, value bits, has histogram chunks) per series."""
    got = prom._chunked_series(body)
    out, start = [], 0
    for i, (key, n) in enumerate(zip(got.keys, got.counts.tolist())):
        ts, bits = got.ts[start : start + n], got.values[start : start + n].view(np.uint64)
        start += n
        keep = (ts >= a) & (ts < b) & (bits != STALE_BITS)
        kept = [NAN_BITS if (x >> 52) & 0x7FF == 0x7FF and x & ((1 << 52) - 1) else x for x in bits[keep].tolist()]
        out.append((key, ts[keep].tolist(), kept, bool(got.histograms[i])))
    return out


def _compiled_rows(body: bytes, a: int, b: int):
    got = xor.read_stream(body, a, b)
    if got is None:
        return None
    out, start = [], 0
    for key, n, hist in zip(got.keys, got.counts.tolist(), got.histograms.tolist()):
        out.append((key, got.ts[start : start + n].tolist(), got.values[start : start + n].view(np.uint64).tolist(), hist))
        start += n
    return out


NAN_BITS = _fbits(float("nan"))


def _stream_body(rng: random.Random, a: int, b: int) -> bytes:
    """Series of counters (resets), gauges with NaNs (negative NaN, other payloads), stale markers,
    samples exactly at a - 1, a, b - 1 and b, chunks ending or starting at the window's edges,
    series split over frames, native histogram chunks."""
    body = b""
    for s in range(rng.randint(1, 6)):
        labels = {"__name__": "m_total", "client_id": f"c{s}", "i": "x" * rng.randint(0, 300)}
        t = a - rng.choice([0, 1, 15_000, 3_600_000])
        v = float(rng.randint(0, 10**6))
        chunks: list[list[tuple[int, int]]] = []
        for _ in range(rng.randint(0, 4)):
            chunk = []
            for _ in range(rng.choice([1, 2, 3, 120, 240])):
                step = rng.choice([15_000, 15_000, 1, 14_999, 60_000, 7_200_000])
                edge = rng.choice([a - 1, a, b - 1, b])
                t = edge if t < edge and rng.random() < 0.3 else t + step  # on the edges exactly; a chunk's times only grow
                kind = rng.random()
                if kind < 0.05:
                    bits = STALE_BITS
                elif kind < 0.1:
                    bits = rng.choice([NAN_BITS, NAN_BITS | (1 << 63), 0x7FF0000000000001, 0x7FF8000000000123])
                elif kind < 0.15:
                    v = float(rng.randint(0, 3))  # a counter reset
                    bits = _fbits(v)
                else:
                    v += rng.randint(0, 50)
                    bits = _fbits(v)
                chunk.append((t, bits))
            chunks.append(chunk)
        # one frame per chunk or all in one (a series split over frames comes with its labels again)
        groups = [[c] for c in chunks] if rng.random() < 0.5 else [chunks]
        for group in groups or [[]]:
            msg, cs = _one_series(labels)
            for c in group:
                cs.chunks.add(min_time_ms=c[0][0], max_time_ms=c[-1][0], type=xor.XOR, data=xor_chunk(c))
                if rng.random() < 0.1:
                    cs.chunks.add(min_time_ms=c[0][0], max_time_ms=c[-1][0], type=rng.choice([xor.HISTOGRAM, xor.FLOAT_HISTOGRAM]), data=b"\x00\x01\x02")
            body += _frame(msg.SerializeToString())
    return body


@pytest.mark.parametrize("seed", range(60))
def test_the_compiled_reader_gives_the_rows_of_the_reference(seed):
    rng = random.Random(seed)
    a = 1_749_945_600_000
    b = a + rng.choice([86_400_000, 3_600_000, 1])
    body = _stream_body(rng, a, b)
    got = _compiled_rows(body, a, b)
    assert got is not None
    assert got == _reference_rows(body, a, b)


def test_the_compiled_reader_leaves_what_it_does_not_expect_to_the_reference():
    a, b = 0, 10**15
    ok = _stream_body(random.Random(3), a, b)
    assert _compiled_rows(ok, a, b) is not None
    corrupt = ok[:-3] + bytes([ok[-3] ^ 0xFF]) + ok[-2:]  # a bit of the last frame flipped: its checksum
    assert _compiled_rows(corrupt, a, b) is None
    with pytest.raises(ValueError, match="checksum"):
        prom._chunked_series(corrupt)
    assert _compiled_rows(ok[:-1], a, b) is None  # truncated
    # a field it does not know inside a chunk (field 5): left to the reference, which skips it
    from billing_dags.ingest.remote_write.proto import TimeSeries

    def ld(field: int, payload: bytes) -> bytes:
        return bytes([field << 3 | 2, *_uvarint(len(payload))]) + payload

    chunk = bytes([3 << 3, xor.XOR]) + ld(4, xor_chunk([(5, _fbits(1.0))])) + bytes([5 << 3, 1])  # type, data, field 5
    labels = TimeSeries(labels=[{"name": "__name__", "value": "m"}]).SerializeToString()
    unknown = _frame(ld(1, labels + ld(2, chunk)))
    assert _compiled_rows(unknown, a, b) is None
    assert _reference_rows(unknown, a, b) == [(labels, [5], [_fbits(1.0)], False)]
    # a chunk that does not decode: the reference names it
    bad = ChunkedReadResponse()
    cs = bad.chunked_series.add()
    cs.labels.add(name="__name__", value="m")
    cs.chunks.add(type=xor.XOR, data=xor_chunk([(5, _fbits(1.0)), (6, _fbits(2.0))])[:4])
    body = _frame(bad.SerializeToString())
    assert _compiled_rows(body, a, b) is None
    with pytest.raises(ValueError, match="does not decode"):
        prom._chunked_series(body)


def test_a_chunk_of_an_unknown_encoding_fails_the_read_naming_it():
    from test_prometheus_unit import FakePrometheus

    msg = ChunkedReadResponse()
    cs = msg.chunked_series.add()
    cs.labels.add(name="__name__", value="m_total")
    cs.chunks.add(type=9, data=b"\x00\x01")
    body = _frame(msg.SerializeToString())
    assert _compiled_rows(body, 0, 10) is None
    sel = prom.Selector("m", "m_total", "client_id", ("c1",))
    with (
        FakePrometheus([(200, body, {"Content-Type": "application/x-streamed-protobuf"})]) as fake,
        pytest.raises(prom.PrometheusError, match="encoding 9") as err,
    ):
        list(prom._fetch_exact(prom.PrometheusClient(fake.url, read_api="remote_read"), sel, 0, 1000))
    assert "cannot be decoded" in str(err.value) and fake.url in str(err.value)


def test_native_histogram_chunks_are_refused_by_name_and_the_float_samples_kept():
    """A series with float and histogram chunks: its float samples are rows, and the pull names it
    as holding histogram samples it does not read; a series with only histograms gives no rows."""
    from test_prometheus_unit import FakePrometheus

    a, b = 1_000_000, 2_000_000
    msg = ChunkedReadResponse()
    floats = xor_chunk([(a, _fbits(1.0)), (a + 1, _fbits(2.0))])
    for name, chunks in (("mixed", [(xor.XOR, floats), (xor.HISTOGRAM, b"\x00\x01")]), ("native", [(xor.FLOAT_HISTOGRAM, b"\x00\x01")])):
        cs = msg.chunked_series.add()
        cs.labels.add(name="__name__", value="m_total")
        cs.labels.add(name="client_id", value="c1")
        cs.labels.add(name="kind", value=name)
        for kind, data in chunks:
            cs.chunks.add(min_time_ms=a, max_time_ms=a + 1, type=kind, data=data)
    body = _frame(msg.SerializeToString())
    sel = prom.Selector("m", "m_total", "client_id", ("c1",))
    refused: dict[str, None] = {}
    with FakePrometheus([(200, body, {"Content-Type": "application/x-streamed-protobuf"})]) as fake:
        rows = list(prom._fetch_exact(prom.PrometheusClient(fake.url, read_api="remote_read"), sel, a, b, refused))
    assert [(labels, ts.tolist()) for _, _, labels, ts, _ in rows] == [((("client_id", "c1"), ("kind", "mixed")), [a, a + 1])]
    assert len(refused) == 2 and all("native histogram samples" in r and "m_total{client_id, kind}" in r and "meter m" in r for r in refused)


def test_the_query_api_names_native_histogram_series_alike():
    """A range selector gives histogram samples apart ("histograms"): the float samples are rows, the
    series is named with the remote-read path's reason."""
    sel = prom.Selector("m", "m_total", "client_id", ("c1",))
    item = {"metric": {"__name__": "m_total", "client_id": "c1"}, "values": [[1000.0, "2"]], "histograms": [[1000.5, {"count": "1", "sum": "1"}]]}
    refused: dict[str, None] = {}
    rows = list(prom._parsed([item], sel, 0, 10**7, refused))
    assert [ts.tolist() for *_, ts, _ in rows] == [[1_000_000]]
    sid = prom.raw.series_id("m_total", {"client_id": "c1"})
    assert list(refused) == [prom._histogram_reason(sel, sid, "m_total", (("client_id", "c1"),))]
