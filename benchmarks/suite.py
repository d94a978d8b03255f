"""`python -m benchmarks` (`make bench`, `make bench-quick`): every performance and correctness figure in one table.

Runs each benchmark module's ``figures()`` in turn — the daily models against a plain DuckDB
scan (items 1, 2, 3, 8), the monthly stage (4), our remote-write receiver against Prometheus's
own (5), the Prometheus pull against Prometheus's evaluation time (6), a 30-day backfill two
partitions at a time against one at a time (7), `billing demo` against a reference commit (9), a month of
Stripe meter events sent concurrently and through the v2 stream against the sequential sender (10) — and prints one table: figure, our value, the
side-by-side reference measured in the same run, the ratio, the target and whether it holds.

--full (what `make bench` runs, by hand, about 15-20 minutes with cached workloads) uses the
standard workloads; the default quick mode (`make bench-quick`, a smoke run for CI, a few
minutes) runs every benchmark at a small size, so only the correctness figures (exactness, raw
bytes, byte-identical parallel partitions) are meaningful there. Workloads are cached under
--out (default benchmarks/out, gitignored).

Exit status: 1 when a benchmark fails to run or a correctness figure does not hold, and in
--full mode also when any target is missed; 0 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from benchmarks.figures import DEFAULT_OUT, Figure, markdown, table

#: module -> the items it measures (the numbers of the figures in benchmarks/README.md)
MODULES = {
    "daily": (1, 2, 3, 8),
    "monthly": (4,),
    "receiver_vs_prometheus": (5,),
    "prometheus_pull": (6,),
    "backfill": (7,),
    "demo_month": (9,),
    "stripe_send": (10,),
}
#: every item number
ITEMS = sorted({i for covers in MODULES.values() for i in covers})
#: figures about correctness, not speed: they must hold at any size, quick mode included
CORRECTNESS = {2, 3, 7, 9, 10}


def machine() -> str:
    mem = ""
    try:
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:"))
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    load = ", load {:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    return f"{platform.node() or 'this machine'}: {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}{load}"


def run(quick: bool, out: Path, items: set[int], console: Console) -> tuple[list[Figure], list[str]]:
    figures: list[Figure] = []
    errors: list[str] = []
    for name, covers in MODULES.items():
        if not items & set(covers):
            continue
        console.rule(f"[bold]{name}[/] (items {', '.join(map(str, covers))})")
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.{name}")
            got = [f for f in module.figures(quick, out, console) if f.item in items]
        except (Exception, SystemExit) as e:  # one failing benchmark must not hide the others' figures
            console.print(traceback.format_exc()[-3000:])
            errors.append(f"{name}: {type(e).__name__}: {e}")
            got = [Figure(i, f"benchmarks.{name}", f"failed: {type(e).__name__}: {str(e)[:200]}", "-", "-", "-", False) for i in covers if i in items]
        console.print(f"{name}: {time.perf_counter() - t0:.0f} s")
        figures.extend(got)
    return figures, errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="the standard workloads (by hand; `make bench`)")
    mode.add_argument("--quick", action="store_true", help="small sizes, a smoke run (the default; `make bench-quick`)")
    ap.add_argument("--only", help=f"comma-separated item numbers, e.g. --only 1,5 (default: all of {ITEMS[0]}-{ITEMS[-1]})")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"cache and scratch folder (default {DEFAULT_OUT})")
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    ap.add_argument("--markdown", type=Path, help="also write the table as Markdown (for the README) to this file")
    args = ap.parse_args(argv)
    items = set(ITEMS)
    if args.only:
        try:
            items = {int(x) for x in args.only.split(",") if x.strip()}
        except ValueError:
            ap.error(f"--only {args.only!r}: give item numbers {ITEMS[0]}-{ITEMS[-1]} separated by commas, e.g. --only 1,5")
        if not items or not items <= set(ITEMS):
            ap.error(f"--only {args.only!r}: item numbers are {ITEMS[0]}-{ITEMS[-1]}")
    quick = not args.full
    console = Console(width=160)
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    figures, errors = run(quick, args.out, items, console)
    mode_name = "quick (smoke sizes)" if quick else "full (standard workloads)"
    title = f"billing_dags benchmarks, {mode_name}: {started:%Y-%m-%d %H:%M} UTC, {time.perf_counter() - t0:.0f} s; {machine()}"
    console.print(table(figures, title))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "mode": "quick" if quick else "full",
                    "started": started.isoformat(),
                    "machine": machine(),
                    "figures": [f.to_json() for f in figures],
                    "errors": errors,
                },
                indent=2,
            )
        )
    if args.markdown:
        args.markdown.write_text(f"{title}\n\n{markdown(figures)}\n")
    failed = [f for f in figures if f.met is False and (f.item in CORRECTNESS or not quick)]
    for e in errors:
        console.print(f"[red]error[/]: {e}")
    for f in failed:
        console.print(f"[red]does not hold[/]: item {f.item}: {f.figure}: {f.ours} (target {f.target})")
    return 1 if errors or failed else 0
