"""The raw layout: the contract between every ingestion source and the SQL models.

``raw/samples/date=YYYY-MM-DD/part-<source>.parquet``: series_id (int64), ts (int64 ms UTC),
value (float64); sorted by (series_id, ts), each series whole inside one row group.
Identical rows are stored once; two *different* values at one (series_id, ts) are both kept: the
models choose between them (the larger value, and count the conflict), so that rule lives in one
place whatever the source.
``raw/series/date=YYYY-MM-DD/part-<source>.parquet``: series_id, metric, labels (all of them,
metric name excluded), first_seen (ms, the first sample of the series in that day).

A source writes a whole day at a time; the write goes to a temporary name and is renamed, so a
reader sees the old day or the new day, never half of one. Rewriting a day with the same
samples gives the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import re
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .settings import Paths

SAMPLES_SCHEMA = pa.schema(
    [
        pa.field("series_id", pa.int64(), nullable=False),
        pa.field("ts", pa.int64(), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
    ]
)
SERIES_SCHEMA = pa.schema(
    [
        pa.field("series_id", pa.int64(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("labels", pa.map_(pa.string(), pa.string()), nullable=False),
        pa.field("first_seen", pa.int64(), nullable=False),
    ]
)
#: rows per row group, at least; a series is never split across row groups
ROW_GROUP_TARGET = 1_000_000
DAY_MS = 86_400_000
_SOURCE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,40}$")


def series_id(metric: str, labels: dict[str, str]) -> int:
    """64-bit hash of the sorted label set, metric name included (signed, to fit Parquet int64)."""
    items = sorted({**labels, "__name__": metric}.items())
    h = hashlib.blake2b(digest_size=8)
    for k, v in items:
        h.update(k.encode())
        h.update(b"\x00")
        h.update(v.encode())
        h.update(b"\x01")
    return int.from_bytes(h.digest(), "big", signed=True)


def day_bounds_ms(day: date) -> tuple[int, int]:
    """The half-open UTC window [start, end) of a day, in epoch milliseconds."""
    start = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
    start_ms = int(start.timestamp()) * 1000
    return start_ms, start_ms + DAY_MS


def day_of_ms(ts_ms: int) -> date:
    return (datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(milliseconds=ts_ms)).date()


def samples_day_dir(paths: Paths, day: date) -> Path:
    return paths.raw_samples / f"date={day.isoformat()}"


def series_day_dir(paths: Paths, day: date) -> Path:
    return paths.raw_series / f"date={day.isoformat()}"


def sample_files(paths: Paths, day: date) -> list[Path]:
    return sorted(samples_day_dir(paths, day).glob("*.parquet"))


def series_files(paths: Paths) -> list[Path]:
    return sorted(paths.raw_series.glob("date=*/*.parquet"))


def raw_days(paths: Paths) -> list[date]:
    return sorted(date.fromisoformat(p.name[5:]) for p in paths.raw_samples.glob("date=*") if any(p.glob("*.parquet")))


class RawLayoutError(ValueError):
    """Samples that do not fit the raw layout (wrong day, unsorted, bad types)."""


def distinct_samples(sid, ts, value):
    """(order, keep): ``order`` sorts the rows by (series_id, ts, value bits) (stable, so equal
    rows keep their input order) and ``keep`` marks, in that order, the first of each identical
    (series_id, ts, value) row. Different values at one (series_id, ts) are all kept: choosing
    between them is the models' rule (the larger value), not the writer's."""
    sid, ts = np.asarray(sid, dtype=np.int64), np.asarray(ts, dtype=np.int64)
    if len(sid) < 2 or ((sid[1:] > sid[:-1]) | ((sid[1:] == sid[:-1]) & (ts[1:] > ts[:-1]))).all():
        return np.arange(len(sid)), np.ones(len(sid), dtype=bool)  # sorted, no (series_id, ts) twice
    bits = np.asarray(value, dtype=np.float64).view(np.int64)
    order = np.lexsort((bits, ts, sid))
    keep = np.ones(len(order), dtype=bool)
    if len(order) > 1:
        s, t, b = sid[order], ts[order], bits[order]
        keep[1:] = (s[1:] != s[:-1]) | (t[1:] != t[:-1]) | (b[1:] != b[:-1])
    return order, keep


def _atomic_write(table: pa.Table, dest: Path, **kwargs) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, **kwargs)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)


def _row_group_boundaries(series: pa.Array) -> list[int]:
    """Row offsets where a row group may end: only where the series id changes."""
    n = len(series)
    if n == 0:
        return []
    cuts: list[int] = []
    start = 0
    s = series.to_numpy(zero_copy_only=False)
    while start < n:
        end = min(start + ROW_GROUP_TARGET, n)
        while end < n and s[end] == s[end - 1]:
            end += 1
        cuts.append(end)
        start = end
    return cuts


def write_day(paths: Paths, day: date, samples: pa.Table, series: pa.Table, source: str) -> dict:
    """Replace one source's raw partition of ``day`` with ``samples`` and ``series``.

    Samples must lie in the day's window [00:00, 24:00) UTC. They are sorted by (series_id, ts,
    value) and identical rows are written once (``distinct_samples``).
    Returns figures for asset metadata.
    """
    if not _SOURCE_RE.match(source):
        raise RawLayoutError(f"source name {source!r} must match {_SOURCE_RE.pattern}")
    samples = samples.select(SAMPLES_SCHEMA.names).cast(SAMPLES_SCHEMA)
    series = series.select(SERIES_SCHEMA.names).cast(SERIES_SCHEMA)
    start_ms, end_ms = day_bounds_ms(day)
    if len(samples):
        lo, hi = pc.min(samples["ts"]).as_py(), pc.max(samples["ts"]).as_py()
        if lo < start_ms or hi >= end_ms:
            raise RawLayoutError(
                f"samples for {day} from source {source!r} have timestamps {lo}..{hi} ms outside "
                f"[{start_ms}, {end_ms}); split samples by UTC day before writing"
            )
    if len(samples):
        order, keep = distinct_samples(samples["series_id"].to_numpy(), samples["ts"].to_numpy(), samples["value"].to_numpy())
        samples = samples.take(pa.array(order[keep]))
    missing = set(pc.unique(samples["series_id"]).to_pylist()) - set(series["series_id"].to_pylist())
    if missing:
        raise RawLayoutError(f"{len(missing)} series ids in samples of {day} have no row in the series table")
    series = series.sort_by("series_id")

    sample_path = samples_day_dir(paths, day) / f"part-{source}.parquet"
    cuts = _row_group_boundaries(samples["series_id"])
    sample_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = sample_path.with_name(f".{sample_path.name}.tmp-{os.getpid()}")
    with pq.ParquetWriter(
        tmp,
        SAMPLES_SCHEMA,
        compression="zstd",
        use_dictionary=False,
        column_encoding={"series_id": "DELTA_BINARY_PACKED", "ts": "DELTA_BINARY_PACKED", "value": "BYTE_STREAM_SPLIT"},
        write_statistics=True,
    ) as writer:
        prev = 0
        for cut in cuts:
            writer.write_table(samples.slice(prev, cut - prev), row_group_size=cut - prev)
            prev = cut
        if not cuts:
            writer.write_table(samples)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, sample_path)
    series_path = series_day_dir(paths, day) / f"part-{source}.parquet"
    _atomic_write(series, series_path, compression="zstd")
    return {
        "samples": len(samples),
        "series": len(series),
        "bytes": sample_path.stat().st_size,
        "path": str(sample_path),
    }
