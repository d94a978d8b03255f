"""Late raw data: which computed model days read raw files whose content changed since.

A daily model that reads raw day files (samples, carry-in, events) records, next to each partition
it writes, the files it read: name, size, modification time and SHA-256 (``inputs.json``). A model
day is late when the raw files of its window now differ by content from that record: a file added,
removed (not a whole day: retention removes those) or with other bytes. A file only touched or rewritten with the same bytes is not late: its
time changed, so it is hashed again, and the hash decides.

Hashing is paid once per file version: a file whose size and time still match the record is taken
as recorded, and the hashes of touched files are kept by the caller (the sensor's cursor).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Callable

from billing_dags import durable, events, raw
from billing_dags.settings import Paths
from billing_dags.sqlmodels import Model, Project, Window, load_project, model_files, partition_file

INPUTS_FILE = "inputs.json"

#: the sources that are raw day files, and the files of one day of each
DAY_FILES: dict[str, Callable[[Paths, date], list[Path]]] = {
    "raw_samples": raw.sample_files,
    "raw_carry_in": raw.carry_in_files,
    "raw_events": events.event_files,
}

#: {relative path: [size, mtime_ns, sha256]}
Entries = dict[str, list]


def raw_readers(project: Project) -> dict[str, dict[str, int]]:
    """Daily models that read raw day files: {model: {source: earlier days it reads too}}."""
    from billing_dags.sqlmodels import sources

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


def input_files(paths: Paths, reads: dict[str, int], window: Window) -> list[Path]:
    """The raw day files a model reading ``reads`` reads for ``window``."""
    files = []
    for source, lookback in reads.items():
        d = window.start - timedelta(days=lookback)
        while d < window.end:
            files += DAY_FILES[source](paths, d)
            d += timedelta(days=1)
    return sorted(set(files))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def snapshot(paths: Paths, files: list[Path], *known: Entries | None) -> Entries:
    """Size, time and SHA-256 of ``files`` (keyed by their path under the data dir); a file whose
    size and time match an entry of ``known`` keeps that hash instead of being read again."""
    out: Entries = {}
    for f in files:
        st = f.stat()
        rel = f.relative_to(paths.data_dir).as_posix()
        for entries in known:
            prior = (entries or {}).get(rel)
            if prior and prior[0] == st.st_size and prior[1] == st.st_mtime_ns:
                out[rel] = [st.st_size, st.st_mtime_ns, prior[2]]
                break
        else:
            out[rel] = [st.st_size, st.st_mtime_ns, sha256_file(f)]
    return out


def inputs_path(paths: Paths, model: Model, window: Window) -> Path:
    return partition_file(paths, model, window).with_name(INPUTS_FILE)


def read_inputs(path: Path) -> Entries | None:
    """A partition's recorded inputs; None when none was recorded (or it cannot be read)."""
    try:
        return json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def inputs_before(paths: Paths, project: Project, model: Model, window: Window | None) -> Entries | None:
    """The raw inputs of a model partition about to be computed (None for a model reading none);
    taken before it reads them, so a file changing while it runs makes the partition late."""
    readers = raw_readers(project)
    reads = readers.get(model.name)
    if window is None or not reads:
        return None
    # the records of this window's other models: a file they hashed in its current version is not read again
    known = [read_inputs(inputs_path(paths, project.models[name], window)) for name in [model.name, *sorted(readers)]]
    return snapshot(paths, input_files(paths, reads, window), *known)


def record_inputs(paths: Paths, model: Model, window: Window, entries: Entries) -> None:
    """Publish the inputs a partition was computed from, next to it (after the partition)."""
    body = {"model": model.name, "day": window.start.isoformat(), "files": entries}
    durable.write_bytes(inputs_path(paths, model, window), json.dumps(body, sort_keys=True, indent=1).encode())


@dataclass(frozen=True)
class LateDay:
    model: str
    day: date
    why: str  # e.g. "raw/samples/date=.../part-x.parquet changed"


def _changed(recorded: Entries, current: Entries) -> str | None:
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
        if recorded[rel][2] != current[rel][2]:
            return f"{rel} changed"
    return None


def late_model_days(paths: Paths, hashes: Entries | None = None, project: Project | None = None) -> tuple[list[LateDay], Entries]:
    """Model days whose raw inputs changed by content since they were computed; and the hashes of
    the files whose time no longer matches any record (to pass back next time, so a touched file is
    hashed once, not on every call).

    A partition computed before inputs were recorded is late when a raw input is newer than it.
    """
    project = project or load_project()
    hashes = hashes or {}
    used: Entries = {}
    late: list[LateDay] = []
    for name, reads in raw_readers(project).items():
        model = project.models[name]
        for part in model_files(paths, model):
            day = date.fromisoformat(part.parent.name.split("=", 1)[1])
            window = Window(day, day + timedelta(days=1))
            files = input_files(paths, reads, window)
            if not files:  # none left (retention removed the raw days) or none ever: nothing can be late
                continue
            recorded = read_inputs(part.with_name(INPUTS_FILE))
            if recorded is None:
                newest = max((f.stat().st_mtime_ns for f in files), default=0)
                if newest > part.stat().st_mtime_ns:
                    late.append(LateDay(name, day, "raw data newer than the partition (computed before inputs were recorded)"))
                continue
            current = snapshot(paths, files, recorded, hashes, used)
            for rel, entry in current.items():
                if recorded.get(rel, [None, None])[:2] != entry[:2]:
                    used[rel] = entry
            why = _changed(recorded, current)
            if why:
                late.append(LateDay(name, day, why))
    return late, used


def computed_days(paths: Paths, models: list[Model]) -> set[date]:
    return {date.fromisoformat(p.parent.name.split("=", 1)[1]) for m in models for p in model_files(paths, m)}


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
