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

Series ids in a segment are recomputed from its labels. A series whose id already stands for
another label set (in data/raw/series or an earlier segment), whose names are not Prometheus
names, or that its segment defines twice is not merged: its samples are quarantined
(``data/landing/quarantine/date=D/<segment>.parquet``, with labels and the reason) before the
segment is marked done, and reported (``quarantined``): acknowledged samples are never merged
into another series and never silently lost.

A segment that cannot be indexed at all is quarantined whole by landing (its indexable samples
salvaged into a new segment) and listed by ``landing_status``; compaction carries on without it.
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from billing_dags.core import durable
from billing_dags.core.durable import fsync_path
from billing_dags.core.settings import Paths
from billing_dags.ingest import raw
from billing_dags.ingest.remote_write.customers import CustomerResolver
from billing_dags.ingest.remote_write.landing import (
    SealedSegment,
    SegmentData,
    quarantined_segments,
    read_segment,
    recover_orphans,
    remove_segment,
    sealed_segments,
)

SOURCE = "remote_write"


@contextmanager
def day_lock(paths: Paths, day: str):
    """One compaction of a day at a time (two runs of the same partition must not interleave)."""
    with durable.exclusive_lock(paths.landing / ".locks" / f"{day}.lock"):
        yield


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
        # segments that could not be indexed, moved whole to landing/quarantine/ (their indexable samples salvaged)
        "quarantined_segments": quarantined_segments(landing),
    }


def _empty_samples() -> pa.Table:
    return raw.SAMPLES_SCHEMA.empty_table()


def _fsync_tree(path: Path, stop: Path) -> None:
    """fsync a directory and its parents up to ``stop`` (renames and new date= folders are durable)."""
    path = Path(path)
    while True:
        fsync_path(path)
        if path == stop or path.parent == path:
            break
        path = path.parent


def quarantine_file(paths: Paths, day: str, segment: str) -> Path:
    """Where compaction keeps a segment's samples of ``day`` that it refused to merge."""
    return paths.landing / "quarantine" / f"date={day}" / f"{segment}.parquet"


QUARANTINE_SCHEMA = pa.schema([*raw.SERIES_SCHEMA.remove(3), *raw.SAMPLES_SCHEMA.remove(0), pa.field("reason", pa.string(), nullable=False)])


def _resolve_series(paths: Paths, day: str, parts: list[tuple[SealedSegment, SegmentData, np.ndarray]]):
    """The landing samples of ``day`` under ids computed from their labels, and the label set of each id.

    A segment's stored ids are not trusted: each is recomputed with ``raw.series_id`` from the labels
    the segment holds. A series is refused — its samples quarantined (``quarantine_file``, written and
    fsynced here, before any segment is marked done), never merged and never dropped — when its
    names are not Prometheus names, when its segment defines its id twice, or when its id already
    stands for another label set: in data/raw/series, else in an earlier segment (the first wins).
    Returns (ids, ts, values per segment, {id: (metric, labels)}, the quarantined series).
    """
    views = []
    for seg, data, m in parts:
        stored, inverse = np.unique(data.series_id[m], return_inverse=True)
        defs = []
        for sid in stored.tolist():
            metric, label_map = data.series[sid]
            problem = raw.series_problem(metric, label_map)
            if problem is None and sid in data.conflicts:
                problem = "its landing segment defines its id with two label sets (the labels shown are the first)"
            labels = tuple(sorted(label_map.items()))
            defs.append((raw.series_id(metric, label_map) if problem is None else None, metric, labels, problem))
        views.append((seg, data, m, stored, inverse, defs))
    known = raw.known_series(paths, {d[0] for *_, defs in views for d in defs if d[0] is not None})
    reference = {sid: (metric, labels) for sid, (metric, labels, _) in known.items()}
    sids, tss, vals, quarantined = [], [], [], []
    for seg, data, m, stored, inverse, defs in views:
        # a refused series keeps the id its segment stored (for the quarantine file); it is never written to raw
        new_ids = np.array([d[0] if d[0] is not None else sid for d, sid in zip(defs, stored.tolist())], dtype=np.int64)
        refused = np.zeros(len(defs), dtype=bool)
        reasons = []
        for j, (sid, metric, labels, problem) in enumerate(defs):
            if problem is None:
                ref = reference.setdefault(sid, (metric, labels))
                if ref != (metric, labels):
                    where = known[sid][2] if sid in known else "an earlier landing segment"
                    problem = str(raw.Collision(sid, metric, labels, *ref, where))
            refused[j] = problem is not None
            reasons.append(problem)
        ids, ts, val = new_ids[inverse], data.ts[m], data.value[m]
        bad = refused[inverse]
        if bad.any():
            q = pa.table(
                {
                    "series_id": ids[bad],
                    "metric": [defs[j][1] for j in inverse[bad].tolist()],
                    "labels": [list(defs[j][2]) for j in inverse[bad].tolist()],
                    "ts": ts[bad],
                    "value": val[bad],
                    "reason": [reasons[j] for j in inverse[bad].tolist()],
                },
                schema=QUARANTINE_SCHEMA,
            )
            path = quarantine_file(paths, day, seg.name)
            with durable.staged(path) as tmp:
                pq.write_table(q, tmp)
            _fsync_tree(path.parent, paths.data_dir)
            counts = np.bincount(inverse[bad], minlength=len(defs))
            for j in np.flatnonzero(refused).tolist():
                quarantined.append(
                    {"segment": seg.name, "series": raw.describe(defs[j][1], defs[j][2]), "samples": int(counts[j]), "reason": reasons[j], "file": str(path)}
                )
        sids.append(ids[~bad])
        tss.append(ts[~bad])
        vals.append(val[~bad])
    return sids, tss, vals, reference, quarantined


