"""`python -m benchmarks.demo`: `billing demo` end to end, for one or more source trees side by side.

Each tree's `billing demo` (default: last complete month, every seeded customer, 60 s scrapes) runs
in a fresh process with a fresh BILLING_DATA_DIR and DAGSTER_HOME (temp dirs), one tree after the
other and alternated over --repeat rounds, so trees see the same machine load. Printed per run:
wall seconds, CPU seconds of the process (user + system; the figure to trust on a shared machine),
the Dagster runs it recorded, and the seconds spent inside them (from run start/end records) and
outside them.

Example, main against a branch: `python -m benchmarks.demo --tree /work/main --tree .`
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN_STATS = """
import json, dagster as dg
i = dg.DagsterInstance.get()
runs = i.get_runs()
inside = 0.0
for r in runs:
    rec = i.get_run_record_by_id(r.run_id)
    if rec.start_time and rec.end_time:
        inside += rec.end_time - rec.start_time
print(json.dumps({"runs": len(runs), "inside_runs_s": round(inside, 1)}))
"""


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def demo(tree: Path, extra: list[str]) -> dict:
    """One `billing demo` of ``tree``'s code in fresh data and instance dirs."""
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        home = Path(tmp) / "dagster_home"
        home.mkdir()
        env = {
            **os.environ,
            "PYTHONPATH": str(tree),
            "BILLING_DATA_DIR": str(Path(tmp) / "data"),
            "DAGSTER_HOME": str(home),
        }
        for var in ("PROMETHEUS_URL", "STRIPE_API_KEY", "BILLING_USAGE_EVENTS_DSN"):
            env.pop(var, None)
        cpu0, t0 = _children_cpu(), time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "billing_dags.cli", "demo", *extra], cwd=tree, env=env, capture_output=True, text=True)
        wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
        if r.returncode != 0:
            raise SystemExit(f"billing demo in {tree} failed ({r.returncode}):\n{r.stderr[-3000:]}")
        stats = json.loads(
            subprocess.run([sys.executable, "-c", RUN_STATS], env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        )
    return {"tree": str(tree), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), **stats, "outside_runs_s": round(wall - stats["inside_runs_s"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", type=Path, help="a source tree (its billing_dags is run); repeat to compare (default: .)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds; the trees alternate within each round (default 1)")
    ap.add_argument("demo_args", nargs="*", help="arguments for `billing demo` after --, e.g. -- --customers 10")
    args = ap.parse_args()
    trees = [t.resolve() for t in (args.tree or [Path(".")])]
    rows = []
    for round_ in range(args.repeat):
        for tree in trees if round_ % 2 == 0 else reversed(trees):
            row = demo(tree, args.demo_args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'tree':<40} {'wall s':>8} {'cpu s':>8} {'runs':>5} {'in runs s':>10} {'outside s':>10}")
    for tree in trees:
        best = min((r for r in rows if r["tree"] == str(tree)), key=lambda r: r["wall_s"])
        print(f"{str(tree):<40} {best['wall_s']:>8} {best['cpu_s']:>8} {best['runs']:>5} {best['inside_runs_s']:>10} {best['outside_runs_s']:>10}")


if __name__ == "__main__":
    main()
