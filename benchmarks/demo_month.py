"""`python -m benchmarks.demo_month`: the demo month (`billing demo`) of this tree and of a reference commit, side by side (item 9).

Target: `make demo` (a simulated month for the 50 seeded customers at a 60 s scrape interval,
every asset in process, then the reports and the Stripe dry-run) in under 20 s on this 2-core machine.

Each tree runs `billing demo --month M` in its own process with a fresh BILLING_DATA_DIR and
DAGSTER_HOME (under --out): this tree, and the reference commit (default ``main``, ``--ref``)
unpacked with `git archive` into <out>/demo-ref-<commit>/ (kept, so its compiled fast path is
cached there). The two demos run one after the other in the same benchmark run, so they share
the machine's load, each after an untimed small demo of its tree (1 customer, hourly samples)
that compiles and caches its fast path and its modules' bytecode (under <out>/pycache, also where
PYTHONDONTWRITEBYTECODE is set). Measured: wall seconds, CPU seconds (the demo process and its children),
the sum of the step times of its Dagster runs (from their event logs) per asset, and the rest
(imports, definitions, run overhead between steps, the demo's own post-steps).

Correctness (item 9 holds only if it is true): every Parquet file of both data dirs has the
same schema and rows (NaN equal to NaN), and every invoice JSON file has the same bytes but
for its code_version (the reference tree, unpacked by `git archive`, has no git metadata). The
Stripe outbox (it records when each meter event was handed to the dry-run sender) is compared
without its time columns.

`figures()` (for `python -m benchmarks`): full = the demo's own sizes (50 customers, 60 s);
quick = 10 customers at 300 s (the same 31 days of runs, smaller days).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, date, datetime
from pathlib import Path

from benchmarks.figures import DEFAULT_OUT, Figure, scratch
from billing_dags.core import calendar
from billing_dags.core.settings import PROJECT_ROOT

FULL = {"customers": 50, "interval_s": 60}
QUICK = {"customers": 10, "interval_s": 300}
TARGET_S = 20.0
#: outbox columns that record when the dry-run sender handled an event (differ run to run)
OUTBOX_TIME_COLUMNS = ("sent_at", "last_attempt_at", "acknowledged_at", "updated_at", "created_at")


def _children_cpu() -> float:
    """CPU seconds (user + system) of this process's waited-for children."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def last_complete_month(today: date | None = None) -> str:
    return calendar.last_complete_month(today or datetime.now(UTC).date()).strftime("%Y-%m")


def reference_tree(out: Path, ref: str) -> tuple[Path, str]:
    """The tree of commit ``ref`` under ``out`` (unpacked once per commit)."""
    commit = subprocess.run(["git", "rev-parse", ref], cwd=PROJECT_ROOT, check=True, capture_output=True, text=True).stdout.strip()
    tree = out / f"demo-ref-{commit[:12]}"
    if not (tree / ".complete").exists():
        if tree.exists():
            shutil.rmtree(tree)
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", commit], cwd=PROJECT_ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        (tree / ".complete").write_text(commit)
    return tree, commit


def step_seconds(dagster_home: Path) -> dict[str, float]:
    """Seconds per step key summed over every run in ``dagster_home`` (STEP_START to its end)."""
    out: dict[str, float] = {}
    for db in sorted((dagster_home / "history" / "runs").glob("*.db")):
        con = sqlite3.connect(db)
        try:
            rows = con.execute(
                "select step_key, dagster_event_type, timestamp from event_logs where step_key is not null "
                "and dagster_event_type in ('STEP_START', 'STEP_SUCCESS', 'STEP_FAILURE') order by id"
            ).fetchall()
        finally:
            con.close()
        started: dict[str, datetime] = {}
        for key, kind, ts in rows:
            t = datetime.fromisoformat(ts) if isinstance(ts, str) else ts
            if kind == "STEP_START":
                started[key] = t
            elif key in started:
                out[key] = out.get(key, 0.0) + (t - started.pop(key)).total_seconds()
    return out


