"""A compiled reader for the common shape of a remote-write 1.0 request (the receiver's fast path).

Prometheus sends ``WriteRequest{timeseries: [TimeSeries{labels..., samples...}]}``: label
fields first, then one or a few samples per series. ``parse`` walks those bytes once in compiled
code (numba, GIL released) and returns, per series, the byte span of its encoded label fields
(the receiver's series-cache key; labels are parsed and validated by the protobuf runtime only on
a cache miss) and its sample count, and per sample the timestamp and the value's exact 64 bits.
In the same pass it counts the samples whose timestamp is outside the accepted window
``[lo, hi]`` and remembers the first of them (series index, timestamp).

It reads a subset of the format on purpose. Anything else — a malformed or truncated message,
an unexpected wire type, a group, a label field after a sample, exemplars, native
histograms, metadata — makes it return ``None`` and the caller decodes the body with the
protobuf runtime (billing_dags.ingest.remote_write.proto), which is the reference: it accepts or refuses
exactly what it always did, with the same message. Fields this reader does not know are skipped
the way the protobuf runtime skips unknown fields. tests/test_remote_write_wire.py checks both
paths give the same batch on valid, fuzzed and truncated bodies.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

_OK, _FALLBACK = 0, 1
_MAX_FIELD = (1 << 29) - 1  # the largest protobuf field number


@njit(cache=True, nogil=True, inline="always")
def _varint(buf, p, end):
    """(value as int64 two's complement, next position); next position -1 when the varint is
    truncated or over 64 bits."""
    if p < end and buf[p] < 0x80:  # one byte: tags, label lengths
        return np.int64(buf[p]), p + 1
    result = 0
    shift = 0
    while p < end:
        b = np.int64(buf[p])
        p += 1
        if shift == 63 and b > 1:
            return result, -1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, p
        shift += 7
        if shift > 63:
            return result, -1
    return result, -1


@njit(cache=True, nogil=True, inline="always")
def _length(buf, p, end):
    """(end of a length-delimited payload starting at p, payload start); -1 when it does not fit."""
    n, p = _varint(buf, p, end)
    if p < 0 or n < 0 or n > end - p:
        return -1, p
    return p + n, p


@njit(cache=True, nogil=True, inline="always")
def _skip(buf, p, end, wire_type):
    """The position after a field's payload of ``wire_type``; -1 when it does not fit or is a group."""
    if wire_type == 0:
        _, p = _varint(buf, p, end)
        return p
    if wire_type == 1:
        return p + 8 if p + 8 <= end else -1
    if wire_type == 5:
        return p + 4 if p + 4 <= end else -1
    if wire_type == 2:
        q, _ = _length(buf, p, end)
        return q
    return -1


@njit(cache=True, nogil=True, inline="always")
def _field(tag):
    """(field number, wire type) of a tag; field number -1 when it is not a valid one."""
    field = tag >> 3
    if field <= 0 or field > _MAX_FIELD:
        return -1, 0
    return field, tag & 7


@njit(cache=True, nogil=True)
def _parse(buf, lab_start, lab_end, counts, ts, bits, lo, hi, window):
    """Fill the output arrays and ``window`` (samples outside [lo, hi], the first one's series
    index and timestamp); returns (status, n_series, n_samples)."""
    end = len(buf)
    p = 0
    n_series = 0
    n_samples = 0
    while p < end:
        if buf[p] != 0x0A:  # anything but timeseries (1, length-delimited): the reference decoder
            return _FALLBACK, 0, 0
        ts_end, p = _length(buf, p + 1, end)
        if ts_end < 0 or n_series >= len(counts):
            return _FALLBACK, 0, 0
        # the label fields, all at the front as Prometheus writes them
        lab_start[n_series] = p
        while p < ts_end and buf[p] == 0x0A:
            p, _ = _length(buf, p + 1, ts_end)
            if p < 0:
                return _FALLBACK, 0, 0
        lab_end[n_series] = p
        first_sample = n_samples
        while p < ts_end:
            tag, p = _varint(buf, p, ts_end)
            if p < 0:
                return _FALLBACK, 0, 0
            if tag == 0x12:  # a sample
                msg_end, p = _length(buf, p, ts_end)
                if msg_end < 0 or n_samples >= len(ts):
                    return _FALLBACK, 0, 0
                t = 0
                v = 0
                while p < msg_end:
                    stag, p = _varint(buf, p, msg_end)
                    if p < 0:
                        return _FALLBACK, 0, 0
                    if stag == 0x09:  # value: fixed64, little-endian
                        if p + 8 > msg_end:
                            return _FALLBACK, 0, 0
                        v = 0
                        for k in range(8):
                            v |= np.int64(buf[p + k]) << (8 * k)
                        p += 8
                    elif stag == 0x10:  # timestamp: varint
                        t, p = _varint(buf, p, msg_end)
                        if p < 0:
                            return _FALLBACK, 0, 0
                    else:
                        field, wt = _field(stag)
                        if field < 0 or field == 1 or field == 2:  # a known field with another wire type
                            return _FALLBACK, 0, 0
                        p = _skip(buf, p, msg_end, wt)
                        if p < 0:
                            return _FALLBACK, 0, 0
                if t < lo or t > hi:
                    if window[0] == 0:
                        window[1] = n_series
                        window[2] = t
                    window[0] += 1
                ts[n_samples] = t
                bits[n_samples] = v
                n_samples += 1
            else:
                field, wt = _field(tag)
                # a label after a sample, exemplars (3), native histograms (4), a known field with another wire type
                if field < 0 or field <= 4:
                    return _FALLBACK, 0, 0
                p = _skip(buf, p, ts_end, wt)
                if p < 0:
                    return _FALLBACK, 0, 0
        counts[n_series] = n_samples - first_sample
        n_series += 1
    return _OK, n_series, n_samples


class Parsed(NamedTuple):
    keys: list[bytes]  # per series: its encoded label fields
    counts: np.ndarray  # int64 per series: samples
    ts: np.ndarray  # int64 per sample, ms
    value: np.ndarray  # float64 per sample, the exact bits sent
    #: samples with a timestamp outside [lo, hi], and the first one's (series index, timestamp)
    out_of_window: int = 0
    first_out_of_window: tuple[int, int] | None = None


_INT64 = np.iinfo(np.int64)


def parse(data: bytes, lo: int = _INT64.min, hi: int = _INT64.max) -> Parsed | None:
    """The series and samples of a serialized WriteRequest, or None: decode it with the protobuf runtime."""
    buf = np.frombuffer(data, dtype=np.uint8)
    # every TimeSeries and every Sample takes at least 2 bytes on the wire (tag + length)
    cap = len(data) // 2 + 1
    out = np.empty((5, cap), dtype=np.int64)  # one allocation: series starts, ends, counts; sample ts, value bits
    lab_start, lab_end, counts, ts, bits = out
    window = np.zeros(3, dtype=np.int64)
    status, n_series, n_samples = _parse(buf, lab_start, lab_end, counts, ts, bits, np.int64(lo), np.int64(hi), window)
    if status != _OK:
        return None
    keys = [data[a:b] for a, b in zip(lab_start[:n_series].tolist(), lab_end[:n_series].tolist())]
    n_out, series_index, first_ts = window.tolist()
    return Parsed(
        keys,
        counts[:n_series].copy(),
        ts[:n_samples].copy(),
        bits[:n_samples].copy().view(np.float64),
        n_out,
        (series_index, first_ts) if n_out else None,
    )
