"""`python -m benchmarks.s3_month`: `billing run` for a month on a local folder vs on S3 (moto), by hand.

Starts moto's standalone S3 server on 127.0.0.1 (port 0, read back), then runs `billing run --month M`
alternately on an empty local folder and with BILLING_DATA_URL on an empty bucket (an empty working
copy), each in a process of its own. Reported per run: wall seconds, CPU seconds of the CLI process
(user + system, from its rusage) and of the S3 server during the run, the objects and bytes published.
Needs the test extra (moto[server], boto3).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.proc import cpu_seconds

ROOT = Path(__file__).resolve().parents[1]
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}


def start_moto() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found: dict[str, str] = {}
    ready = threading.Event()

    def read():
        for line in proc.stdout:
            m = re.search(r"Running on (http://127\.0\.0\.1:\d+)", line)
            if m:
                found["url"] = m.group(1)
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(60):
        proc.kill()
        raise SystemExit("moto.server did not start")
    return proc, found["url"]


def run(root: Path, name: str, month: str, args: list[str], extra: dict, moto_pid: int) -> dict:
    home = root / f"dagster-{name}"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "AWS_"))}
    env.update(PYTHONPATH=str(ROOT), DAGSTER_HOME=str(home), BILLING_DATA_DIR=str(root / name), **extra)
    if "BILLING_SEEDS_DIR" in os.environ:
        env["BILLING_SEEDS_DIR"] = os.environ["BILLING_SEEDS_DIR"]
    before_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    moto_before = cpu_seconds(moto_pid)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "billing_dags.cli.main", "run", "--month", month, *args], env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before_children.ru_utime) + (after.ru_stime - before_children.ru_stime)
    files = [p for p in (root / name).rglob("*") if p.is_file() and "/." not in p.as_posix()[len(str(root)) :]]
    return {
        "run": name,
        "wall_s": round(wall, 1),
        "cli_cpu_s": round(cpu, 1),
        "s3_server_cpu_s": round(cpu_seconds(moto_pid) - moto_before, 1),
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--month", default="2026-02")
    ap.add_argument("--interval", default="3600")
    ap.add_argument("--customers", default=None)
    ap.add_argument("--reps", type=int, default=1)
    opts = ap.parse_args(argv)
    args = ["--interval", opts.interval] + (["--customers", opts.customers] if opts.customers else [])
    import boto3

    moto, url = start_moto()
    try:
        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="bench", aws_secret_access_key="bench")
        with tempfile.TemporaryDirectory(prefix="s3-month-") as tmp:
            root = Path(tmp)
            for rep in range(opts.reps):
                print(json.dumps(run(root, f"local-{rep}", opts.month, args, {}, moto.pid)), flush=True)
                bucket = f"bench-{rep}"
                client.create_bucket(Bucket=bucket)
                s3 = {**CREDENTIALS, "AWS_ENDPOINT_URL": url, "BILLING_DATA_URL": f"s3://{bucket}/warehouse"}
                print(json.dumps(run(root, f"s3-{rep}", opts.month, args, s3, moto.pid)), flush=True)
    finally:
        moto.terminate()
        moto.wait(10)


if __name__ == "__main__":
    main()
