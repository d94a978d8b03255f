"""Late raw data: which computed model days read raw files whose content changed since.

A daily model that reads raw day files (samples, carry-in, events) records, next to each partition
it writes, the files it read: name, size and SHA-256 (``inputs.json``, the same bytes for the same
inputs however the partition was computed). A model day is late when the raw files of its window
now differ by content from that record: a file added, removed (not a whole day: retention removes
those) or with other bytes. A file only touched or rewritten with the same bytes is not late: it
is hashed again, and the hash decides.

Hashing is paid once per file version: a file of the recorded size not written since the record
was (its time is older) is taken as recorded, without reading it; the hashes of files written
since are kept by the caller (the sensor's cursor) with their size and time. A file that changed
while the model ran is recorded with no hash, so it is never taken as recorded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

from billing_dags.core import durable
from billing_dags.core.settings import Paths
from billing_dags.core.shards import Shard, shard_of_dir
from billing_dags.ingest import events, raw
from billing_dags.models.sqlmodels import Model, Project, Window, load_project, model_files, partition_day, partition_file

INPUTS_FILE = "inputs.json"

#: the sources that are raw day files, and the files of one day of each
DAY_FILES: dict[str, Callable[..., list[Path]]] = {
    "raw_samples": raw.sample_files,
    "raw_carry_in": raw.carry_in_files,
    "raw_events": events.event_files,
}

#: {relative path: [size, mtime_ns, sha256]}: what a file is now (or was when it was hashed)
Entries = dict[str, list]
#: {relative path: [size, sha256]}: what a partition was computed from ("" when it changed meanwhile)
Recorded = dict[str, list]


def raw_readers(project: Project) -> dict[str, dict[str, int]]:
    """Daily models that read raw day files: {model: {source: earlier days it reads too}}."""
    from billing_dags.models.sqlmodels import sources

    known = sources()
    out = {}
    for model in project.models.values():
        if model.materialized != "table" or model.partitioned_by != "billing_daily":
            continue
        _, srcs = project.table_deps(model.name)
        read = {s: known[s].lookback_days for s in sorted(srcs) if s in DAY_FILES}
        if read:
            out[model.name] = read
    return out


def input_files(paths: Paths, reads: dict[str, int], window: Window, listed: dict | None = None) -> list[Path]:
    """The raw day files a model reading ``reads`` reads for ``window`` (``listed`` keeps the
    listings of (source, day) for the next call)."""
    listed = {} if listed is None else listed
    files = []
    for source, lookback in reads.items():
        d = window.start - timedelta(days=lookback)
        while d < window.end:
            if (source, d, window.shard) not in listed:
                listed[source, d, window.shard] = DAY_FILES[source](paths, d, window.shard)
            files += listed[source, d, window.shard]
            d += timedelta(days=1)
    return sorted(set(files))


@dataclass(frozen=True)
class Record:
    files: Recorded
    written_ns: int  # the record's own modification time


def snapshot(paths: Paths, files: list[Path], records: list[Record | None] = (), cache: Entries | None = None, collect: Entries | None = None) -> Entries:
    """Size, time and SHA-256 of ``files`` (keyed by their path under the data dir). A file is read
    only when no record knows it (same size, older than the record) and neither ``collect`` nor
    ``cache`` does (same size and time); every file no record knows is added to ``collect``."""
    out: Entries = {}
    for f in files:
        st = f.stat()
        rel = f.relative_to(paths.data_dir).as_posix()
        sha = next((r.files[rel][1] for r in records if r and _unwritten(r, rel, st)), None)
        if sha is None:
            for known in (collect, cache):
                prior = (known or {}).get(rel)
                if prior and prior[0] == st.st_size and prior[1] == st.st_mtime_ns:
                    sha = prior[2]
                    break
            else:
                sha = durable.sha256_file(f)
            if collect is not None:
                collect[rel] = [st.st_size, st.st_mtime_ns, sha]
        out[rel] = [st.st_size, st.st_mtime_ns, sha]
    return out


def _unwritten(record: Record, rel: str, st) -> bool:
    """The file is as recorded and not written since (same size, older than the record)."""
    entry = record.files.get(rel)
    return bool(entry and entry[1] and entry[0] == st.st_size and st.st_mtime_ns < record.written_ns)


def inputs_path(paths: Paths, model: Model, window: Window) -> Path:
    return partition_file(paths, model, window).with_name(INPUTS_FILE)


def read_record(path: Path) -> Record | None:
    """A partition's recorded inputs; None when none was recorded (or it cannot be read)."""
    try:
        written = path.stat().st_mtime_ns
        return Record({rel: [int(e[0]), str(e[1])] for rel, e in json.loads(path.read_text())["files"].items()}, written)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None


