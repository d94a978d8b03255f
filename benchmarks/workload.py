"""The standard benchmark workload, in the real raw layout.

N series (default 20,000) x 1 UTC day at a 15 s scrape interval (115.2M samples at 20,000), with
counter resets, scrape gaps (a staleness marker at the first missed scrape), NaN samples and a
per-target scrape offset. The series are the simulated set-ups' series (`simulate.simulate_day`,
so they resolve to seeded customers and meters) replicated with an ``instance`` label; each
replica has its own magnitude. Counters are integers except ``container_cpu_usage_seconds_total``
(integer ms / 1000, so fractional like the real cAdvisor counter); gauges are integers.

Day D-1 holds only each series' last sample (what fct_usage_by_day needs from the day before, via
the small per-day edge table). The day is written with `raw.write_day` in chunks of series (one
file per chunk, disjoint series ranges) to bound memory, and cached under
``<out>/workload-<N>x<interval>s-seed<seed>/`` (``out`` defaults to benchmarks/out/) so reruns
with the same parameters skip generation. Deterministic for a given (series, interval, seed).
"""

from __future__ import annotations

import json
import shutil
import time
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

from benchmarks.figures import DEFAULT_OUT
from billing_dags.core.settings import PROJECT_ROOT, Paths, resolve_paths
from billing_dags.ingest import raw, simulate

DAY = date(2026, 10, 15)
GENERATOR_VERSION = 3
#: files per day: the series are written in this many chunks (the cost-growth subsets are 1/4, 1/2, all)
CHUNKS = 8
#: a bigger day is written in more files of at most this many series each (generation memory stays that
#: of the standard day's chunk, and a file holds what one of the standard day's holds)
MAX_CHUNK_SERIES = 2_500
P_RESET = 0.10
P_GAP = 1 / 15
P_NAN = 1 / 5000
STALE_NAN = np.array([simulate.STALE_NAN_BITS], dtype=np.uint64).view(np.float64)[0]
GAUGES = {"stratum_active_connections", "iot_storage_used_bytes", "iot_active_devices", "container_memory_working_set_bytes", "kubelet_volume_stats_used_bytes"}


def _templates(seed: int) -> list[dict]:
    """The simulated series of one day (50 customers), with a per-step rate or level each."""
    from billing_dags.seeds.catalog import read_seed

    customers = read_seed(PROJECT_ROOT / "seeds", "customers")
    samples, series = simulate.simulate_day(DAY, customers, seed=seed, interval_s=60)
    sid = samples["series_id"].to_numpy()
    val = samples["value"].to_numpy()
    out = []
    order = np.argsort(sid, kind="stable")
    sid, val = sid[order], val[order]
    starts = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1]])
    ends = np.r_[starts[1:], len(sid)]
    by_sid = {int(sid[s]): val[s:e][np.isfinite(val[s:e])] for s, e in zip(starts, ends)}
    for row in series.to_pylist():
        v = by_sid.get(row["series_id"])
        if v is None or not len(v):
            continue
        metric = row["metric"]
        gauge = metric in GAUGES
        level = float(np.median(v)) if gauge else max(float(np.median(np.abs(np.diff(v)))) / 4, 0.001 if "cpu_usage" in metric else 1.0)
        out.append({"metric": metric, "labels": dict(row["labels"]), "gauge": gauge, "cpu": metric == "container_cpu_usage_seconds_total", "level": level})
    return out


def _catalogue(n_series: int, seed: int) -> list[dict]:
    tpl = _templates(seed)
    cat = []
    for j in range(n_series):
        t = tpl[j % len(tpl)]
        labels = {**t["labels"], "instance": f"replica-{j:05d}"}
        cat.append({**t, "labels": labels, "series_id": raw.series_id(t["metric"], labels)})
    cat.sort(key=lambda r: r["series_id"])
    return cat


