"""Python engine for the hot daily model: fct_series_edges_by_day computed by streaming the raw day.

``sql_models/marts/fct_series_edges_by_day.sql`` stays the specification: this module computes
exactly its output (same columns, types, rows and values, to the unit) and the tests compare the
two. It exists because the SQL's window functions (LAG/LEAD over every sample) cost about 9x a
plain scan and gigabytes of memory, while the raw layout already gives what they compute: each
file is sorted by (series_id, ts) with every series whole inside one row group.

How: the day's row groups are read one at a time with pyarrow (two worker threads, at most a few
row groups in flight, so memory is bounded by the row-group size, not the day) and reduced with
vectorised numpy per series: np.*.reduceat over series boundaries for counts, sums and maxima;
deltas and held times with a series-boundary mask; the reset mask is ``v < v_prev``.

Exactness (the SQL's ``exact_value(v) = v::varchar::decimal(38, 9)``): a float64 whose shortest
round-trip text has at most ``s`` decimals is the integer ``K = rint(v * 10**s)`` scaled by
10**-s, provided ``float(K) / 10**s == v`` and ``|v| * 10**s < 2**50`` (so K is found without
rounding error and is the only such decimal in v's rounding interval); an integer-valued float
with ``|v| <= 2**53`` is itself (s = 0). Each series gets the smallest scale in (0, 3, 6, 9) that
holds for all its samples; sums run in int64, split into 24-bit limbs where a bound check says
they could overflow, and are combined per series in Python integers. Series no scale fits (e.g.
1/3, or fractional values above 2**20) go through DuckDB's own ``exact_value`` for their samples.

Checks stay on: series ids ascending within a row group and row groups of different series
disjoint; timestamps non-decreasing within a series (exact duplicates of (series, ts) are
collapsed to the smallest value, as the SQL does); a violation raises ``raw.RawLayoutError``
naming the file, row group and series. Raw inputs that are not in this layout (overlapping files)
are merged per overlapping group of row groups, or, past a size limit, computed by the SQL.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import raw
from .settings import STALENESS_MS, Paths
from .sqlmodels import UseSQLEngine

#: output schema of fct_series_edges_by_day (what DuckDB's to_arrow_table gives for the SQL)
DEC = pa.decimal128(38, 9)
SCHEMA = pa.schema(
    [
        ("day", pa.date32()),
        ("series_id", pa.int64()),
        ("samples", pa.int64()),
        ("dropped_samples", pa.int64()),
        ("first_ts_ms", pa.int64()),
        ("first_value", pa.float64()),
        ("last_ts_ms", pa.int64()),
        ("last_value", pa.float64()),
        ("in_day_increase", DEC),
        ("resets", pa.int64()),
        ("peak", DEC),
        ("in_day_integral", DEC),
        ("in_day_covered_ms", pa.int64()),
        ("max_gap_ms", pa.int64()),
    ]
)
COLUMNS = ["series_id", "ts", "value"]
SCALES = (0, 3, 6, 9)
_LIMB = 24
_LIMB_MASK = (1 << _LIMB) - 1
#: rows of overlapping row groups merged in memory before falling back to the SQL
MERGE_LIMIT_ROWS = int(os.environ.get("BILLING_FASTPATH_MERGE_ROWS", 8_000_000))
_MAX_DEC = 10**38


class FallbackToSQL(UseSQLEngine):
    """The raw input is outside what the streaming path handles; the caller runs the SQL."""


@dataclass(frozen=True)
class _Unit:
    """One row group (or, when row groups overlap, several to merge) to reduce."""

    parts: tuple[tuple[Path, int], ...]
    lo: int | None
    hi: int | None
    rows: int
    in_window: bool  # statistics say every ts is inside [start, end)


# --------------------------------------------------------------------------- planning


def _plan(files: list[Path], start_ms: int, end_ms: int) -> list[_Unit]:
    groups = []
    for f in files:
        md = pq.ParquetFile(f).metadata
        names = [md.schema.column(i).name for i in range(md.num_columns)]
        try:
            si, ti = names.index("series_id"), names.index("ts")
        except ValueError:
            raise raw.RawLayoutError(f"{f}: raw samples need columns series_id, ts, value; found {names}") from None
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            if rg.num_rows == 0:
                continue
            s, t = rg.column(si).statistics, rg.column(ti).statistics
            lo = hi = None
            if s is not None and s.has_min_max:
                lo, hi = int(s.min), int(s.max)
            inside = t is not None and t.has_min_max and t.min >= start_ms and t.max < end_ms
            if t is not None and t.has_min_max and (t.max < start_ms or t.min >= end_ms):
                continue  # nothing of this row group is in the window
            groups.append((lo, hi, f, g, rg.num_rows, inside))
    if any(lo is None for lo, *_ in groups):
        if len(groups) > 1:
            raise FallbackToSQL("row groups without series_id statistics")
        return [_Unit(((g[2], g[3]),), None, None, g[4], g[5]) for g in groups]
    groups.sort(key=lambda g: (g[0], g[1]))
    units: list[list] = []
    hi = None
    for g in groups:
        if units and g[0] <= hi:  # overlaps the current unit's series range: merge them
            units[-1].append(g)
            hi = max(hi, g[1])
        else:
            units.append([g])
            hi = g[1]
    out = []
    for u in units:
        rows = sum(g[4] for g in u)
        if len(u) > 1 and rows > MERGE_LIMIT_ROWS:
            raise FallbackToSQL(f"{len(u)} overlapping row groups with {rows:,} rows")
        out.append(_Unit(tuple((g[2], g[3]) for g in u), u[0][0], max(g[1] for g in u), rows, all(g[5] for g in u)))
    return out


# --------------------------------------------------------------------------- exact helpers


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Row indices of the concatenated half-open ranges [starts[i], ends[i])."""
    lengths = ends - starts
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    offs = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return offs + np.arange(total, dtype=np.int64)


