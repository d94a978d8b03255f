"""`make bench-quick`: every benchmark runs at smoke size and prints its row of the table.

Speed figures at smoke size say nothing (the machine is shared and the sizes are small), so this
checks that every item is measured and that the correctness figures hold: the raw layout's bytes
per sample, the fast path equal to the SQL reference to the unit, parallel backfill partitions
byte-identical to sequential ones. Real servers (Prometheus) run on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from billing_dags.core.settings import PROJECT_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.acceptance]


def _benchmark(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` from the project's folder, this checkout's code first."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, cwd=PROJECT_ROOT, timeout=900)


def test_quick_suite_measures_every_item_and_the_correctness_figures_hold(tmp_path):
    out, result = tmp_path / "out", tmp_path / "figures.json"
    proc = _benchmark("benchmarks", "--quick", "--only", "1,2,3,4,5,6,7,8,10", "--out", str(out), "--json", str(result), "--markdown", str(tmp_path / "t.md"))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    doc = json.loads(result.read_text())
    assert doc["errors"] == []
    rows = {f["item"]: f for f in doc["figures"]}
    # item 9 (a whole `billing demo` month, several minutes even at smoke size) is left to `make bench`;
    # the demo month itself runs in test_cli
    assert sorted(rows) == [1, 2, 3, 4, 5, 6, 7, 8, 10]
    for item in (2, 3, 10):  # 10: every Stripe meter event reached the local server exactly once
        assert rows[item]["met"] is True, rows[item]
    # at smoke size the backfill is judged on byte-identical partitions only (False when they differ)
    assert rows[7]["met"] is not False, rows[7]
    assert "billing_dags benchmarks, quick" in proc.stdout
    # the Markdown table (for benchmarks/README.md) has the same rows
    md = (tmp_path / "t.md").read_text()
    assert md.count("\n| ") == 1 + len(doc["figures"])  # header + a row per figure (item 6 has two)
    for f in doc["figures"]:
        assert f"| {f['item']} | {f['figure'].replace('|', chr(92) + '|')} |" in md
    # the workloads were cached under --out, not in the project's benchmarks/out
    assert out.exists() and any(out.iterdir())


def test_bad_item_numbers_are_refused_with_the_fix(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--only", "11"], capture_output=True, text=True, env=env, cwd=PROJECT_ROOT)
    assert proc.returncode == 2 and "item numbers are 1-10" in proc.stderr


def test_scale_day_quick_runs_every_mode_and_all_publish_the_same_files(tmp_path):
    """`python -m benchmarks.scale_day --quick`: the day's models in process and on 2 Celery workers (real
    redis-server and `billing worker` processes), at smoke size: every figure is measured and both modes
    publish the same model files (the other modes, without Dagster and on 1 worker, run the same code)."""
    import shutil

    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed (apt-get install -y --no-install-recommends redis-server); CI installs it")
    pytest.importorskip("dagster_celery")
    result = tmp_path / "scale.json"
    proc = _benchmark("benchmarks.scale_day", "--quick", "--modes", "in_process,celery_2", "--out", str(tmp_path / "out"), "--json", str(result))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    doc = json.loads(result.read_text())
    summary = doc["summary"]
    assert summary["identical_outputs"] == {"standard": True, "big": True}
    assert {(r["mode"], r["day"]) for r in doc["rows"]} == {(m, d) for m in ("in_process", "celery_2") for d in ("standard", "big")}
    s = summary["celery_2"]
    assert s["worker_peak_pss_mb"] > 0 and s["samples_per_s_per_worker"] > 0 and s["cpu_vs_in_process"], s
    assert doc["days"]["big"]["samples"] > 5 * doc["days"]["standard"]["samples"]
