"""The partitions start where billing does: BILLING_PARTITIONS_START, else the earliest subscription's month."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date

import pytest

from billing_dags.cli.main import main
from billing_dags.core.settings import PROJECT_ROOT, SettingsError, parse_partitions_start, partitions_start

LOAD = (
    "from billing_dags.defs.shared.partitions import billing_daily, billing_monthly\n"
    "print(billing_daily.get_first_partition_key(), billing_monthly.get_first_partition_key())"
)


def _load(env: dict) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    full.update(env, PYTHONPATH=str(PROJECT_ROOT))
    return subprocess.run([sys.executable, "-c", LOAD], env=full, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("value", "fix"),
    [
        ("oct", "is not a month (YYYY-MM)"),
        ("2026-13", "is not a valid date"),
        ("2026-10-15", "is not the first day of a month"),
        ("1999-12", "is before 2000"),
    ],
)
def test_bad_partitions_start_names_the_variable_and_the_fix(value, fix):
    with pytest.raises(SettingsError, match="BILLING_PARTITIONS_START") as e:
        parse_partitions_start(value)
    assert fix in str(e.value)


def test_default_is_the_first_month_of_the_earliest_subscription(tmp_path):
    (tmp_path / "subscriptions.csv").write_text("customer_id,plan_id,start_date,end_date\na,p,2026-05-20,\nb,p,2026-03-17,2026-04-01\n")
    assert partitions_start({}, seeds_dir=tmp_path) == date(2026, 3, 1)
    assert partitions_start({"BILLING_PARTITIONS_START": "2026-10"}, seeds_dir=tmp_path) == date(2026, 10, 1)
    (tmp_path / "subscriptions.csv").write_text("customer_id,plan_id,start_date,end_date\n")
    with pytest.raises(SettingsError, match=r"BILLING_PARTITIONS_START is not set .* no subscription start_date"):
        partitions_start({}, seeds_dir=tmp_path)


def test_code_location_partitions_start_at_the_configured_month(tmp_path):
    proc = _load({"BILLING_PARTITIONS_START": "2026-10"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2026-10-01", "2026-10-01"]
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / "subscriptions.csv").write_text("customer_id,plan_id,start_date,end_date\na,p,2026-08-09,\n")
    proc = _load({"BILLING_SEEDS_DIR": str(seeds)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2026-08-01", "2026-08-01"]
    proc = _load({"BILLING_PARTITIONS_START": "2026-10-15"})
    assert proc.returncode != 0
    assert "BILLING_PARTITIONS_START='2026-10-15' is not the first day of a month" in proc.stderr


def test_cli_refuses_months_before_the_configured_start(data_dir, monkeypatch, capsys):
    monkeypatch.setenv("BILLING_PARTITIONS_START", "2026-10")
    assert main(["run", "--month", "2026-09"]) == 2
    err = capsys.readouterr().err
    assert "before the first partition (2026-10)" in err and "BILLING_PARTITIONS_START=2026-09" in err
    monkeypatch.setenv("BILLING_PARTITIONS_START", "2026/10")
    assert main(["run", "--month", "2026-09"]) == 2
    assert "BILLING_PARTITIONS_START='2026/10' is not a month" in capsys.readouterr().err