def _scaled(v: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, ok): K = v * 10**s as int64 and whether that is exactly v's shortest decimal."""
    with np.errstate(invalid="ignore", over="ignore"):
        if s == 0:
            k = v.astype(np.int64)
            ok = (k == v) & (np.abs(v) <= 2.0**53)
        else:
            p = 10.0**s
            r = np.rint(v * p)
            ok = (np.abs(v) < 2.0**50 / p) & (r / p == v)
            k = np.where(ok, r, 0).astype(np.int64)
    return k, ok


def _duckdb_nano(values: np.ndarray) -> np.ndarray:
    """exact_value(v) * 10**9 as Python ints, computed by DuckDB itself (the rare slow path)."""
    import duckdb

    con = duckdb.connect(config={"autoinstall_known_extensions": False})
    try:
        con.register("vals", pa.table({"i": np.arange(len(values)), "v": values}))
        dec = con.sql("select v::varchar::decimal(38, 9) as d from vals order by i").to_arrow_table()["d"]
    finally:
        con.close()
    return np.array([int(d.scaleb(9)) for d in dec.to_pylist()], dtype=object)


def _nano_of(values: np.ndarray) -> np.ndarray:
    """exact_value(v) * 10**9 for each value, as an object array of Python ints."""
    out = np.empty(len(values), dtype=object)
    todo = np.ones(len(values), dtype=bool)
    for s in SCALES:
        if not todo.any():
            break
        k, ok = _scaled(values, s)
        ok &= todo
        if ok.any():
            out[ok] = k[ok].astype(object) * 10 ** (9 - s)
        todo &= ~ok
    if todo.any():
        out[todo] = _duckdb_nano(values[todo])
    return out


