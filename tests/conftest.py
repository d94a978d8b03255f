"""Shared fixtures: every test gets its own data dir; nothing on disk is shared between tests."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from billing_dags.settings import PROJECT_ROOT, resolve_paths

SEEDS = PROJECT_ROOT / "seeds"


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "data"
    monkeypatch.setenv("BILLING_DATA_DIR", str(d))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir()
    (tmp_path / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    for var in ("PROMETHEUS_URL", "STRIPE_API_KEY", "STRIPE_API_BASE"):
        monkeypatch.delenv(var, raising=False)
    return d


def copy_small_seeds(d: Path) -> Path:
    """A copy of the seeds in ``d`` with one customer per set-up (five customers)."""
    shutil.copytree(SEEDS, d)
    with (SEEDS / "customers.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    picked, seen = [], set()
    for row in rows:
        if row["setup"] not in seen:
            seen.add(row["setup"])
            picked.append(row)
    with (d / "customers.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(picked)
    keep = {row["customer_id"] for row in picked}
    for name in ("subscriptions.csv", "credits.csv", "report_tokens.csv"):
        with (SEEDS / name).open(newline="") as f:
            reader = csv.DictReader(f)
            kept = [r for r in reader if r["customer_id"] in keep]
            fields = reader.fieldnames
        with (d / name).open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(kept)
    return d


@pytest.fixture
def small_seeds(tmp_path, monkeypatch) -> Path:
    """A copy of the seeds with one customer per set-up (five customers)."""
    d = copy_small_seeds(tmp_path / "seeds")
    monkeypatch.setenv("BILLING_SEEDS_DIR", str(d))
    return d


@pytest.fixture
def paths(data_dir, small_seeds):
    return resolve_paths(data_dir, small_seeds)
