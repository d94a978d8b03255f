"""Copies of the project's seeds for tests that want fewer customers."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from billing_dags.core.settings import PROJECT_ROOT

SEEDS = PROJECT_ROOT / "seeds"


def copy_small_seeds(d: Path) -> Path:
    """A copy of the seeds in ``d`` with one customer per set-up (five customers)."""
    shutil.copytree(SEEDS, d)
    with (SEEDS / "customers.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    picked, seen = [], set()
    for row in rows:
        if row["setup"] not in seen:
            seen.add(row["setup"])
            picked.append(row)
    with (d / "customers.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(picked)
    keep = {row["customer_id"] for row in picked}
    for name in ("subscriptions.csv", "credits.csv", "report_tokens.csv", "customer_billing.csv", "api_keys.csv"):
        with (SEEDS / name).open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            kept = [r for r in reader if r["customer_id"] in keep]
            fields = reader.fieldnames
        with (d / name).open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(kept)
    return d
