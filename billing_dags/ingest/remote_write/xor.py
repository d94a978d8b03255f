"""Streamed remote-read responses (response type STREAMED_XOR_CHUNKS): the frames, and the
Prometheus XOR chunks in them, decoded in compiled code (numba, GIL released).

A streamed response is a sequence of frames: the payload's size (uvarint), its CRC-32 (Castagnoli,
big-endian uint32), then a ChunkedReadResponse (protobuf, not compressed) holding series with
their chunks as the TSDB stores them (prometheus/storage/remote/chunked.go). A float chunk
(encoding XOR, tsdb/chunkenc/xor.go) is a big-endian uint16 sample count, then a bit stream: the
first timestamp as a signed varint and the first value's 64 bits; the second timestamp as the
unsigned varint of its delta; every later timestamp as the delta of deltas in 1, 2+14, 3+17,
4+20 or 4+64 bits; every value after the first as its XOR with the previous value (Gorilla). The
values keep their exact bits (stale markers included). Chunks are whole, so they may hold samples
outside the queried range; the caller cuts them.

Two readers of a response. :func:`read_stream` is the pull's: one compiled pass over the frames
(checksums and protobuf fields, no Python object per series or chunk but its label bytes) and one
that decodes every XOR chunk straight into the output arrays, keeping only the samples of a
window [a, b) that are not stale markers, every other NaN with the bits of ``float('nan')``: the
rows the query API's range selectors give. It reads the shape Prometheus writes; anything else (a
field it does not expect, labels after a chunk, a bad checksum, a chunk that does not decode)
makes it return None, and the caller reads the response with :func:`frames`, the protobuf runtime
and :func:`decode_chunks` (the reference, which accepts or refuses exactly as before, with its
message). tests/test_remote_read_xor.py checks that both give the same rows.

Chunks of native histograms (encodings HISTOGRAM and FLOAT_HISTOGRAM) are not decoded: the pull
keeps float samples only (the query API's range selectors give histograms apart, as "histograms");
the series holding them are flagged so that the caller reports them. A chunk of any other encoding
is an error: its samples cannot be read, and silently leaving them out would under-bill.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from billing_dags.ingest.remote_write.wire import _field, _length, _skip, _varint

#: Chunk.Encoding
XOR = 1
HISTOGRAM = 2
FLOAT_HISTOGRAM = 3
#: Prometheus's staleness marker: a NaN with these exact bits
STALE_NAN_BITS = 0x7FF0000000000002
#: the bits of float('nan') (np.nan): every other NaN is written with them, as the query API's "NaN" parses
NAN_BITS = 0x7FF8000000000000
_INT64 = np.iinfo(np.int64)


def _crc_table() -> np.ndarray:
    """Slicing-by-8 tables of CRC-32C: table[0] the byte-at-a-time one, table[k] a byte followed by k zero bytes."""
    poly = 0x82F63B78  # Castagnoli, reflected
    table = np.zeros((8, 256), dtype=np.int64)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table[0, i] = c
    for k in range(1, 8):
        table[k] = (table[k - 1] >> 8) ^ table[0][table[k - 1] & 0xFF]
    return table


_CRC_TABLE = _crc_table()


@njit(cache=True, nogil=True)
def _crc32c(buf, start, end, table):
    crc = np.int64(0xFFFFFFFF)
    i = start
    while i + 8 <= end:  # eight bytes a step
        one = crc ^ (np.int64(buf[i]) | (np.int64(buf[i + 1]) << 8) | (np.int64(buf[i + 2]) << 16) | (np.int64(buf[i + 3]) << 24))
        crc = (
            table[7, one & 0xFF]
            ^ table[6, (one >> 8) & 0xFF]
            ^ table[5, (one >> 16) & 0xFF]
            ^ table[4, (one >> 24) & 0xFF]
            ^ table[3, buf[i + 4]]
            ^ table[2, buf[i + 5]]
            ^ table[1, buf[i + 6]]
            ^ table[0, buf[i + 7]]
        )
        i += 8
    while i < end:
        crc = table[0, (crc ^ buf[i]) & 0xFF] ^ (crc >> 8)
        i += 1
    return crc ^ 0xFFFFFFFF


def crc32c(data: bytes) -> int:
    return int(_crc32c(np.frombuffer(data, dtype=np.uint8), 0, len(data), _CRC_TABLE))


def varint(data: bytes, p: int) -> tuple[int, int]:
    """The protobuf varint at ``data[p:]`` and the position after it; ValueError when truncated or overlong."""
    result = shift = 0
    while True:
        if p >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = data[p]
        p += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, p
        shift += 7


def frames(data: bytes) -> list[bytes]:
    """The payloads of a streamed response's frames; ValueError on a truncated frame or a bad checksum."""
    buf = np.frombuffer(data, dtype=np.uint8)
    out, p = [], 0
    while p < len(data):
        size, p = varint(data, p)
        if p + 4 + size > len(data):
            raise ValueError(f"truncated frame ({size} bytes announced, {len(data) - p - 4} left)")
        want = int.from_bytes(data[p : p + 4], "big")
        if int(_crc32c(buf, p + 4, p + 4 + size, _CRC_TABLE)) != want:
            raise ValueError("frame checksum (CRC-32C) mismatch")
        out.append(data[p + 4 : p + 4 + size])
        p += 4 + size
    return out


