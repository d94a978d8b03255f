"""`python -m benchmarks.stripe_send`: a month of Stripe meter events sent under rate limits (item 10).

Workload: the first send of one 30-day month for 20 customers, 233 (customer, meter) pairs, 6,990
meter events, to the local Stripe server of tests/stripe_server.py run as its own process, which
answers every 7th POST of meter events with a 429 (no Retry-After) and every 50th with a 500, and
refuses a second concurrent call for one (customer, meter) as Stripe does. Three senders, one after
the other in the same run, each against a fresh server and a fresh copy of the outbox:

- **before**: the sequential sender of a reference commit (``--ref``, default the last commit
  before the concurrent sender), loaded from git: one event at a time, every 429 pauses the whole
  sender. It takes about 0.1 s per event under this load, so by default it sends the first
  ``--before-days`` days (3) and its month is extrapolated from its events/s; ``--before-days 30``
  sends the whole month (about 13 minutes).
- **v1**: ``billing_dags.stripe.meters.send_days`` with the defaults (16 in flight, at most one per
  pair, per-pair backoff).
- **v2**: the same through the meter event stream (batches of 100, a session token).

Measured: wall seconds and events/s of each, the CPU seconds of the sending process and of the
server process (on a busy 2-core machine the wall time of the concurrent sender is bound by
CPU: read it with the CPU figures); and, as a
correctness figure, that every event reached the server exactly once (accepted identifiers =
outbox rows, no duplicate) with no concurrent call refused and the outbox all ``sent``.

Target: the v1 month under 60 s with one 429 in seven.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from benchmarks.figures import DEFAULT_OUT, Figure, scratch
from benchmarks.proc import cpu_seconds
from billing_dags.core.settings import PROJECT_ROOT, Paths

#: the last commit whose sender posts one event at a time
BEFORE_REF = "37d8d01"
MONTH = date(2026, 11, 1)
NOW = datetime(2026, 12, 1, 6, 0, tzinfo=UTC)
API_KEY = "sk_test_51BenchmarkKey000000000000000"
FULL = {"customers": 20, "meters": 12, "days": 30, "before_days": 3}
QUICK = {"customers": 3, "meters": 2, "days": 2, "before_days": 1}
RATE_LIMIT_EVERY, FAIL_EVERY = 7, 50
TARGET_S = 60.0


def outbox_rows(day: date, customers: int, meters: int) -> list[dict]:
    """The day's pending rows: every customer on ``meters`` meters, but the last 7 of 20 customers on
    one fewer (20 customers x 12 meters: 233 pairs, 6,990 events over 30 days)."""
    from billing_dags.stripe import outbox as ob

    rows = []
    for c in range(customers):
        n_meters = meters - 1 if customers >= 20 and c >= customers - 7 else meters
        for m in range(n_meters):
            cid, mid = f"cust{c:03d}", f"meter{m:02d}"
            rows.append(ob.pending_row(cid, f"cus_Bench{c:06d}", mid, f"bench_{mid}", day, 1000 + 37 * c + m + day.day, identifier_name=mid))
    return rows


def write_month(paths: Paths, days: list[date], customers: int, meters: int) -> int:
    from billing_dags.stripe import outbox as ob

    n = 0
    for d in days:
        rows = outbox_rows(d, customers, meters)
        ob.write_outbox(paths, d, rows)
        n += len(rows)
    return n


class Server:
    """tests/stripe_server.py in its own process, on 127.0.0.1 port 0."""

    def __init__(self, meters: int, faults: bool = True):
        cmd = [sys.executable, str(PROJECT_ROOT / "tests" / "stripe_server.py"), "--now", str(int(NOW.timestamp())), "--api-key", API_KEY]
        cmd += [x for m in range(meters) for x in ("--meter", f"bench_meter{m:02d}")]
        cmd += ["--rate-limit-every", str(RATE_LIMIT_EVERY), "--fail-every", str(FAIL_EVERY)] if faults else []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http://127.0.0.1:"):
            self.stop()
            raise RuntimeError(f"the local Stripe server did not start: {self.url!r}")

    def state(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/_test/state", timeout=30) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def before_sender(out: Path, ref: str):
    """The ``Sender`` class of ``stripe/sender.py`` at commit ``ref`` (its imports still exist)."""
    commit = subprocess.run(["git", "rev-parse", ref], cwd=PROJECT_ROOT, check=True, capture_output=True, text=True).stdout.strip()
    src = subprocess.run(["git", "show", f"{commit}:billing_dags/stripe/sender.py"], cwd=PROJECT_ROOT, check=True, capture_output=True, text=True).stdout
    path = out / f"sender_{commit[:12]}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"sender_{commit[:12]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, commit[:12]


def run_one(kind: str, out: Path, days: list[date], size: dict, ref: str, concurrency: int | None = None) -> dict:
    """Send ``days`` of a fresh outbox with one sender against a fresh server; its figures."""
    from billing_dags.stripe import outbox as ob
    from billing_dags.stripe.meters import send_days
    from billing_dags.stripe.sender import make_client

    work = out / f"stripe-{kind}"
    shutil.rmtree(work, ignore_errors=True)
    paths = Paths(work / "data", work / "seeds")
    n = write_month(paths, days, size["customers"], size["meters"])
    server = Server(size["meters"])
    try:
        client = make_client(API_KEY, server.url)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        if kind == "before":
            module, commit = before_sender(out, ref)
            sender = module.Sender(client, now=NOW)
            for d in days:  # as its send_days did: one day after the other, the file written after each
                ob.write_outbox(paths, d, sender.send(ob.read_outbox(paths, d)))
        else:
            commit = None
            _, sender = send_days(paths, days, client, now=NOW, api=kind, **({"concurrency": concurrency} if concurrency else {}))
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        state = server.state()
        server_cpu = cpu_seconds(server.proc.pid)
    finally:
        server.stop()
    rows = [r for d in days for r in ob.read_outbox(paths, d)]
    statuses = {s: sum(r["status"] == s for r in rows) for s in {r["status"] for r in rows}}
    codes: dict[str, int] = {}
    for path, by in state["by_path_and_status"].items():
        if "meter_event" in path:
            for code, k in by.items():
                codes[code] = codes.get(code, 0) + k
    return {
        "kind": kind,
        "ref": commit,
        "events": n,
        "days": len(days),
        "wall_s": wall,
        "cpu_s": cpu,
        "server_cpu_s": server_cpu,
        "events_per_s": n / wall if wall else float("inf"),
        "statuses": statuses,
        "stats": dict(sender.stats),
        "server": state,
        "responses": codes,
        "exact": state["events"] == state["unique_identifiers"] == n and statuses == {"sent": n} and state["concurrent_rejections"] == 0,
    }


def measure(
    quick: bool, out: Path, before_days: int | None = None, ref: str = BEFORE_REF, console=None, concurrency: int | None = None, kinds=("before", "v1", "v2")
) -> dict:
    size = dict(QUICK if quick else FULL)
    if before_days is not None:
        size["before_days"] = before_days
    days = [MONTH + timedelta(days=i) for i in range(size["days"])]
    results = {}
    for kind, ds in (("before", days[: size["before_days"]]), ("v1", days), ("v2", days)):
        if kind not in kinds:
            continue
        results[kind] = r = run_one(kind, out, ds, size, ref, concurrency)
        if console:
            console.print(
                f"{kind}: {r['events']:,} events over {r['days']} days in {r['wall_s']:.1f} s ({r['events_per_s']:,.0f} events/s, "
                f"CPU: sender {r['cpu_s']:.1f} s, server {r['server_cpu_s']:.1f} s); responses {r['responses']}; exact: {r['exact']}"
            )
    if "before" in results:
        results["before"]["month_s"] = len(days) * len(outbox_rows(days[0], size["customers"], size["meters"])) / results["before"]["events_per_s"]
        results["before"]["extrapolated"] = results["before"]["days"] < size["days"]
    results["size"] = size
    return results


def figures(quick: bool, out: Path, console) -> list[Figure]:
    res = measure(quick, scratch(out, "stripe_send"), console=console)
    before, v1, v2 = res["before"], res["v1"], res["v2"]
    size = res["size"]
    workload = f"{v1['events']:,} events, {size['customers']} customers, {size['days']} days; 1 in {RATE_LIMIT_EVERY} POSTs 429, 1 in {FAIL_EVERY} 500"
    month_before = f"{before['month_s']:,.0f} s" + (f" (extrapolated from {before['days']} days)" if before["extrapolated"] else "")
    ref = f"sequential sender ({before['ref']}): {month_before}, {before['events_per_s']:.1f} events/s"
    return [
        Figure(
            10,
            f"Stripe send of a month, concurrent v1 meter events (16 in flight, one per customer and meter): {workload}",
            f"{v1['wall_s']:.1f} s, {v1['events_per_s']:,.0f} events/s; CPU {v1['cpu_s']:.1f} s sender + {v1['server_cpu_s']:.1f} s server",
            ref,
            f"{before['month_s'] / v1['wall_s']:.0f}x faster",
            f"< {TARGET_S:.0f} s",
            None if quick else v1["wall_s"] < TARGET_S,
        ),
        Figure(
            10,
            f"the same month through the v2 meter event stream (100 events per request): {workload}",
            f"{v2['wall_s']:.1f} s, {v2['events_per_s']:,.0f} events/s; CPU {v2['cpu_s']:.1f} s sender + {v2['server_cpu_s']:.1f} s server",
            ref,
            f"{before['month_s'] / v2['wall_s']:.0f}x faster",
            "reported",
            None,
        ),
        Figure(
            10,
            "every event accepted exactly once (identifiers = outbox rows, no duplicate, no concurrent call refused, outbox all sent), each sender",
            ", ".join(
                f"{k}: {r['server']['events']:,}/{r['events']:,}, {r['server']['concurrent_rejections']} refused"
                for k, r in (("before", before), ("v1", v1), ("v2", v2))
            ),
            "-",
            "-",
            "exact",
            before["exact"] and v1["exact"] and v2["exact"],
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    ap = argparse.ArgumentParser(prog="python -m benchmarks.stripe_send", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke size (3 customers, 2 meters, 2 days)")
    ap.add_argument("--before-days", type=int, help="days the sequential sender sends (default 3; 30 = the whole month, about 13 minutes)")
    ap.add_argument("--ref", default=BEFORE_REF, help=f"the commit of the sequential sender (default {BEFORE_REF})")
    ap.add_argument("--concurrency", type=int, help="requests in flight of the new senders (default: the sender's, 16)")
    ap.add_argument("--only", default="before,v1,v2", help="which senders, comma-separated (default before,v1,v2)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = ap.parse_args(argv)
    console = Console(width=160)
    kinds = tuple(k.strip() for k in args.only.split(","))
    res = measure(args.quick, scratch(args.out, "stripe_send"), args.before_days, args.ref, console, args.concurrency, kinds)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))
    if "before" in res:
        b = res["before"]
        console.print(f"before: the month in {b['month_s']:,.0f} s{' (extrapolated)' if b['extrapolated'] else ''}")
    return 0 if all(res[k]["exact"] for k in kinds) else 1


if __name__ == "__main__":
    raise SystemExit(main())
