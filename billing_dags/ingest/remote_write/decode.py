"""Decode one remote-write request body: snappy block format (cramjam), then a protobuf
WriteRequest (the compiled reader of wire.py for the usual shape, the protobuf runtime for any
other), then validated columns of samples.

A body that cannot be used raises ``BadRequest`` (the receiver answers 400; Prometheus does not
retry it) or ``TooLarge`` (413): among them a metric or label name that is not a Prometheus name
(control characters included), and a series whose id another label set already has. Messages name the problem and the series index, never label
values or sample values (DESIGN rule 12: no payloads in logs).

``Limits`` bounds what is accepted (docs/remote-write.md, "Limits"): sample timestamps in a
window (a sample outside it refuses the whole request with ``OutOfWindow``, like Prometheus's
own receiver answers 400 "out of bounds"), labels per series, label name and value bytes, and the
bytes the series cache may hold.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import cramjam
import numpy as np
from google.protobuf.message import DecodeError

from billing_dags.core.errors import InputError
from billing_dags.ingest import raw
from billing_dags.ingest.remote_write import wire
from billing_dags.ingest.remote_write.customers import UNKNOWN, CustomerResolver
from billing_dags.ingest.remote_write.proto import TimeSeries, TimeSeriesKeyed, WriteRequestKeyed

#: Prometheus staleness marker: a NaN with this exact bit pattern
STALE_NAN_BITS = 0x7FF0000000000002
DAY_MS = raw.DAY_MS
#: series cache entries kept before the cache is cleared (bounded memory, re-filled on demand)
SERIES_CACHE_MAX = 500_000
#: what a cache entry holds besides twice its key's bytes (the key, then the parsed labels): the
#: SeriesInfo, its tuples and the dict slot, measured with tracemalloc
CACHE_ENTRY_OVERHEAD, CACHE_LABEL_OVERHEAD = 400, 170

#: The widest timestamp window any setting may open, [floor, ceiling): every instant in it is a
#: Python date, an Arrow or DuckDB timestamp, even a nanosecond timestamp (pandas, Polars: 2262).
#: Landing refuses to index anything outside it (landing.py), so nothing acknowledged can be.
TS_FLOOR_MS = 0  # 1970-01-01T00:00Z
TS_CEILING_MS = 7_258_118_400_000  # 2200-01-01T00:00Z
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def describe_ms(ms: int) -> str:
    """A timestamp in ms as ISO 8601 UTC, for messages; one past Python's dates says so."""
    try:
        return (_EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    except OverflowError:
        return "after year 9999" if ms > 0 else "before year 1"


@dataclass(frozen=True)
class Limits:
    """What the receiver accepts (defaults: docs/remote-write.md, "Limits")."""

    #: no sample before this (ms); --min-sample-time, default 2000-01-01T00:00Z
    min_sample_ms: int = 946_684_800_000
    #: no sample more than this ahead of the receiver's clock (ms); --max-sample-future, default
    #: 10 minutes, like Prometheus (its scrapes; newer versions of its receiver too) and Mimir
    max_future_ms: int = 600_000
    #: labels per series, __name__ included (Prometheus label_limit, Mimir max_label_names_per_series 30)
    max_labels: int = 64
    #: bytes of a label name (Prometheus label_name_length_limit; Mimir's default 1024)
    max_label_name_bytes: int = 1024
    #: bytes of a label value, the metric name included (label_value_length_limit; Mimir's 2048)
    max_label_value_bytes: int = 2048
    #: bytes the series cache may hold before it starts over (--series-cache-bytes)
    max_cache_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        if not TS_FLOOR_MS <= self.min_sample_ms < TS_CEILING_MS:
            raise ValueError(f"the earliest sample time must be from {describe_ms(TS_FLOOR_MS)} to before {describe_ms(TS_CEILING_MS)}")
        if not 0 <= self.max_future_ms <= 366 * DAY_MS:
            raise ValueError("the future margin must be from 0 to 366 days (31622400 s)")
        for name in ("max_labels", "max_label_name_bytes", "max_label_value_bytes", "max_cache_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")

    def window(self, now_ms: int) -> tuple[int, int]:
        """The accepted sample timestamps [lo, hi] at ``now_ms``, never past the ceiling."""
        return self.min_sample_ms, min(now_ms + self.max_future_ms, TS_CEILING_MS - 1)


class BadRequest(InputError):
    """An undecodable or invalid body: answer 400."""


class OutOfWindow(BadRequest):
    """Samples with a timestamp outside the accepted window: answer 400, count ``samples``."""

    def __init__(self, message: str, samples: int):
        super().__init__(message)
        self.samples = samples


class TooLarge(InputError):
    """A body that would decode to more than the configured limit: answer 413."""


def _short(name: str) -> str:
    """A label name for a message: quoted, cut at 40 characters."""
    return repr(name if len(name) <= 40 else name[:40] + "…")


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
    for b in body[:5]:
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

    def __init__(
        self,
        resolver: CustomerResolver | None = None,
        max_decoded_bytes: int = 64 << 20,
        compiled: bool = True,
        limits: Limits = Limits(),
        clock=time.time,
    ):
        self.resolver = resolver or CustomerResolver()
        self.max_decoded_bytes = max_decoded_bytes
        self.compiled = compiled
        self.limits = limits
        self.clock = clock
        self._cache: dict[bytes, SeriesInfo] = {}
        #: the series of each id in the cache: a second label set with one id is refused
        self._by_id: dict[int, SeriesInfo] = {}
        self._cache_bytes = 0
        self._cache_full = False

    @property
    def cache_bytes(self) -> int:
        """The bytes the series cache holds (estimated per entry; see CACHE_ENTRY_OVERHEAD)."""
        return self._cache_bytes

    def _series(self, key: bytes, index: int) -> SeriesInfo:
        """The series of ``key`` (its encoded label fields), parsed and checked on a cache miss."""
        info = self._cache.get(key)
        if info is not None:
            return info
        metric = None
        prev = None
        labels: list[tuple[str, str]] = []
        limits = self.limits
        try:
            pairs = [(lab.name, lab.value) for lab in TimeSeries.FromString(key).labels]
        except DecodeError:
            raise BadRequest(f"series {index}: a label is not a valid prometheus.Label (invalid UTF-8?)") from None
        if len(pairs) > limits.max_labels:
            raise BadRequest(f"series {index}: {len(pairs)} labels, over the limit of {limits.max_labels} (--max-labels); drop some with write_relabel_configs")
        for name, value in pairs:
            if not name:
                raise BadRequest(f"series {index}: a label has an empty name")
            if len(name.encode()) > limits.max_label_name_bytes:
                raise BadRequest(
                    f"series {index}: label name {_short(name)} is {len(name.encode())} bytes, "
                    f"over the limit of {limits.max_label_name_bytes} (--max-label-name-bytes)"
                )
            if len(value.encode()) > limits.max_label_value_bytes:
                raise BadRequest(
                    f"series {index}: the value of label {_short(name)} is {len(value.encode())} bytes, "
                    f"over the limit of {limits.max_label_value_bytes} (--max-label-value-bytes)"
                )
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
        cost = CACHE_ENTRY_OVERHEAD + CACHE_LABEL_OVERHEAD * len(pairs) + 2 * len(key)
        if customer == UNKNOWN:
            cost += CACHE_LABEL_OVERHEAD + len(seen or "")
        info = SeriesInfo(sid, metric, tuple(labels), customer, seen)
        self._by_id.setdefault(sid, info)  # cleared with the cache: within a request it holds every series
        if self._cache_bytes + cost <= limits.max_cache_bytes and len(self._cache) < SERIES_CACHE_MAX:
            self._cache[key] = info
            self._cache_bytes += cost
        else:  # full: not kept; the next request starts the cache over
            self._cache_full = True
        return info

    def _out_of_window(self, infos: list[SeriesInfo], index: int, ts: int, samples: int) -> OutOfWindow:
        limits = self.limits
        return OutOfWindow(
            f"series {index} ({infos[index].metric[:100]}): sample timestamp {ts} ms ({describe_ms(ts)}) is outside "
            f"the accepted window: not before {describe_ms(limits.min_sample_ms)} (--min-sample-time), not more than "
            f"{limits.max_future_ms // 1000} s ahead of the receiver's clock (--max-sample-future); "
            f"{samples} sample(s) of this request are outside it, the request is refused whole",
            samples,
        )

    def decode(self, body: bytes) -> Batch:
        t0 = time.thread_time()
        declared = _snappy_declared_length(body)
        if declared > self.max_decoded_bytes:
            raise TooLarge(f"body decodes to {declared} bytes, more than the limit of {self.max_decoded_bytes}")
        try:
            data = bytes(cramjam.snappy.decompress_raw(body))
        except Exception as e:  # cramjam.DecompressionError and friends
            raise BadRequest(f"bad snappy block ({type(e).__name__}); send Content-Encoding: snappy in block format") from None
        if self._cache_full:  # bounded memory: start over, re-filled on demand
            self._cache.clear()
            self._by_id.clear()
            self._cache_bytes, self._cache_full = 0, False
        lo, hi = self.limits.window(int(self.clock() * 1000))
        parsed = wire.parse(data, lo, hi) if self.compiled else None
        if parsed is None:
            batch = self._decode_reference(data, lo, hi)
        else:
            cache_get, series_of = self._cache.get, self._series
            infos = [cache_get(key) or series_of(key, index) for index, key in enumerate(parsed.keys)]
            if parsed.out_of_window:  # after every series' labels were checked, as in the reference
                raise self._out_of_window(infos, *parsed.first_out_of_window, parsed.out_of_window)
            batch = self._batch(infos, parsed.counts, parsed.ts, parsed.value)
        batch.decode_cpu_s = time.thread_time() - t0
        return batch

    def _decode_reference(self, data: bytes, lo: int, hi: int) -> Batch:
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
        counts_a, ts_a = np.array(counts, dtype=np.int64), np.array(tss, dtype=np.int64)
        outside = (ts_a < lo) | (ts_a > hi)
        if outside.any():
            first = int(np.argmax(outside))
            index = int(np.searchsorted(np.cumsum(counts_a), first, side="right"))
            raise self._out_of_window(infos, index, int(ts_a[first]), int(np.count_nonzero(outside)))
        batch = self._batch(infos, counts_a, ts_a, np.array(vals, dtype=np.float64))
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
        # unknown customers' label values numbered within this request (the decode threads share nothing here)
        names: dict[str | None, int] = {}
        codes = np.array([names.setdefault(info.customer_label, len(names)) if info.customer == UNKNOWN else -1 for info in infos], dtype=np.int64)
        if codes.max() >= 0:
            unknown_series = codes >= 0
            unknown = np.repeat(unknown_series, counts)
            per_code = np.bincount(codes[unknown_series], weights=counts[unknown_series]).astype(np.int64)
            present = np.flatnonzero(per_code)
            labels = list(names)
            batch.unknown_customers.update(dict(zip([labels[c] for c in present.tolist()], per_code[present].tolist())))
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