# --------------------------------------------------------------------------- the XOR bit stream
# As Prometheus's bstreamReader: the next bits of the chunk in a 64-bit buffer (its ``valid`` low
# bits unread), loaded 8 bytes at a time from ``buf[byte:end]`` (fewer at the end of the chunk).
# Past the end of the chunk ``byte`` becomes ``end + 1`` and stays there: the caller checks that
# once per sample.

_U1 = np.uint64(1)
_U8 = np.uint64(8)
_U32 = np.uint64(32)


@njit(cache=True, nogil=True, inline="always")
def _load(buf, byte, end):
    """(buffer, valid bits, next byte): the next 8 bytes of the chunk, or what is left of it."""
    if byte + 8 <= end:
        w = (
            (np.uint64(buf[byte]) << np.uint64(56))
            | (np.uint64(buf[byte + 1]) << np.uint64(48))
            | (np.uint64(buf[byte + 2]) << np.uint64(40))
            | (np.uint64(buf[byte + 3]) << np.uint64(32))
            | (np.uint64(buf[byte + 4]) << np.uint64(24))
            | (np.uint64(buf[byte + 5]) << np.uint64(16))
            | (np.uint64(buf[byte + 6]) << np.uint64(8))
            | np.uint64(buf[byte + 7])
        )
        return w, np.int64(64), byte + 8
    k = max(0, end - byte)
    w = np.uint64(0)
    for i in range(k):
        w = (w << _U8) | np.uint64(buf[byte + i])
    return w, np.int64(8 * k), byte + k


@njit(cache=True, nogil=True, inline="always")
def _take(buf, byte, end, buffer, valid, n):
    """(the next ``n`` bits, 1 <= n <= 63, as int64, byte, buffer, valid)."""
    if n <= valid:
        valid -= n
        return np.int64((buffer >> np.uint64(valid)) & ((_U1 << np.uint64(n)) - _U1)), byte, buffer, valid
    # the rest of this buffer, then the start of the next one
    hi = buffer & ((_U1 << np.uint64(valid)) - _U1)
    n -= valid
    buffer, valid, byte = _load(buf, byte, end)
    if n > valid:
        return np.int64(0), end + 1, buffer, np.int64(0)
    valid -= n
    lo = (buffer >> np.uint64(valid)) & ((_U1 << np.uint64(n)) - _U1)
    return np.int64((hi << np.uint64(n)) | lo), byte, buffer, valid


@njit(cache=True, nogil=True, inline="always")
def _take_long(buf, byte, end, buffer, valid, n):
    """(the next ``n`` bits, 1 <= n <= 64, as int64 two's complement, byte, buffer, valid)."""
    if n <= 56:
        return _take(buf, byte, end, buffer, valid, n)
    hi, byte, buffer, valid = _take(buf, byte, end, buffer, valid, n - 32)
    lo, byte, buffer, valid = _take(buf, byte, end, buffer, valid, 32)
    return np.int64((np.uint64(hi) << _U32) | np.uint64(lo)), byte, buffer, valid