def compact_day(paths: Paths, day: str, cache: dict[str, SegmentData] | None = None) -> dict:
    """Merge every pending landing sample of ``day`` (YYYY-MM-DD) into its raw partition."""
    t0 = time.perf_counter()
    d = date.fromisoformat(day)
    start, end = raw.day_bounds_ms(d)
    cache = cache if cache is not None else {}
    with day_lock(paths, day):
        segs: list[SealedSegment] = [s for s in sealed_segments(paths.landing) if day in s.pending_days()]
        result = {
            "day": day,
            "segments": len(segs),
            "landing_samples": 0,
            "new_samples": 0,
            "duplicates": 0,
            "existing_samples": 0,
            "samples": 0,
            "series": 0,
            "written": False,
            "segments_removed": 0,
        }
        if not segs:
            return result
        figures: Counter = Counter()
        unknown: Counter = Counter()
        parts = []
        for seg in segs:
            data = cache.get(seg.name)
            if data is None:
                data = cache[seg.name] = read_segment(seg.path)
            parts.append((seg, data, (data.ts >= start) & (data.ts < end)))
            figures.update(seg.index["days"].get(day, {}))
            unknown.update(seg.index.get("unknown_customers", {}))
        sids, tss, vals, reference, quarantined = _resolve_series(paths, day, parts)
        new_sid, new_ts, new_val = np.concatenate(sids), np.concatenate(tss), np.concatenate(vals)

        sample_path = raw.samples_day_dir(paths, d) / f"part-{SOURCE}.parquet"
        series_path = raw.series_day_dir(paths, d) / f"part-{SOURCE}.parquet"
        # the day as written (every shard's file when sharded: they concatenate to the day)
        existing, existing_series = raw.read_source_day(paths, d, SOURCE)
        existing = existing if existing is not None else _empty_samples()
        existing_series = existing_series if existing_series is not None else raw.SERIES_SCHEMA.empty_table()
        n_existing = len(existing)
        sid = np.concatenate([existing["series_id"].to_numpy(), new_sid])
        ts = np.concatenate([existing["ts"].to_numpy(), new_ts])
        val = np.concatenate([existing["value"].to_numpy(), new_val])
        order, keep = raw.distinct_samples(sid, ts, val)  # a resent batch is counted once
        idx = order[keep]
        sid, ts, val = sid[idx], ts[idx], val[idx]
        added = len(sid) - n_existing
        n_quarantined = sum(q["samples"] for q in quarantined)
        result.update(
            landing_samples=len(new_ts) + n_quarantined,
            new_samples=added,
            duplicates=len(new_ts) - added,
            existing_samples=n_existing,
            quarantined_samples=n_quarantined,
            quarantined=quarantined,
            samples=len(sid),
            stale=figures.get("stale", 0),
            nonfinite=figures.get("nonfinite", 0),
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
                    metric, labels = reference[s]
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
        batch = durable.Batch()
        try:
            for seg in segs:
                batch.write(seg.done_marker(day), f"{result['landing_samples']}\n".encode())
            batch.commit()
        finally:
            batch.abort()
            batch.close()
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
        "recovered_segments": [r["segment"] for r in recovered if not r.get("quarantined")],
        "quarantined_segments": [r["segment"] for r in recovered if r.get("quarantined")],
        "landing_samples": landing_samples,
        "new_samples": sum(r["new_samples"] for r in results),
        "duplicates": sum(r["duplicates"] for r in results),
        "seconds": round(seconds, 3),
        "samples_per_s": round(landing_samples / seconds) if seconds > 0 else None,
    }
