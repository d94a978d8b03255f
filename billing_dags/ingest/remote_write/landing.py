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

Everything the writer appends can be indexed: it refuses a batch with a timestamp outside
[decode.TS_FLOOR_MS, decode.TS_CEILING_MS) before writing it. A segment that still cannot be
indexed (written by an older receiver, damaged, crafted: a sample outside that window, a sample
of a series it never defines, a record with a right CRC but no valid payload) is quarantined:
moved whole to ``quarantine/`` with a ``<name>.quarantine.json`` saying why, after its indexable
samples were written to a new segment ``<name>-salvaged`` (``billing remote-write status``).

The writer holds an exclusive ``flock`` on its open segment. It seals a segment when it reaches
the size or age limit, or at shutdown: an index ``<name>.idx.json`` (the UTC days it holds, with
sample, staleness, non-finite and unknown-customer counts) is written, then the file is renamed
``.seg``. An ``.open`` file that nobody holds the lock on belongs to a dead receiver, or to a
writer that met an unexpected error (it fails that group with 503, lets go of its segment and
carries on); recovery (at receiver start and before compaction) cuts its torn tail and seals it
the same way, with an index rebuilt from its records.
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
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np

from billing_dags.core import durable
from billing_dags.core.errors import InputError
from billing_dags.ingest import raw
from billing_dags.ingest.remote_write.customers import UNKNOWN, CustomerResolver
from billing_dags.ingest.remote_write.decode import STALE_NAN_BITS, TS_CEILING_MS, TS_FLOOR_MS, BadRequest, Batch, SeriesInfo, describe_ms

log = logging.getLogger(__name__)

FILE_MAGIC = b"BRWSEG1\n"
REC_MAGIC = b"BRWR"
REC_HEADER = struct.Struct("<4sII")
PAYLOAD_HEADER = struct.Struct("<II")
OPEN_SUFFIX, SEALED_SUFFIX, INDEX_SUFFIX = ".open", ".seg", ".idx.json"
QUARANTINE_DIR, QUARANTINE_SUFFIX, SALVAGED_SUFFIX = "quarantine", ".quarantine.json", "-salvaged"
#: the largest record accepted when reading (a corrupt length must not allocate gigabytes)
MAX_RECORD_BYTES = 1 << 30
UNKNOWN_CUSTOMERS_KEPT = 50


class DiskFull(OSError):
    """The batch could not be made durable (no space, quota, I/O error): answer 503."""


class Unindexable(InputError):
    """Samples a segment index cannot hold (see ``problem``): never written; a segment holding
    them is quarantined."""


def _outside_window(lo: int, hi: int) -> str | None:
    """Why samples with timestamps from ``lo`` to ``hi`` cannot be indexed, or None."""
    for ts in (lo, hi):
        if not TS_FLOOR_MS <= ts < TS_CEILING_MS:
            return (
                f"sample timestamp {ts} ms ({describe_ms(ts)}) is outside the window a segment can index, "
                f"{describe_ms(TS_FLOOR_MS)} to {describe_ms(TS_CEILING_MS)}"
            )
    return None


def day_name(day_number: int) -> str:
    return raw.day_of_ms(day_number * raw.DAY_MS).isoformat()


def _write_json_atomic(path: Path, obj: dict) -> None:
    durable.write_bytes(path, json.dumps(obj, sort_keys=True, indent=1).encode())


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
            "sealed_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "recovered": recovered,
        }


# --- writing ---------------------------------------------------------------------------------


def encode_record(batch: Batch, new_series: list[int]) -> bytes:
    defs = [[sid, batch.series[sid].metric, [list(kv) for kv in batch.series[sid].labels]] for sid in new_series]
    return _record(defs, batch.series_id, batch.ts, batch.value)


