"""What produced a month's invoices (the manifest) and why a finalized month's figures changed.

The manifest, stored in every invoice, holds the SHA-256 of each raw input file and seed file and
the code version, so that a disputed figure can be reproduced exactly; comparing a finalized
invoice's manifest with a recomputation's names the reason for an adjustment.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping
from datetime import date
from pathlib import Path

from billing_dags import __version__
from billing_dags.billing.periods import checked_month, period_end
from billing_dags.core.calendar import month_days
from billing_dags.core.durable import sha256_file
from billing_dags.core.settings import PROJECT_ROOT, Paths
from billing_dags.ingest.events import unsharded_event_files
from billing_dags.ingest.raw import unsharded_sample_files
from billing_dags.ingest.usage_reports import SOURCE as REPORTS_SOURCE
from billing_dags.ingest.usage_reports import ReportStore
from billing_dags.seeds.catalog import seeds_digest
from billing_dags.seeds.credits import CREDITS_FILE


def code_version(root: Path | str = PROJECT_ROOT) -> str:
    """The package version, plus ``+g<commit>`` when ``root`` is a git checkout and ``git rev-parse HEAD`` works."""
    version = __version__
    root = Path(root)
    if not (root / ".git").exists():
        return version
    try:
        r = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
        )
    except (OSError, subprocess.SubprocessError):
        return version
    sha = (r.stdout or "").strip()
    if r.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", sha):
        return f"{version}+g{sha}"
    return version


def invoice_manifest(paths: Paths, month: date, seeds_dir: Path | str, code_version: str) -> dict:
    """What produced a month's invoices: SHA-256 of each raw samples and raw events Parquet file of the
    month's days (path relative to the data dir -> hash), the usage reports accepted for each day
    (count and SHA-256, from the report store: a late report changes it), each seed file's SHA-256,
    and the code version."""
    month = checked_month(month)
    end = period_end(month)
    raw: dict[str, str] = {}
    raw_events: dict[str, str] = {}
    for day in month_days(month):
        # each file as the unsharded layout holds it: a month's manifest does not depend on BILLING_SHARDS
        raw.update(unsharded_sample_files(paths, day))
        raw_events.update(unsharded_event_files(paths, day))
    with ReportStore.open(paths, readonly=True) as store:
        reports = store.fingerprints(month, end)
    seeds = seeds_digest(Path(seeds_dir))
    credits_file = Path(seeds_dir) / CREDITS_FILE
    if credits_file.exists():  # also while seeds.SPECS has no credits entry
        seeds.setdefault(CREDITS_FILE, sha256_file(credits_file))
    return {
        "month": f"{month:%Y-%m}",
        "raw_samples": raw,
        "raw_events": raw_events,
        "usage_reports": reports,
        "seeds": dict(sorted(seeds.items())),
        "code_version": code_version,
    }


def recompute_reason(finalized: Mapping | None, recomputed_manifest: Mapping | None) -> str:
    """Why a finalized month's figures changed, from the two manifests. Raw events and usage reports
    are compared only when the finalized manifest has them (manifests written before they were
    fingerprinted do not); the usage reports' own events file is explained by the reports."""
    old = (finalized or {}).get("manifest") or {}
    new = recomputed_manifest or {}
    reasons = []
    if old.get("raw_samples") != new.get("raw_samples"):
        reasons.append("late data")
    if "raw_events" in old:
        reports_part = f"/part-{REPORTS_SOURCE}.parquet"
        others = lambda m: {k: v for k, v in (m.get("raw_events") or {}).items() if not k.endswith(reports_part)}  # noqa: E731
        if others(old) != others(new):
            reasons.append("late usage events")
    if "usage_reports" in old and old["usage_reports"] != new.get("usage_reports"):
        before, after = old["usage_reports"], new.get("usage_reports") or {}
        days = sorted(d for d in set(before) | set(after) if before.get(d) != after.get(d))
        added = sum(after.get(d, {}).get("reports", 0) - before.get(d, {}).get("reports", 0) for d in days)
        what = f"{added} late usage report{'s' if added != 1 else ''}" if added > 0 else "changed usage reports"
        reasons.append(f"{what} ({', '.join(days)})")
    if old.get("seeds") != new.get("seeds"):
        reasons.append("a seed change")
    if old.get("code_version") != new.get("code_version"):
        reasons.append("a code change")
    return " and ".join(reasons) or "a rerun"
