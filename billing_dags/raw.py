"""The raw layout: the contract between every ingestion source and the SQL models.

``raw/samples/date=YYYY-MM-DD/part-<source>.parquet``: series_id (int64), ts (int64 ms UTC),
value (float64); sorted by (series_id, ts), each series whole inside one row group.
``raw/series/date=YYYY-MM-DD/part-<source>.parquet``: series_id, metric, labels (all of them,
metric name excluded), first_seen (ms, the first sample of the series in that day).
``raw/carry_in/date=YYYY-MM-DD/part-<source>.parquet`` (same columns as samples): the day's carry-in,
each series' last sample before the day (at most ``EDGE_LOOKBACK_DAYS`` earlier), for a source that
records it (a Prometheus pull); its series rows are ``raw/series/date=.../part-<source>-carry-in.parquet``
(first_seen = that sample). With it the day needs no earlier day's partition (DESIGN rule 3).

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


def carry_in_day_dir(paths: Paths, day: date) -> Path:
    return paths.raw_carry_in / f"date={day.isoformat()}"


def carry_in_files(paths: Paths, day: date) -> list[Path]:
    return sorted(carry_in_day_dir(paths, day).glob("*.parquet"))


def series_files(paths: Paths) -> list[Path]:
    return sorted(paths.raw_series.glob("date=*/*.parquet"))


def raw_days(paths: Paths) -> list[date]:
    return sorted(date.fromisoformat(p.name[5:]) for p in paths.raw_samples.glob("date=*") if any(p.glob("*.parquet")))


class RawLayoutError(ValueError):
    """Samples that do not fit the raw layout (wrong day, unsorted, bad types)."""


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

    Samples must lie in the day's window [00:00, 24:00) UTC. They are sorted by (series_id, ts)
    and exact duplicates of (series_id, ts) are dropped (first value kept after a stable sort).
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
    samples = samples.sort_by([("series_id", "ascending"), ("ts", "ascending")])
    if len(samples) > 1:
        sid = samples["series_id"].to_numpy()
        ts = samples["ts"].to_numpy()
        dup = (sid[1:] == sid[:-1]) & (ts[1:] == ts[:-1])
        if dup.any():
            import numpy as np

            keep = np.concatenate([[True], ~dup])
            samples = samples.filter(pa.array(keep))
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


def write_carry_in(paths: Paths, day: date, samples: pa.Table, series: pa.Table, source: str, lookback_days: int) -> int:
    """Replace ``source``'s carry-in of ``day``: one sample per series, each before the day and at most
    ``lookback_days`` earlier (an empty table records that there is none). Returns the number of series."""
    if not _SOURCE_RE.match(source):
        raise RawLayoutError(f"source name {source!r} must match {_SOURCE_RE.pattern}")
    samples = samples.select(SAMPLES_SCHEMA.names).cast(SAMPLES_SCHEMA).sort_by("series_id")
    series = series.select(SERIES_SCHEMA.names).cast(SERIES_SCHEMA).sort_by("series_id")
    start_ms, _ = day_bounds_ms(day)
    if len(samples):
        lo, hi = pc.min(samples["ts"]).as_py(), pc.max(samples["ts"]).as_py()
        if lo < start_ms - lookback_days * DAY_MS or hi >= start_ms:
            raise RawLayoutError(
                f"carry-in of {day} from source {source!r} has timestamps {lo}..{hi} ms outside the "
                f"{lookback_days} days before the day; it holds each series' last sample before the day"
            )
    ids = samples["series_id"]
    if pc.count_distinct(ids).as_py() != len(ids) or set(ids.to_pylist()) != set(series["series_id"].to_pylist()):
        raise RawLayoutError(f"carry-in of {day} from source {source!r} must hold one sample and one series row per series")
    _atomic_write(samples, carry_in_day_dir(paths, day) / f"part-{source}.parquet", compression="zstd")
    _atomic_write(series, series_day_dir(paths, day) / f"part-{source}-carry-in.parquet", compression="zstd")
    return len(samples)
