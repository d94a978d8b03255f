"""Compaction: remote-write landing segments -> the raw partition of each sample's UTC day.

For a day D: under a per-day lock, every sealed segment that still has samples of D is read;
its samples of D are merged with what ``raw/samples/date=D/part-remote_write.parquet`` already
holds, identical rows once (``raw.distinct_samples``: a batch Prometheus resent after a lost 204
is counted once; two different values at one (series_id, ts) are both kept, and the models bill
the larger and flag the conflict), and the day is rewritten with ``raw.write_day`` (temp file, fsync, rename) plus
an fsync of the directories. Only then does each segment get a ``.done-D`` marker; a segment is
deleted once every day it holds is done. Rerunning is idempotent: a day with nothing new is not
rewritten (its files keep their mtime, so the late-data sensor does not fire for nothing).

Staleness markers and NaN/Inf stay in raw (the SQL models drop and count them) and are counted
here and in the segment index; samples of unknown customers are kept and reported.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections import Counter
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import raw
from .remote_write.customers import CustomerResolver
from .remote_write.landing import (
    SealedSegment,
    SegmentData,
    fsync_dir,
    read_segment,
    recover_orphans,
    remove_segment,
    sealed_segments,
)
from .settings import Paths

SOURCE = "remote_write"


@contextmanager
def day_lock(paths: Paths, day: str):
    """One compaction of a day at a time (two runs of the same partition must not interleave)."""
    lock_dir = paths.landing / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_dir / f"{day}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _resolver(paths: Paths) -> CustomerResolver:
    return CustomerResolver.from_seeds(paths.seeds_dir)


def pending_days(paths: Paths) -> dict[str, dict]:
    """Days with samples in sealed segments not yet compacted: segments and figures per day."""
    out: dict[str, dict] = {}
    for seg in sealed_segments(paths.landing):
        for day in seg.pending_days():
            entry = out.setdefault(day, {"segments": [], "figures": Counter()})
            entry["segments"].append(seg.name)
            entry["figures"].update(seg.index["days"][day])
    return dict(sorted(out.items()))


def landing_status(paths: Paths) -> dict:
    landing = paths.landing
    open_segments = sorted(p.name for p in landing.glob("seg-*.open")) if landing.is_dir() else []
    return {
        "landing": str(landing),
        "open_segments": open_segments,
        "pending_days": {d: {"segments": len(e["segments"]), **e["figures"]} for d, e in pending_days(paths).items()},
    }


def _empty_samples() -> pa.Table:
    return raw.SAMPLES_SCHEMA.empty_table()


def _fsync_tree(path: Path, stop: Path) -> None:
    """fsync a directory and its parents up to ``stop`` (renames and new date= folders are durable)."""
    path = Path(path)
    while True:
        fsync_dir(path)
        if path == stop or path.parent == path:
            break
        path = path.parent


def compact_day(paths: Paths, day: str, cache: dict[str, SegmentData] | None = None) -> dict:
    """Merge every pending landing sample of ``day`` (YYYY-MM-DD) into its raw partition."""
    t0 = time.perf_counter()
    d = date.fromisoformat(day)
    start, end = raw.day_bounds_ms(d)
    cache = cache if cache is not None else {}
    with day_lock(paths, day):
        segs: list[SealedSegment] = [s for s in sealed_segments(paths.landing) if day in s.pending_days()]
        result = {"day": day, "segments": len(segs), "landing_samples": 0, "new_samples": 0, "duplicates": 0,
                  "existing_samples": 0, "samples": 0, "series": 0, "written": False, "segments_removed": 0}
        if not segs:
            return result
        figures: Counter = Counter()
        unknown: Counter = Counter()
        sids, tss, vals = [], [], []
        series_defs: dict[int, tuple[str, dict[str, str]]] = {}
        for seg in segs:
            data = cache.get(seg.name)
            if data is None:
                data = cache[seg.name] = read_segment(seg.path)
            m = (data.ts >= start) & (data.ts < end)
            sids.append(data.series_id[m])
            tss.append(data.ts[m])
            vals.append(data.value[m])
            for sid in np.unique(data.series_id[m]).tolist():
                series_defs.setdefault(sid, data.series[sid])
            figures.update(seg.index["days"].get(day, {}))
            unknown.update(seg.index.get("unknown_customers", {}))
        new_sid, new_ts, new_val = np.concatenate(sids), np.concatenate(tss), np.concatenate(vals)

        sample_path = raw.samples_day_dir(paths, d) / f"part-{SOURCE}.parquet"
        series_path = raw.series_day_dir(paths, d) / f"part-{SOURCE}.parquet"
        existing = pq.read_table(sample_path) if sample_path.exists() else _empty_samples()
        existing_series = pq.read_table(series_path) if series_path.exists() else raw.SERIES_SCHEMA.empty_table()
        n_existing = len(existing)
        sid = np.concatenate([existing["series_id"].to_numpy(), new_sid])
        ts = np.concatenate([existing["ts"].to_numpy(), new_ts])
        val = np.concatenate([existing["value"].to_numpy(), new_val])
        order, keep = raw.distinct_samples(sid, ts, val)  # a resent batch is counted once
        sid, ts, val = sid[order][keep], ts[order][keep], val[order][keep]
        added = len(sid) - n_existing
        result.update(
            landing_samples=len(new_ts), new_samples=added, duplicates=len(new_ts) - added, existing_samples=n_existing,
            samples=len(sid), stale=figures.get("stale", 0), nonfinite=figures.get("nonfinite", 0),
            unknown_customer=figures.get("unknown_customer", 0),
            unknown_customers=dict(unknown.most_common(20)) if figures.get("unknown_customer") else {},
        )
        if added > 0:
            first = np.ones(len(sid), dtype=bool)
            first[1:] = sid[1:] != sid[:-1]
            first_seen = dict(zip(sid[first].tolist(), ts[first].tolist()))
            old = {r["series_id"]: r for r in existing_series.to_pylist()}
            rows = {"series_id": [], "metric": [], "labels": [], "first_seen": []}
            for s, fs in first_seen.items():
                if s in old:
                    metric, labels = old[s]["metric"], list(old[s]["labels"])
                else:
                    metric, label_map = series_defs[s]
                    labels = sorted(label_map.items())
                rows["series_id"].append(s)
                rows["metric"].append(metric)
                rows["labels"].append(labels)
                rows["first_seen"].append(fs)
            samples = pa.table({"series_id": sid, "ts": ts, "value": val}, schema=raw.SAMPLES_SCHEMA)
            written = raw.write_day(paths, d, samples, pa.table(rows, schema=raw.SERIES_SCHEMA), SOURCE)
            _fsync_tree(sample_path.parent, paths.data_dir)
            _fsync_tree(series_path.parent, paths.data_dir)
            result.update(written=True, series=written["series"], path=written["path"], bytes=written["bytes"])
        else:
            result["series"] = len(existing_series)
        # the day is durable: mark it done in each segment, then drop segments with nothing left
        for seg in segs:
            marker = seg.done_marker(day)
            with open(marker, "w") as f:
                f.write(f"{result['landing_samples']}\n")
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(paths.landing)
        for seg in segs:
            if not seg.pending_days():
                remove_segment(seg)
                cache.pop(seg.name, None)
                result["segments_removed"] += 1
        result["seconds"] = round(time.perf_counter() - t0, 3)
        return result


def compact(paths: Paths, days: list[str] | None = None, recover: bool = True) -> dict:
    """Compact the given days (default: every day with pending landing samples).

    With ``recover``, ``.open`` segments of a receiver that is no longer running are sealed first
    (their torn tail, never acknowledged, is cut off).
    """
    t0 = time.perf_counter()
    recovered = recover_orphans(paths.landing, _resolver(paths)) if recover else []
    todo = list(pending_days(paths)) if days is None else sorted(set(days))
    cache: dict[str, SegmentData] = {}
    results = [compact_day(paths, day, cache) for day in todo]
    seconds = time.perf_counter() - t0
    landing_samples = sum(r["landing_samples"] for r in results)
    return {
        "days": results,
        "recovered_segments": [r["segment"] for r in recovered],
        "landing_samples": landing_samples,
        "new_samples": sum(r["new_samples"] for r in results),
        "duplicates": sum(r["duplicates"] for r in results),
        "seconds": round(seconds, 3),
        "samples_per_s": round(landing_samples / seconds) if seconds > 0 else None,
    }
