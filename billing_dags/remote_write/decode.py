"""Decode one remote-write request body: snappy block format (cramjam), then a protobuf
WriteRequest (protobuf runtime), then validated columns of samples.

A body that cannot be used raises ``BadRequest`` (the receiver answers 400; Prometheus does not
retry it) or ``TooLarge`` (413). Messages name the problem and the series index, never label
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

from .customers import UNKNOWN, CustomerResolver
from .proto import Label, WriteRequestKeyed

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
    """Decodes request bodies; keeps a cache of label sets -> series (id, customer)."""

    def __init__(self, resolver: CustomerResolver | None = None, max_decoded_bytes: int = 64 << 20):
        self.resolver = resolver or CustomerResolver()
        self.max_decoded_bytes = max_decoded_bytes
        self._cache: dict[tuple, SeriesInfo] = {}

    def _series(self, key: tuple, index: int) -> SeriesInfo:
        info = self._cache.get(key)
        if info is not None:
            return info
        metric = None
        prev = None
        labels: list[tuple[str, str]] = []
        try:
            pairs = [(lab.name, lab.value) for lab in map(Label.FromString, key)]
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
        customer, seen = self.resolver.resolve(metric, label_map)
        info = SeriesInfo(raw.series_id(metric, label_map), metric, tuple(labels), customer, seen)
        if len(self._cache) >= SERIES_CACHE_MAX:
            self._cache.clear()
        self._cache[key] = info
        return info

    def decode(self, body: bytes) -> Batch:
        t0 = time.thread_time()
        declared = _snappy_declared_length(body)
        if declared > self.max_decoded_bytes:
            raise TooLarge(f"body decodes to {declared} bytes, more than the limit of {self.max_decoded_bytes}")
        try:
            data = cramjam.snappy.decompress_raw(body)
        except Exception as e:  # cramjam.DecompressionError and friends
            raise BadRequest(f"bad snappy block ({type(e).__name__}); send Content-Encoding: snappy in block format") from None
        try:
            req = WriteRequestKeyed.FromString(bytes(data))
        except DecodeError:
            raise BadRequest("body is not a protobuf prometheus.WriteRequest") from None
        series: dict[int, SeriesInfo] = {}
        sids: list[int] = []
        tss: list[int] = []
        vals: list[float] = []
        per_series: list[tuple[SeriesInfo, int]] = []
        exemplars = histograms = 0
        cache_get, series_of = self._cache.get, self._series
        sids_ext, tss_app, vals_app = sids.extend, tss.append, vals.append
        for index, ts in enumerate(req.timeseries):
            key = tuple(ts.labels)
            info = cache_get(key) or series_of(key, index)
            samples = ts.samples
            n = len(samples)
            if n == 1:  # the usual shape: one sample per series per request
                s = samples[0]
                tss_app(s.timestamp)
                vals_app(s.value)
            else:
                for s in samples:
                    tss_app(s.timestamp)
                    vals_app(s.value)
            if n:
                series[info.series_id] = info
                sids_ext([info.series_id] * n)
                per_series.append((info, n))
            if ts.exemplars:
                exemplars += len(ts.exemplars)
            if ts.histograms:
                histograms += len(ts.histograms)
        sid_a = np.array(sids, dtype=np.int64)
        ts_a = np.array(tss, dtype=np.int64)
        val_a = np.array(vals, dtype=np.float64)
        batch = Batch(series, sid_a, ts_a, val_a, metadata=len(req.metadata), exemplars=exemplars, histograms=histograms)
        if len(ts_a):
            stale = val_a.view(np.uint64) == STALE_NAN_BITS
            nonfinite = ~np.isfinite(val_a) & ~stale
            unknown = np.zeros(len(ts_a), dtype=bool)
            offset = 0
            for info, n in per_series:
                if info.customer == UNKNOWN:
                    unknown[offset : offset + n] = True
                    batch.unknown_customers[info.customer_label] += n
                offset += n
            batch.stale, batch.nonfinite, batch.unknown_customer = int(stale.sum()), int(nonfinite.sum()), int(unknown.sum())
            day = ts_a // DAY_MS
            for d in np.unique(day).tolist():
                m = day == d
                batch.days[d] = {
                    "samples": int(m.sum()),
                    "stale": int((stale & m).sum()),
                    "nonfinite": int((nonfinite & m).sum()),
                    "unknown_customer": int((unknown & m).sum()),
                }
        batch.decode_cpu_s = time.thread_time() - t0
        return batch


def is_stale(value: float) -> bool:
    return math.isnan(value) and np.float64(value).view(np.uint64) == STALE_NAN_BITS