def _integral(k, v, held, starts, maxabs: int, scale, window_ms: int, max_len: int) -> np.ndarray:
    """Per-series sum of k * held as Python ints (held sums to at most window_ms per series)."""
    if maxabs * window_ms < 2**62:
        return np.add.reduceat(k * held, starts).astype(object)
    # The int64 sums wrap (mod 2**64); a float64 sum of v * held * 10**s is within far less than
    # 2**62 of the true value, which picks the one integer congruent to the wrapped sum.
    err = (max_len + 2) * 2.0**-52 * maxabs * window_ms * 2
    if err < 2.0**61:
        with np.errstate(over="ignore"):
            wrapped = np.add.reduceat(k * held, starts).astype(object)
        approx = np.add.reduceat(v * held, starts) * (10.0 ** scale)
        out = np.empty(len(starts), dtype=object)
        for i, (w, a) in enumerate(zip(wrapped.tolist(), approx.tolist())):
            out[i] = w + (round((a - w) / 2.0**64) << 64)
        return out
    # else: split k into 24-bit limbs so no partial sum can overflow int64
    hi = k >> _LIMB
    lo = k & _LIMB_MASK
    hi *= held
    lo *= held
    return np.add.reduceat(hi, starts).astype(object) * (1 << _LIMB) + np.add.reduceat(lo, starts).astype(object)


def _increase(k: np.ndarray, starts: np.ndarray, last: np.ndarray, reset_rows: np.ndarray) -> np.ndarray:
    """Per-series sum of (k - k_prev, or k after a reset) = k_last - k_first + sum of k_prev at resets."""
    inc = (k[last] - k[starts]).astype(object) if k.dtype != object else k[last] - k[starts]
    if len(reset_rows):
        owner = np.searchsorted(starts, reset_rows, side="right") - 1
        np.add.at(inc, owner, k[reset_rows - 1].astype(object))
    return inc


def _read(unit: _Unit) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tables = [pq.ParquetFile(f).read_row_group(g, columns=COLUMNS, use_threads=False) for f, g in unit.parts]
    t = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
    sid = t.column("series_id").to_numpy()
    ts = t.column("ts").to_numpy()
    v = t.column("value").to_numpy()
    if sid.dtype != np.int64 or ts.dtype != np.int64:
        sid, ts = sid.astype(np.int64), ts.astype(np.int64)
    if v.dtype != np.float64:
        v = v.astype(np.float64)
    return sid, ts, v


def _where(unit: _Unit) -> str:
    return ", ".join(f"{f} row group {g}" for f, g in unit.parts)


