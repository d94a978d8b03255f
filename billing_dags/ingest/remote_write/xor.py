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

Chunks of another encoding (native histograms) are not read: the query API's range selectors give
histograms apart from float samples, and the pull keeps only the float samples.
"""

from __future__ import annotations

import numpy as np
from numba import njit

#: Chunk.Encoding
XOR = 1


def _crc_table() -> np.ndarray:
    poly = 0x82F63B78  # Castagnoli, reflected
    table = np.zeros(256, dtype=np.int64)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table[i] = c
    return table


_CRC_TABLE = _crc_table()


@njit(cache=True, nogil=True)
def _crc32c(buf, start, end, table):
    crc = np.int64(0xFFFFFFFF)
    for i in range(start, end):
        crc = table[(crc ^ buf[i]) & 0xFF] ^ (crc >> 8)
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


@njit(cache=True, nogil=True, inline="always")
def _bits(buf, pos, n, endbit):
    """(the next n bits as int64, new bit position); position -1 past the end."""
    if pos < 0 or pos + n > endbit:
        return np.int64(0), np.int64(-1)
    v = np.int64(0)
    while n > 0:  # up to a byte at a time
        avail = 8 - (pos & 7)
        take = min(avail, n)
        v = (v << take) | ((np.int64(buf[pos >> 3]) >> (avail - take)) & ((1 << take) - 1))
        pos += take
        n -= take
    return v, pos


@njit(cache=True, nogil=True, inline="always")
def _uvarint(buf, pos, endbit):
    result = np.int64(0)
    shift = 0
    while shift < 64:
        b, pos = _bits(buf, pos, 8, endbit)
        if pos < 0:
            return result, pos
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
    return result, np.int64(-1)


@njit(cache=True, nogil=True)
def _decode(buf, starts, ends, out_start, ts, bits):
    """Decode chunk c (buf[starts[c]:ends[c]]) into ts/bits from out_start[c]; returns -1, or the
    index of the first chunk that does not decode."""
    for c in range(len(starts)):
        p, end = starts[c], ends[c]
        if end - p < 2:
            return c
        n = (np.int64(buf[p]) << 8) | np.int64(buf[p + 1])
        pos = np.int64((p + 2) * 8)
        endbit = np.int64(end * 8)
        o = out_start[c]
        t = np.int64(0)
        v = np.int64(0)
        tdelta = np.int64(0)
        leading = np.int64(0)
        trailing = np.int64(0)
        for i in range(n):
            if i == 0:
                ux, pos = _uvarint(buf, pos, endbit)
                t = (ux >> 1) & 0x7FFFFFFFFFFFFFFF
                if ux & 1:
                    t = ~t
                v, pos = _bits(buf, pos, 64, endbit)
            else:
                if i == 1:
                    tdelta, pos = _uvarint(buf, pos, endbit)
                else:
                    d = 0
                    for _ in range(4):
                        bit, pos = _bits(buf, pos, 1, endbit)
                        d <<= 1
                        if bit == 0:
                            break
                        d |= 1
                    dod = np.int64(0)
                    if d == 0b1111:
                        dod, pos = _bits(buf, pos, 64, endbit)
                    elif d != 0:
                        sz = 14 if d == 0b10 else 17 if d == 0b110 else 20
                        raw, pos = _bits(buf, pos, sz, endbit)
                        if raw > (np.int64(1) << (sz - 1)):
                            raw -= np.int64(1) << sz
                        dod = raw
                    tdelta += dod
                t += tdelta
                # the value: XOR with the previous one
                bit, pos = _bits(buf, pos, 1, endbit)
                if bit == 1:
                    bit, pos = _bits(buf, pos, 1, endbit)
                    if bit == 1:
                        leading, pos = _bits(buf, pos, 5, endbit)
                        mbits, pos = _bits(buf, pos, 6, endbit)
                        if mbits == 0:
                            mbits = 64
                        trailing = 64 - leading - mbits
                        if trailing < 0:
                            return c
                    mbits = 64 - leading - trailing
                    x, pos = _bits(buf, pos, mbits, endbit)
                    v ^= x << trailing
            if pos < 0:
                return c
            ts[o + i] = t
            bits[o + i] = v
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
