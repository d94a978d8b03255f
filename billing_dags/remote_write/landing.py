"""Landing segments: where the receiver puts every batch before it answers 204.

A segment is an append-only file ``seg-<utc>-<pid>-<n>.open`` in ``data/landing/``:

    file header   b"BRWSEG1\\n"
    record        b"BRWR" | payload length (u32 LE) | CRC-32 of the payload (u32 LE) | payload
    payload       n_samples (u32) | series JSON length (u32) | series JSON | series_id[n] (i64 LE)
                  | ts[n] (i64 LE, ms) | value[n] (f64 LE)

The series JSON lists ``[series_id, metric, [[name, value], ...]]`` for the series that first
appear in this segment; later records name them by id only. One record is one acknowledged
request; a group of records is written and then fsynced once (group commit) before any of
their requests is answered. A write that fails (disk full) is truncated away and answered 503.

A SIGKILL can leave a torn last record: its CRC (or its length) does not match, the reader stops
there, and recovery truncates it — it was never acknowledged, Prometheus retries it.

The writer holds an exclusive ``flock`` on its open segment. It seals a segment when it reaches
the size or age limit, or at shutdown: an index ``<name>.idx.json`` (the UTC days it holds, with
sample, staleness, non-finite and unknown-customer counts) is written, then the file is renamed
``.seg``. An ``.open`` file that nobody holds the lock on belongs to a dead receiver; recovery
(at receiver start and before compaction) cuts its torn tail and seals it the same way.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import queue
import struct
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np

from billing_dags import raw

from .customers import UNKNOWN, CustomerResolver
from .decode import STALE_NAN_BITS, BadRequest, Batch, SeriesInfo

log = logging.getLogger(__name__)

FILE_MAGIC = b"BRWSEG1\n"
REC_MAGIC = b"BRWR"
REC_HEADER = struct.Struct("<4sII")
PAYLOAD_HEADER = struct.Struct("<II")
OPEN_SUFFIX, SEALED_SUFFIX, INDEX_SUFFIX = ".open", ".seg", ".idx.json"
#: the largest record accepted when reading (a corrupt length must not allocate gigabytes)
MAX_RECORD_BYTES = 1 << 30
UNKNOWN_CUSTOMERS_KEPT = 50


class DiskFull(OSError):
    """The batch could not be made durable (no space, quota, I/O error): answer 503."""


def day_name(day_number: int) -> str:
    return raw.day_of_ms(day_number * raw.DAY_MS).isoformat()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, sort_keys=True, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- index -----------------------------------------------------------------------------------


@dataclass
class IndexBuilder:
    """The figures of a segment, accumulated as records are written (or re-read in recovery)."""

    records: int = 0
    samples: int = 0
    series: int = 0
    days: dict[int, Counter] = field(default_factory=dict)
    unknown_customers: Counter = field(default_factory=Counter)
    min_ts: int | None = None
    max_ts: int | None = None

    def add(self, batch: Batch, new_series: int) -> None:
        self.records += 1
        self.samples += batch.samples
        self.series += new_series
        for d, figures in batch.days.items():
            self.days.setdefault(d, Counter()).update(figures)
        self.unknown_customers.update(batch.unknown_customers)
        if batch.samples:
            lo, hi = int(batch.ts.min()), int(batch.ts.max())
            self.min_ts = lo if self.min_ts is None else min(self.min_ts, lo)
            self.max_ts = hi if self.max_ts is None else max(self.max_ts, hi)

    def to_json(self, name: str, recovered: bool = False) -> dict:
        return {
            "segment": name,
            "records": self.records,
            "samples": self.samples,
            "series": self.series,
            "min_ts": self.min_ts,
            "max_ts": self.max_ts,
            "days": {day_name(d): dict(sorted(c.items())) for d, c in sorted(self.days.items())},
            "unknown_customers": dict(self.unknown_customers.most_common(UNKNOWN_CUSTOMERS_KEPT)),
            "sealed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "recovered": recovered,
        }


# --- writing ---------------------------------------------------------------------------------


def encode_record(batch: Batch, new_series: list[int]) -> bytes:
    series_json = json.dumps(
        [[sid, batch.series[sid].metric, [list(kv) for kv in batch.series[sid].labels]] for sid in new_series],
        separators=(",", ":"),
    ).encode()
    n = batch.samples
    payload = b"".join(
        [
            PAYLOAD_HEADER.pack(n, len(series_json)),
            series_json,
            batch.series_id.astype("<i8", copy=False).tobytes(),
            batch.ts.astype("<i8", copy=False).tobytes(),
            batch.value.astype("<f8", copy=False).tobytes(),
        ]
    )
    return REC_HEADER.pack(REC_MAGIC, len(payload), zlib.crc32(payload)) + payload


def _new_series(batch: Batch, held: dict[int, SeriesInfo], added: dict[int, SeriesInfo]) -> tuple[list[int], raw.Collision | None]:
    """The batch's series whose labels the segment (``held``, ``added`` in this group) does not hold
    yet, or the first series whose id it holds with another label set."""
    series = batch.series
    held_get, added_get = held.get, added.get
    if list(map(held_get, series)) == list(series.values()):  # compares by identity first, in C
        return [], None  # the usual batch: every series held, as the decoder's same cached object
    new = []
    for sid, info in series.items():
        prev = held_get(sid)
        if prev is info:  # the usual case: the decoder's cached series
            continue
        if prev is None:
            prev = added_get(sid)
            if prev is None:
                new.append(sid)
                continue
        if prev is not info and (prev.metric, prev.labels) != (info.metric, info.labels):
            return [], raw.Collision(sid, info.metric, info.labels, prev.metric, prev.labels, "the receiver's open landing segment")
    return new, None


class _Segment:
    def __init__(self, directory: Path, seq: int):
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        self.name = f"seg-{stamp}-{os.getpid()}-{seq:06d}"
        self.path = directory / f"{self.name}{OPEN_SUFFIX}"
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(self.fd, FILE_MAGIC)
            os.fsync(self.fd)
            fsync_dir(directory)  # the file's name is durable before anything in it is acknowledged
        except OSError:
            os.close(self.fd)
            self.path.unlink(missing_ok=True)
            raise
        self.size = len(FILE_MAGIC)
        self.created = time.monotonic()
        self.series: dict[int, SeriesInfo] = {}  # the series whose labels this segment holds
        self.index = IndexBuilder()


class SegmentWriter:
    """Group-commit writer: ``submit(batch)`` returns a Future resolved once the batch is fsynced.

    One thread owns the open segment. It takes every batch waiting in its queue, appends one
    record per batch, fsyncs once, then resolves their futures (or fails them all with DiskFull
    after truncating what it wrote). It rotates segments by size and age, also when idle.
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_segment_bytes: int = 64 << 20,
        max_segment_age_s: float = 60.0,
        min_free_bytes: int = 64 << 20,
        max_group: int = 256,
    ):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_segment_bytes = max_segment_bytes
        self.max_segment_age_s = max_segment_age_s
        self.min_free_bytes = min_free_bytes
        self.max_group = max_group
        self._queue: queue.Queue = queue.Queue()
        self._seg: _Segment | None = None
        self._seq = 0
        self._closed = False
        self.fsyncs = 0
        self.fsync_seconds = 0.0
        self.sealed = 0
        self._thread = threading.Thread(target=self._run, name="landing-writer", daemon=True)
        self._thread.start()

    # called from request handlers ------------------------------------------------------------
    def free_bytes(self) -> int:
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize

    def disk_full(self) -> bool:
        """True when the landing disk has less than ``min_free_bytes`` left (answer 503 early)."""
        try:
            return self.free_bytes() < self.min_free_bytes
        except OSError:
            return True

    def submit(self, batch: Batch) -> Future:
        fut: Future = Future()
        if self._closed:
            fut.set_exception(DiskFull(errno.EIO, "the landing writer is shut down"))
        else:
            self._queue.put((batch, fut))
        return fut

    def close(self) -> None:
        """Write what is queued, seal the open segment, stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()

    # the writer thread -------------------------------------------------------------------------
    def _run(self) -> None:
        stop = False
        while not stop:
            timeout = None
            if self._seg is not None:
                timeout = max(0.05, self.max_segment_age_s - (time.monotonic() - self._seg.created))
            try:
                first = self._queue.get(timeout=timeout)
            except queue.Empty:
                first = ()
            group = []
            if first is None:
                stop = True
            elif first:
                group.append(first)
            while len(group) < self.max_group:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                group.append(item)
            if group:
                self._write_group(group)
            if self._seg is not None and (
                stop
                or self._seg.size >= self.max_segment_bytes
                or time.monotonic() - self._seg.created >= self.max_segment_age_s
            ):
                self._seal_current()
        # anything submitted after the stop marker
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item:
                item[1].set_exception(DiskFull(errno.EIO, "the landing writer is shut down"))

    def _write_group(self, group: list) -> None:
        try:
            if self._seg is None:
                self._seq += 1
                self._seg = _Segment(self.directory, self._seq)
        except OSError as e:
            for _, fut in group:
                fut.set_exception(DiskFull(e.errno or errno.EIO, f"cannot create a landing segment: {e.strerror}"))
            return
        seg = self._seg
        start = seg.size
        added: dict[int, SeriesInfo] = {}
        written: list[tuple[Batch, Future, int]] = []
        try:
            for batch, fut in group:
                new, clash = _new_series(batch, seg.series, added)
                if clash is not None:  # its samples would be read as the other series': refused (400)
                    fut.set_exception(BadRequest(f"{clash}; refused so that neither is merged into the other"))
                    continue
                added.update((sid, batch.series[sid]) for sid in new)
                written.append((batch, fut, len(new)))
                rec = encode_record(batch, new)
                view = memoryview(rec)
                while view:
                    n = os.write(seg.fd, view)
                    view = view[n:]
                    seg.size += n
            t0 = time.perf_counter()
            os.fdatasync(seg.fd)
            self.fsync_seconds += time.perf_counter() - t0
            self.fsyncs += 1
        except Exception as e:  # OSError (ENOSPC, EIO, EDQUOT) above all; anything else must not hang requests
            self._rollback(seg, start)
            code = getattr(e, "errno", None) or errno.EIO
            reason = getattr(e, "strerror", None) or type(e).__name__
            for _, fut in group:
                if not fut.done():
                    fut.set_exception(DiskFull(code, f"landing write failed: {reason}"))
            return
        seg.series.update(added)
        for batch, fut, n_new in written:
            seg.index.add(batch, n_new)
            fut.set_result(None)

    def _rollback(self, seg: _Segment, size: int) -> None:
        """Cut a failed group off the segment; if even that fails, abandon the segment."""
        try:
            os.ftruncate(seg.fd, size)
            os.lseek(seg.fd, size, os.SEEK_SET)  # the next record goes right after the last good one
            os.fsync(seg.fd)
            seg.size = size
        except OSError:
            log.error("could not truncate %s after a failed write; sealing it at its last good record", seg.path.name)
            try:
                os.close(seg.fd)
            except OSError:
                pass
            self._seg = None  # recovery (CRC) drops the partial tail when it is sealed later

    def _seal_current(self) -> None:
        seg, self._seg = self._seg, None
        try:
            os.fsync(seg.fd)
            if seg.index.records == 0:
                seg.path.unlink()
                fsync_dir(self.directory)
            else:
                seal(self.directory, seg.path, seg.index.to_json(seg.name))
                self.sealed += 1
        except OSError as e:
            log.error("could not seal %s (%s); recovery will seal it", seg.path.name, e.strerror)
        finally:
            os.close(seg.fd)  # releases the flock


def seal(directory: Path, open_path: Path, index: dict) -> Path:
    """Write the index, then rename .open -> .seg; both durable before returning."""
    name = open_path.name[: -len(OPEN_SUFFIX)]
    _write_json_atomic(directory / f"{name}{INDEX_SUFFIX}", index)
    sealed = directory / f"{name}{SEALED_SUFFIX}"
    os.replace(open_path, sealed)
    fsync_dir(directory)
    return sealed


# --- reading ---------------------------------------------------------------------------------


@dataclass
class SegmentData:
    series: dict[int, tuple[str, dict[str, str]]]
    series_id: np.ndarray
    ts: np.ndarray
    value: np.ndarray
    records: int
    valid_bytes: int
    torn: bool  # bytes after the last good record (a write cut short by a crash)
    record_sizes: list[int] = field(default_factory=list)
    #: ids the segment defines twice with different labels (the first definition is in ``series``)
    conflicts: set[int] = field(default_factory=set)


def read_segment(path: Path) -> SegmentData:
    """Every intact record of a segment, in order; stops at the first torn or corrupt record."""
    data = Path(path).read_bytes()
    series: dict[int, tuple[str, dict[str, str]]] = {}
    conflicts: set[int] = set()
    sids, tss, vals, sizes = [], [], [], []
    if data[: len(FILE_MAGIC)] != FILE_MAGIC:
        return SegmentData({}, *(np.empty(0, t) for t in ("<i8", "<i8", "<f8")), 0, 0, bool(data))
    pos = len(FILE_MAGIC)
    torn = False
    while pos < len(data):
        if pos + REC_HEADER.size > len(data):
            torn = True
            break
        magic, length, crc = REC_HEADER.unpack_from(data, pos)
        end = pos + REC_HEADER.size + length
        if magic != REC_MAGIC or length > MAX_RECORD_BYTES or end > len(data):
            torn = True
            break
        payload = memoryview(data)[pos + REC_HEADER.size : end]
        if zlib.crc32(payload) != crc:
            torn = True
            break
        n, jlen = PAYLOAD_HEADER.unpack_from(payload, 0)
        o = PAYLOAD_HEADER.size
        for sid, metric, labels in json.loads(bytes(payload[o : o + jlen])):
            label_map = dict(labels)
            if series.setdefault(sid, (metric, label_map)) != (metric, label_map):
                conflicts.add(sid)
        o += jlen
        sids.append(np.frombuffer(payload, "<i8", n, o))
        tss.append(np.frombuffer(payload, "<i8", n, o + 8 * n))
        vals.append(np.frombuffer(payload, "<f8", n, o + 16 * n))
        sizes.append(end - pos)
        pos = end
    cat = lambda parts, t: np.concatenate(parts).astype(t) if parts else np.empty(0, t)  # noqa: E731
    return SegmentData(series, cat(sids, np.int64), cat(tss, np.int64), cat(vals, np.float64), len(sizes), pos, torn, sizes, conflicts)


def index_from_data(seg: SegmentData, resolver: CustomerResolver | None = None) -> IndexBuilder:
    """Rebuild a segment's figures by reading it (recovery)."""
    idx = IndexBuilder(records=seg.records, samples=len(seg.ts), series=len(seg.series))
    if not len(seg.ts):
        return idx
    idx.min_ts, idx.max_ts = int(seg.ts.min()), int(seg.ts.max())
    stale = seg.value.view(np.uint64) == STALE_NAN_BITS
    nonfinite = ~np.isfinite(seg.value) & ~stale
    unknown = np.zeros(len(seg.ts), dtype=bool)
    if resolver is not None and resolver.enabled:
        for sid, (metric, labels) in seg.series.items():
            kind, seen = resolver.resolve(metric, labels)
            if kind == UNKNOWN:
                m = seg.series_id == sid
                unknown |= m
                idx.unknown_customers[seen] += int(m.sum())
    day = seg.ts // raw.DAY_MS
    for d in np.unique(day).tolist():
        m = day == d
        idx.days[d] = Counter(
            samples=int(m.sum()),
            stale=int((stale & m).sum()),
            nonfinite=int((nonfinite & m).sum()),
            unknown_customer=int((unknown & m).sum()),
        )
    return idx


