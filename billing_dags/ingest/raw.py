"""The raw layout: the contract between every ingestion source and the SQL models.

``raw/samples/date=YYYY-MM-DD/part-<source>.parquet``: series_id (int64), ts (int64 ms UTC),
value (float64); sorted by (series_id, ts), each series whole inside one row group.
Identical rows are stored once; two *different* values at one (series_id, ts) are both kept: the
models choose between them (the larger value, and count the conflict), so that rule lives in one
place whatever the source.
``raw/series/date=YYYY-MM-DD/part-<source>.parquet``: series_id, metric, labels (all of them,
metric name excluded), first_seen (ms, the first sample of the series in that day).
``raw/carry_in/date=YYYY-MM-DD/part-<source>.parquet`` (same columns as samples): the day's carry-in,
each series' last sample before the day (at most ``EDGE_LOOKBACK_DAYS`` earlier), for a source that
records it (a Prometheus pull); its series rows are ``raw/series/date=.../part-<source>-carry-in.parquet``
(first_seen = that sample). With it the day needs no earlier day's partition (DESIGN rule 3).

A source writes a whole day at a time; the write goes to a temporary name and is renamed, so a
reader sees the old day or the new day, never half of one. Rewriting a day with the same
samples gives the same bytes.

Series identity: ``series_id`` is a 64-bit hash of ``series_key``, an injective encoding of the
label set (names and values separated by 0xFF, a byte valid UTF-8 never holds). The hash alone is
never trusted: ``write_day`` refuses series whose names are not Prometheus names, ids not computed
by ``series_id``, and an id that data/raw/series (or the write itself) already holds with another
label set (``SeriesCollision``), so two label sets are never merged under one id.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from billing_dags.core import durable
from billing_dags.core.errors import InputError
from billing_dags.core.settings import Paths
from billing_dags.core.shards import Shard, all_shards, series_shards

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


class RawLayoutError(InputError):
    """Samples or series that do not fit the raw layout (wrong day, bad types, invalid names, an id another label set holds)."""


#: Prometheus's metric and label names (control characters, separators and other bytes refused)
METRIC_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
#: ends every name and value in a series key: 0xFF never occurs in UTF-8, so the key is injective
_KEY_SEP = b"\xff"


def series_key(metric: str, labels: dict[str, str]) -> bytes:
    """The label set, metric name included as ``__name__``, sorted by name: ``name 0xFF value 0xFF`` each.

    Injective: no name or value encodes to a byte 0xFF (as in Prometheus's own label hashing), so
    two different label sets never give the same key. The one definition every writer uses.
    """
    parts = [x.encode() for item in sorted({**labels, "__name__": metric}.items()) for x in item]
    parts.append(b"")
    return _KEY_SEP.join(parts)


def series_id(metric: str, labels: dict[str, str]) -> int:
    """64-bit hash of ``series_key`` (signed, to fit Parquet int64)."""
    return int.from_bytes(hashlib.blake2b(series_key(metric, labels), digest_size=8).digest(), "big", signed=True)


def _show(name: str) -> str:
    return repr(name[:60] + ("..." if len(name) > 60 else ""))


def series_problem(metric: str, labels: dict[str, str]) -> str | None:
    """Why a series cannot be stored (a name that is not a Prometheus name, a value that is not
    UTF-8), or None. Names its metric or label name, never a label value."""
    if not METRIC_NAME_RE.fullmatch(metric):
        return f"metric name {_show(metric)} is not a Prometheus metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)"
    for name, value in labels.items():
        if not LABEL_NAME_RE.fullmatch(name) or name == "__name__":
            return f"label name {_show(name)} of metric {metric} is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)"
        try:
            value.encode()
        except UnicodeEncodeError:
            return f"the value of label {name} of metric {metric} is not valid UTF-8"
    return None


Labels = tuple[tuple[str, str], ...]


def describe(metric: str, labels: Labels) -> str:
    """A series by its metric and label names (no label values: they are payload)."""
    return f"{metric}{{{', '.join(k for k, _ in labels)}}}"


@dataclass(frozen=True)
class Collision:
    """Two label sets with one series id: the one refused and the one already holding the id."""

    series_id: int
    metric: str
    labels: Labels
    other_metric: str
    other_labels: Labels
    where: str  # where the other one is: a raw/series file, or the batch being written

    def __str__(self) -> str:
        return (
            f"series id {self.series_id} of {describe(self.metric, self.labels)} is already "
            f"{describe(self.other_metric, self.other_labels)} (other label values) in {self.where}"
        )


class SeriesCollision(RawLayoutError):
    """A write would put two label sets under one series id: refused, nothing written."""

    def __init__(self, collisions: list[Collision], context: str):
        self.collisions = collisions
        shown = "; ".join(map(str, collisions[:5])) + (f"; and {len(collisions) - 5} more" if len(collisions) > 5 else "")
        super().__init__(
            f"{context}: {len(collisions)} series share a series id with another label set, refused so that neither is merged into the other: {shown}"
        )


def known_series(paths: Paths, ids) -> dict[int, tuple[str, Labels, str]]:
    """(metric, sorted labels, file) that data/raw/series holds for each of ``ids`` it holds.

    Each id is looked up in the newest file that has it: every write keeps one label set per id
    (``write_day`` checks under a lock), so one row per id is enough. Files are opened for their
    series_id column; labels are read only from files holding ids not yet found.
    """
    want = np.unique(np.asarray(list(ids), dtype=np.int64))
    found: dict[int, tuple[str, Labels, str]] = {}
    for f in sorted(all_series_files(paths), reverse=True):
        if not len(want):
            break
        file_ids = pq.read_table(f, columns=["series_id"])["series_id"].to_numpy()
        hit = np.isin(file_ids, want)
        if not hit.any():
            continue
        rows = pq.read_table(f, columns=["series_id", "metric", "labels"]).filter(pa.array(hit))
        where = str(f.relative_to(paths.data_dir))
        for sid, metric, labels in zip(rows["series_id"].to_pylist(), rows["metric"].to_pylist(), rows["labels"].to_pylist()):
            found.setdefault(sid, (metric, tuple(sorted(labels)), where))
        want = want[~np.isin(want, file_ids[hit])]
    return found


def collisions(paths: Paths, series: pa.Table) -> list[Collision]:
    """Rows of ``series`` (a series table) whose id another row or data/raw/series holds with other labels."""
    labels = [tuple(sorted(x)) for x in series["labels"].to_pylist()]
    return _collisions(paths, series["series_id"].to_pylist(), list(zip(series["metric"].to_pylist(), labels)))


def _collisions(paths: Paths, ids: list[int], defs: list[tuple[str, Labels]]) -> list[Collision]:
    out: list[Collision] = []
    first: dict[int, tuple[str, Labels]] = {}
    for sid, mine in zip(ids, defs):
        seen = first.setdefault(sid, mine)
        if seen != mine:
            out.append(Collision(sid, *mine, *seen, "the same write"))
    for sid, (metric, lab, where) in known_series(paths, first).items():
        if first[sid] != (metric, lab):
            out.append(Collision(sid, *first[sid], metric, lab, where))
    return out


@contextmanager
def series_lock(paths: Paths):
    """One check-and-publish of series at a time, across processes (flock on data/raw/.series.lock)."""
    with durable.exclusive_lock(paths.raw_series.parent / ".series.lock"):
        yield


def day_bounds_ms(day: date) -> tuple[int, int]:
    """The half-open UTC window [start, end) of a day, in epoch milliseconds."""
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    start_ms = int(start.timestamp()) * 1000
    return start_ms, start_ms + DAY_MS


def day_of_ms(ts_ms: int) -> date:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ts_ms)).date()


def samples_day_dir(paths: Paths, day: date) -> Path:
    return paths.raw_samples / f"date={day.isoformat()}"


def series_day_dir(paths: Paths, day: date) -> Path:
    return paths.raw_series / f"date={day.isoformat()}"


def carry_in_day_dir(paths: Paths, day: date) -> Path:
    return paths.raw_carry_in / f"date={day.isoformat()}"


# --- shards (core/shards.py): the shard-aware file lists every reader and writer uses -----------------


def shard_dir(day_dir: Path, shard: Shard | None) -> Path:
    """The folder a shard's files of a day are in: the day's folder itself when unsharded."""
    return day_dir if shard is None else day_dir / shard.dirname


def day_files(paths: Paths, day_dir: Path, shard: Shard | None = None) -> list[Path]:
    """The Parquet files of one day folder of the raw layout: ``shard``'s; with ``shard`` None, the
    whole day (unsharded: the folder's files; with ``paths.shards`` > 1: every shard's, in shard order,
    which concatenate to the day). Files of another number of shards are never listed."""
    if shard is not None:
        if shard.count != paths.shards:
            raise ValueError(f"{shard} does not belong to the {paths.shards} shards configured (BILLING_SHARDS)")
        return sorted((day_dir / shard.dirname).glob("*.parquet")) if paths.shards > 1 else sorted(day_dir.glob("*.parquet"))
    if paths.shards == 1:
        return sorted(day_dir.glob("*.parquet"))
    return [f for s in all_shards(paths.shards) for f in sorted((day_dir / s.dirname).glob("*.parquet"))]


def sample_files(paths: Paths, day: date, shard: Shard | None = None) -> list[Path]:
    return day_files(paths, samples_day_dir(paths, day), shard)


def carry_in_files(paths: Paths, day: date, shard: Shard | None = None) -> list[Path]:
    return day_files(paths, carry_in_day_dir(paths, day), shard)


def series_files(paths: Paths, shard: Shard | None = None) -> list[Path]:
    """Every day's series files: ``shard``'s, or the whole layout's (every shard's when sharded)."""
    if paths.shards == 1:
        return sorted(paths.raw_series.glob("date=*/*.parquet"))
    pattern = f"date=*/{shard.dirname}/*.parquet" if shard is not None else f"date=*/shard=*-of-{paths.shards}/*.parquet"
    return sorted(paths.raw_series.glob(pattern))


def all_series_files(paths: Paths) -> list[Path]:
    """Every series file whatever the number of shards it was written with (series ids are checked across all)."""
    return sorted([*paths.raw_series.glob("date=*/*.parquet"), *paths.raw_series.glob("date=*/shard=*/*.parquet")])


def raw_days(paths: Paths) -> list[date]:
    return sorted(date.fromisoformat(p.name[5:]) for p in paths.raw_samples.glob("date=*") if sample_files(paths, date.fromisoformat(p.name[5:])))


def customer_labels(paths: Paths) -> dict[str, str]:
    """metric -> the customer label of the first meter (seeds/meters.csv order) that lists it; {} without a
    meters file."""
    from billing_dags.seeds.catalog import read_seed

    if not (paths.seeds_dir / "meters.csv").exists():
        return {}
    out: dict[str, str] = {}
    for row in read_seed(paths.seeds_dir, "meters").select(["metrics", "customer_label"]).to_pylist():
        for metric in row["metrics"].split():
            out.setdefault(metric, row["customer_label"])  # a metric of two meters: the first row's label
    return out


def shards_of_series(paths: Paths, series: pa.Table) -> np.ndarray:
    """The shard index of each row of a series table (core/shards.py: customer label value, else series id)."""
    return series_shards(series["metric"].to_pylist(), series["labels"].to_pylist(), series["series_id"].to_pylist(), customer_labels(paths), paths.shards)


def split_by_shard(paths: Paths, samples: pa.Table, series: pa.Table, only: Shard | None = None) -> list[tuple[Shard | None, pa.Table, pa.Table]]:
    """(shard, samples, series) of every shard (one entry with shard None when unsharded); ``series``
    sorted by series_id holds a row for every sample's series. Row order is kept within each shard.
    With ``only`` (a writer of one shard, e.g. a Prometheus pull per shard): that shard's entry alone,
    once every series is checked to be in it (RawLayoutError naming how many are not)."""
    if only is not None and only.count != paths.shards:
        raise RawLayoutError(f"{only} is not a shard of the {paths.shards} shard(s) BILLING_SHARDS sets")
    if paths.shards == 1:
        return [(None, samples, series)]
    idx = shards_of_series(paths, series)
    if only is not None:
        other = int((idx != only.index).sum())
        if other:
            raise RawLayoutError(f"{other} of {len(series)} series written for {only} belong to other shards; write each shard's series to its own shard")
        return [(only, samples, series)]
    ids = series["series_id"].to_numpy()
    order = np.argsort(ids, kind="stable")
    sample_shard = idx[order[np.searchsorted(ids[order], samples["series_id"].to_numpy())]] if len(samples) else np.zeros(0, dtype=np.int64)
    return [(s, samples.filter(pa.array(sample_shard == s.index)), series.filter(pa.array(idx == s.index))) for s in all_shards(paths.shards)]


def read_source_day(paths: Paths, day: date, source: str) -> tuple[pa.Table | None, pa.Table | None]:
    """One source's samples and series of ``day`` as written (every shard's, concatenated), or None each."""
    name = f"part-{source}.parquet"
    samples = [f for f in sample_files(paths, day) if f.name == name]
    series = [f for f in day_files(paths, series_day_dir(paths, day)) if f.name == name]
    read = lambda files, schema: pa.concat_tables([pq.read_table(f).cast(schema) for f in files]) if files else None  # noqa: E731
    return read(samples, SAMPLES_SCHEMA), read(series, SERIES_SCHEMA)


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


def _in_order(sid: np.ndarray, ts: np.ndarray) -> bool:
    """Whether the rows are sorted by (series_id, ts) with no (series_id, ts) twice (what
    ``distinct_samples`` would leave as it is)."""
    if (sid[1:] < sid[:-1]).any():
        return False
    same = sid[1:] == sid[:-1]
    return bool((ts[1:][same] > ts[:-1][same]).all())


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


def _checked_series(series: pa.Table, what: str) -> tuple[pa.Table, list[tuple[str, Labels]]]:
    """The series table with each row's labels sorted by name, and each row's (metric, labels),
    once every row is a valid series whose id is ``series_id`` of its labels (a writer's own
    hashing would break the one identity)."""
    rows = zip(series["series_id"].to_pylist(), series["metric"].to_pylist(), series["labels"].to_pylist())
    canonical, defs, changed = [], [], False
    for i, (sid, metric, labels) in enumerate(rows):
        label_map = dict(labels)
        problem = series_problem(metric, label_map) if len(label_map) == len(labels) else f"metric {metric} has a label twice"
        if problem:
            raise RawLayoutError(f"{what}: series row {i}: {problem}; fix or drop the series before writing")
        if series_id(metric, label_map) != sid:
            raise RawLayoutError(
                f"{what}: series row {i} ({describe(metric, tuple(labels))}) has series_id {sid}, not the id of its "
                f"labels; compute ids with billing_dags.ingest.raw.series_id"
            )
        ordered = sorted(labels)
        changed = changed or ordered != labels
        canonical.append(ordered)
        defs.append((metric, tuple(ordered)))
    if changed:
        labels_type = SERIES_SCHEMA.field("labels")
        series = series.set_column(series.schema.get_field_index("labels"), labels_type, pa.array(canonical, labels_type.type))
    return series, defs


def write_day(paths: Paths, day: date, samples: pa.Table, series: pa.Table, source: str, shard: Shard | None = None) -> dict:
    """Replace one source's raw partition of ``day`` with ``samples`` and ``series`` (with ``shard``, when
    sharded: that shard's files only, every series being in it; the other shards' files are not touched).

    Samples must lie in the day's window [00:00, 24:00) UTC. They are sorted by (series_id, ts,
    value) and identical rows are written once (``distinct_samples``).
    Every series row must be valid (``series_problem``) with ``series_id`` of its labels, and no id
    may be held by another label set in the write or in data/raw/series (``SeriesCollision``,
    checked and published under ``series_lock``): nothing is written then.
    Returns figures for asset metadata.
    """
    if not _SOURCE_RE.match(source):
        raise RawLayoutError(f"source name {source!r} must match {_SOURCE_RE.pattern}")
    what = f"series for {day} from source {source!r}"
    samples = samples.select(SAMPLES_SCHEMA.names).cast(SAMPLES_SCHEMA)
    series, defs = _checked_series(series.select(SERIES_SCHEMA.names).cast(SERIES_SCHEMA), what)
    start_ms, end_ms = day_bounds_ms(day)
    if len(samples):
        lo, hi = pc.min(samples["ts"]).as_py(), pc.max(samples["ts"]).as_py()
        if lo < start_ms or hi >= end_ms:
            raise RawLayoutError(
                f"samples for {day} from source {source!r} have timestamps {lo}..{hi} ms outside "
                f"[{start_ms}, {end_ms}); split samples by UTC day before writing"
            )
    sid = samples["series_id"].to_numpy()
    if len(sid) > 1 and not _in_order(sid, samples["ts"].to_numpy()):  # in order already: no copy
        order, keep = distinct_samples(sid, samples["ts"].to_numpy(), samples["value"].to_numpy())
        samples = samples.take(pa.array(order[keep]))
        sid = samples["series_id"].to_numpy()
    # sorted by series_id now: its distinct values are where it changes
    first = np.ones(len(sid), dtype=bool)
    first[1:] = sid[1:] != sid[:-1]
    missing = set(sid[first].tolist()) - set(series["series_id"].to_pylist())
    if missing:
        raise RawLayoutError(f"{len(missing)} series ids in samples of {day} have no row in the series table")
    ids = series["series_id"].to_pylist()
    series = series.sort_by("series_id")

    # one samples file and one series file per shard (one of each when unsharded), all published under one lock
    staged: list[tuple[Path, Path, Path, pa.Table]] = []  # (temp, sample path, series path, series)
    try:
        for part, part_samples, part_series in split_by_shard(paths, samples, series, shard):
            sample_path = shard_dir(samples_day_dir(paths, day), part) / f"part-{source}.parquet"
            series_path = shard_dir(series_day_dir(paths, day), part) / f"part-{source}.parquet"
            sample_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = durable.temp_path(sample_path)
            staged.append((tmp, sample_path, series_path, part_series))
            _write_samples(tmp, part_samples)
        # checked and published under one lock: no other writer can take an id between check and rename
        with series_lock(paths):
            found = _collisions(paths, ids, defs)
            if found:
                raise SeriesCollision(found, what)
            for tmp, sample_path, series_path, part_series in staged:
                durable.publish(tmp, sample_path)
                with durable.staged(series_path) as series_tmp:
                    pq.write_table(part_series, series_tmp, compression="zstd")
    finally:
        for tmp, *_ in staged:
            tmp.unlink(missing_ok=True)
    return {
        "samples": len(samples),
        "series": len(series),
        "bytes": sum(p.stat().st_size for _, p, _, _ in staged),
        "path": str(staged[0][1] if len(staged) == 1 else samples_day_dir(paths, day)),
    }


def unsharded_files(paths: Paths, day_dir: Path, sha256_of: Callable[[pa.Table, Path], None]) -> dict[str, str]:
    """{path relative to the data dir: SHA-256} of a day folder's files as the unsharded layout holds them:
    the files themselves when unsharded; when sharded, each source's shard files concatenated and written
    again as the one unsharded file would be (``sha256_of(table, temp path)`` writes it), under the
    unsharded name. Records of a day (invoice manifests) then do not depend on the number of shards."""
    files = day_files(paths, day_dir)
    if paths.shards == 1:
        return {f.relative_to(paths.data_dir).as_posix(): durable.sha256_file(f) for f in files}
    by_name: dict[str, list[Path]] = {}
    for f in files:
        by_name.setdefault(f.name, []).append(f)
    out = {}
    with tempfile.TemporaryDirectory(prefix=".unsharded-", dir=paths.data_dir) as work:
        for name in sorted(by_name):
            tmp = Path(work) / name
            sha256_of(pa.concat_tables([pq.read_table(f, partitioning=None) for f in by_name[name]]), tmp)
            out[(day_dir / name).relative_to(paths.data_dir).as_posix()] = durable.sha256_file(tmp)
            tmp.unlink()
    return out


def unsharded_sample_files(paths: Paths, day: date) -> dict[str, str]:
    """``unsharded_files`` of a day's raw samples (every writer's file is sorted and distinct: so is their union)."""

    def write(table: pa.Table, path: Path) -> None:
        table = table.cast(SAMPLES_SCHEMA)
        order, keep = distinct_samples(table["series_id"].to_numpy(), table["ts"].to_numpy(), table["value"].to_numpy())
        _write_samples(path, table.take(pa.array(order[keep])))

    return unsharded_files(paths, samples_day_dir(paths, day), write)


def _write_samples(path: Path, samples: pa.Table) -> None:
    """A samples file: each series whole inside one row group (``_row_group_boundaries``)."""
    cuts = _row_group_boundaries(samples["series_id"])
    with pq.ParquetWriter(
        path,
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


def write_carry_in(paths: Paths, day: date, samples: pa.Table, series: pa.Table, source: str, lookback_days: int, shard: Shard | None = None) -> int:
    """Replace ``source``'s carry-in of ``day``: one sample per series, each before the day and at most
    ``lookback_days`` earlier (an empty table records that there is none); with ``shard``, that shard's
    files only, as ``write_day``. Returns the number of series."""
    if not _SOURCE_RE.match(source):
        raise RawLayoutError(f"source name {source!r} must match {_SOURCE_RE.pattern}")
    what = f"carry-in series of {day} from source {source!r}"
    samples = samples.select(SAMPLES_SCHEMA.names).cast(SAMPLES_SCHEMA).sort_by("series_id")
    series, defs = _checked_series(series.select(SERIES_SCHEMA.names).cast(SERIES_SCHEMA).sort_by("series_id"), what)
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
    with series_lock(paths):
        found = _collisions(paths, series["series_id"].to_pylist(), defs)
        if found:
            raise SeriesCollision(found, what)
        for part, part_samples, part_series in split_by_shard(paths, samples, series, shard):
            for table, dest in (
                (part_samples, shard_dir(carry_in_day_dir(paths, day), part) / f"part-{source}.parquet"),
                (part_series, shard_dir(series_day_dir(paths, day), part) / f"part-{source}-carry-in.parquet"),
            ):
                with durable.staged(dest) as tmp:
                    pq.write_table(table, tmp, compression="zstd")
    return len(samples)
