"""`python -m benchmarks.instance`: the daily assets through a real Dagster instance, as operators run them
from the UI: dagster-webserver + dagster-daemon (tests/servers.py `DagsterServer`), DAGSTER_HOME and
the warehouse in a fresh folder under --out, the project's dagster.yaml (run queue) and workspace.yaml.

Measured (simulated usage, PROMETHEUS_URL unset; the seeds' customers, or the first --customers):
  1. one day through the daemon: a run of the daily_usage job for one partition launched over GraphQL
     (as the Launchpad or a schedule does), from the launch to SUCCESS; split into the wait before the
     run's process started (queue, launch) and the run itself (start to end, Dagster's own stamps);
  2. a --days asset backfill of the daily assets (launchPartitionBackfill with an asset selection, what
     "Materialize…" with a partition range launches from the Catalog or Lineage), from the launch to the
     backfill COMPLETED_SUCCESS with every run SUCCESS; the number of runs it made;
  3. the peak memory of the instance during each: the RSS of the webserver, the daemon and every process
     of their process groups (code servers, runs), summed, sampled every 0.25 s (psutil if installed, else
     /proc). Shared pages count once per process, so it is an upper bound, as `ps`/top add it up.
Seeds are materialized first (not timed). Every phase fails loudly if a run fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path

from servers import DagsterServer  # the test harness starts and stops the instance

from benchmarks.figures import DEFAULT_OUT


def rss_bytes(pids: list[int]) -> int:
    """The summed resident memory of ``pids`` (gone ones count 0)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    total = 0
    for pid in pids:
        try:
            if psutil is not None:
                total += psutil.Process(pid).memory_info().rss
            else:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except Exception:  # the process ended between listing and reading
            pass
    return total


class PeakRSS:
    """Samples the instance's summed RSS in a thread while the block runs."""

    def __init__(self, server: DagsterServer, every_s: float = 0.25):
        self.server, self.every_s, self.peak, self.processes = server, every_s, 0, 0
        self._stop = threading.Event()

    def _loop(self):
        while not self._stop.is_set():
            pids = self.server.pids()
            self.peak = max(self.peak, rss_bytes(pids))
            self.processes = max(self.processes, len(pids))
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_times(server: DagsterServer, run_id: str) -> dict:
    run = server.graphql("query($id: ID!) { runOrError(runId: $id) { ... on Run { creationTime startTime endTime } } }", {"id": run_id})["runOrError"]
    return run


def measure(out: Path, days: int, customers: int | None, skip_backfill: bool = False, log=print) -> dict:
    root = Path(out).resolve() / "instance"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    run_config = {"resources": {"simulation": {"config": {"customers": customers}}}} if customers else {}
    result: dict = {"customers": customers or "all (seeds)", "days": days}
    t0 = time.perf_counter()
    with DagsterServer(root) as server:
        result["startup_s"] = time.perf_counter() - t0
        log(f"instance up in {result['startup_s']:.0f} s at {server.url} (logs in {root})")
        run = server.wait_run(server.launch_run("refresh_seeds_and_views"), 900)
        if run["status"] != "SUCCESS":
            raise SystemExit(f"seeds run failed:\n{server.run_errors(run['id'])}")
        keys = server.partition_keys("raw_samples")
        one_day, span = keys[-days - 2], keys[-days - 1 : -1]

        log(f"one day ({one_day}) through the daemon ...")
        with PeakRSS(server) as mem:
            t = time.perf_counter()
            run_id = server.launch_run("daily_usage", partition=one_day, run_config=run_config)
            run = server.wait_run(run_id, 1800)
            wall = time.perf_counter() - t
        if run["status"] != "SUCCESS":
            raise SystemExit(f"the run of {one_day} failed:\n{server.run_errors(run_id)}")
        stamps = run_times(server, run_id)
        result["day"] = {
            "partition": one_day,
            "seconds": wall,
            "run_s": stamps["endTime"] - stamps["startTime"],
            "before_start_s": stamps["startTime"] - stamps["creationTime"],
            "peak_rss_bytes": mem.peak,
            "processes": mem.processes,
        }

        if not skip_backfill:
            log(f"{days}-day asset backfill ({span[0]} .. {span[-1]}) ...")
            assets = server.asset_keys("daily_usage")
            with PeakRSS(server) as mem:
                t = time.perf_counter()
                data = server.graphql(
                    """mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) { __typename
                         ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } ... on Error { message } } }""",
                    {"p": {"assetSelection": assets, "partitionNames": span, "runConfigData": run_config}},
                )["launchPartitionBackfill"]
                if data["__typename"] != "LaunchBackfillSuccess":
                    raise SystemExit(f"launching the backfill failed: {data}")
                backfill = server.wait_backfill(data["backfillId"], 7200)
                wall = time.perf_counter() - t
            bad = [r for r in backfill["runs"] if r["status"] != "SUCCESS"]
            if backfill["status"] != "COMPLETED_SUCCESS" or bad:
                raise SystemExit(f"backfill {backfill['status']}:\n" + "\n".join(server.run_errors(r["id"]) for r in bad))
            result["backfill"] = {
                "first": span[0],
                "last": span[-1],
                "seconds": wall,
                "runs": len(backfill["runs"]),
                "peak_rss_bytes": mem.peak,
                "processes": mem.processes,
            }
    return result


def report(m: dict, console) -> None:
    from rich.table import Table

    t = Table(title=f"The daily assets through dagster-webserver + dagster-daemon ({m['customers']} customers, simulated)")
    for col in ("what", "seconds", "detail", "peak RSS, all processes (MB)", "processes at most"):
        t.add_column(col, justify="left" if col in ("what", "detail") else "right")
    d = m["day"]
    t.add_row(
        f"one day ({d['partition']}), job run via the daemon",
        f"{d['seconds']:.1f}",
        f"run {d['run_s']:.1f} s, queue + launch {d['before_start_s']:.1f} s",
        f"{d['peak_rss_bytes'] / 2**20:.0f}",
        str(d["processes"]),
    )
    if "backfill" in m:
        b = m["backfill"]
        t.add_row(
            f"{m['days']}-day asset backfill ({b['first']} .. {b['last']})",
            f"{b['seconds']:.1f}",
            f"{b['runs']} run(s), {b['seconds'] / m['days']:.1f} s a day",
            f"{b['peak_rss_bytes'] / 2**20:.0f}",
            str(b["processes"]),
        )
    console.print(t)
    console.print(f"instance start-up (webserver + daemon, location loaded, daemons healthy): {m['startup_s']:.0f} s")


def main() -> None:
    from rich.console import Console

    ap = argparse.ArgumentParser(prog="python -m benchmarks.instance", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--days", type=int, default=30, help="days of the asset backfill (default 30)")
    ap.add_argument("--customers", type=int, default=None, help="simulate the first N customers of the seeds (default all)")
    ap.add_argument("--skip-backfill", action="store_true", help="measure the one-day run only")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR", help="scratch folder (default benchmarks/out); instance/ in it is replaced")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON line too")
    args = ap.parse_args()
    console = Console()
    m = measure(args.out, args.days, args.customers, args.skip_backfill, log=console.print)
    report(m, console)
    if args.json:
        print(json.dumps(m))


if __name__ == "__main__":
    main()