def recover_orphans(directory: Path, resolver: CustomerResolver | None = None) -> list[dict]:
    """Seal every ``.open`` segment no live writer holds: cut its torn tail, index it, rename it."""
    directory = Path(directory)
    out = []
    if not directory.is_dir():
        return out
    for path in sorted(directory.glob(f"seg-*{OPEN_SUFFIX}")):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live receiver is writing it
            if not path.exists():  # sealed by its writer between glob and lock
                continue
            seg = read_segment(path)
            name = path.name[: -len(OPEN_SUFFIX)]
            dropped = os.fstat(fd).st_size - seg.valid_bytes
            if seg.torn:
                os.ftruncate(fd, max(seg.valid_bytes, len(FILE_MAGIC)))
                os.fsync(fd)
            if seg.records == 0:
                path.unlink()
                fsync_dir(directory)
                out.append({"segment": name, "records": 0, "removed": True, "torn": seg.torn})
                continue
            index = index_from_data(seg, resolver).to_json(name, recovered=True)
            index["torn_tail_bytes_dropped"] = dropped
            seal(directory, path, index)
            out.append({**index, "torn": seg.torn})
        finally:
            os.close(fd)
    return out


@dataclass(frozen=True)
class SealedSegment:
    name: str
    path: Path
    index: dict

    @property
    def days(self) -> list[str]:
        return sorted(self.index.get("days", {}))

    def done_marker(self, day: str) -> Path:
        return self.path.with_name(f"{self.name}.done-{day}")

    def pending_days(self) -> list[str]:
        return [d for d in self.days if not self.done_marker(d).exists()]


def sealed_segments(directory: Path, resolver: CustomerResolver | None = None) -> list[SealedSegment]:
    """Sealed segments in arrival order, with their index (rebuilt if a crash lost it)."""
    directory = Path(directory)
    out = []
    if not directory.is_dir():
        return out
    for path in sorted(directory.glob(f"seg-*{SEALED_SUFFIX}")):
        name = path.name[: -len(SEALED_SUFFIX)]
        idx_path = directory / f"{name}{INDEX_SUFFIX}"
        try:
            index = json.loads(idx_path.read_text())
        except (FileNotFoundError, ValueError):
            if not path.exists():
                continue
            index = index_from_data(read_segment(path), resolver).to_json(name, recovered=True)
            _write_json_atomic(idx_path, index)
        out.append(SealedSegment(name, path, index))
    return out


def remove_segment(seg: SealedSegment) -> None:
    """Delete a fully compacted segment: data first, then its index and markers."""
    seg.path.unlink(missing_ok=True)
    for p in seg.path.parent.glob(f"{seg.name}.*"):
        p.unlink(missing_ok=True)
    fsync_dir(seg.path.parent)


def parse_day(day: str) -> date:
    return date.fromisoformat(day)
