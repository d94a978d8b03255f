"""Python engine for the hot daily model: int_series_edges_by_day computed by streaming the raw day.

``sql_models/intermediate/usage/int_series_edges_by_day.sql`` stays the specification: this module computes
exactly its output (same columns, types, rows and values, to the unit) and the tests compare the
two. It exists because the SQL's window functions (LAG/LEAD over every sample) cost about 9x a
plain scan and gigabytes of memory, while the raw layout already gives what they compute: each
file is sorted by (series_id, ts) with every series whole inside one row group.

How: the day's row groups are decoded with pyarrow a batch of rows at a time (two worker
threads, a few row groups in flight, so memory is bounded by the row-group size, not the day)
and each batch is reduced by compiled code (numba, ``nogil``: both threads compute at once,
while the rows are still in the CPU cache; a series cut by the end of a batch is completed with
the start of the next). Per series, ``_fast`` makes two vectorised passes when the series is
simple (timestamps strictly increasing inside the window, every finite value exact at one
decimal scale): one converts the values to integers and checks, one sums over consecutive
samples; non-finite values are dropped between runs of finite ones. Anything else (duplicates,
rows outside the window, values that need different scales) goes sample by sample through
``_general``. The compiled code is cached next to this file (``__pycache__``): compiling takes
several seconds once, loading it about a second per process.

Exactness (the SQL's ``exact_value(v) = v::varchar::decimal(38, 9)``): a float64 whose shortest
round-trip text has at most ``s`` decimals is the integer ``K = rint(v * 10**s)`` scaled by
10**-s, provided ``float(K) / 10**s == v`` and ``|v| * 10**s < 2**50`` (so K is found without
rounding error and is the only such decimal in v's rounding interval); an integer-valued float
with ``|v| <= 2**53`` is itself (s = 0). ``_exact`` gives a value's smallest scale in
(0, 3, 6, 9); ``_fast`` uses one scale for the whole series (the same exact values). The sums of
K * held ms and of the K before each reset are kept per scale in two int64 limbs (K split at
bit 32): they cannot overflow while the window is under 2**30 ms, since a series' held times add
up to at most the window and it has at most one sample per ms. The limbs are combined per series
in Python integers (the in-day increase is ``K_last - K_first`` plus the values before resets).
Series with a value no scale fits (e.g. 1/3, or fractional values above 2**20) go through
DuckDB's own ``exact_value`` for their samples.

Checks stay on: series ids ascending within a row group and row groups of different series
disjoint; timestamps non-decreasing within a series, over all its rows (exact duplicates of
(series, ts) are collapsed to the larger value and counted as conflicts, as the SQL does); a violation raises
``raw.RawLayoutError`` naming the file, row group and series. Raw inputs that are not in this layout (overlapping files)
are merged per overlapping group of row groups, or, past a size limit, computed by the SQL.

``gauge_peaks_by_day`` is the engine of ``int_gauge_peaks_by_day`` (the peak over time of each
customer's sum of gauge levels): the gauge series, their carried-in samples and the gauge event
spans come from the model's own CTEs (one DuckDB query, small tables); the day's samples of those
series are gathered from the raw row groups by compiled code, each row group into its own slice of
two arrays sized from its series ids (12 bytes a sample: ms after the day's start as int32, the
value), then packed; compiled code turns them into level changes per customer,
meter and dimension (one per sample, plus one where a level goes stale), orders them by time (a
counting sort) and sums them exactly in int64 at the group's largest decimal scale (values no
scale fits, or sums that could pass 2**62, run the SQL instead). When those arrays and the level
changes of the groups swept at once would pass ``GAUGE_MEMORY_BYTES`` (256 MB: about 3,000 gauge
series a day at 15 s), the day is cut into time slices: the one pass over the raw rows appends each unit's samples
of every slice to that slice's file in a temporary directory (with each series' samples at its last
ts before the slice, the level holding at its start), then the slices are read back and swept one at
a time; a group's peak is the largest of its slices' peaks (the sum at an instant is the same in any
slice holding it) and its held time their sum, so the result is the same, to the unit.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from numba import njit

from billing_dags.core.settings import STALENESS_MS, Paths
from billing_dags.ingest import raw
from billing_dags.models.sqlmodels import UseSQLEngine

#: output schema of int_series_edges_by_day (what DuckDB's to_arrow_table gives for the SQL)
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
        ("duplicate_conflicts", pa.int64()),
    ]
)
COLUMNS = ["series_id", "ts", "value"]
SCALES = (0, 3, 6, 9)
#: 10**(9 - s) for each scale index: K * _NANO[i] counts 10**-9 units
_NANO = np.array([10**9, 10**6, 10**3, 1], dtype=object)
#: rows decoded at a time (the compiled code reads them while they are in the CPU cache)
BATCH_ROWS = 131_072
#: rows of overlapping row groups merged in memory before falling back to the SQL
MERGE_LIMIT_ROWS = int(os.environ.get("BILLING_FASTPATH_MERGE_ROWS", 8_000_000))
_MAX_DEC = 10**38
_F2_50 = 2.0**50
_F2_53 = 2.0**53
_LIMB = 32  # the exact sums are split into limbs at bit 32 (see the docstring)
_MAX_WINDOW_BITS = 30  # longer windows could overflow the limbs: computed by the SQL
_KMIN = -(2**63)
_BLOCK = 256  # rows per block of the first pass (non-finite values are located per block)

# the compiled pass's integer output, one row per series (columns), and its float output
(
    _SID,
    _SAMPLES,
    _DROPPED,
    _FIRST_TS,
    _LAST_TS,
    _RESETS,
    _COVERED,
    _MAX_GAP,
    _K_FIRST,
    _S_FIRST,
    _K_LAST,
    _S_LAST,
    _K_PEAK,
    _S_PEAK,
    _SLOW,
    _ROW0,
    _ROW1,
    _CONFLICTS,
) = range(18)
_ACC = 18  # + 16 limb sums: integral high (4 scales), integral low, reset high, reset low
_NCOL = _ACC + 16
_FIRST_V, _LAST_V, _PEAK = range(3)
# statuses of the compiled pass
_DONE, _FULL, _TS_BACK, _SERIES_BACK = range(4)


class FallbackToSQL(UseSQLEngine):
    """The raw input is outside what the streaming path handles; the caller runs the SQL."""


@dataclass(frozen=True)
class _Unit:
    """One row group (or, when row groups overlap, several to merge) to reduce."""

    parts: tuple[tuple[Path, int], ...]
    lo: int | None
    hi: int | None
    rows: int


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
            if t is not None and t.has_min_max and (t.max < start_ms or t.min >= end_ms):
                continue  # nothing of this row group is in the window
            groups.append((lo, hi, f, g, rg.num_rows))
    if any(lo is None for lo, *_ in groups):
        if len(groups) > 1:
            raise FallbackToSQL("row groups without series_id statistics")
        return [_Unit(((g[2], g[3]),), None, None, g[4]) for g in groups]
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
        out.append(_Unit(tuple((g[2], g[3]) for g in u), u[0][0], max(g[1] for g in u), rows))
    return out


# --------------------------------------------------------------------------- the compiled pass


@njit(nogil=True, cache=True, error_model="numpy")
def _exact(x):
    """(K, i): x is exactly the decimal K * 10**-SCALES[i] (its shortest text); i = -1 if no scale fits."""
    a = abs(x)
    if a <= _F2_53:
        k = np.int64(x)
        if k == x:
            return k, 0
    p = 1.0
    for i in range(1, 4):
        p *= 1000.0
        if a < _F2_50 / p:
            r = np.rint(x * p)
            if r / p == x:
                return np.int64(r), i
    return np.int64(0), -1


@njit(nogil=True, cache=True, error_model="numpy")
def _exact_all(values, k, i):
    for j in range(len(values)):
        k[j], i[j] = _exact(values[j])


@njit(nogil=True, cache=True, error_model="numpy")
def _put(o, f, s, nsamp, dropped, first_t, last_t, resets, covered, maxgap, kf, sf, kl, sl, kp, sp, slow, r0, r1, conflicts, first_v, last_v, peak):
    o[_SID] = s
    o[_SAMPLES] = nsamp
    o[_DROPPED] = dropped
    o[_FIRST_TS] = first_t
    o[_LAST_TS] = last_t
    o[_RESETS] = resets
    o[_COVERED] = covered
    o[_MAX_GAP] = maxgap
    o[_K_FIRST] = kf
    o[_S_FIRST] = sf
    o[_K_LAST] = kl
    o[_S_LAST] = sl
    o[_K_PEAK] = kp
    o[_S_PEAK] = sp
    o[_SLOW] = slow
    o[_ROW0] = r0
    o[_ROW1] = r1
    o[_CONFLICTS] = conflicts
    f[_FIRST_V] = first_v
    f[_LAST_V] = last_v
    f[_PEAK] = peak


@njit(nogil=True, cache=True, error_model="numpy")
def _scan(sid, ts, v, s, scale, k, nanblocks):
    """First pass over one series' rows (sid, ts, v are its slices): k[j] = K of v[j] at ``scale``.

    Vectorised (unsigned indices: no wrap-around checks). Returns (rows of another series,
    smallest ts step, values not exact at the scale or not finite, non-finite values, largest
    finite K, blocks with a non-finite value, whose starts go to ``nanblocks``).
    """
    n = np.uint64(len(ts))
    one = np.uint64(1)
    step = np.uint64(_BLOCK)
    p = 1.0
    for _ in range(scale):
        p *= 1000.0
    lim = _F2_53 + 2.0 if scale == 0 else _F2_50 / p  # |x| <= 2**53 at scale 0
    other = np.int64(0)
    bad = np.int64(0)
    nonfin = np.int64(0)
    kmax = np.int64(_KMIN)
    mind = np.int64(1)
    nb = 0
    b0 = np.uint64(0)
    while b0 < n:
        b1 = min(b0 + step, n)
        nf = np.int64(0)
        if scale == 0:
            for j in range(b0, b1):
                x = v[j]
                inr = abs(x) < lim
                kj = np.int64(x if inr else 0.0)
                k[j] = kj
                fin = x - x == 0.0
                nf += np.int64(not fin)
                bad += np.int64(not (inr & (np.float64(kj) == x)))
                kmax = max(kmax, kj if fin else _KMIN)
                other += np.int64(sid[j] != s)
        else:
            for j in range(b0, b1):
                x = v[j]
                r = np.rint(x * p)
                inr = abs(x) < lim
                kj = np.int64(r if inr else 0.0)
                k[j] = kj
                fin = x - x == 0.0
                nf += np.int64(not fin)
                bad += np.int64(not (inr & (r / p == x)))
                kmax = max(kmax, kj if fin else _KMIN)
                other += np.int64(sid[j] != s)
        for j in range(max(b0, one), b1):
            mind = min(mind, ts[j] - ts[j - one])
        if nf:
            nanblocks[nb] = np.int64(b0)
            nb += 1
            nonfin += nf
        b0 = b1
    return other, mind, bad, nonfin, kmax, nb


@njit(nogil=True, cache=True, error_model="numpy")
def _pairs(ts, v, k, a, b, stale_ms):
    """Consecutive samples (j - 1, j) for j in (a, b), all finite: sample j - 1 holds until ts[j].

    Vectorised. Returns (largest gap, held ms, resets, integral high limb, low limb, reset high, low).
    """
    one = np.uint64(1)
    m32 = np.int64(0xFFFFFFFF)
    m31 = np.int64(0x7FFFFFFF)
    maxgap = np.int64(0)
    covered = np.int64(0)
    resets = np.int64(0)
    ih = np.int64(0)
    il = np.int64(0)
    rh = np.int64(0)
    rl = np.int64(0)
    for j in range(np.uint64(a) + one, np.uint64(b)):
        d = ts[j] - ts[j - one]
        maxgap = max(maxgap, d)
        held = min(d, stale_ms) & m31  # 0 < held < 2**31 here: 32-bit multiplies
        covered += held
        kp = k[j - one]
        hi = kp >> 32
        lo = kp & m32
        ih += hi * held
        il += lo * held
        m = -np.int64(v[j] < v[j - one])  # all ones at a reset
        resets -= m
        rh += hi & m
        rl += lo & m
    return maxgap, covered, resets, ih, il, rh, rl


@njit(nogil=True, cache=True, error_model="numpy")
def _fast(s, sid, ts, v, start_ms, end_ms, stale_ms, scale, k, nanblocks, o, f):
    """One series (slices of its rows) when it is simple: timestamps strictly increasing inside
    the window, every finite value exact at ``scale`` (index into SCALES). Returns 0 (output row
    written), 1 (a value is not exact at this scale: try another) or 2 (not simple: duplicates,
    rows outside the window, timestamps or series out of order)."""
    n = len(ts)
    if ts[0] < start_ms or ts[n - 1] >= end_ms:
        return 2
    other, mind, bad, nonfin, kmax, nb = _scan(sid, ts, v, s, scale, k, nanblocks)
    if other or mind <= 0:
        return 2
    if bad > nonfin:
        return 1
    if nonfin == n:  # every sample dropped
        o[:] = 0
        f[:] = 0.0
        o[_SID] = s
        o[_DROPPED] = n
        return 0
    m32 = np.int64(0xFFFFFFFF)
    maxgap = np.int64(0)
    covered = np.int64(0)
    resets = np.int64(0)
    ih = np.int64(0)
    il = np.int64(0)
    rh = np.int64(0)
    rl = np.int64(0)
    # the runs of finite values, between the non-finite ones (found in the flagged blocks)
    runs = np.empty(2 * (nonfin + 1), dtype=np.int64)
    nr = 0
    a = 0
    for q in range(nb):
        for j in range(nanblocks[q], min(nanblocks[q] + _BLOCK, n)):
            if not np.isfinite(v[j]):
                if j > a:
                    runs[nr] = a
                    runs[nr + 1] = j
                    nr += 2
                a = j + 1
    if n > a:
        runs[nr] = a
        runs[nr + 1] = n
        nr += 2
    last = -1  # the last finite sample summed so far
    for q in range(0, nr, 2):
        a = runs[q]
        if last >= 0:  # the sample before the non-finite ones holds until the run's first
            d = ts[a] - ts[last]
            maxgap = max(maxgap, d)
            held = min(d, stale_ms)
            covered += held
            ih += (k[last] >> 32) * held
            il += (k[last] & m32) * held
            if v[a] < v[last]:
                resets += 1
                rh += k[last] >> 32
                rl += k[last] & m32
        g, c, r, a1, a2, a3, a4 = _pairs(ts, v, k, a, runs[q + 1], stale_ms)
        maxgap = max(maxgap, g)
        covered += c
        resets += r
        ih += a1
        il += a2
        rh += a3
        rl += a4
        last = runs[q + 1] - 1
    first = runs[0]
    held = min(end_ms - ts[last], stale_ms)
    covered += held
    ih += (k[last] >> 32) * held
    il += (k[last] & m32) * held
    p = 1.0
    for _ in range(scale):
        p *= 1000.0
    _put(
        o,
        f,
        s,
        n - nonfin,
        nonfin,
        ts[first],
        ts[last],
        resets,
        covered,
        maxgap,
        k[first],
        scale,
        k[last],
        scale,
        kmax,
        scale,
        np.int64(0),
        np.int64(0),
        np.int64(n),
        np.int64(0),
        v[first],
        v[last],
        kmax / p,
    )
    o[_ACC : _ACC + 16] = 0
    o[_ACC + scale] = ih
    o[_ACC + 4 + scale] = il
    o[_ACC + 8 + scale] = rh
    o[_ACC + 12 + scale] = rl
    return 0


@njit(nogil=True, cache=True, error_model="numpy")
def _general(s, ts, v, start_ms, end_ms, stale_ms, o, f):
    """One series (its slices), sample by sample: the window, duplicates (the larger value is kept,
    a timestamp with different values counted once as a conflict) and each value at its own
    smallest scale. Returns (status, error row, error value); no row of
    the series inside the window leaves o[_SAMPLES] = o[_DROPPED] = 0."""
    m32 = np.int64(0xFFFFFFFF)
    acc = o[_ACC : _ACC + 16]
    acc[:] = 0
    n = len(ts)
    seen = np.int64(-9223372036854775807) - 1
    dropped = 0
    nsamp = 0
    resets = 0
    conflicts = 0
    conflict = False  # the pending timestamp already counted as a conflict
    covered = np.int64(0)
    maxgap = np.int64(0)
    slow = 0
    first_t = np.int64(0)
    last_t = np.int64(0)
    first_v = 0.0
    last_v = 0.0
    peak = 0.0
    kf = np.int64(0)
    sf = 0
    kl = np.int64(0)
    sl = 0
    have = False
    pt = np.int64(0)
    pv = 0.0
    t = np.int64(0)
    x = 0.0
    row = 0
    while True:
        final = False
        if row < n:
            t = ts[row]
            x = v[row]
            row += 1
            if t < seen:
                return _TS_BACK, row - 1, seen
            seen = t
            if t < start_ms or t >= end_ms:
                continue
            if not np.isfinite(x):
                dropped += 1
                continue
            if not have:
                pt = t
                pv = x
                have = True
                continue
            if t == pt:  # a duplicate of (series, ts): the larger value stays
                if x != pv and not conflict:
                    conflicts += 1
                    conflict = True
                if x > pv:
                    pv = x
                continue
            nt = t
        else:
            if not have:
                break
            nt = end_ms
            final = True
        # the pending sample (pt, pv) is final: it holds until nt, at most the staleness limit
        k, i = _exact(pv)
        held = min(nt - pt, stale_ms)
        covered += held
        if nsamp == 0:
            first_t = pt
            first_v = pv
            kf = k
            sf = i
            peak = pv
        else:
            maxgap = max(maxgap, pt - last_t)
            if pv < last_v:
                resets += 1
                if sl >= 0:
                    acc[8 + sl] += kl >> 32
                    acc[12 + sl] += kl & m32
            if pv > peak:
                peak = pv
        if i >= 0:
            acc[i] += (k >> 32) * held
            acc[4 + i] += (k & m32) * held
        else:
            slow = 1
        nsamp += 1
        last_t = pt
        last_v = pv
        kl = k
        sl = i
        if final:
            break
        pt = t
        pv = x
        conflict = False
    kp, sp = _exact(peak)
    _put(
        o,
        f,
        s,
        nsamp,
        dropped,
        first_t,
        last_t,
        resets,
        covered,
        maxgap,
        kf,
        sf,
        kl,
        sl,
        kp,
        sp,
        slow,
        np.int64(0),
        np.int64(n),
        conflicts,
        first_v,
        last_v,
        peak,
    )
    return _DONE, 0, 0


@njit(nogil=True, cache=True, error_model="numpy")
def _series_end(sid, r0, s, guess):
    """The first row after r0 of another series than s, if the rows are sorted (checked by _scan)."""
    n = len(sid)
    hi = r0 + guess
    if hi <= n and sid[hi - 1] == s and (hi == n or sid[hi] != s):
        return hi
    lo = r0  # sid[lo] == s; gallop, then bisect
    step = 1
    hi = lo + step
    while hi < n and sid[hi] == s:
        lo = hi
        step *= 2
        hi = lo + step
    hi = min(hi, n)
    while hi - lo > 1:
        mid = (lo + hi) >> 1
        if sid[mid] == s:
            lo = mid
        else:
            hi = mid
    return hi


@njit(nogil=True, cache=True, error_model="numpy")
def _edges(sid, ts, v, row, cur, have_cur, partial, start_ms, end_ms, stale_ms, oi, of):
    """Reduce rows [row, len) (sorted by series, ts) into one output row per series.

    Returns (series written, next row, status, error row, error value, last series id, have one).
    With ``partial``, the last series (the one reaching the end of the arrays, which may go on in
    the next batch) is left: the next row is its first. Stops with _FULL at a series boundary
    when ``oi`` is full (call again from the next row), or at the first row that breaks the
    layout (_TS_BACK: error value = the previous ts; _SERIES_BACK: error value = the previous
    series).
    """
    n = len(sid)
    cap = oi.shape[0]
    nout = 0
    scale = np.int64(0)  # the last series' scale: neighbours are usually alike
    length = 1
    k = np.empty(8192, dtype=np.int64)
    nanblocks = np.empty(8192 // _BLOCK + 1, dtype=np.int64)
    while row < n:
        s = sid[row]
        if have_cur and s <= cur:
            return nout, row, _SERIES_BACK, row, cur, cur, have_cur
        if nout == cap:
            return nout, row, _FULL, 0, 0, cur, have_cur
        r0 = row
        r1 = _series_end(sid, r0, s, length)
        if partial and r1 == n:
            break
        cur = s
        have_cur = 1
        if r1 - r0 > len(k):
            k = np.empty(2 * (r1 - r0), dtype=np.int64)
            nanblocks = np.empty(len(k) // _BLOCK + 1, dtype=np.int64)
        o = oi[nout]
        f = of[nout]
        st = _fast(s, sid[r0:r1], ts[r0:r1], v[r0:r1], start_ms, end_ms, stale_ms, scale, k, nanblocks, o, f)
        if st == 1:  # not exact at the last series' scale: the others, smallest first
            tried = scale
            for scale in range(4):
                if scale != tried:
                    st = _fast(s, sid[r0:r1], ts[r0:r1], v[r0:r1], start_ms, end_ms, stale_ms, scale, k, nanblocks, o, f)
                    if st != 1:
                        break
        if st != 0:
            scale = np.int64(0)
            r1 = r0 + 1
            while r1 < n and sid[r1] == s:
                r1 += 1
            st, err_row, err_val = _general(s, ts[r0:r1], v[r0:r1], start_ms, end_ms, stale_ms, o, f)
            if st != _DONE:
                return nout, r0 + err_row, st, r0 + err_row, err_val, cur, have_cur
        row = r1
        length = r1 - r0
        if o[_SAMPLES] == 0 and o[_DROPPED] == 0:
            continue  # no row of this series inside the window
        o[_ROW0] = r0
        o[_ROW1] = r1
        nout += 1
    return nout, row, _DONE, 0, 0, cur, have_cur


# --------------------------------------------------------------------------- exact helpers


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
    """exact_value(v) * 10**9 for each value, as an object array of Python ints (the compiled
    code's scale rule, ``_exact``; DuckDB for values no scale fits)."""
    values = np.ascontiguousarray(values, dtype=np.float64)
    k = np.empty(len(values), dtype=np.int64)
    i = np.empty(len(values), dtype=np.int64)
    _exact_all(values, k, i)
    out = k.astype(object) * _NANO[np.maximum(i, 0)]
    slow = i < 0
    if slow.any():
        out[slow] = _duckdb_nano(values[slow])
    return out


def _slow_sums(ts: np.ndarray, v: np.ndarray, spans: np.ndarray, start_ms: int, end_ms: int) -> list[tuple[int, int]]:
    """(in-day increase, integral) in 10**-9 units of the series in rows spans[j] = (row0, row1), by DuckDB's exact_value."""
    series = []
    for r0, r1 in spans.tolist():
        t, x = ts[r0:r1], v[r0:r1]
        keep = (t >= start_ms) & (t < end_ms) & np.isfinite(x)
        t, x = t[keep], x[keep]
        order = np.lexsort((-x, t))  # duplicates of a ts: the larger value first, and kept
        t, x = t[order], x[order]
        first = np.r_[True, t[1:] != t[:-1]]
        series.append((t[first], x[first]))
    nano = _duckdb_nano(np.concatenate([x for _, x in series]))
    out = []
    pos = 0
    for t, x in series:
        nn = nano[pos : pos + len(x)]
        pos += len(x)
        held = np.minimum(np.diff(t, append=end_ms), STALENESS_MS).astype(object)
        before_reset = np.flatnonzero(x[1:] < x[:-1])
        out.append((nn[-1] - nn[0] + int(nn[before_reset].sum()), int((nn * held).sum())))
    return out


def _arrays(batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(series_id, ts, value) of a record batch or table as read-only contiguous int64, int64,
    float64 arrays (one compiled specialisation: Arrow's own are read-only)."""
    out = []
    for name, typ in zip(COLUMNS, (np.int64, np.int64, np.float64)):
        col = batch.column(name)
        if isinstance(col, pa.ChunkedArray):
            col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
        a = col.to_numpy(zero_copy_only=False)
        if a.dtype != typ or not a.flags.c_contiguous:
            a = np.ascontiguousarray(a, dtype=typ)
        a.flags.writeable = False
        out.append(a)
    return tuple(out)


def _batches(unit: _Unit, start_ms: int, end_ms: int):
    """The unit's rows as (series_id, ts, value) arrays, in order, a few thousand series at a time."""
    if len(unit.parts) == 1:
        f, g = unit.parts[0]
        for b in pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS, row_groups=[g], columns=COLUMNS, use_threads=False):
            yield _arrays(b)
        return
    # overlapping sources: merge (the sample-by-sample pass resolves duplicates of a ts)
    t = pa.concat_tables([pq.ParquetFile(f).read_row_group(g, columns=COLUMNS, use_threads=False) for f, g in unit.parts])
    sid, ts, v = _arrays(t)
    keep = (ts >= start_ms) & (ts < end_ms)
    sid, ts, v = sid[keep], ts[keep], v[keep]
    order = np.lexsort((v, ts, sid))
    out = sid[order], ts[order], v[order]
    for a in out:
        a.flags.writeable = False
    yield out


def _where(unit: _Unit) -> str:
    return ", ".join(f"{f} row group {g}" for f, g in unit.parts)


class _Sink:
    """The output rows of one unit, appended call after call of the compiled code."""

    def __init__(self, unit: _Unit, start_ms: int, end_ms: int):
        self.unit, self.start_ms, self.end_ms = unit, start_ms, end_ms
        cap = max(64, unit.rows // 1024)
        self.oi = np.empty((cap, _NCOL), dtype=np.int64)
        self.of = np.empty((cap, 3), dtype=np.float64)
        self.n = 0
        self.cur = self.have_cur = 0
        self.slow: dict[int, tuple[int, int]] = {}  # output row -> (increase, integral), by DuckDB

    def run(self, sid: np.ndarray, ts: np.ndarray, v: np.ndarray, partial: bool) -> int:
        """Reduce the series of these rows (with ``partial``, all but the last); returns the next row."""
        row = 0
        while True:
            if self.n == len(self.oi):
                self.oi = np.concatenate([self.oi, np.empty_like(self.oi)])
                self.of = np.concatenate([self.of, np.empty_like(self.of)])
            nout, row, status, err_row, err_val, self.cur, self.have_cur = _edges(
                sid,
                ts,
                v,
                row,
                self.cur,
                self.have_cur,
                partial,
                self.start_ms,
                self.end_ms,
                STALENESS_MS,
                self.oi[self.n :],
                self.of[self.n :],
            )
            if status == _TS_BACK:
                raise raw.RawLayoutError(
                    f"{_where(self.unit)}: timestamps of series {int(sid[err_row])} go back in time ({err_val} then "
                    f"{int(ts[err_row])} ms); raw files must be sorted by (series_id, ts) — rewrite the day with raw.write_day"
                )
            if status == _SERIES_BACK:
                raise raw.RawLayoutError(
                    f"{_where(self.unit)}: series {int(sid[err_row])} follows series {err_val}: the rows are not sorted by "
                    "(series_id, ts) with each series contiguous; rewrite the day with raw.write_day"
                )
            new = self.oi[self.n : self.n + nout]
            slow = np.flatnonzero(new[:, _SLOW])
            if len(slow):  # no decimal scale fits some value: DuckDB's exact_value for these series
                sums = _slow_sums(ts, v, new[slow][:, [_ROW0, _ROW1]], self.start_ms, self.end_ms)
                self.slow.update(zip((self.n + slow).tolist(), sums))
            self.n += nout
            if status == _DONE:
                return row

    def result(self) -> dict | None:
        oi, of = self.oi[: self.n], self.of[: self.n]
        if len(oi) == 0:
            return None
        unit = self.unit
        if unit.lo is not None and (int(oi[0, _SID]) < unit.lo or int(oi[-1, _SID]) > unit.hi):
            raise raw.RawLayoutError(f"{_where(unit)}: series ids outside the row group's statistics")
        # exact sums in 10**-9 units, Python ints: the limbs per scale
        integral = np.zeros(len(oi), dtype=object)
        increase = np.zeros(len(oi), dtype=object)
        for i in range(4):
            a = oi[:, _ACC + i : _ACC + 16 : 4]  # integral high, low, reset high, low at scale i
            if a.any():
                integral += (a[:, 0].astype(object) * (1 << _LIMB) + a[:, 1].astype(object)) * _NANO[i]
                increase += (a[:, 2].astype(object) * (1 << _LIMB) + a[:, 3].astype(object)) * _NANO[i]
        live = oi[:, _SAMPLES] > 0
        increase += np.where(live, oi[:, _K_LAST].astype(object) * _NANO[oi[:, _S_LAST] & 3], 0)
        increase -= np.where(live, oi[:, _K_FIRST].astype(object) * _NANO[oi[:, _S_FIRST] & 3], 0)
        for j, (inc, integ) in self.slow.items():
            increase[j] = inc
            integral[j] = integ
        return {"ints": oi, "floats": of, "in_day_increase": increase, "in_day_integral": integral}


def _reduce(unit: _Unit, start_ms: int, end_ms: int) -> dict | None:
    sink = _Sink(unit, start_ms, end_ms)
    tail = None  # the rows of a series cut by the end of a batch, to complete with the next
    for sid, ts, v in _batches(unit, start_ms, end_ms):
        if len(sid) == 0:
            continue
        if tail is not None and len(tail[0]):
            s = tail[0][0]
            end = _series_end(sid, 0, s, 1) if sid[0] == s else 0
            tail = tuple(np.concatenate([a, b[:end]]) for a, b in zip(tail, (sid, ts, v)))
            if end == len(sid):
                continue
            for a in tail:
                a.flags.writeable = False
            sink.run(*tail, partial=False)
            sid, ts, v = sid[end:], ts[end:], v[end:]
        row = sink.run(sid, ts, v, partial=True)
        tail = (sid[row:], ts[row:], v[row:])
    if tail is not None and len(tail[0]):
        for a in tail:
            a.flags.writeable = False
        sink.run(*tail, partial=False)
    return sink.result()


# --------------------------------------------------------------------------- assembly


def _decimal_array(nano: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """DECIMAL(38, 9) from Python ints counting 10**-9 units (two's complement, 16 bytes each)."""
    n = len(nano)
    if valid is not None and not valid.all():
        nano = np.where(valid, nano, 0)
    if n and ((nano >= _MAX_DEC) | (nano <= -_MAX_DEC)).any():
        x = next(int(x) for x in nano if not -_MAX_DEC < x < _MAX_DEC)
        raise OverflowError(f"value {x}e-9 does not fit DECIMAL(38, 9)")
    words = np.empty((n, 2), dtype=np.uint64)  # little-endian: low 64 bits, then high 64 bits
    if n:
        words[:, 0] = (nano & 0xFFFFFFFFFFFFFFFF).astype(np.uint64)
        words[:, 1] = (nano >> 64).astype(np.int64).view(np.uint64)
    arr = pa.Array.from_buffers(DEC, n, [None, pa.py_buffer(words)])
    if valid is not None and not valid.all():
        arr = pc.if_else(pa.array(valid), arr, pa.scalar(None, DEC))
    return arr


def _assemble(day: date, parts: list[dict]) -> pa.Table:
    if parts:
        oi = np.concatenate([p["ints"] for p in parts])
        of = np.concatenate([p["floats"] for p in parts])
        increase = np.concatenate([p["in_day_increase"] for p in parts])
        integral = np.concatenate([p["in_day_integral"] for p in parts])
    else:
        oi, of = np.empty((0, _NCOL), dtype=np.int64), np.empty((0, 3))
        increase = integral = np.empty(0, dtype=object)
    n = len(oi)
    valid = oi[:, _SAMPLES] > 0  # a series whose every sample in the window was dropped has nulls
    nulls = None if valid.all() else ~valid

    def opt(a, typ):
        return pa.array(a, type=typ, mask=nulls)

    peak = oi[:, _K_PEAK].astype(object) * _NANO[oi[:, _S_PEAK] & 3]
    by_duckdb = valid & (oi[:, _S_PEAK] < 0)  # no decimal scale fits the peak
    if by_duckdb.any():
        peak[by_duckdb] = _duckdb_nano(of[by_duckdb, _PEAK])
    return pa.table(
        [
            pa.array(np.full(n, (day - date(1970, 1, 1)).days, dtype=np.int32), pa.int32()).cast(pa.date32()),
            pa.array(oi[:, _SID], pa.int64()),
            pa.array(oi[:, _SAMPLES], pa.int64()),
            pa.array(oi[:, _DROPPED], pa.int64()),
            opt(oi[:, _FIRST_TS], pa.int64()),
            opt(of[:, _FIRST_V], pa.float64()),
            opt(oi[:, _LAST_TS], pa.int64()),
            opt(of[:, _LAST_V], pa.float64()),
            _decimal_array(increase),
            pa.array(oi[:, _RESETS], pa.int64()),
            _decimal_array(peak, valid),
            _decimal_array(integral),
            pa.array(oi[:, _COVERED], pa.int64()),
            pa.array(oi[:, _MAX_GAP], pa.int64()),
            pa.array(oi[:, _CONFLICTS], pa.int64()),
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
    except Exception:
        pass


def series_edges(files: list[Path], day: date, start_ms: int, end_ms: int, *, threads: int | None = None) -> pa.Table:
    """int_series_edges_by_day for the window [start_ms, end_ms) (``day`` = its first day) from raw files."""
    if (end_ms - start_ms).bit_length() > _MAX_WINDOW_BITS:
        raise FallbackToSQL(f"a window of {end_ms - start_ms:,} ms")
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


def edges_by_day(paths: Paths, model, window, threads: int | None = None) -> pa.Table:
    """Engine entry point (``python: billing_dags.models.fastpath:edges_by_day`` in the model's config)."""
    files = []
    d = window.start
    while d < window.end:
        files += raw.sample_files(paths, d, window.shard)
        d = date.fromordinal(d.toordinal() + 1)
    return series_edges(files, window.start, window.start_ms, window.end_ms, threads=threads)


# --------------------------------------------------------------------------- int_gauge_peaks_by_day

PEAKS_SCHEMA = pa.schema(
    [
        ("day", pa.date32()),
        ("customer_id", pa.string()),
        ("meter_id", pa.string()),
        ("dimension", pa.string()),
        ("gauge_peak", DEC),
        ("gauge_held_ms", pa.int64()),
    ]
)
_BOUND = 2.0**62  # the sum of a group's levels at one scale must stay below this (int64 sums)
#: the gauge samples (12 bytes each) and level changes held at once; a day that needs more is swept in time
#: slices, its samples spilled to files in TMPDIR in the one pass over the raw rows (BILLING_GAUGE_MEMORY_MB)
GAUGE_MEMORY_BYTES = int(os.environ.get("BILLING_GAUGE_MEMORY_MB", "256")) << 20
GAUGE_SWEEP_BYTES = 48  # per sample of a group being swept: two level changes (time, change, held) and their order
GAUGE_MAX_SLICES = 1440


@njit(nogil=True, cache=True, error_model="numpy", inline="always")
def _series_run(sid, r, gsid):
    """The end of the run of equal series ids that starts at row ``r``, and that series' index in
    ``gsid`` (sorted gauge series ids; -1 when it is not one of them)."""
    n = len(sid)
    s = sid[r]
    r1 = r + 1
    while r1 < n and sid[r1] == s:
        r1 += 1
    g = np.searchsorted(gsid, s)
    if g < len(gsid) and gsid[g] == s:
        return r1, g
    return r1, -1


@njit(nogil=True, cache=True, error_model="numpy")
def _gauge_count(sid, gsid, count):
    """Rows of ``sid`` (a row group's series ids) that belong to the gauge series ``gsid`` (sorted),
    also added per series to ``count``."""
    n = len(sid)
    m = 0
    r = 0
    while r < n:
        r1, g = _series_run(sid, r, gsid)
        if g >= 0:
            m += r1 - r
            count[g] += r1 - r
        r = r1
    return m


@njit(nogil=True, cache=True, error_model="numpy")
def _gauge_take(sid, ts, v, gsid, start_ms, end_ms, out_t, out_v, m, count, state):
    """Append the rows of the gauge series ``gsid`` (sorted) inside [start_ms, end_ms) with a finite
    value to out_t (ms after start_ms, int32) and out_v from position m, counting them per series
    in ``count``. ``state``: the indices in gsid of the first and the last gauge series seen (-1:
    none) and the last row's ts taken; returns (new m, status): status 1 when a gauge series comes
    after a later one (rows not sorted by series), 2 when the timestamps of series state[1] go back."""
    n = len(sid)
    r = 0
    while r < n:
        r1, g = _series_run(sid, r, gsid)
        if g >= 0:
            if g < state[1]:
                return m, 1
            if g > state[1]:
                state[2] = _KMIN
            if state[0] < 0:
                state[0] = g
            state[1] = g
            for j in range(r, r1):
                if ts[j] >= start_ms and ts[j] < end_ms and np.isfinite(v[j]):
                    if ts[j] < state[2]:
                        return m, 2
                    state[2] = ts[j]
                    out_t[m] = ts[j] - start_ms
                    out_v[m] = v[j]
                    m += 1
                    count[g] += 1
        r = r1
    return m, 0


@njit(nogil=True, cache=True, error_model="numpy")
def _slice_counts(t, count, g0, g1, cuts, out_count):
    """For the samples t of the gauge series g0..g1 (in series order, count[g] rows each, t sorted
    within a series): each series' rows in each time slice [cuts[p], cuts[p + 1]) after its rows
    at its last ts before the slice (the level holding at its start), into out_count[p, g]; returns
    the first of those rows per (slice, series) in ``first`` and the total."""
    nslices = len(cuts) - 1
    first = np.empty((nslices, g1 - g0 + 1), dtype=np.int64)
    total = 0
    r0 = 0
    for g in range(g0, g1 + 1):
        r1 = r0 + count[g]
        a = r0
        for p in range(nslices):
            q = a
            while q > r0 and t[q - 1] == t[a - 1]:
                q -= 1
            b = a
            while b < r1 and t[b] < cuts[p + 1]:
                b += 1
            first[p, g - g0] = q
            out_count[p, g] = b - q
            total += b - q
            a = b
        r0 = r1
    return first, total


@njit(nogil=True, cache=True, error_model="numpy")
def _slice_copy(t, v, first, out_count, g0, out_t, out_v, offsets):
    """The rows counted by ``_slice_counts`` into out_t, out_v: slice p's rows from offsets[p], in series order."""
    for p in range(first.shape[0]):
        m = offsets[p]
        for i in range(first.shape[1]):
            q = first[p, i]
            for j in range(q, q + out_count[p, g0 + i]):
                out_t[m] = t[j]
                out_v[m] = v[j]
                m += 1


@njit(nogil=True, cache=True, error_model="numpy")
def _pow1000(e):
    p = np.int64(1)
    for _ in range(e):
        p *= 1000
    return p


@njit(nogil=True, cache=True, error_model="numpy")
def _time_order(at, start_ms, end_ms):
    """Indices that sort ``at`` (times in [start_ms, end_ms)): a counting sort into about one bucket
    per 4 values, then insertion sort inside each bucket (a crowded bucket by argsort)."""
    m = len(at)
    nb = max(1, m // 4)
    span = end_ms - start_ms
    count = np.zeros(nb + 1, dtype=np.int64)
    for r in range(m):
        count[(at[r] - start_ms) * nb // span + 1] += 1
    for b in range(nb):
        count[b + 1] += count[b]
    order = np.empty(m, dtype=np.int64)
    fill = count[:nb].copy()
    for r in range(m):
        b = (at[r] - start_ms) * nb // span
        order[fill[b]] = r
        fill[b] += 1
    for b in range(nb):
        lo, hi = count[b], count[b + 1]
        if hi - lo > 64:
            sub = order[lo:hi].copy()
            order[lo:hi] = sub[np.argsort(at[sub], kind="mergesort")]
            continue
        for r in range(lo + 1, hi):
            x = order[r]
            q = r - 1
            while q >= lo and at[order[q]] > at[x]:
                order[q + 1] = order[q]
                q -= 1
            order[q + 1] = x
    return order


@njit(nogil=True, cache=True, error_model="numpy")
def _gauge_sweep(
    ts,
    v,
    sample0,
    carried_ts,
    carried_v,
    has_carried,
    group_series,
    group0,
    ev_group0,
    ev_from,
    ev_until,
    ev_k,
    ev_scale,
    base_ms,
    lo_ms,
    hi_ms,
    stale_ms,
    peak_k,
    peak_scale,
    held_ms,
):
    """For each group (its series group_series[group0[g]:group0[g + 1]], samples in
    rows sample0[s]:sample0[s + 1], and its event spans ev_*[ev_group0[g]:ev_group0[g + 1]]), over
    the time [lo_ms, hi_ms) (the day, or a slice of it whose samples include each series' last one
    before lo_ms): the peak over time of the sum of the levels held (samples at ts ms after base_ms),
    exactly (int64 at the group's largest decimal scale), and the time some level holds (0: none,
    the peak is then meaningless). Returns (status, series or group): 0 done; 1 timestamps of a
    series go back; 2 a value no decimal scale fits; 3 the group's sums could overflow."""
    ngroups = len(group0) - 1
    for g in range(ngroups):
        # the group's decimal scale and a bound on its sums (at most one level per series at a time)
        scale = 0
        bound = 0.0
        npoints = 0
        for q in range(group0[g], group0[g + 1]):
            s = group_series[q]
            top = abs(carried_v[s]) if has_carried[s] else 0.0
            for j in range(sample0[s], sample0[s + 1]):
                if j > sample0[s] and ts[j] < ts[j - 1]:
                    return 1, s
                k, i = _exact(v[j])
                if i < 0:
                    return 2, s
                scale = max(scale, i)
                top = max(top, abs(v[j]))
            if has_carried[s]:
                k, i = _exact(carried_v[s])
                if i < 0:
                    return 2, s
                scale = max(scale, i)
            bound += top
            npoints += sample0[s + 1] - sample0[s] + 1
        for e in range(ev_group0[g], ev_group0[g + 1]):
            scale = max(scale, ev_scale[e])
        p = 1.0
        for _ in range(scale):
            p *= 1000.0
        bound *= p
        for e in range(ev_group0[g], ev_group0[g + 1]):
            bound += abs(float(ev_k[e])) * _pow1000(scale - ev_scale[e])
        if bound >= _BOUND:
            return 3, g
        # the level changes: where a sample starts to hold (the change from the level it replaces),
        # and where a level stops holding (staleness) before the day's end
        nev = 2 * (npoints + ev_group0[g + 1] - ev_group0[g])
        at = np.empty(nev, dtype=np.int64)
        dk = np.empty(nev, dtype=np.int64)
        dh = np.empty(nev, dtype=np.int8)
        m = 0
        for q in range(group0[g], group0[g + 1]):
            s = group_series[q]
            j0, j1 = sample0[s], sample0[s + 1]
            j = j0 - 1 if has_carried[s] else j0  # j0 - 1 stands for the carried sample
            k_held = np.int64(0)  # the series' level holding at ``until_held``
            until_held = lo_ms
            holding = False
            while j < j1:
                if j < j0:
                    t, x = carried_ts[s], carried_v[s]
                    nxt = j0
                else:
                    t, x = base_ms + ts[j], v[j]
                    nxt = j + 1
                    while nxt < j1 and base_ms + ts[nxt] == t:  # duplicates of a ts: the larger value
                        x = max(x, v[nxt])
                        nxt += 1
                until = min(base_ms + ts[nxt] if nxt < j1 else hi_ms, t + stale_ms, hi_ms)
                frm = max(t, lo_ms)
                if until > frm:
                    k, i = _exact(x)
                    k *= _pow1000(scale - i)
                    if holding and until_held == frm:  # the previous level holds up to here: one change
                        at[m], dk[m], dh[m] = frm, k - k_held, 0
                    else:
                        if holding:
                            at[m], dk[m], dh[m] = until_held, -k_held, -1
                            m += 1
                        at[m], dk[m], dh[m] = frm, k, 1
                    m += 1
                    k_held, until_held, holding = k, until, True
                j = nxt
            if holding and until_held < hi_ms:
                at[m], dk[m], dh[m] = until_held, -k_held, -1
                m += 1
        for e in range(ev_group0[g], ev_group0[g + 1]):
            frm = max(ev_from[e], lo_ms)
            until = min(ev_until[e], hi_ms)
            if until <= frm:
                continue
            k = ev_k[e] * _pow1000(scale - ev_scale[e])
            at[m], dk[m], dh[m] = frm, k, 1
            m += 1
            if until < hi_ms:
                at[m], dk[m], dh[m] = until, -k, -1
                m += 1
        order = _time_order(at[:m], lo_ms, hi_ms)
        level = np.int64(0)
        held = np.int64(0)
        have = False
        best = np.int64(0)
        covered = np.int64(0)
        for r in range(m):
            i = order[r]
            level += dk[i]
            held += dh[i]
            if r + 1 < m and at[order[r + 1]] == at[i]:
                continue  # every change at this instant first
            if held > 0:
                if not have or level > best:
                    best = level
                    have = True
                covered += (at[order[r + 1]] if r + 1 < m else hi_ms) - at[i]
        peak_k[g] = best
        peak_scale[g] = scale
        held_ms[g] = covered
    return 0, 0


def _model_cte(con, model, window, select: str) -> pa.Table:
    """Rows of a query over a model's CTEs (its ``select * from final`` replaced by ``select``)."""
    sql = model.sql.strip().rstrip(";")
    tail = "select * from final"
    if not sql.endswith(tail):
        raise FallbackToSQL(f"{model.path} does not end with {tail!r}")
    sql = sql[: -len(tail)] + select
    used = {k: v for k, v in window.params(model.lookback_days).items() if f"${k}" in sql}
    return con.sql(sql, params=used or None).to_arrow_table()


def _decimal_scaled(values) -> tuple[np.ndarray, np.ndarray]:
    """DECIMAL(38, 9) values as (K, scale index): value = K * 10**-SCALES[i], the smallest scale that fits int64."""
    ks, scales = np.empty(len(values), dtype=np.int64), np.empty(len(values), dtype=np.int64)
    for j, d in enumerate(values):
        nano = int(d.scaleb(9))
        for i in range(4):
            step = 10 ** (9 - SCALES[i])
            if nano % step == 0 and abs(nano // step) < 2**62:
                ks[j], scales[j] = nano // step, i
                break
        else:
            raise FallbackToSQL(f"gauge event level {d} too large for the compiled path")
    return ks, scales


def _gauge_rows_of(unit: _Unit, gsid: np.ndarray, count: np.ndarray) -> int:
    """An upper bound on the unit's rows of the gauge series ``gsid``: its rows of those series (series ids only),
    also added per series to ``count``."""
    return sum(
        _gauge_count(
            np.ascontiguousarray(pq.ParquetFile(f).read_row_group(g, columns=["series_id"], use_threads=False).column(0).to_numpy(), dtype=np.int64),
            gsid,
            count,
        )
        for f, g in unit.parts
    )


def _gauge_gather(unit: _Unit, gsid: np.ndarray, start_ms: int, end_ms: int, out_t: np.ndarray, out_v: np.ndarray, count: np.ndarray) -> tuple[int, int, int]:
    """The unit's samples of the gauge series into out_t, out_v (its own slice of the day's arrays),
    counted per series in ``count``: (rows written, first and last gauge series index, -1 if none)."""
    m, state = 0, np.array([-1, -1, _KMIN], dtype=np.int64)
    for sid, ts, v in _batches(unit, start_ms, end_ms):
        m, status = _gauge_take(sid, ts, v, gsid, start_ms, end_ms, out_t, out_v, m, count, state)
        if status == 1:
            raise raw.RawLayoutError(f"{_where(unit)}: series are not sorted by series_id; rewrite the day with raw.write_day")
        if status == 2:
            raise raw.RawLayoutError(f"{_where(unit)}: timestamps of series {int(gsid[state[1]])} go back in time; rewrite the day with raw.write_day")
    return m, int(state[0]), int(state[1])


def _slice_count(rows: int, group_rows: np.ndarray, threads: int) -> int:
    """Time slices of the day so that one slice's gauge samples (12 bytes each) and the level changes
    of the groups swept at once (GAUGE_SWEEP_BYTES per sample) fit GAUGE_MEMORY_BYTES."""
    largest = np.sort(group_rows)[::-1][:threads].sum() if len(group_rows) else 0
    need = 12 * rows + GAUGE_SWEEP_BYTES * int(largest)
    return int(min(GAUGE_MAX_SLICES, max(1, -(-need // max(1, GAUGE_MEMORY_BYTES)))))


class _Spill:
    """The day's gauge samples cut into time slices, in files of a temporary directory (TMPDIR): each
    unit appends its rows of every slice (``put``), then each slice is read back whole (``read``), in
    series order, with its rows per series in ``count[p]``."""

    def __init__(self, cuts: list[int], n: int):
        self.cuts = np.array(cuts, dtype=np.int64)
        # scratch files without a name (nothing is published; they vanish when closed or when the process dies)
        self.files = [tempfile.TemporaryFile(prefix="billing-gauge-") for _ in range(len(cuts) - 1)]  # noqa: SIM115 - closed in close()
        self.chunks: list[list[tuple[int, int, int]]] = [[] for _ in self.files]  # per slice: (unit, offset, rows)
        self.count = np.zeros((len(self.files), n), dtype=np.int64)
        self.first_t = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)  # each series' first ts (ms after the day's start)
        self.lock = threading.Lock()

    def put(self, unit: int, t: np.ndarray, v: np.ndarray, first: int, last: int, count: np.ndarray) -> None:
        c = count[first : last + 1]
        live = c > 0
        self.first_t[first : last + 1][live] = t[(np.cumsum(c) - c)[live]]
        starts, total = _slice_counts(t, count, first, last, self.cuts, self.count)
        sizes = self.count[:, first : last + 1].sum(axis=1)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        out_t, out_v = np.empty(total, dtype=t.dtype), np.empty(total, dtype=v.dtype)
        _slice_copy(t, v, starts, self.count, first, out_t, out_v, offsets)
        with self.lock:
            for p, f in enumerate(self.files):
                a, b = int(offsets[p]), int(offsets[p + 1])
                if b > a:
                    offset = f.seek(0, os.SEEK_END)
                    f.write(memoryview(out_t[a:b]))
                    f.write(memoryview(out_v[a:b]))
                    self.chunks[p].append((unit, offset, b - a))

    def read(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        chunks = sorted(self.chunks[p])  # units in series order
        rows = sum(m for _, _, m in chunks)
        t, v = np.empty(rows, dtype=np.int32), np.empty(rows, dtype=np.float64)
        pos, f = 0, self.files[p]
        for _, offset, m in chunks:
            f.seek(offset)
            for a in (t[pos : pos + m], v[pos : pos + m]):
                if f.readinto(memoryview(a).cast("B")) != a.nbytes:
                    raise OSError(f"{f.name}: short read")
            pos += m
        return t, v

    def close(self) -> None:
        for f in self.files:
            f.close()


#: the series with their carried sample, then the event spans, in one query (shared CTEs computed once)
_GAUGE_INPUTS = (
    "select 0 as part, series.series_id, series.customer_id, series.meter_id, series.dimension, "
    "carried.ts_ms as from_ms, carried.value, null::bigint as until_ms, null::decimal(38, 9) as level "
    "from series left join carried on carried.series_id = series.series_id "
    "union all select 1, null, customer_id, meter_id, dimension, from_ms, null, until_ms, level from event_spans "
    "order by part, series_id, customer_id"
)


def _sweep_slice(
    ts, v, rows, has_carried, carried_ts, carried_v, group_series, group0, ev_group0, ev_from, ev_until, ev_k, ev_scale, base_ms, lo_ms, hi_ms, threads, gsid
):  # fmt: skip
    """The compiled sweep of every group over [lo_ms, hi_ms), the series' samples ts, v in series order
    (``rows`` each): (peak K, its scale index, held ms) per group, the groups in ``threads`` parts of
    about as many samples each (the compiled code releases the GIL)."""
    ngroups = len(group0) - 1
    sample0 = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    peak_k, peak_scale, held = np.zeros(ngroups, np.int64), np.zeros(ngroups, np.int64), np.zeros(ngroups, np.int64)

    def sweep(a: int, b: int) -> tuple[int, int]:  # groups [a, b), on their own rows of the outputs
        return _gauge_sweep(
            ts, v, sample0, carried_ts, carried_v, has_carried, group_series, group0[a : b + 1], ev_group0[a : b + 1],
            ev_from, ev_until, ev_k, ev_scale, base_ms, lo_ms, hi_ms, STALENESS_MS, peak_k[a:b], peak_scale[a:b], held[a:b],
        )  # fmt: skip

    work = np.cumsum(np.diff(sample0)[group_series])[np.maximum(group0[1:] - 1, 0)] if len(rows) else np.zeros(ngroups)
    cuts = [0, *np.searchsorted(work, [work[-1] * i / threads for i in range(1, threads)]).tolist(), ngroups] if ngroups else [0, 0]
    slices = [(a, b) for a, b in itertools.pairwise(cuts) if b > a]
    if len(slices) <= 1:
        results = [(*sweep(a, b), a) for a, b in slices]
    else:
        with ThreadPoolExecutor(len(slices)) as pool:
            results = [(*f.result(), a) for f, (a, b) in zip([pool.submit(sweep, a, b) for a, b in slices], slices)]
    status, which = next(((st, w + (a if st == 3 else 0)) for st, w, a in results if st), (0, 0))
    if status == 1:
        raise raw.RawLayoutError(f"raw samples: timestamps of series {int(gsid[which])} go back in time; rewrite the day with raw.write_day")
    if status in (2, 3):
        raise FallbackToSQL("a gauge value no decimal scale fits, or sums beyond int64")
    return peak_k, peak_scale, held


def gauge_peaks(paths: Paths, model, window, *, threads: int | None = None, con=None, slices: int | None = None) -> pa.Table:
    """int_gauge_peaks_by_day for ``window`` (one day): the series, carried samples and event spans
    come from the model's own CTEs (DuckDB, small), the day's gauge samples from the raw files.
    ``con``: a session where everything the model reads for the window is already created
    (``sqlmodels.run_model_days``), else one is opened and prepared for the window. ``slices``: cut
    the day into that many time slices (default: as GAUGE_MEMORY_BYTES needs, usually 1)."""
    from billing_dags.models.sqlmodels import load_project, prepare, session

    start_ms, end_ms = window.start_ms, window.end_ms
    if (end_ms - start_ms).bit_length() > _MAX_WINDOW_BITS:
        raise FallbackToSQL(f"a window of {end_ms - start_ms:,} ms")
    if con is not None:
        rows = _model_cte(con, model, window, _GAUGE_INPUTS)
    else:
        with session(threads) as con:
            prepare(con, load_project(), model.name, paths, window)
            rows = _model_cte(con, model, window, _GAUGE_INPUTS)
    nseries = pc.sum(pc.equal(rows["part"], 0)).as_py() or 0
    series, events = rows.slice(0, nseries), rows.slice(nseries)
    groups: dict[tuple[str, str, str], int] = {}
    gsid = series["series_id"].to_numpy().astype(np.int64)
    sgroup = np.array(
        [groups.setdefault(k, len(groups)) for k in zip(*(series[c].to_pylist() for c in ("customer_id", "meter_id", "dimension")))],
        dtype=np.int64,
    )
    n = len(gsid)
    # a series id listed twice: its samples and its carried one go to the first of its rows (as its samples do)
    has_carried = series["from_ms"].is_valid().to_numpy(zero_copy_only=False) & (np.searchsorted(gsid, gsid) == np.arange(n))
    carried_ts = series["from_ms"].fill_null(0).to_numpy().astype(np.int64)
    carried_v = series["value"].fill_null(0.0).to_numpy().astype(np.float64)
    ev_columns = ("customer_id", "meter_id", "dimension", "from_ms", "until_ms", "level")
    ev = sorted(
        (groups.setdefault((cid, mid, dim), len(groups)), frm, until, level)
        for cid, mid, dim, frm, until, level in zip(*(events[c].to_pylist() for c in ev_columns))
    )
    ev_group = np.array([e[0] for e in ev], dtype=np.int64)
    ev_k, ev_scale = _decimal_scaled([e[3] for e in ev])
    ev_from = np.array([e[1] for e in ev], dtype=np.int64)
    ev_until = np.array([e[2] for e in ev], dtype=np.int64)

    ngroups = len(groups)
    group_series = np.argsort(sgroup, kind="stable").astype(np.int64)
    group0 = np.searchsorted(sgroup[group_series], np.arange(ngroups + 1)).astype(np.int64)
    ev_group0 = np.searchsorted(ev_group, np.arange(ngroups + 1)).astype(np.int64)

    # the day's samples of these series, in series order (units are disjoint series ranges, in order)
    units = _plan([Path(f) for f in raw.sample_files(paths, window.start, window.shard)], start_ms, end_ms) if n else []
    # row groups whose series range holds no gauge series are not read
    units = [u for u in units if u.lo is None or np.searchsorted(gsid, u.lo) < np.searchsorted(gsid, u.hi, side="right")]
    threads = threads or min(2, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(threads) if threads > 1 and len(units) > 1 else None
    count = np.zeros(n, dtype=np.int64)
    spill = None
    try:
        each = pool.map if pool else map
        # the units' rows of each gauge series (an upper bound: series ids only) tell how many time slices the day needs
        bounds = np.fromiter(each(lambda u: _gauge_rows_of(u, gsid, count), units), dtype=np.int64, count=len(units))
        nslices = slices or _slice_count(int(bounds.sum()), np.bincount(sgroup, weights=count, minlength=ngroups), threads)
        count[:] = 0
        cuts = [(end_ms - start_ms) * p // nslices for p in range(nslices + 1)]  # ms after start_ms
        if nslices == 1:
            # each unit gets its slice of the day's arrays (sized by its rows of gauge series), then the slices are packed
            offsets = np.concatenate([[0], np.cumsum(bounds)])
            ts = np.empty(int(offsets[-1]), dtype=np.int32)  # ms after start_ms (the window is under 2**30 ms)
            v = np.empty(len(ts), dtype=np.float64)
            got = list(
                each(
                    lambda i: _gauge_gather(units[i], gsid, start_ms, end_ms, ts[offsets[i] : offsets[i + 1]], v[offsets[i] : offsets[i + 1]], count),
                    range(len(units)),
                )
            )
        else:
            # one pass over the raw rows: each unit's samples go to the slices' files, then the slices are swept one by one
            spill = _Spill(cuts, n)

            def gather_spill(i: int) -> tuple[int, int, int]:
                t, x = np.empty(int(bounds[i]), dtype=np.int32), np.empty(int(bounds[i]), dtype=np.float64)
                m, first, last = _gauge_gather(units[i], gsid, start_ms, end_ms, t, x, count)
                if first >= 0:
                    spill.put(i, t[:m], x[:m], first, last, count)
                return m, first, last

            got = list(each(gather_spill, range(len(units))))
    except BaseException:
        if pool:
            pool.shutdown()  # the other units' threads stop writing to the spill before it is closed
            pool = None
        if spill is not None:
            spill.close()
        raise
    finally:
        if pool:
            pool.shutdown()
    prev = -1
    for _, first, last in got:
        if first < 0:
            continue
        if first <= prev:
            if spill is not None:
                spill.close()
            raise raw.RawLayoutError(f"raw samples of {window.start}: series are not sorted within and across row groups; rewrite the day with raw.write_day")
        prev = last
    if spill is None:
        pos = 0
        for i, (m, first, _) in enumerate(got):
            if first < 0:
                continue
            if pos != offsets[i]:
                ts[pos : pos + m], v[pos : pos + m] = ts[offsets[i] : offsets[i] + m], v[offsets[i] : offsets[i] + m]
            pos += m
        ts, v = ts[:pos], v[:pos]
    peak = np.zeros(ngroups, dtype=object)  # 10**-9 units
    held = np.zeros(ngroups, np.int64)
    try:
        for p in range(nslices):
            if spill is not None:
                ts, v = spill.read(p)
                rows, carried = spill.count[p], has_carried & (spill.first_t >= cuts[p])
            else:
                rows, carried = count, has_carried
            k, scale, covered = _sweep_slice(
                ts, v, rows, carried, carried_ts, carried_v, group_series, group0, ev_group0, ev_from, ev_until, ev_k, ev_scale,
                start_ms, start_ms + cuts[p], start_ms + cuts[p + 1], threads, gsid,
            )  # fmt: skip
            live = covered > 0
            nano = k.astype(object) * _NANO[scale]
            better = live & ((held == 0) | (nano > peak).astype(bool))
            peak[better] = nano[better]
            held += covered
            ts = v = None
    finally:
        if spill is not None:
            spill.close()
    keys = list(groups)
    live = np.flatnonzero(held > 0)
    nano = peak[live]
    return pa.table(
        [
            pa.array(np.full(len(live), (window.start - date(1970, 1, 1)).days, dtype=np.int32), pa.int32()).cast(pa.date32()),
            pa.array([keys[g][0] for g in live], pa.string()),
            pa.array([keys[g][1] for g in live], pa.string()),
            pa.array([keys[g][2] for g in live], pa.string()),
            _decimal_array(nano),
            pa.array(held[live], pa.int64()),
        ],
        schema=PEAKS_SCHEMA,
    )


def gauge_peaks_by_day(paths: Paths, model, window, threads: int | None = None, con=None) -> pa.Table:
    """Engine entry point (``python: billing_dags.models.fastpath:gauge_peaks_by_day`` in the model's config).
    It takes a prepared session (``con``): ``sqlmodels.run_model_days`` prepares one for all its windows."""
    if window.end.toordinal() - window.start.toordinal() != 1:
        raise FallbackToSQL("the compiled path computes one day at a time")
    return gauge_peaks(paths, model, window, threads=threads, con=con)


gauge_peaks_by_day.takes_session = True
