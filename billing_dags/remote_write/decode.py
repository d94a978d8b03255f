"""Decode one remote-write request body: snappy block format (cramjam), then a protobuf
WriteRequest (the compiled reader of wire.py for the usual shape, the protobuf runtime for any
other), then validated columns of samples.

A body that cannot be used raises ``BadRequest`` (the receiver answers 400; Prometheus does not
retry it) or ``TooLarge`` (413): among them a metric or label name that is not a Prometheus name
(control characters included), and a series whose id another label set already has. Messages name the problem and the series index, never label
values or sample values (DESIGN rule 12: no payloads in logs).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field

import cramjam
import numpy as np
from google.protobuf.message import DecodeError

from billing_dags import raw

from . import wire
from .customers import UNKNOWN, CustomerResolver
from .proto import TimeSeries, TimeSeriesKeyed, WriteRequestKeyed

#: Prometheus staleness marker: a NaN with this exact bit pattern
STALE_NAN_BITS = 0x7FF0000000000002
DAY_MS = raw.DAY_MS
#: series cache entries kept before the cache is cleared (bounded memory, re-filled on demand)
SERIES_CACHE_MAX = 500_000


class BadRequest(ValueError):
    """An undecodable or invalid body: answer 400."""


class TooLarge(ValueError):
    """A body that would decode to more than the configured limit: answer 413."""


@dataclass
class SeriesInfo:
    series_id: int
    metric: str
    labels: tuple[tuple[str, str], ...]  # metric name excluded, sorted by name
    customer: str  # KNOWN / UNKNOWN / UNMETERED
    customer_label: str | None
    #: for an unknown customer: the index of customer_label in the decoder's list of them, else -1
    unknown_code: int = -1


@dataclass
class Batch:
    """The decoded samples of one request, as columns, plus what they contain."""

    series: dict[int, SeriesInfo]
    series_id: np.ndarray  # int64
    ts: np.ndarray  # int64 ms
    value: np.ndarray  # float64
    metadata: int = 0
    exemplars: int = 0
    histograms: int = 0
    stale: int = 0
    nonfinite: int = 0
    unknown_customer: int = 0
    unknown_customers: Counter = field(default_factory=Counter)  # customer label value -> samples
    days: dict[int, dict[str, int]] = field(default_factory=dict)  # day number -> figures
    decode_cpu_s: float = 0.0

    @property
    def samples(self) -> int:
        return len(self.ts)


def _snappy_declared_length(body: bytes) -> int:
    """The uncompressed length a snappy block declares in its varint preamble."""
    result = shift = 0
    for i, b in enumerate(body[:5]):
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result
        shift += 7
    raise BadRequest("bad snappy block: the length preamble is truncated or longer than 5 bytes")


class Decoder:
    """Decodes request bodies; keeps a cache of label sets -> series (id, customer).

    The compiled reader (wire.py) takes the usual request shape; everything else, and every body
    when ``compiled`` is False (the reference the tests compare with), goes through the protobuf
    runtime.
    """

    def __init__(self, resolver: CustomerResolver | None = None, max_decoded_bytes: int = 64 << 20, compiled: bool = True):
        self.resolver = resolver or CustomerResolver()
        self.max_decoded_bytes = max_decoded_bytes
        self.compiled = compiled
        self._cache: dict[bytes, SeriesInfo] = {}
        #: the series of each id in the cache: a second label set with one id is refused
        self._by_id: dict[int, SeriesInfo] = {}
        self._unknown_labels: list[str | None] = []
        self._unknown_codes: dict[str | None, int] = {}

    def _series(self, key: bytes, index: int) -> SeriesInfo:
        """The series of ``key`` (its encoded label fields), parsed and checked on a cache miss."""
        info = self._cache.get(key)
        if info is not None:
            return info
        metric = None
        prev = None
        labels: list[tuple[str, str]] = []
        try:
            pairs = [(lab.name, lab.value) for lab in TimeSeries.FromString(key).labels]
        except DecodeError:
            raise BadRequest(f"series {index}: a label is not a valid prometheus.Label (invalid UTF-8?)") from None
        for name, value in pairs:
            if not name:
                raise BadRequest(f"series {index}: a label has an empty name")
            if prev is not None and name <= prev:
                what = "duplicate" if name == prev else "unsorted"
                raise BadRequest(f"series {index}: {what} label {name!r} (labels must be sorted by name, each once)")
            prev = name
            if name == "__name__":
                metric = value
            elif value != "":  # an empty value means the label is absent (Prometheus semantics)
                labels.append((name, value))
        if not metric:
            raise BadRequest(f"series {index}: no metric name (__name__ label missing or empty)")
        label_map = dict(labels)
        problem = raw.series_problem(metric, label_map)
        if problem:
            raise BadRequest(f"series {index}: {problem}")
        sid = raw.series_id(metric, label_map)
        other = self._by_id.get(sid)
        if other is not None and (other.metric, other.labels) != (metric, tuple(labels)):
            clash = raw.Collision(sid, metric, tuple(labels), other.metric, other.labels, "a series this receiver took earlier")
            raise BadRequest(f"series {index}: {clash}; refused so that neither is merged into the other")
        customer, seen = self.resolver.resolve(metric, label_map)
        code = -1
        if customer == UNKNOWN:
            code = self._unknown_codes.setdefault(seen, len(self._unknown_labels))
            if code == len(self._unknown_labels):
                self._unknown_labels.append(seen)
        info = SeriesInfo(sid, metric, tuple(labels), customer, seen, code)
        self._cache[key] = info
        self._by_id.setdefault(sid, info)
        return info

    def decode(self, body: bytes) -> Batch:
        t0 = time.thread_time()
        declared = _snappy_declared_length(body)
        if declared > self.max_decoded_bytes:
            raise TooLarge(f"body decodes to {declared} bytes, more than the limit of {self.max_decoded_bytes}")
        try:
            data = bytes(cramjam.snappy.decompress_raw(body))
        except Exception as e:  # cramjam.DecompressionError and friends
            raise BadRequest(f"bad snappy block ({type(e).__name__}); send Content-Encoding: snappy in block format") from None
        if len(self._cache) >= SERIES_CACHE_MAX:  # bounded memory: start over, re-filled on demand
            self._cache.clear()
            self._by_id.clear()
            self._unknown_labels.clear()
            self._unknown_codes.clear()
        parsed = wire.parse(data) if self.compiled else None
        if parsed is None:
            batch = self._decode_reference(data)
        else:
            cache_get, series_of = self._cache.get, self._series
            infos = [cache_get(key) or series_of(key, index) for index, key in enumerate(parsed.keys)]
            batch = self._batch(infos, parsed.counts, parsed.ts, parsed.value)
        batch.decode_cpu_s = time.thread_time() - t0
        return batch

    def _decode_reference(self, data: bytes) -> Batch:
        """Decode with the protobuf runtime: every shape the compiled reader leaves to it (see wire.py)."""
        try:
            req = WriteRequestKeyed.FromString(data)
        except DecodeError:
            raise BadRequest("body is not a protobuf prometheus.WriteRequest") from None
        infos: list[SeriesInfo] = []
        counts: list[int] = []
        tss: list[int] = []
        vals: list[float] = []
        exemplars = histograms = 0
        for index, ts in enumerate(req.timeseries):
            # the same key as the compiled reader's: the encoded label fields, in order
            key = TimeSeriesKeyed(labels=ts.labels).SerializeToString()
            infos.append(self._series(key, index))
            counts.append(len(ts.samples))
            for s in ts.samples:
                tss.append(s.timestamp)
                vals.append(s.value)
            exemplars += len(ts.exemplars)
            histograms += len(ts.histograms)
        batch = self._batch(infos, np.array(counts, dtype=np.int64), np.array(tss, dtype=np.int64), np.array(vals, dtype=np.float64))
        batch.metadata, batch.exemplars, batch.histograms = len(req.metadata), exemplars, histograms
        return batch

    def _batch(self, infos: list[SeriesInfo], counts: np.ndarray, ts_a: np.ndarray, val_a: np.ndarray) -> Batch:
        """A batch from the series of a request (in order) and their samples' columns."""
        sids = np.array([info.series_id for info in infos], dtype=np.int64)
        batch = Batch({}, np.repeat(sids, counts), ts_a, val_a)
        if not len(ts_a):
            return batch
        batch.series = {info.series_id: info for info in infos}
        if counts.min() == 0:  # a series sent without samples is not in the batch
            batch.series = {info.series_id: info for info, n in zip(infos, counts.tolist()) if n}
        stale = val_a.view(np.uint64) == STALE_NAN_BITS
        nonfinite = ~np.isfinite(val_a) & ~stale
        codes = np.array([info.unknown_code for info in infos], dtype=np.int64)
        if codes.max() >= 0:
            unknown_series = codes >= 0
            unknown = np.repeat(unknown_series, counts)
            per_code = np.bincount(codes[unknown_series], weights=counts[unknown_series]).astype(np.int64)
            present = np.flatnonzero(per_code)
            names = self._unknown_labels
            batch.unknown_customers.update(dict(zip([names[c] for c in present.tolist()], per_code[present].tolist())))
        else:
            unknown = np.zeros(len(ts_a), dtype=bool)
        batch.stale, batch.nonfinite = int(np.count_nonzero(stale)), int(np.count_nonzero(nonfinite))
        batch.unknown_customer = int(np.count_nonzero(unknown))
        day = ts_a // DAY_MS
        first = int(day[0])
        if (day == first).all():  # the usual request: one UTC day
            batch.days[first] = {"samples": len(ts_a), "stale": batch.stale, "nonfinite": batch.nonfinite, "unknown_customer": batch.unknown_customer}
            return batch
        for d in np.unique(day).tolist():
            m = day == d
            batch.days[d] = {
                "samples": int(np.count_nonzero(m)),
                "stale": int(np.count_nonzero(stale & m)),
                "nonfinite": int(np.count_nonzero(nonfinite & m)),
                "unknown_customer": int(np.count_nonzero(unknown & m)),
            }
        return batch


def is_stale(value: float) -> bool:
    return math.isnan(value) and np.float64(value).view(np.uint64) == STALE_NAN_BITS
