"""`python -m benchmarks.monthly`: the monthly stage for 10,000 customers (item 4).

Target: usage by month -> rated usage -> invoice lines -> invoice files and the Stripe outbox for
10,000 customers in under 30 s and 1 GB.

Workload (cached under <out>/monthly-<N>c-<month>/, ``--out`` default benchmarks/out; a second run
with the same parameters reuses it): a seeds folder (a copy of seeds/ with customers.csv and
subscriptions.csv for N customers spread evenly over the five set-ups, unique label values and
Stripe ids, one customer in 20 changing plan mid-month and one in 50 starting mid-month;
credits.csv empty unless --grants, customer_billing.csv empty), its validated seed snapshots (`write_seed_snapshots`), and
synthetic `fct_usage_by_day` partitions for every day of the month (the model's exact schema,
written with `sqlmodels.write_partition` as the model writes them): one row per customer, meter and
dimension of its set-up and day (proxy 5, IoT 9, testbed 5, LLM 2 meters x 4 models, Kubernetes 5
-- 6.4 rows per customer-day on average).

The stage runs in one fresh process (peak RSS of the whole stage): the five monthly SQL models
with `run_model`, the invoices as the `invoices` asset builds them (lines, seed snapshots,
credits, manifest, held customers, `build_invoices`, `write_invoice_files`, `settle_drafts`, credits ledger) --
once as drafts on the 1st and once finalized on the 4th (numbers assigned, files rewritten) --
and the Stripe outbox of one day (`build_outbox` + `write_outbox`). Invoice PDFs are not written
(`BILLING_INVOICE_PDF=0`): laying out one takes about 0.3 s of CPU, apart from the figures measured here. Outputs of earlier runs are
removed first, so every run starts from the same state. The best total of --repeat runs is kept.

Reference (the target names none): after the stage, in the same process and after its peak RSS is
read, a plain DuckDB scan of the month's `fct_usage_by_day` partitions (count and sums of usage,
gauge integral and samples over every row; best of 3) -- the cost of reading the stage's input
once, so the ratio says how much the stage costs beyond that.

`figures()` (for `python -m benchmarks`): full = 10,000 customers, best of 2; quick = 100
customers, one run (the target is defined for 10,000 customers, so quick reports without a
verdict).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from benchmarks.figures import DEFAULT_OUT, Figure
from benchmarks.proc import peak_rss_bytes
from billing_dags.core.calendar import next_month
from billing_dags.core.settings import PROJECT_ROOT, resolve_paths

FULL = {"customers": 10_000, "repeat": 2}
QUICK = {"customers": 100, "repeat": 1}
TARGET_S, TARGET_BYTES = 30.0, 2**30
SETUPS = {  # set-up -> (customer id prefix, plans to rotate through)
    "proxy": ("mp", ["proxy_per_gb", "proxy_per_share", "proxy_hybrid", "proxy_basic", "proxy_pro", "proxy_tiered"]),
    "iot": ("iot", ["iot_starter", "iot_professional"]),
    "testbed": ("tb", ["testbed_basic", "testbed_professional", "testbed_enterprise"]),
    "llm": ("llm", ["llm_payg"]),
    "k8s": ("k8s", ["k8s_starter", "k8s_professional", "k8s_enterprise"]),
}
LLM_MODELS = ["gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet", "llama-3.1-70b"]
MONTHLY_MODELS = [
    "fct_usage_by_month",
    "dim_subscription_periods_by_month",
    "fct_usage_by_subscription_period",
    "fct_billable_usage_by_subscription_period",
    "fct_rated_usage_by_subscription_period",
    "fct_invoice_lines",
]
DAY_MS = 86_400_000


# --------------------------------------------------------------------------- workload


def write_seeds(seeds_dir: Path, n_customers: int, month: date, grants: int) -> list[tuple[str, str]]:
    """The seeds folder; returns [(customer_id, setup)]."""
    if seeds_dir.exists():
        shutil.rmtree(seeds_dir)
    shutil.copytree(PROJECT_ROOT / "seeds", seeds_dir)
    setups = list(SETUPS)
    customers, subs = [], []
    mid = month + timedelta(days=15)
    late = month + timedelta(days=9)
    for i in range(n_customers):
        setup = setups[i % len(setups)]
        prefix, plans = SETUPS[setup]
        cid = f"{prefix}-b{i:05d}"
        customers.append((cid, setup))
        plan = plans[(i // len(setups)) % len(plans)]
        with_label = f"{setup}-bench-{i:05d}"
        customers_row = [cid, f"Bench {setup} {i:05d}", setup, with_label, "usd", f"cus_bench{i:05d}", "prometheus"]
        customers[-1] = (cid, setup, customers_row)
        if i % 20 == 7 and len(plans) > 1:  # plan change mid-month: two periods, prorated fees
            subs.append([cid, plan, "2025-01-01", mid.isoformat()])
            subs.append([cid, plans[(plans.index(plan) + 1) % len(plans)], mid.isoformat(), ""])
        elif i % 50 == 13:  # starts mid-month
            subs.append([cid, plan, late.isoformat(), ""])
        else:
            subs.append([cid, plan, "2025-01-01", ""])
    with open(seeds_dir / "customers.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["customer_id", "name", "setup", "label_value", "currency", "stripe_customer_id", "usage_source"])
        w.writerows(c[2] for c in customers)
    with open(seeds_dir / "subscriptions.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["customer_id", "plan_id", "start_date", "end_date"])
        w.writerows(subs)
    with open(seeds_dir / "customer_billing.csv", "w", newline="") as f:  # billed under their names on the issuer's terms
        csv.writer(f, lineterminator="\n").writerow(["customer_id", "legal_name", "address", "country", "tax_id", "email", "payment_terms_days", "tax_code"])
    with open(seeds_dir / "report_tokens.csv", "w", newline="") as f:  # the demo token names a demo customer
        csv.writer(f, lineterminator="\n").writerow(["customer_id", "token_sha256", "description"])
    with open(seeds_dir / "credits.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["grant_id", "customer_id", "currency", "amount", "granted_on", "expires_on", "description"])
        step = max(1, n_customers // grants) if grants else 0
        for k in range(grants):
            cid = customers[(k * step) % n_customers][0]
            w.writerow([f"{cid}-g{k}", cid, "usd", "50.00", (month - timedelta(days=60)).isoformat(), "", "Benchmark credit"])
    return [(c[0], c[1]) for c in customers]


def meter_rows(seeds_dir: Path) -> dict[str, list[tuple[str, str, str]]]:
    """set-up -> [(meter_id, dimension, kind)] of the meters the set-up exports."""
    prefixes = {"proxy": "proxy_", "iot": "iot_", "testbed": "testbed_", "llm": "llm_", "k8s": "k8s_"}
    with open(seeds_dir / "meters.csv") as f:
        meters = list(csv.DictReader(f))
    out: dict[str, list[tuple[str, str, str]]] = {}
    for setup, prefix in prefixes.items():
        rows = []
        for m in meters:
            if m["meter_id"].startswith(prefix):
                dims = LLM_MODELS if m["dimension_label"] else [""]
                rows += [(m["meter_id"], d, m["kind"]) for d in dims]
        out[setup] = rows
    return out


def usage_day(day: date, customers: list[tuple[str, str]], meters: dict, rng: np.random.Generator) -> pa.Table:
    """One synthetic fct_usage_by_day partition (the model's columns and types)."""
    cid, mid, dim, kind = [], [], [], []
    for c, setup in customers:
        for m, d, k in meters[setup]:
            cid.append(c)
            mid.append(m)
            dim.append(d)
            kind.append(k)
    n = len(cid)
    is_gauge = np.array([k == "gauge" for k in kind])
    series = rng.integers(1, 5, n)
    counter = rng.integers(1_000, 20_000_000_000, n)  # bytes, shares, tokens, ms ... per day
    peak = rng.integers(1, 50_000_000_000, n)  # a peak below 50 GB keeps peak * day-ms in int64
    covered = np.full(n, DAY_MS, dtype=np.int64) * series
    integral = (peak // 2) * DAY_MS // 1  # peak/2 held all day
    dec = pa.decimal128(38, 9)

    def decimal(values: np.ndarray, mask: np.ndarray) -> pa.Array:
        return pc.cast(pa.array(values, type=pa.int64(), mask=mask), dec)

    return pa.table(
        {
            "day": pa.array([day] * n, pa.date32()),
            "customer_id": pa.array(cid, pa.string()),
            "meter_id": pa.array(mid, pa.string()),
            "dimension": pa.array(dim, pa.string()),
            "kind": pa.array(kind, pa.string()),
            "usage": decimal(counter, is_gauge),
            "gauge_integral": decimal(integral, ~is_gauge),
            "gauge_covered_ms": pa.array(covered, pa.int64(), mask=~is_gauge),
            "gauge_peak": decimal(peak, ~is_gauge),
            "series": pa.array(series, pa.int64()),
            "samples": pa.array(series * 1440, pa.int64()),
            "dropped_samples": pa.array(np.zeros(n, dtype=np.int64)),
            "resets": pa.array((rng.random(n) < 0.01).astype(np.int64)),
            "reappeared_series": pa.array(np.zeros(n, dtype=np.int64)),
            "max_gap_ms": pa.array(np.full(n, 60_000, dtype=np.int64)),
            "events": pa.array(np.zeros(n, dtype=np.int64)),
            "duplicate_conflicts": pa.array(np.zeros(n, dtype=np.int64)),
            "gauge_held_ms": pa.array(np.where(is_gauge, 86_400_000, 0), pa.int64(), mask=~is_gauge),
        }
    )


def prepare(root: Path, n_customers: int, month: date, grants: int, log=print) -> tuple[Path, Path, int]:
    from billing_dags.defs.seeds.assets import write_seed_snapshots
    from billing_dags.models.sqlmodels import Window, load_project, write_partition

    data_dir, seeds_dir = root / "data", root / "seeds"
    marker = root / "ready.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        if info == {"customers": n_customers, "month": month.isoformat(), "grants": grants}:
            return data_dir, seeds_dir, 0
    t0 = time.perf_counter()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    customers = write_seeds(seeds_dir, n_customers, month, grants)
    paths = resolve_paths(data_dir, seeds_dir)
    write_seed_snapshots(paths)
    t1 = time.perf_counter()
    model = load_project().models["fct_usage_by_day"]
    meters = meter_rows(seeds_dir)
    rng = np.random.default_rng(42)
    rows = 0
    day = month
    while day < next_month(month):
        table = usage_day(day, customers, meters, rng)
        write_partition(paths, model, Window(day, day + timedelta(days=1)), table)
        rows += table.num_rows
        day += timedelta(days=1)
    log(
        f"workload: seeds for {n_customers:,} customers validated and snapshotted in {t1 - t0:.1f}s; "
        f"{rows:,} fct_usage_by_day rows written in {time.perf_counter() - t1:.1f}s"
    )
    marker.write_text(json.dumps({"customers": n_customers, "month": month.isoformat(), "grants": grants}))
    return data_dir, seeds_dir, rows


# --------------------------------------------------------------------------- the stage (own process)


def stage(data_dir: Path, seeds_dir: Path, month: date) -> dict:
    import pyarrow.parquet as pq

    from billing_dags.billing import build, settlement, store
    from billing_dags.billing import credits as cr
    from billing_dags.billing.manifest import code_version, invoice_manifest
    from billing_dags.models.sqlmodels import Window, load_project, partition_file, run_model, seed_snapshot_path
    from billing_dags.operations.flags import unacknowledged_critical
    from billing_dags.seeds.catalog import load_grants
    from billing_dags.stripe import outbox as ob

    paths = resolve_paths(data_dir, seeds_dir)
    for model in MONTHLY_MODELS:  # start from the same state every run
        shutil.rmtree(paths.models / model, ignore_errors=True)
    shutil.rmtree(paths.invoices, ignore_errors=True)
    shutil.rmtree(paths.outbox, ignore_errors=True)
    rss0 = peak_rss_bytes()
    project = load_project()
    window = Window(month, next_month(month))
    steps: list[dict] = []
    for name in MONTHLY_MODELS:
        t0 = time.perf_counter()
        r = run_model(paths, name, window, project=project)
        steps.append({"step": name, "seconds": time.perf_counter() - t0, "rows": r.rows})

    def invoices_at(now: datetime) -> dict:
        # the call sequence of billing_dags/defs/invoicing/assets.py::invoices
        lines = pq.read_table(partition_file(paths, project.models["fct_invoice_lines"], window)).to_pylist()
        seeds = {n: pq.read_table(seed_snapshot_path(paths, n)).to_pylist() for n in ("customers", "plans", "currencies")}
        grants = load_grants(paths.seeds_dir, seeds["customers"], seeds["currencies"])
        manifest = invoice_manifest(paths, window.start, paths.seeds_dir, code_version())
        held = dict.fromkeys(unacknowledged_critical(paths, window.start), "held")
        t_build = time.perf_counter()
        docs = build.build_invoices(
            lines, seeds["customers"], seeds["plans"], seeds["currencies"], window.start, now=now, manifest=manifest, paths=paths, grants=grants, held=held
        )
        t_write = time.perf_counter()
        written = store.write_invoice_files(paths, docs)
        settlement.settle_drafts(paths, window.start, docs, grants)
        cr.write_ledger(paths, grants, {c["currency"]: int(c["minor_unit_exponent"]) for c in seeds["currencies"]})
        return {
            "invoices": len(docs),
            "lines": len(lines),
            "by_status": written["by_status"],
            "files_written": len(written["written"]),
            "build_s": t_write - t_build,
            "write_s": time.perf_counter() - t_write,
        }

    for label, now in [
        ("invoices: drafts (run on the 1st)", datetime.combine(window.end, datetime.min.time(), UTC) + timedelta(minutes=30)),
        ("invoices: finalized (run on the 4th)", datetime.combine(window.end + timedelta(days=3), datetime.min.time(), UTC) + timedelta(minutes=30)),
    ]:
        t0 = time.perf_counter()
        result = invoices_at(now)
        steps.append({"step": label, "seconds": time.perf_counter() - t0, "rows": result["invoices"], **result})

    day = window.end - timedelta(days=1)
    t0 = time.perf_counter()
    usage = pq.read_table(partition_file(paths, project.models["fct_usage_by_day"], Window(day, window.end)))
    customers = pq.read_table(seed_snapshot_path(paths, "customers")).to_pylist()
    seeds = {name: pq.read_table(seed_snapshot_path(paths, name)) for name in ("meters", "units")}
    quantities = ob.day_quantities(day, usage, seeds)  # as the stripe_outbox asset builds it
    rows = ob.build_outbox(day, quantities, customers, seeds["meters"].to_pylist(), ob.read_outbox(paths, day))
    ob.write_outbox(paths, day, rows)
    steps.append({"step": f"Stripe outbox of one day ({day})", "seconds": time.perf_counter() - t0, "rows": len(rows)})
    # the stage as the target counts it: models, invoice files (the run on the 1st) and the outbox; the run on the
    # 4th that finalizes the same invoices is shown on its own row, outside the total
    total = sum(s["seconds"] for s in steps if not s["step"].startswith("invoices: finalized"))
    invoice_bytes = sum(f.stat().st_size for f in paths.invoices.rglob("*") if f.is_file())
    peak = peak_rss_bytes()  # before the reference scan, which is not part of the stage
    scan_s, scan_rows = scan_month(paths, project, window)
    return {
        "steps": steps,
        "seconds": total,
        "peak_rss_bytes": peak,
        "rss_after_imports_bytes": rss0,
        "invoice_bytes": invoice_bytes,
        "scan_seconds": scan_s,
        "scan_rows": scan_rows,
    }


def scan_month(paths, project, window, repeat: int = 3) -> tuple[float, int]:
    """The reference: best wall of a plain DuckDB scan of the month's fct_usage_by_day partitions."""
    from billing_dags.models.sqlmodels import connect, model_files

    files = [
        f for f in model_files(paths, project.models["fct_usage_by_day"]) if window.start <= date.fromisoformat(f.parent.name.removeprefix("day=")) < window.end
    ]
    listing = ", ".join("'" + str(f).replace("'", "''") + "'" for f in files)
    sql = f"select count(*), sum(usage), sum(gauge_integral), sum(samples) from read_parquet([{listing}])"
    con = connect()
    try:
        best, rows = float("inf"), 0
        for _ in range(repeat):
            t0 = time.perf_counter()
            rows = con.execute(sql).fetchone()[0]
            best = min(best, time.perf_counter() - t0)
    finally:
        con.close()
    return best, rows


def run_stage(data_dir: Path, seeds_dir: Path, month: date) -> dict:
    """One stage run in a fresh process (run in the workload's folder, so nothing lands in the repository)."""
    # invoice PDFs (about 0.3 s of CPU each, see docs/invoices.md) are left out of the stage: it measures the figures' path
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "BILLING_INVOICE_PDF": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.monthly", "--stage", str(data_dir), str(seeds_dir), "--month", month.strftime("%Y-%m")],
        capture_output=True,
        text=True,
        env=env,
        cwd=data_dir.parent,
    )
    if proc.returncode:
        raise SystemExit(f"monthly stage failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- measurement, table, figure


def measure(out: Path, n_customers: int, month: date, grants: int = 0, repeat: int = 2, log=print) -> dict:
    """Prepare (or reuse) the workload under ``out`` and run the stage ``repeat`` times; the numbers."""
    root = Path(out).resolve() / (f"monthly-{n_customers}c-{month.strftime('%Y-%m')}" + (f"-{grants}g" if grants else ""))
    data_dir, seeds_dir, _ = prepare(root, n_customers, month, grants, log=log)
    runs = []
    for i in range(repeat):
        log(f"  monthly stage, {n_customers:,} customers, run {i + 1}/{repeat} ...")
        runs.append(run_stage(data_dir, seeds_dir, month))
    best = min(runs, key=lambda r: r["seconds"])
    return {
        "customers": n_customers,
        "month": month.strftime("%Y-%m"),
        "repeat": repeat,
        "runs": runs,
        "best": best,
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
        "scan_seconds": min(r["scan_seconds"] for r in runs),
        "usage_rows": sum(s["rows"] for s in best["steps"] if s["step"] == "fct_usage_by_month"),
    }


def report(m: dict, console) -> None:
    """The detailed table of ``python -m benchmarks.monthly``."""
    from rich.table import Table

    best, peak = m["best"], m["peak_rss_bytes"]
    t = Table(title=f"monthly stage, {m['customers']:,} customers, {m['month']} (best of {m['repeat']} runs, each in a fresh process)")
    for col in ("step", "wall (s)", "share", "rows out"):
        t.add_column(col, justify="left" if col == "step" else "right")
    for s in best["steps"]:
        if not s["step"].startswith("invoices: finalized"):
            t.add_row(s["step"], f"{s['seconds']:.2f}", f"{s['seconds'] / best['seconds']:.0%}", f"{s['rows']:,}")
    t.add_row("monthly stage (models + invoice files + outbox)", f"{best['seconds']:.2f}", "100%", "")
    for s in best["steps"]:
        if s["step"].startswith("invoices: finalized"):
            t.add_row(f"(not in the total) {s['step']}", f"{s['seconds']:.2f}", "", f"{s['rows']:,}")
    t.add_row("(reference) DuckDB scan of the month's fct_usage_by_day", f"{m['scan_seconds']:.2f}", "", f"{best['scan_rows']:,} read")
    console.print(t)
    for s in best["steps"]:
        if s["step"].startswith("invoices"):
            console.print(f"  {s['step']}: build {s['build_s']:.2f}s, write {s['write_s']:.2f}s ({s['files_written']:,} files), {s['by_status']}")
    walls = ", ".join(f"{r['seconds']:.2f}s" for r in m["runs"])
    console.print(
        f"all runs: {walls}; peak RSS of the stage process (both invoice runs included) {peak / 2**20:,.0f} MB "
        f"({best['rss_after_imports_bytes'] / 2**20:.0f} MB after imports); invoice files {best['invoice_bytes'] / 2**20:.0f} MB"
    )
    console.print(
        f"target (30 s, 1 GB): wall {'met' if best['seconds'] < TARGET_S else 'MISSED'} ({best['seconds'] / TARGET_S:.2f} of the budget), "
        f"memory {'met' if peak < TARGET_BYTES else 'MISSED'} ({peak / TARGET_BYTES:.2f} of the budget); "
        f"{m['usage_rows']:,} customer-meter-month rows; {best['seconds'] / m['scan_seconds']:.0f}x the scan"
    )


def figure(m: dict, quick: bool) -> Figure:
    """Item 4. ``met``: best wall < 30 s and peak RSS < 1 GB; None in quick mode (the target is for 10,000 customers)."""
    best, peak = m["best"]["seconds"], m["peak_rss_bytes"]
    per_customer = m["usage_rows"] / m["customers"]
    return Figure(
        item=4,
        figure=(
            f"monthly stage (usage by month -> rated usage -> invoice lines -> invoice files and outbox), "
            f"{m['customers']:,} customers x {per_customer:.1f} meter rows, {m['month']}" + (", quick size" if quick else f", best of {m['repeat']}")
        ),
        ours=f"{best:.2f} s ({best / TARGET_S:.2f} of 30 s), peak {peak / 2**20:,.0f} MB ({peak / TARGET_BYTES:.2f} of 1 GB)",
        reference=f"{m['scan_seconds']:.3f} s (DuckDB scan of the month's fct_usage_by_day, {m['best']['scan_rows']:,} rows)",
        ratio=f"{best / m['scan_seconds']:.0f}x",
        target="< 30 s and < 1 GB (10,000 customers)",
        met=None if quick else (best < TARGET_S and peak < TARGET_BYTES),
    )


def figures(quick: bool, out: Path, console) -> list[Figure]:
    size = QUICK if quick else FULL
    m = measure(out, size["customers"], date(2026, 10, 1), repeat=size["repeat"], log=console.print)
    return [figure(m, quick)]


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.monthly", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--customers", type=int, default=FULL["customers"])
    ap.add_argument("--month", default="2026-10", help="YYYY-MM (default 2026-10)")
    ap.add_argument("--grants", type=int, default=0, help="prepaid credit grants in credits.csv (default 0: header only)")
    ap.add_argument("--repeat", type=int, default=FULL["repeat"], help="stage runs, each in a fresh process (default 2; best total reported)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR", help="folder for the cached workload (default benchmarks/out)")
    ap.add_argument("--stage", nargs=2, metavar=("DATA_DIR", "SEEDS_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    month = date.fromisoformat(args.month + "-01")
    if args.stage:
        print(json.dumps(stage(Path(args.stage[0]), Path(args.stage[1]), month), default=str))
        return

    from rich.console import Console

    console = Console(width=130)
    report(measure(args.out, args.customers, month, args.grants, args.repeat, log=console.print), console)


if __name__ == "__main__":
    main()