def inputs_before(paths: Paths, project: Project, model: Model, window: Window | None) -> Entries | None:
    """The raw inputs of a model partition about to be computed (None for a model reading none);
    taken before it reads them, so a file changing while it runs makes the partition late."""
    readers = raw_readers(project)
    reads = readers.get(model.name)
    if window is None or not reads:
        return None
    # the records of this window's models: a file one of them hashed, unwritten since, is not read again
    records = [read_record(inputs_path(paths, project.models[name], window)) for name in sorted(readers)]
    return snapshot(paths, input_files(paths, reads, window), records)


def record_inputs(paths: Paths, model: Model, window: Window, entries: Entries) -> None:
    """Publish the inputs a partition was computed from, next to it (after the partition). A file
    written since ``entries`` were taken is recorded with no hash: it may not be what the model read."""
    files: Recorded = {}
    for rel, (size, mtime_ns, sha) in entries.items():
        try:
            st = (paths.data_dir / rel).stat()
            same = (st.st_size, st.st_mtime_ns) == (size, mtime_ns)
        except FileNotFoundError:
            same = False
        files[rel] = [size, sha if same else ""]
    body = {"model": model.name, "day": window.start.isoformat(), "files": files}
    durable.write_bytes(inputs_path(paths, model, window), json.dumps(body, sort_keys=True, indent=1).encode())


@dataclass(frozen=True)
class LateDay:
    model: str
    day: date
    why: str  # e.g. "raw/samples/date=.../part-x.parquet changed"
    inputs: str = ""  # SHA-256 over the current inputs' names and hashes (another change, another value)
    shard: Shard | None = None  # the shard of the partition, when sharded


def _changed(recorded: Recorded, current: Entries) -> str | None:
    """What differs by content; a raw day folder emptied altogether (retention removes whole raw days
    once their month is invoiced) is not a change: the models keep what they computed from it."""
    present = {rel.rsplit("/", 1)[0] for rel in current}
    for rel in sorted(set(recorded) | set(current)):
        if rel not in current:
            if rel.rsplit("/", 1)[0] in present:
                return f"{rel} removed"
            continue
        if rel not in recorded:
            return f"{rel} added"
        if recorded[rel][1] != current[rel][2]:
            return f"{rel} changed"
    return None


def late_model_days(paths: Paths, hashes: Entries | None = None, project: Project | None = None) -> tuple[list[LateDay], Entries]:
    """Model days whose raw inputs changed by content since they were computed; and the hashes of
    the files written since a record of them (to pass back next time, so a touched file is hashed
    once, not on every call).

    A partition computed before inputs were recorded is late when a raw input is newer than it.
    """
    project = project or load_project()
    hashes = hashes or {}
    used: Entries = {}
    late: list[LateDay] = []
    listed: dict = {}
    for name, reads in raw_readers(project).items():
        model = project.models[name]
        for part in model_files(paths, model):
            day = partition_day(part)
            window = Window(day, day + timedelta(days=1), shard_of_dir(part.parent.name))
            files = input_files(paths, reads, window, listed)
            if not files:  # none left (retention removed the raw days) or none ever: nothing can be late
                continue
            record = read_record(part.with_name(INPUTS_FILE))
            if record is None:
                newest = max(f.stat().st_mtime_ns for f in files)
                if newest > part.stat().st_mtime_ns:
                    late.append(LateDay(name, day, "raw data newer than the partition (computed before inputs were recorded)", shard=window.shard))
                continue
            current = snapshot(paths, files, [record], hashes, used)
            why = _changed(record.files, current)
            if why:
                digest = hashlib.sha256(json.dumps(sorted([rel, e[2]] for rel, e in current.items())).encode()).hexdigest()
                late.append(LateDay(name, day, why, digest, window.shard))
    return late, used


def computed_days(paths: Paths, models: list[Model], shard: Shard | None = None) -> set[date]:
    """The days with a partition of any of ``models`` (sharded: of ``shard``'s, else of any shard)."""
    return {partition_day(p) for m in models for p in model_files(paths, m, shard)}


def rerun_ranges(late_days: set[date], computed: set[date], follow_days: int) -> list[tuple[date, date]]:
    """Day ranges to recompute: from each late day through the ``follow_days`` after the last late
    one (later days read its edges and usage), over days already computed only; late days that
    computed days connect share one range."""
    ranges: list[tuple[date, date]] = []
    if not late_days:
        return ranges
    last = max(late_days) + timedelta(days=follow_days)
    start = end = None
    d = min(late_days)
    while d <= last:
        if d in computed and (start is not None or d in late_days):
            start = start or d
            end = d
        elif d not in computed and start is not None:
            ranges.append((start, end))
            start = None
        d += timedelta(days=1)
    if start is not None:
        ranges.append((start, end))
    return ranges