def _reduce(unit: _Unit, start_ms: int, end_ms: int) -> dict | None:
    sid, ts, v = _read(unit)
    if not unit.in_window:
        m = (ts >= start_ms) & (ts < end_ms)
        if not m.all():
            sid, ts, v = sid[m], ts[m], v[m]
    if len(sid) == 0:
        return None
    if len(unit.parts) > 1:  # overlapping sources: merge (value as the last key: duplicates keep the smallest)
        order = np.lexsort((v, ts, sid))
        sid, ts, v = sid[order], ts[order], v[order]
    dropped_ids = dropped_counts = None
    with np.errstate(invalid="ignore", over="ignore"):
        total = v.sum()
    if not np.isfinite(total) and not (finite := np.isfinite(v)).all():  # a finite sum: all finite
        dropped_ids, dropped_counts = np.unique(sid[~finite], return_counts=True)
        sid, ts, v = sid[finite], ts[finite], v[finite]
    n = len(sid)
    if n == 0:
        return {"dropped": (dropped_ids, dropped_counts)}
    new = np.empty(n, dtype=bool)
    new[0] = True
    np.not_equal(sid[1:], sid[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    dts = np.empty(n, dtype=np.int64)
    dts[0] = 0
    np.subtract(ts[1:], ts[:-1], out=dts[1:])
    dts[starts] = 1
    ordered = int(dts.min()) > 0
    dts[starts] = 0
    # the layout's promises, checked: each series contiguous, series ascending, ts non-decreasing
    if not ordered:
        if len(unit.parts) == 1 and bool(np.any(dts < 0)):
            i = int(np.flatnonzero(dts < 0)[0])
            raise raw.RawLayoutError(
                f"{_where(unit)}: timestamps of series {int(sid[i])} go back in time ({int(ts[i - 1])} then "
                f"{int(ts[i])} ms); raw files must be sorted by (series_id, ts) — rewrite the day with raw.write_day"
            )
        # exact duplicates of (series, ts): keep the smallest value, like the SQL
        dup = dts == 0
        dup[starts] = False
        if len(unit.parts) == 1:
            # only values move (within runs of equal (series, ts)): new, dts and dup stay valid
            order = np.lexsort((v, ts, sid))
            sid, ts, v = sid[order], ts[order], v[order]
        keep = ~dup
        sid, ts, v, new, dts = sid[keep], ts[keep], v[keep], new[keep], dts[keep]
        n = len(sid)
        starts = np.flatnonzero(new)
    sids = sid[starts]
    if len(sids) > 1 and not bool(np.all(sids[1:] > sids[:-1])):
        i = int(np.flatnonzero(sids[1:] <= sids[:-1])[0])
        raise raw.RawLayoutError(
            f"{_where(unit)}: series {int(sids[i + 1])} follows series {int(sids[i])}: the rows are not sorted by "
            "(series_id, ts) with each series contiguous; rewrite the day with raw.write_day"
        )
    if unit.lo is not None and (int(sids[0]) < unit.lo or int(sids[-1]) > unit.hi):
        raise raw.RawLayoutError(f"{_where(unit)}: series ids outside the row group's statistics")
    nser = len(starts)
    ends = np.empty_like(starts)
    ends[:-1] = starts[1:]
    ends[-1] = n
    last = ends - 1
    held = np.empty(n, dtype=np.int64)
    held[:-1] = dts[1:]
    held[last] = end_ms - ts[last]
    np.minimum(held, STALENESS_MS, out=held)
    reset = np.empty(n, dtype=bool)
    reset[0] = False
    np.less(v[1:], v[:-1], out=reset[1:])
    reset[starts] = False
    reset_rows = np.flatnonzero(reset)
    resets = np.zeros(nser, dtype=np.int64)
    if len(reset_rows):
        np.add.at(resets, np.searchsorted(starts, reset_rows, side="right") - 1, 1)
    out = {
        "series_id": sids,
        "samples": ends - starts,
        "first_ts_ms": ts[starts],
        "first_value": v[starts],
        "last_ts_ms": ts[last],
        "last_value": v[last],
        "resets": resets,
        "peak_f": np.maximum.reduceat(v, starts),
        "in_day_covered_ms": np.add.reduceat(held, starts),
        "max_gap_ms": np.maximum.reduceat(dts, starts),
        "dropped": (dropped_ids, dropped_counts),
    }
    # exact values: per series, the smallest decimal scale s that represents all its samples
    # exactly as integers k = v * 10**s (see the module docstring); sums in units of 10**-s
    scale = np.zeros(nser, dtype=np.int64)
    with np.errstate(invalid="ignore", over="ignore"):
        k = v.astype(np.int64)
        exact = k == v
    slow = None
    kmin, kmax = int(k.min()), int(k.max())
    if not (-(2**53) <= kmin and kmax <= 2**53 and exact.all()):
        slow = np.empty(0, dtype=np.int64)
        exact &= np.abs(v) <= 2.0**53
        frac = np.flatnonzero(~np.logical_and.reduceat(exact, starts))
        rows = _ranges(starts[frac], ends[frac])
        k[rows] = 0
        vv = v[rows]
        st = np.concatenate([[0], np.cumsum(ends[frac] - starts[frac])[:-1]])
        todo = np.ones(len(frac), dtype=bool)
        for s_ in SCALES[1:]:
            kk, ok = _scaled(vv, s_)
            good = np.logical_and.reduceat(ok, st) & todo
            if good.any():
                sel = _ranges(st[good], np.r_[st[1:], len(vv)][good])
                k[rows[sel]] = kk[sel]
                scale[frac[good]] = s_
                todo &= ~good
            if not todo.any():
                break
        slow = frac[todo]
    maxabs = max(abs(kmax), abs(kmin)) if slow is None else max(abs(int(k.max())), abs(int(k.min())))
    slow = np.empty(0, dtype=np.int64) if slow is None else slow
    inc = _increase(k, starts, last, reset_rows)
    integral = _integral(k, v, held, starts, maxabs, scale, end_ms - start_ms, int((ends - starts).max()))
    factor = np.array([10**9, 10**6, 10**3, 1], dtype=object)[scale // 3]
    inc = inc * factor
    integral = integral * factor
    if len(slow):  # no decimal scale fits: DuckDB's own exact_value for these series' samples
        rows = _ranges(starts[slow], ends[slow])
        lens = ends[slow] - starts[slow]
        st = np.concatenate([[0], np.cumsum(lens)[:-1]])
        nano = _duckdb_nano(v[rows])
        r = np.flatnonzero(reset[rows])
        inc[slow] = _increase(nano, st, st + lens - 1, r)
        integral[slow] = np.add.reduceat(nano * held[rows].astype(object), st)
    out["in_day_increase"] = inc
    out["in_day_integral"] = integral
    return out


# --------------------------------------------------------------------------- assembly


def _decimal_array(nano: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """DECIMAL(38, 9) from Python ints counting 10**-9 units (two's complement, 16 bytes each)."""
    n = len(nano)
    if valid is not None and not valid.all():
        nano = np.where(valid, nano, 0)
    buf = bytearray(16 * n)
    for i, x in enumerate(nano.tolist()):
        x = int(x)
        if not -_MAX_DEC < x < _MAX_DEC:
            raise OverflowError(f"value {x}e-9 does not fit DECIMAL(38, 9)")
        buf[16 * i:16 * i + 16] = x.to_bytes(16, "little", signed=True)
    arr = pa.Array.from_buffers(DEC, n, [None, pa.py_buffer(bytes(buf))])
    if valid is not None and not valid.all():
        arr = pc.if_else(pa.array(valid), arr, pa.scalar(None, DEC))
    return arr


def _assemble(day: date, parts: list[dict]) -> pa.Table:
    cols = ["series_id", "samples", "first_ts_ms", "first_value", "last_ts_ms", "last_value", "resets",
            "peak_f", "in_day_covered_ms", "max_gap_ms", "in_day_increase", "in_day_integral"]
    live = [p for p in parts if "series_id" in p]
    if live:
        c = {k: np.concatenate([p[k] for p in live]) for k in cols}
    else:
        c = {k: np.empty(0, dtype=object if k.startswith("in_day_i") else np.float64 if k.endswith(("value", "_f")) else np.int64) for k in cols}
    d_ids = [p["dropped"][0] for p in parts if p["dropped"][0] is not None]
    d_cnt = [p["dropped"][1] for p in parts if p["dropped"][1] is not None]
    nlive = len(c["series_id"])
    valid = np.ones(nlive, dtype=bool)
    dropped = np.zeros(nlive, dtype=np.int64)
    if d_ids:
        ids = np.concatenate(d_ids)
        cnt = np.concatenate(d_cnt).astype(np.int64)
        ids, inv = np.unique(ids, return_inverse=True)
        cnt = np.bincount(inv, weights=cnt, minlength=len(ids)).astype(np.int64)
        order = np.argsort(c["series_id"], kind="stable")
        pos = np.searchsorted(c["series_id"], ids, sorter=order)
        pos_c = np.minimum(pos, max(nlive - 1, 0))
        found = (pos < nlive) & (c["series_id"][order[pos_c]] == ids) if nlive else np.zeros(len(ids), dtype=bool)
        dropped[order[pos_c[found]]] = cnt[found]
        extra = ids[~found]
        if len(extra):  # series whose every sample in the day was dropped
            m = len(extra)
            c = {
                **{k: np.concatenate([c[k], np.zeros(m, dtype=c[k].dtype)]) for k in cols if k not in ("in_day_increase", "in_day_integral")},
                "in_day_increase": np.concatenate([c["in_day_increase"], np.zeros(m, dtype=object)]),
                "in_day_integral": np.concatenate([c["in_day_integral"], np.zeros(m, dtype=object)]),
            }
            c["series_id"][nlive:] = extra
            dropped = np.concatenate([dropped, cnt[~found]])
            valid = np.concatenate([valid, np.zeros(m, dtype=bool)])
    n = len(c["series_id"])
    nulls = None if valid.all() else ~valid

    def opt(a, typ):
        return pa.array(a, type=typ, mask=nulls)

    peak = np.empty(n, dtype=object)
    if n:
        peak[valid] = _nano_of(c["peak_f"][valid])
    peak[~valid] = 0
    return pa.table(
        [
            pa.array(np.full(n, (day - date(1970, 1, 1)).days, dtype=np.int32), pa.int32()).cast(pa.date32()),
            pa.array(c["series_id"], pa.int64()),
            pa.array(c["samples"], pa.int64()),
            pa.array(dropped, pa.int64()),
            opt(c["first_ts_ms"], pa.int64()),
            opt(c["first_value"], pa.float64()),
            opt(c["last_ts_ms"], pa.int64()),
            opt(c["last_value"], pa.float64()),
            _decimal_array(c["in_day_increase"]),
            pa.array(c["resets"], pa.int64()),
            _decimal_array(peak, valid),
            _decimal_array(c["in_day_integral"]),
            pa.array(c["in_day_covered_ms"], pa.int64()),
            pa.array(c["max_gap_ms"], pa.int64()),
        ],
        schema=SCHEMA,
    )


def _keep_freed_memory() -> None:
    """glibc: reuse freed row-group buffers instead of returning them to the OS after each one.

    Every row group allocates and frees the same few dozen MB; with the default thresholds glibc
    unmaps them and the next row group page-faults them back in (measured: about a third of the
    CPU time went to the kernel). Process-wide, idempotent, ignored where mallopt is missing.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD
    except Exception:  # noqa: BLE001 - not glibc: keep the defaults
        pass


def series_edges(files: list[Path], day: date, start_ms: int, end_ms: int, *, threads: int | None = None) -> pa.Table:
    """fct_series_edges_by_day for the window [start_ms, end_ms) (``day`` = its first day) from raw files."""
    _keep_freed_memory()
    units = _plan([Path(f) for f in files], start_ms, end_ms)
    threads = threads or min(2, os.cpu_count() or 1)
    parts: list[dict] = []
    if threads <= 1 or len(units) <= 1:
        for u in units:
            r = _reduce(u, start_ms, end_ms)
            if r is not None:
                parts.append(r)
    else:
        with ThreadPoolExecutor(threads) as pool:
            # at most 2 units per thread in flight: memory is bounded by the row-group size
            inflight = []
            for u in units:
                inflight.append(pool.submit(_reduce, u, start_ms, end_ms))
                if len(inflight) >= 2 * threads:
                    r = inflight.pop(0).result()
                    if r is not None:
                        parts.append(r)
            for fut in inflight:
                r = fut.result()
                if r is not None:
                    parts.append(r)
    return _assemble(day, parts)


def edges_by_day(paths: Paths, model, window) -> pa.Table:
    """Engine entry point (``python: billing_dags.fastpath:edges_by_day`` in the model's config)."""
    files = []
    d = window.start
    while d < window.end:
        files += raw.sample_files(paths, d)
        d = date.fromordinal(d.toordinal() + 1)
    return series_edges(files, window.start, window.start_ms, window.end_ms)