@njit(cache=True, nogil=True, inline="always")
def _uvarint(buf, byte, end, buffer, valid):
    result = np.int64(0)
    shift = 0
    while shift < 64:
        b, byte, buffer, valid = _take(buf, byte, end, buffer, valid, 8)
        if byte > end:
            return result, byte, buffer, valid
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, byte, buffer, valid
        shift += 7
    return result, end + 1, buffer, valid


@njit(cache=True, nogil=True, inline="always")
def _decode_chunk(buf, p, end, ts, bits, o, cut, a, b):
    """Decode the XOR chunk ``buf[p:end]`` into ts/bits from index ``o``: every sample, or with
    ``cut`` only those with a <= ts < b that are not stale markers (other NaNs as NAN_BITS).
    Returns the number of samples written, -1 when the chunk does not decode."""
    if end - p < 2:
        return -1
    n = (np.int64(buf[p]) << 8) | np.int64(buf[p + 1])
    byte = p + 2
    buffer = np.uint64(0)
    valid = np.int64(0)
    t = np.int64(0)
    v = np.int64(0)
    tdelta = np.int64(0)
    leading = np.int64(0)
    trailing = np.int64(0)
    w = o
    for i in range(n):
        if i == 0:
            ux, byte, buffer, valid = _uvarint(buf, byte, end, buffer, valid)
            t = (ux >> 1) & 0x7FFFFFFFFFFFFFFF
            if ux & 1:
                t = ~t
            v, byte, buffer, valid = _take_long(buf, byte, end, buffer, valid, 64)
        else:
            if i == 1:
                tdelta, byte, buffer, valid = _uvarint(buf, byte, end, buffer, valid)
            else:
                # the delta of deltas: its prefix 0, 10, 110, 1110 or 1111
                d = 0
                for _ in range(4):
                    bit, byte, buffer, valid = _take(buf, byte, end, buffer, valid, 1)
                    d <<= 1
                    if bit == 0:
                        break
                    d |= 1
                if d != 0:
                    if d == 0b1111:
                        dod, byte, buffer, valid = _take_long(buf, byte, end, buffer, valid, 64)
                    else:
                        sz = 14 if d == 0b10 else 17 if d == 0b110 else 20
                        dod, byte, buffer, valid = _take(buf, byte, end, buffer, valid, sz)
                        if dod > (np.int64(1) << (sz - 1)):
                            dod -= np.int64(1) << sz
                    tdelta += dod
            t += tdelta
            # the value: XOR with the previous one
            bit, byte, buffer, valid = _take(buf, byte, end, buffer, valid, 1)
            if bit == 1:
                bit, byte, buffer, valid = _take(buf, byte, end, buffer, valid, 1)
                if bit == 1:
                    leading, byte, buffer, valid = _take(buf, byte, end, buffer, valid, 5)
                    mbits, byte, buffer, valid = _take(buf, byte, end, buffer, valid, 6)
                    if mbits == 0:
                        mbits = 64
                    trailing = 64 - leading - mbits
                    if trailing < 0:
                        return -1
                mbits = 64 - leading - trailing
                if mbits <= 0:
                    return -1
                x, byte, buffer, valid = _take_long(buf, byte, end, buffer, valid, mbits)
                v ^= x << trailing
        if byte > end:
            return -1
        out = v  # v stays the previous value of the next XOR
        if cut:
            if t < a or t >= b or v == STALE_NAN_BITS:
                continue
            if (v & 0x7FF0000000000000) == 0x7FF0000000000000 and (v & 0x000FFFFFFFFFFFFF) != 0:
                out = np.int64(NAN_BITS)
        ts[w] = t
        bits[w] = out
        w += 1
    return w - o


@njit(cache=True, nogil=True)
def _decode(buf, starts, ends, out_start, ts, bits):
    """Decode chunk c (buf[starts[c]:ends[c]]) into ts/bits from out_start[c]; returns -1, or the
    index of the first chunk that does not decode."""
    for c in range(len(starts)):
        if _decode_chunk(buf, starts[c], ends[c], ts, bits, out_start[c], False, 0, 0) < 0:
            return c
    return -1