def run_demo(tree: Path, root: Path, month: str, customers: int, interval_s: int, log=print) -> dict:
    """`billing demo` of ``tree`` in a fresh data dir and DAGSTER_HOME under ``root``."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    data, home = root / "data", root / "home"
    env = {**os.environ, "PYTHONPATH": str(tree), "BILLING_DATA_DIR": str(data), "DAGSTER_HOME": str(home)}
    env.pop("BILLING_SEEDS_DIR", None)
    # bytecode cached as on an installed machine (`make` compiles the packages' bytecode, Python caches the
    # project's on first import): the warm-up writes it under --out, the timed run reads it
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(root.parent / "pycache" / tree.name)
    cmd = [sys.executable, "-m", "billing_dags.cli.main", "demo", "--month", month, "--customers", str(customers), "--interval", str(interval_s)]
    cpu0, t0 = _children_cpu(), time.perf_counter()
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    (root / "demo.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        raise RuntimeError(f"billing demo in {tree} exited {done.returncode}: {(done.stdout + done.stderr)[-2000:]}")
    steps = step_seconds(home)
    log(f"{tree}: {wall:.1f} s wall, {cpu:.1f} s CPU, {sum(steps.values()):.1f} s in steps")
    return {"tree": str(tree), "data": str(data), "seconds": wall, "cpu_s": cpu, "steps": steps}


def _parquet_equal(a: Path, b: Path, drop: tuple[str, ...] = ()) -> bool:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    ta, tb = pq.read_table(a, partitioning=None), pq.read_table(b, partitioning=None)
    ta = ta.drop_columns([c for c in drop if c in ta.column_names])
    tb = tb.drop_columns([c for c in drop if c in tb.column_names])
    if ta.schema != tb.schema or len(ta) != len(tb):
        return False
    for name in ta.column_names:
        x, y = ta[name].combine_chunks(), tb[name].combine_chunks()
        if pa.types.is_floating(x.type):  # NaN equals NaN here: compare the bits and the nulls
            if not (
                x.is_null().equals(y.is_null())
                and np.array_equal(x.fill_null(0).to_numpy(zero_copy_only=False).view(np.int64), y.fill_null(0).to_numpy(zero_copy_only=False).view(np.int64))
            ):
                return False
        elif not x.equals(y):
            return False
    return True


#: invoices record the code version; a tree unpacked by git archive has no git metadata for it
_CODE_VERSION = re.compile(rb'"code_version": "[^"]*"')


def _invoice_bytes(path: Path) -> bytes:
    return _CODE_VERSION.sub(b'"code_version": ""', path.read_bytes())


def compare(a: Path, b: Path) -> dict:
    """Parquet files (schema and rows) and invoice JSON files (bytes) of two data dirs."""
    differ, only = [], []
    files = 0
    pa_files = {p.relative_to(a) for p in a.rglob("*.parquet")} | {p.relative_to(b) for p in b.rglob("*.parquet")}
    json_files = {p.relative_to(a) for p in (a / "invoices").rglob("*.json")} | {p.relative_to(b) for p in (b / "invoices").rglob("*.json")}
    for rel in sorted(pa_files | json_files):
        files += 1
        if not (a / rel).exists() or not (b / rel).exists():
            only.append(str(rel))
            continue
        if rel.suffix == ".json":
            same = _invoice_bytes(a / rel) == _invoice_bytes(b / rel)
        else:
            drop = OUTBOX_TIME_COLUMNS if rel.parts[0] == "outbox" else ()
            same = _parquet_equal(a / rel, b / rel, drop)
        if not same:
            differ.append(str(rel))
    return {"files": files, "differ": differ, "only_in_one": only, "identical": not differ and not only}


def measure(out: Path, customers: int, interval_s: int, ref: str | None = "main", month: str | None = None, log=print) -> dict:
    """``ref`` None: this tree alone, without the untimed warm-up (the smoke run of `--quick`)."""
    out = scratch(out, "demo_month")
    month = month or last_complete_month()
    ref_tree, commit = None, ""
    if ref is not None:
        try:
            ref_tree, commit = reference_tree(out, ref)
        except (subprocess.CalledProcessError, OSError) as e:  # not a git checkout: this tree alone, nothing to compare
            log(f"no reference tree for {ref!r} ({e}); measuring this tree only")
        # untimed first: each tree compiles (and caches) its fast path's code and byte-compiles its modules
        for tree in filter(None, (ref_tree, PROJECT_ROOT)):
            run_demo(tree, out / "warm-up", month, 1, 3600, lambda _: None)
    before = run_demo(ref_tree, out / "before", month, customers, interval_s, log) if ref_tree else None
    after = run_demo(PROJECT_ROOT, out / "after", month, customers, interval_s, log)
    same = compare(Path(before["data"]), Path(after["data"])) if before else {"files": 0, "differ": [], "only_in_one": [], "identical": True}
    return {"ref": ref, "commit": commit, "month": month, "customers": customers, "interval_s": interval_s, "before": before, "after": after, "compare": same}


def report(m: dict, console) -> None:
    from rich.table import Table

    a = m["after"]
    b = m["before"] or {"steps": {}, "seconds": float("nan"), "cpu_s": float("nan")}
    t = Table(title=f"billing demo {m['month']}: {m['customers']} customers at {m['interval_s']} s; before = {m['ref'] or '-'} ({m['commit'][:10]})")
    for col in ("step", "before s", "after s"):
        t.add_column(col, justify="left" if col == "step" else "right")
    keys = sorted(set(b["steps"]) | set(a["steps"]), key=lambda k: -b["steps"].get(k, 0.0))
    for k in keys:
        t.add_row(k, f"{b['steps'].get(k, 0.0):.1f}", f"{a['steps'].get(k, 0.0):.1f}")
    for label, f in (
        ("sum of steps", lambda r: sum(r["steps"].values())),
        ("outside steps", lambda r: r["seconds"] - sum(r["steps"].values())),
        ("wall", lambda r: r["seconds"]),
        ("CPU", lambda r: r["cpu_s"]),
    ):
        t.add_row(f"[bold]{label}", f"{f(b):.1f}", f"{f(a):.1f}")
    console.print(t)
    c = m["compare"]
    console.print(
        f"data dirs: {c['files']} files compared, {'identical' if c['identical'] else 'DIFFERENT'}"
        + (f"; differ: {c['differ'][:10]}; only in one: {c['only_in_one'][:10]}" if not c["identical"] else "")
    )


def figure(m: dict, quick: bool) -> Figure:
    b, a, c = m["before"], m["after"], m["compare"]
    size = f"{m['customers']} customers at {m['interval_s']} s"
    met = None if quick else (a["seconds"] < TARGET_S and c["identical"])
    if not c["identical"]:
        met = False

    def shown(r: dict) -> str:
        return f"{r['seconds']:.1f} s ({r['cpu_s']:.0f} s CPU, {sum(r['steps'].values()):.0f} s steps)"

    return Figure(
        9,
        f"billing demo, a month ({size}): wall (CPU, in steps); outputs {'identical' if c['identical'] else 'DIFFER'} ({c['files']} files)",
        shown(a),
        f"{m['ref']} {m['commit'][:10]}: {shown(b)}" if b else "-",
        f"{a['seconds'] / b['seconds']:.2f}" if b else "-",
        f"< {TARGET_S:.0f} s (50 customers, 60 s)",
        met,
    )


def figures(quick: bool, out: Path, console) -> list[Figure]:
    size = QUICK if quick else FULL
    # the smoke run times this tree alone: the side-by-side comparison is four demo months
    m = measure(out, size["customers"], size["interval_s"], ref=None if quick else "main", log=console.print)
    report(m, console)
    return [figure(m, quick)]


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.demo_month", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--customers", type=int, default=FULL["customers"], help="customers simulated (default 50, the demo's)")
    ap.add_argument("--interval", type=int, default=FULL["interval_s"], help="scrape interval in seconds (default 60)")
    ap.add_argument("--month", help="YYYY-MM (default: the last complete month, as the demo)")
    ap.add_argument("--ref", default="main", help="the commit to compare with (default main)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR", help="scratch folder (default benchmarks/out)")
    ap.add_argument("--json", type=Path, help="also write the measurements to this JSON file")
    args = ap.parse_args()
    from rich.console import Console

    console = Console(width=130)
    m = measure(args.out, args.customers, args.interval, args.ref, args.month, log=console.print)
    report(m, console)
    if args.json:
        args.json.write_text(json.dumps(m, indent=2))
    if not m["compare"]["identical"]:
        raise SystemExit("the demo's outputs differ from the reference's")


if __name__ == "__main__":
    main()