def _values(chunk: list[dict], rng: np.random.Generator, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(value at D-1's last scrape, values [series, step] of day D) for a chunk of series."""
    k = len(chunk)
    level = np.array([c["level"] for c in chunk]) * np.exp(rng.normal(0, 0.5, k))
    gauge = np.array([c["gauge"] for c in chunk])
    cpu = np.array([c["cpu"] for c in chunk])
    t = np.arange(n_steps) / n_steps
    diurnal = 1 + 0.3 * np.cos(2 * np.pi * (t[None, :] - rng.random((k, 1))))
    # counters: integer increments (cpu: integer ms, stored / 1000)
    scale = np.where(cpu, level * 1000, level)
    inc = np.floor(scale[:, None] * diurnal * (0.5 + rng.random((k, n_steps))))
    start = np.floor(scale * rng.integers(100, 50_000, k))
    counter = start[:, None] + np.cumsum(inc, axis=1)
    resets = rng.random(k) < P_RESET
    for i in np.flatnonzero(resets & ~gauge):
        r = int(rng.integers(1, n_steps))
        counter[i, r:] -= counter[i, r - 1] - inc[i, r]
    prev = start.copy()
    # gauges: integer level with noise
    g = np.maximum(0, np.round(level[:, None] * diurnal + rng.normal(0, 1, (k, n_steps)) * np.maximum(1, level[:, None] * 1e-4)))
    vals = np.where(gauge[:, None], g, counter)
    prev = np.where(gauge, vals[:, 0], prev)
    vals = np.where(cpu[:, None], vals / 1000, vals)
    prev = np.where(cpu, prev / 1000, prev)
    return prev, vals


def generate(root: Path, n_series: int, interval_s: int = 15, seed: int = 42, log=print) -> Paths:
    """Write the workload under ``root`` (raw samples of DAY and D-1's last samples, seed snapshots)."""
    from billing_dags.defs.seeds.assets import write_seed_snapshots

    paths = resolve_paths(root / "data", PROJECT_ROOT / "seeds")
    write_seed_snapshots(paths)
    rng = np.random.default_rng(seed)
    cat = _catalogue(n_series, seed)
    start_ms, _ = raw.day_bounds_ms(DAY)
    prev_day = DAY - timedelta(days=1)
    step = interval_s * 1000
    n_steps = raw.DAY_MS // step
    prev_rows = {"series_id": [], "ts": [], "value": []}
    t0 = time.perf_counter()
    total = 0
    chunk_series = min(-(-len(cat) // CHUNKS), MAX_CHUNK_SERIES)
    for c0 in range(0, len(cat), chunk_series):
        chunk = cat[c0 : c0 + chunk_series]
        k = len(chunk)
        sids = np.array([c["series_id"] for c in chunk], dtype=np.int64)
        offset = rng.integers(0, step, k)
        prev, vals = _values(chunk, rng, n_steps)
        ts = start_ms + offset[:, None] + np.arange(n_steps, dtype=np.int64)[None, :] * step
        keep = np.ones((k, n_steps), dtype=bool)
        for i in np.flatnonzero(rng.random(k) < P_GAP):  # a 1-6 h gap, staleness marker first
            length = int(rng.integers(3600, 6 * 3600) * 1000 // step)
            g0 = int(rng.integers(1, n_steps - length))
            vals[i, g0] = STALE_NAN
            keep[i, g0 + 1 : g0 + length] = False
        vals[rng.random((k, n_steps)) < P_NAN] = np.nan
        table = pa.table(
            {
                "series_id": np.repeat(sids, n_steps)[keep.ravel()],
                "ts": ts.ravel()[keep.ravel()],
                "value": vals.ravel()[keep.ravel()],
            }
        )
        series = pa.table(
            {
                "series_id": sids,
                "metric": [c["metric"] for c in chunk],
                "labels": pa.array([list(c["labels"].items()) for c in chunk], pa.map_(pa.string(), pa.string())),
                "first_seen": np.full(k, start_ms - step, dtype=np.int64),
            }
        )
        source = f"bench{c0 // chunk_series:03d}"
        raw.write_day(paths, DAY, table, series, source)
        total += table.num_rows
        prev_rows["series_id"].append(sids)
        prev_rows["ts"].append(start_ms - step + offset - step)
        prev_rows["value"].append(prev)
        log(f"  generated {c0 + k:,}/{len(cat):,} series ({total:,} samples, {time.perf_counter() - t0:.0f}s)")
        del table, vals, ts, keep
    prev_table = pa.table({k: np.concatenate(v) for k, v in prev_rows.items()})
    prev_series = pa.table(
        {
            "series_id": prev_table["series_id"],
            "metric": [c["metric"] for c in cat],
            "labels": pa.array([list(c["labels"].items()) for c in cat], pa.map_(pa.string(), pa.string())),
            "first_seen": prev_table["ts"],
        }
    )
    raw.write_day(paths, prev_day, prev_table, prev_series, "bench")
    return paths


def standard(n_series: int = 20_000, interval_s: int = 15, seed: int = 42, log=print, out: Path = DEFAULT_OUT) -> Paths:
    """The cached workload for (n_series, interval, seed) under ``out``: generated on first use."""
    root = Path(out) / f"workload-{n_series}x{interval_s}s-seed{seed}"
    stamp = root / "workload.json"
    # the series ids in the cached files: a change of raw.series_id's encoding regenerates the workload
    meta = {"version": GENERATOR_VERSION, "series": n_series, "interval_s": interval_s, "seed": seed, "series_id_of_up": raw.series_id("up", {})}
    if stamp.exists() and json.loads(stamp.read_text()) == meta:
        return resolve_paths(root / "data", PROJECT_ROOT / "seeds")
    shutil.rmtree(root, ignore_errors=True)
    log(f"generating the workload ({n_series:,} series x 1 day at {interval_s} s) under {root} ...")
    paths = generate(root, n_series, interval_s, seed, log=log)
    stamp.write_text(json.dumps(meta))
    return paths


def subset(paths: Paths, parts: int, log=print) -> Paths:
    """A data dir holding the first ``parts`` of the CHUNKS files of the day (symlinks), for cost growth."""
    from billing_dags.defs.seeds.assets import write_seed_snapshots

    root = paths.data_dir.parent / f"subset-{parts}of{CHUNKS}"
    sub = resolve_paths(root / "data", PROJECT_ROOT / "seeds")
    stamp = root / "subset.json"
    if stamp.exists():
        return sub
    shutil.rmtree(root, ignore_errors=True)
    for kind in ("samples", "series"):
        src_root = paths.raw_samples if kind == "samples" else paths.raw_series
        dst_root = sub.raw_samples if kind == "samples" else sub.raw_series
        for d in (DAY - timedelta(days=1), DAY):
            files = sorted((src_root / f"date={d.isoformat()}").glob("*.parquet"))
            if d == DAY:
                files = files[:parts]
            (dst_root / f"date={d.isoformat()}").mkdir(parents=True, exist_ok=True)
            for f in files:
                (dst_root / f"date={d.isoformat()}" / f.name).symlink_to(f)
    write_seed_snapshots(sub)
    stamp.write_text(json.dumps({"parts": parts}))
    return sub
