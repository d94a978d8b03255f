"""Retention (DESIGN rule 13): raw samples (their carry-in too), raw events and landing segments are kept for 90 days, then removed.

A raw day is removed only when it is older than the retention period AND its month has been
invoiced with every invoice finalized: data behind a draft (or not yet billed) month stays.
Aggregates (data/models), invoices and the Stripe outbox are never touched here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from billing_dags.core import durable
from billing_dags.core.calendar import month_start
from billing_dags.core.settings import DEFAULT_RETENTION_DAYS, Paths


@dataclass(frozen=True)
class Candidate:
    path: Path
    day: date | None
    bytes: int
    action: str  # remove | keep
    reason: str
    #: "path" (a file or folder) or "reports" (the day's rows of the usage-report store at ``path``)
    what: str = "path"


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def month_fully_finalized(paths: Paths, month: date) -> tuple[bool, str]:
    """(True, "") when the month has invoices and all are finalized; else (False, why)."""
    folder = paths.invoices / f"{month:%Y-%m}"
    docs = [json.loads(f.read_text()) for f in sorted(folder.glob("*.json")) if f.name != "registry.json"]
    docs = [d for d in docs if isinstance(d, dict) and "status" in d]
    if not docs:
        return False, f"{month:%Y-%m} has no invoices yet"
    drafts = [d["customer_id"] for d in docs if d["status"] != "finalized"]
    if drafts:
        return False, f"{month:%Y-%m} has {len(drafts)} draft invoice(s) ({', '.join(drafts[:3])}{'...' if len(drafts) > 3 else ''})"
    return True, ""


def plan(paths: Paths, *, today: date | None = None, retention_days: int = DEFAULT_RETENTION_DAYS) -> list[Candidate]:
    """What retention would do today: every raw day and landing file older than the cut-off."""
    if retention_days < 1:
        raise ValueError(f"retention of {retention_days} days: give at least 1 (DESIGN default 90)")
    today = today or datetime.now(UTC).date()
    cutoff = today - timedelta(days=retention_days)
    out: list[Candidate] = []
    finalized: dict[date, tuple[bool, str]] = {}

    def decide(day: date, why_old: str) -> tuple[str, str]:
        """remove (with why it is old) when the day's month is fully finalized, else keep (and why)."""
        month = month_start(day)
        if month not in finalized:
            finalized[month] = month_fully_finalized(paths, month)
        ok, why = finalized[month]
        return ("remove", why_old) if ok else ("keep", why)

    for root in (paths.raw_samples, paths.raw_series, paths.raw_carry_in, paths.data_dir / "raw" / "events"):
        for day_dir in sorted(root.glob("date=*")):
            try:
                day = date.fromisoformat(day_dir.name[5:])
            except ValueError:
                continue
            if day >= cutoff:
                continue
            action, reason = decide(day, f"older than {retention_days} days ({cutoff})")
            out.append(Candidate(day_dir, day, _size(day_dir), action, reason))
    from billing_dags.ingest.usage_reports import ReportStore, store_path

    with ReportStore.open(paths, readonly=True) as store:
        for day_text, (n, _) in store.day_counts().items():
            day = date.fromisoformat(day_text)
            if day >= cutoff:
                continue
            action, reason = decide(day, f"{n} usage reports older than {retention_days} days ({cutoff})")
            out.append(Candidate(store_path(paths), day, 0, action, reason, what="reports"))
    if paths.landing.exists():
        cutoff_ts = datetime(cutoff.year, cutoff.month, cutoff.day, tzinfo=UTC).timestamp()
        reports_dir = store_path(paths).parent
        for f in sorted(p for p in paths.landing.rglob("*") if p.is_file() and reports_dir not in p.parents):
            if f.stat().st_mtime < cutoff_ts:
                out.append(Candidate(f, None, f.stat().st_size, "remove", f"landing file untouched for {retention_days} days"))
    return out


def apply(candidates: list[Candidate], *, log=print) -> dict:
    """Remove what the plan says; log every path removed or kept and why."""
    removed = kept = freed = 0
    for c in candidates:
        if c.action == "remove" and c.what == "reports":
            from billing_dags.ingest.usage_reports import ReportStore

            with ReportStore(c.path) as store:
                n = store.delete_day(c.day)
            removed += 1
            log(f"removed {n} usage reports of {c.day} from {c.path}: {c.reason}")
        elif c.action == "remove":
            if c.path.is_dir():
                durable.remove_tree(c.path)
            else:
                durable.remove(c.path)
            removed += 1
            freed += c.bytes
            log(f"removed {c.path} ({c.bytes} bytes): {c.reason}")
        else:
            kept += 1
            log(f"kept {c.path}: {c.reason}")
    return {"removed": removed, "kept": kept, "bytes_freed": freed}
