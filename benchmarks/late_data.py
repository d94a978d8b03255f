"""`python -m benchmarks.late_data`: what content-based late-data detection costs.

Workload (a temporary data dir, removed after): --days computed days, each with one raw samples
file of --mb MiB (random bytes: only hashed, never parsed), a carry-in file and an events file of
--small-kb KiB, and an empty partition of every daily model reading raw files, with its inputs
recorded as a model run records them.

Measured:
- record: seconds per model partition to take its inputs before it runs (SHA-256 of the raw files
  of its window that no other model of the day has hashed yet), and the hash throughput in MiB/s;
- idle evaluation: the sensor's detection over every computed day with nothing late (a stat per
  file and one small JSON read per model partition, no file read);
- touch: every raw file of one day rewritten with the same bytes: the first evaluation (hashes
  those files once), then the next one given the hashes it returned (reads nothing);
- change: one byte of one day's samples changed: the detection time and the late model days found.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--days", type=int, default=90, help="computed days (default 90)")
    ap.add_argument("--mb", type=float, default=20.0, help="MiB of raw samples per day (default 20)")
    ap.add_argument("--small-kb", type=int, default=64, help="KiB of the carry-in and events files per day (default 64)")
    args = ap.parse_args()
    if args.days < 2 or args.mb <= 0:
        ap.error("--days must be at least 2 and --mb positive")

    from billing_dags.core import durable
    from billing_dags.core.settings import PROJECT_ROOT, resolve_paths
    from billing_dags.ingest import events, raw
    from billing_dags.models import late_data
    from billing_dags.models.sqlmodels import Window, load_project, partition_file

    root = Path(tempfile.mkdtemp(prefix="late-data-bench-"))
    try:
        paths = resolve_paths(root / "data", PROJECT_ROOT / "seeds")
        project = load_project()
        readers = late_data.raw_readers(project)
        first = date(2026, 1, 1)
        days = [first + timedelta(days=i) for i in range(args.days)]
        big = int(args.mb * (1 << 20))
        small = args.small_kb << 10
        for d in days:
            for folder, name, size in (
                (raw.samples_day_dir(paths, d), "part-bench.parquet", big),
                (raw.carry_in_day_dir(paths, d), "part-bench.parquet", small),
                (events.events_day_dir(paths, d), "part-bench.parquet", small),
            ):
                folder.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(os.urandom(size))

        (one,) = raw.sample_files(paths, days[0])
        t0 = time.perf_counter()
        durable.sha256_file(one)
        hash_s = time.perf_counter() - t0
        record_s = []
        for d in days:
            window = Window(d, d + timedelta(days=1))
            for name in readers:
                model = project.models[name]
                t0 = time.perf_counter()
                inputs = late_data.inputs_before(paths, project, model, window)
                record_s.append(time.perf_counter() - t0)
                part = partition_file(paths, model, window)
                part.parent.mkdir(parents=True, exist_ok=True)
                part.write_bytes(b"")
                late_data.record_inputs(paths, model, window, inputs)

        def detect(hashes=None):
            t0 = time.perf_counter()
            late, used = late_data.late_model_days(paths, hashes, project)
            return time.perf_counter() - t0, late, used

        idle_s, idle_late, _ = detect()
        touched = days[len(days) // 2]
        later = time.time() + 5
        for f in [*raw.sample_files(paths, touched), *raw.carry_in_files(paths, touched), *events.event_files(paths, touched)]:
            f.write_bytes(f.read_bytes())
            os.utime(f, (later, later))
        touch_first_s, touch_late, used = detect()
        touch_next_s, touch_next_late, _ = detect(used)
        (f,) = raw.sample_files(paths, touched)
        with open(f, "r+b") as fh:
            b = fh.read(1)
            fh.seek(0)
            fh.write(bytes([b[0] ^ 1]))
        change_s, change_late, _ = detect(used)

        out = {
            "days": args.days,
            "models_reading_raw": sorted(readers),
            "raw_mib_per_day": args.mb,
            "record_seconds_per_model_partition_mean": round(sum(record_s) / len(record_s), 4),
            "record_seconds_per_model_partition_max": round(max(record_s), 4),
            "hash_mib_per_s": round(args.mb / max(hash_s, 1e-9), 1),
            "idle_evaluation_seconds": round(idle_s, 3),
            "idle_late": len(idle_late),
            "touch_first_evaluation_seconds": round(touch_first_s, 3),
            "touch_next_evaluation_seconds": round(touch_next_s, 3),
            "touch_late": len(touch_late) + len(touch_next_late),
            "change_evaluation_seconds": round(change_s, 3),
            "change_late": sorted(f"{d.model} {d.day}" for d in change_late),
        }
        print(json.dumps(out))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