def _record(defs: list, series_id: np.ndarray, ts: np.ndarray, value: np.ndarray) -> bytes:
    series_json = json.dumps(defs, separators=(",", ":")).encode()
    payload = b"".join(
        [
            PAYLOAD_HEADER.pack(len(ts), len(series_json)),
            series_json,
            series_id.astype("<i8", copy=False).tobytes(),
            ts.astype("<i8", copy=False).tobytes(),
            value.astype("<f8", copy=False).tobytes(),
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
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        self.name = f"seg-{stamp}-{os.getpid()}-{seq:06d}"
        self.path = directory / f"{self.name}{OPEN_SUFFIX}"
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(self.fd, FILE_MAGIC)
            os.fsync(self.fd)
            durable.fsync_path(directory)  # the file's name is durable before anything in it is acknowledged
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
        if self._closed or not self._thread.is_alive():
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
            try:
                if group:
                    self._write_group(group)
                if self._seg is not None and (
                    stop or self._seg.size >= self.max_segment_bytes or time.monotonic() - self._seg.created >= self.max_segment_age_s
                ):
                    self._seal_current()
            except Exception as e:  # a bug must cost one group a retry, never the writer
                self._survive(e, group)
        # anything submitted after the stop marker
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item:
                item[1].set_exception(DiskFull(errno.EIO, "the landing writer is shut down"))

    def _survive(self, error: Exception, group: list) -> None:
        """Fail the group's unanswered requests (503: Prometheus retries them) and let go of the
        open segment: what it holds was acknowledged, recovery seals it from its records."""
        log.error("landing writer: %s: %s; failing %d request(s) with 503 and carrying on", type(error).__name__, error, len(group))
        for _, fut in group:
            if not fut.done():
                fut.set_exception(DiskFull(errno.EIO, f"the landing writer failed ({type(error).__name__})"))
        seg, self._seg = self._seg, None
        if seg is not None:
            log.error("landing writer: leaving %s to recovery", seg.path.name)
            try:
                os.close(seg.fd)  # releases the flock: recover_orphans may take it
            except OSError:
                pass

    def _write_group(self, group: list) -> None:
        checks = [(fut, _outside_window(int(b.ts.min()), int(b.ts.max()))) for b, fut in group if b.samples]
        for fut, problem in checks:
            if problem:
                fut.set_exception(Unindexable(problem))
        group = [(b, fut) for b, fut in group if not fut.done()]
        if not group:
            return
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
                durable.fsync_path(self.directory)
            else:
                seal(self.directory, seg.path, seg.index.to_json(seg.name))
                self.sealed += 1
        except OSError as e:
            log.error("could not seal %s (%s); recovery will seal it", seg.path.name, e.strerror)
        finally:
            os.close(seg.fd)  # releases the flock; on any other error the segment is left to recovery


def seal(directory: Path, open_path: Path, index: dict) -> Path:
    """Write the index, then rename .open -> .seg; both durable before returning."""
    name = open_path.name[: -len(OPEN_SUFFIX)]
    _write_json_atomic(directory / f"{name}{INDEX_SUFFIX}", index)
    sealed = directory / f"{name}{SEALED_SUFFIX}"
    durable.publish(open_path, sealed)
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
    #: a record with a right CRC but no valid payload stopped the reading (never written by the
    #: writer: damage or tampering); recovery quarantines such a segment instead of cutting it
    corrupt: bool = False

    #: ids the segment defines twice with different labels (the first definition is in ``series``)
    conflicts: set[int] = field(default_factory=set)


def _series_defs(raw_json: bytes) -> list[tuple[int, str, dict[str, str]]]:
    defs = json.loads(raw_json)
    out = []
    for sid, metric, labels in defs:
        labels = dict(labels)
        if not (isinstance(sid, int) and -(2**63) <= sid < 2**63 and isinstance(metric, str) and all(isinstance(x, str) for kv in labels.items() for x in kv)):
            raise ValueError("a series definition is not [id, metric, [[name, value], ...]]")
        out.append((sid, metric, labels))
    return out


def read_segment(path: Path) -> SegmentData:
    """Every intact record of a segment, in order; stops at the first torn or corrupt record."""
    data = Path(path).read_bytes()
    series: dict[int, tuple[str, dict[str, str]]] = {}
    conflicts: set[int] = set()
    sids, tss, vals, sizes = [], [], [], []
    if data[: len(FILE_MAGIC)] != FILE_MAGIC:
        return SegmentData({}, *(np.empty(0, t) for t in ("<i8", "<i8", "<f8")), 0, 0, bool(data))
    pos = len(FILE_MAGIC)
    torn = corrupt = False
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
        try:
            n, jlen = PAYLOAD_HEADER.unpack_from(payload, 0)
            o = PAYLOAD_HEADER.size
            if o + jlen + 24 * n != len(payload):
                raise ValueError("the payload's lengths do not add up")
            defs = _series_defs(bytes(payload[o : o + jlen]))
        except (struct.error, ValueError, TypeError):  # json.JSONDecodeError is a ValueError
            corrupt = True
            break
        for sid, metric, labels in defs:
            if series.setdefault(sid, (metric, labels)) != (metric, labels):
                conflicts.add(sid)
        o += jlen
        sids.append(np.frombuffer(payload, "<i8", n, o))
        tss.append(np.frombuffer(payload, "<i8", n, o + 8 * n))
        vals.append(np.frombuffer(payload, "<f8", n, o + 16 * n))
        sizes.append(end - pos)
        pos = end
    cat = lambda parts, t: np.concatenate(parts).astype(t) if parts else np.empty(0, t)  # noqa: E731
    return SegmentData(series, cat(sids, np.int64), cat(tss, np.int64), cat(vals, np.float64), len(sizes), pos, torn, sizes, corrupt, conflicts)


def _indexable(seg: SegmentData) -> tuple[np.ndarray, str | None]:
    """Which samples an index can hold, and why not all of them (None: all)."""
    ok = (seg.ts >= TS_FLOOR_MS) & (seg.ts < TS_CEILING_MS)
    problems = []
    if seg.corrupt:
        problems.append(f"record {seg.records + 1} (at byte {seg.valid_bytes}) has a right CRC but no valid payload")
    if not ok.all():
        outside = seg.ts[~ok]
        problems.append(f"{len(outside)} sample(s) outside the window, e.g. {_outside_window(int(outside.min()), int(outside.max()))}")
    defined = np.isin(seg.series_id, np.fromiter(seg.series, dtype=np.int64, count=len(seg.series)))
    if not defined.all():
        problems.append(f"{int(np.count_nonzero(~defined))} sample(s) of series the segment never defines")
    return ok & defined, "; ".join(problems) or None


def index_from_data(seg: SegmentData, resolver: CustomerResolver | None = None) -> IndexBuilder:
    """Rebuild a segment's figures by reading it (recovery); ``Unindexable`` when it cannot be."""
    _, problem = _indexable(seg)
    if problem:
        raise Unindexable(problem)
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
    """Seal every ``.open`` segment no live writer holds: cut its torn tail, index it, rename it;
    quarantine one that cannot be indexed (entries with ``"quarantined": True``)."""
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
            try:
                index = index_from_data(seg, resolver).to_json(name, recovered=True)
            except Unindexable as e:
                out.append(set_aside(directory, path, seg, str(e), resolver))
                continue
            dropped = os.fstat(fd).st_size - seg.valid_bytes
            if seg.torn:
                os.ftruncate(fd, max(seg.valid_bytes, len(FILE_MAGIC)))
                os.fsync(fd)
            if seg.records == 0:
                path.unlink()
                durable.fsync_path(directory)
                out.append({"segment": name, "records": 0, "removed": True, "torn": seg.torn})
                continue
            index["torn_tail_bytes_dropped"] = dropped
            seal(directory, path, index)
            out.append({**index, "torn": seg.torn})
        finally:
            os.close(fd)
    return out


def set_aside(directory: Path, path: Path, seg: SegmentData, reason: str, resolver: CustomerResolver | None = None) -> dict:
    """Quarantine a segment that cannot be indexed: first its indexable samples go to a new sealed
    segment ``<name>-salvaged`` (nothing acknowledged becomes unprocessable), then the file moves,
    every byte of it, to ``quarantine/`` next to a ``.quarantine.json`` saying why."""
    directory = Path(directory)
    name = path.name.rsplit(".", 1)[0]
    keep, _ = _indexable(seg)
    if seg.conflicts:  # ids the segment defines twice: salvaged under one label set they would merge; kept here only
        keep &= ~np.isin(seg.series_id, np.fromiter(seg.conflicts, dtype=np.int64, count=len(seg.conflicts)))
    entry = {
        "segment": name,
        "quarantined": True,
        "reason": reason,
        "bytes": path.stat().st_size,
        "records": seg.records,
        "samples": len(seg.ts),
        "salvaged_samples": int(np.count_nonzero(keep)),
        "salvaged_segment": None,
        "quarantined_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if keep.any():
        sids = seg.series_id[keep]
        defs = [[sid, *seg.series[sid]] for sid in np.unique(sids).tolist()]
        defs = [[sid, metric, sorted(labels.items())] for sid, metric, labels in defs]
        salvaged = directory / f"{name}{SALVAGED_SUFFIX}{OPEN_SUFFIX}"
        with open(salvaged, "wb") as f:
            f.write(FILE_MAGIC + _record(defs, sids, seg.ts[keep], seg.value[keep]))
            f.flush()
            os.fsync(f.fileno())
        data = read_segment(salvaged)
        seal(directory, salvaged, index_from_data(data, resolver).to_json(salvaged.stem, recovered=True))
        entry["salvaged_segment"] = salvaged.stem
    qdir = directory / QUARANTINE_DIR
    qdir.mkdir(exist_ok=True)
    _write_json_atomic(qdir / f"{name}{QUARANTINE_SUFFIX}", entry)
    durable.publish(path, qdir / path.name)
    durable.fsync_path(directory)
    log.error("landing segment %s cannot be indexed (%s): quarantined in %s, %d sample(s) salvaged", name, reason, qdir, entry["salvaged_samples"])
    return entry


def quarantined_segments(directory: Path) -> list[dict]:
    """What ``set_aside`` moved to ``quarantine/``, oldest first."""
    qdir = Path(directory) / QUARANTINE_DIR
    return [json.loads(p.read_text()) for p in sorted(qdir.glob(f"seg-*{QUARANTINE_SUFFIX}"))] if qdir.is_dir() else []


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
            data = read_segment(path)
            try:
                index = index_from_data(data, resolver).to_json(name, recovered=True)
            except Unindexable as e:
                salvaged = set_aside(directory, path, data, str(e), resolver)["salvaged_segment"]
                if salvaged:  # after this one in name order: not in the listing taken above
                    spath = directory / f"{salvaged}{SEALED_SUFFIX}"
                    out.append(SealedSegment(salvaged, spath, json.loads((directory / f"{salvaged}{INDEX_SUFFIX}").read_text())))
                continue
            _write_json_atomic(idx_path, index)
        out.append(SealedSegment(name, path, index))
    return out


def remove_segment(seg: SealedSegment) -> None:
    """Delete a fully compacted segment: data first, then its index and markers."""
    seg.path.unlink(missing_ok=True)
    for p in seg.path.parent.glob(f"{seg.name}.*"):
        p.unlink(missing_ok=True)
    durable.fsync_path(seg.path.parent)


def parse_day(day: str) -> date:
    return date.fromisoformat(day)