def decode_chunks(datas: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """XOR chunks -> (samples per chunk int64, ts ms int64, values float64 with their exact bits),
    the chunks' samples one after the other; ValueError when a chunk does not decode."""
    if not datas:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    lengths = np.fromiter((len(d) for d in datas), dtype=np.int64, count=len(datas))
    ends = np.cumsum(lengths)
    starts = ends - lengths
    buf = np.frombuffer(b"".join(datas), dtype=np.uint8)
    if (lengths < 2).any():
        raise ValueError("a chunk shorter than its header")
    counts = (buf[starts].astype(np.int64) << 8) | buf[starts + 1].astype(np.int64)
    out_start = np.cumsum(counts) - counts
    total = int(counts.sum())
    ts = np.empty(total, dtype=np.int64)
    bits = np.empty(total, dtype=np.int64)
    bad = _decode(buf, starts, ends, out_start, ts, bits)
    if bad >= 0:
        raise ValueError(f"XOR chunk {bad} of {len(datas)} does not decode ({int(counts[bad])} samples announced in {int(lengths[bad])} bytes)")
    return counts, ts, bits.view(np.float64)


# --------------------------------------------------------------------------- the compiled reader

_OK, _FALLBACK = 0, 1


@njit(cache=True, nogil=True)
def _scan(buf, table, fill, lab_start, lab_end, chunk_start, chunk_end, chunk_type, chunk_series):
    """Walk the frames of a streamed response: checksums, ChunkedReadResponse, ChunkedSeries and
    Chunk fields. With ``fill``, record each series' label span and each chunk's data span, encoding
    and series. Returns (status, series, chunks)."""
    end = len(buf)
    p = 0
    ns = 0
    nc = 0
    while p < end:
        size, p = _varint(buf, p, end)
        if p < 0 or size < 0 or size > end - p - 4:
            return _FALLBACK, 0, 0
        want = (np.int64(buf[p]) << 24) | (np.int64(buf[p + 1]) << 16) | (np.int64(buf[p + 2]) << 8) | np.int64(buf[p + 3])
        q = p + 4
        frame_end = q + size
        p = frame_end
        if not fill and _crc32c(buf, q, frame_end, table) != want:
            return _FALLBACK, 0, 0
        while q < frame_end:
            tag, q = _varint(buf, q, frame_end)
            if q < 0:
                return _FALLBACK, 0, 0
            if tag == 0x0A:  # chunked_series
                series_end, q = _length(buf, q, frame_end)
                if series_end < 0:
                    return _FALLBACK, 0, 0
                # the label fields, all at the front as Prometheus writes them
                if fill:
                    lab_start[ns] = q
                while q < series_end and buf[q] == 0x0A:
                    q, _ = _length(buf, q + 1, series_end)
                    if q < 0:
                        return _FALLBACK, 0, 0
                if fill:
                    lab_end[ns] = q
                while q < series_end:
                    tag, q = _varint(buf, q, series_end)
                    if q < 0:
                        return _FALLBACK, 0, 0
                    if tag != 0x12:  # anything but a chunk (a label after a chunk included): the reference
                        return _FALLBACK, 0, 0
                    c_end, q = _length(buf, q, series_end)
                    if c_end < 0:
                        return _FALLBACK, 0, 0
                    ctype = np.int64(0)
                    d_start = np.int64(-1)
                    d_end = np.int64(-1)
                    while q < c_end:
                        tag, q = _varint(buf, q, c_end)
                        if q < 0:
                            return _FALLBACK, 0, 0
                        if tag == 0x18:  # type
                            ctype, q = _varint(buf, q, c_end)
                        elif tag == 0x22:  # data
                            if d_start >= 0:
                                return _FALLBACK, 0, 0
                            d_end, d_start = _length(buf, q, c_end)
                            q = d_end
                        elif tag == 0x08 or tag == 0x10:  # min_time_ms, max_time_ms
                            _, q = _varint(buf, q, c_end)
                        else:
                            return _FALLBACK, 0, 0
                        if q < 0:
                            return _FALLBACK, 0, 0
                    if d_start < 0:
                        d_start = c_end
                        d_end = c_end
                    if fill:
                        chunk_start[nc] = d_start
                        chunk_end[nc] = d_end
                        chunk_type[nc] = ctype
                        chunk_series[nc] = ns
                    nc += 1
                ns += 1
            elif tag == 0x10:  # query_index
                qi, q = _varint(buf, q, frame_end)
                if q < 0 or qi != 0:
                    return _FALLBACK, 0, 0
            else:
                field, wt = _field(tag)
                if field < 0 or field <= 2:
                    return _FALLBACK, 0, 0
                q = _skip(buf, q, frame_end, wt)
                if q < 0:
                    return _FALLBACK, 0, 0
    return _OK, ns, nc


@njit(cache=True, nogil=True)
def _decode_window(buf, chunk_start, chunk_end, chunk_type, chunk_series, a, b, ts, bits, counts, histograms):
    """Decode the XOR chunks into ts/bits, only the samples of [a, b) that are not stale markers;
    per (merged) series its count, and whether it has histogram chunks. Returns samples written,
    -1 when a chunk does not decode or has an unknown encoding."""
    w = 0
    for c in range(len(chunk_start)):
        s = chunk_series[c]
        if chunk_type[c] == XOR:
            k = _decode_chunk(buf, chunk_start[c], chunk_end[c], ts, bits, w, True, a, b)
            if k < 0:
                return -1
            w += k
            counts[s] += k
        elif chunk_type[c] == HISTOGRAM or chunk_type[c] == FLOAT_HISTOGRAM:
            histograms[s] = True
        else:
            return -1
    return w


class Stream(NamedTuple):
    keys: list[bytes]  # per series: its encoded label fields (a series split over frames joined)
    counts: np.ndarray  # int64 per series: samples kept
    ts: np.ndarray  # int64 per sample, ms, series after series
    values: np.ndarray  # float64 per sample
    histograms: np.ndarray  # bool per series: it has native histogram chunks (not decoded)


def read_stream(data: bytes, a: int = _INT64.min, b: int = _INT64.max) -> Stream | None:
    """The series of a streamed response (one query) with their samples of [a, b), stale markers
    dropped and other NaNs as float('nan'); None when the reference reader must read it."""
    buf = np.frombuffer(data, dtype=np.uint8)
    none = np.zeros(0, dtype=np.int64)
    status, ns, nc = _scan(buf, _CRC_TABLE, False, none, none, none, none, none, none)
    if status != _OK:
        return None
    spans = np.empty((6, max(ns, nc)), dtype=np.int64)
    lab_start, lab_end, chunk_start, chunk_end, chunk_type, chunk_series = spans
    _scan(buf, _CRC_TABLE, True, lab_start, lab_end, chunk_start, chunk_end, chunk_type, chunk_series)
    chunk_start, chunk_end, chunk_type, chunk_series = chunk_start[:nc], chunk_end[:nc], chunk_type[:nc], chunk_series[:nc]
    # a series split over frames comes as consecutive series with the same labels: one series
    keys: list[bytes] = []
    merged = np.empty(ns, dtype=np.int64)
    for i, (s, e) in enumerate(zip(lab_start[:ns].tolist(), lab_end[:ns].tolist())):
        key = data[s:e]
        if not keys or keys[-1] != key:
            keys.append(key)
        merged[i] = len(keys) - 1
    xor_chunks = chunk_type == XOR
    if ((chunk_end - chunk_start)[xor_chunks] < 2).any():
        return None
    heads = chunk_start[xor_chunks]
    total = int(((buf[heads].astype(np.int64) << 8) | buf[heads + 1]).sum())
    ts = np.empty(total, dtype=np.int64)
    bits = np.empty(total, dtype=np.int64)
    counts = np.zeros(len(keys), dtype=np.int64)
    histograms = np.zeros(len(keys), dtype=np.bool_)
    n = _decode_window(buf, chunk_start, chunk_end, chunk_type, merged[chunk_series], np.int64(a), np.int64(b), ts, bits, counts, histograms)
    if n < 0:
        return None
    return Stream(keys, counts, ts[:n], bits[:n].view(np.float64), histograms)
