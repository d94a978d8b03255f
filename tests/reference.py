"""A tiny, independent, obviously-correct reference for DESIGN rules 1, 2, 4, 5 and 7.

Pure Python and ``Decimal`` only: no DuckDB, no code from billing_dags. The SQL models are
checked against these functions.

A sample is ``(ts_ms, value)`` with ``value`` a float64 as stored in the raw layout. The quantity
a sample stands for is the decimal number it was written as: the shortest decimal that
round-trips to the float (``repr``), which is also what Prometheus prints. An integer counter
value is therefore exactly that integer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal, localcontext

Sample = tuple[int, float]

STALENESS_MS = 300_000
DAY_MS = 86_400_000
_PREC = 100  # far more digits than any quantity or amount here needs


def sample_decimal(value: float) -> Decimal:
    """The exact decimal a float sample stands for (its shortest round-trip representation)."""
    return Decimal(repr(float(value)))


def clean(samples: Iterable[Sample]) -> list[tuple[int, Decimal]]:
    """Rule 5: drop NaN/+-Inf; rule 10: identical (ts, value) duplicates count once, and of two
    different values at one ts the larger is the sample (never a reset that did not happen); sort by time."""
    by_ts: dict[int, float] = {}
    for ts, value in samples:
        if not math.isfinite(value):
            continue
        by_ts[ts] = max(by_ts.get(ts, value), value)
    return [(ts, sample_decimal(by_ts[ts])) for ts in sorted(by_ts)]


def last_before(samples: Iterable[Sample], start_ms: int) -> Sample | None:
    """The last finite sample strictly before ``start_ms`` (the 'edge' of earlier days), or None."""
    earlier = [(ts, v) for ts, v in samples if ts < start_ms and math.isfinite(v)]
    return max(earlier) if earlier else None


def counter_usage(
    samples: Sequence[Sample],
    start_ms: int,
    end_ms: int,
    prev: Sample | None = None,
    new_series: bool = True,
) -> Decimal:
    """Exact counter usage over the half-open window [start_ms, end_ms).

    Rule 1: for each consecutive pair, ``v - v_prev`` if ``v >= v_prev`` else ``v`` (a reset).
    Rule 2: a pair counts in the window of its later sample; ``prev`` is the last sample before
    the window (it pairs with the first sample in the window).
    Rule 4: with no ``prev``, a new series counts its first value (it started from zero); a series
    that is not new (seen again after a gap longer than the lookback) does not.
    Samples outside the window are ignored (pass the earlier one as ``prev``).
    """
    inside = [(ts, v) for ts, v in clean(samples) if start_ms <= ts < end_ms]
    if prev is not None:
        if prev[0] >= start_ms:
            raise ValueError("prev must be before the window")
        last: Decimal | None = sample_decimal(prev[1])
    else:
        last = None
    total = Decimal(0)
    for _, v in inside:
        if last is None:
            if new_series:
                total += v
        elif v >= last:
            total += v - last
        else:
            total += v
        last = v
    return total


def counter_resets(samples: Sequence[Sample], start_ms: int, end_ms: int, prev: Sample | None = None) -> int:
    """Number of pairs whose later sample is in the window and whose value went down."""
    inside = [(ts, v) for ts, v in clean(samples) if start_ms <= ts < end_ms]
    last = sample_decimal(prev[1]) if prev is not None else None
    n = 0
    for _, v in inside:
        if last is not None and v < last:
            n += 1
        last = v
    return n


def gauge_integral(
    samples: Sequence[Sample],
    start_ms: int,
    end_ms: int,
    prev: Sample | None = None,
    staleness_ms: int = STALENESS_MS,
) -> Decimal:
    """Rule 5: sum of value x milliseconds held inside [start_ms, end_ms).

    Each sample holds from its timestamp until the next sample, at most ``staleness_ms``; the
    part of that interval inside the window counts. ``prev`` (the last sample before the window)
    may hold into the window.
    """
    points = [(ts, v) for ts, v in clean(samples) if start_ms <= ts < end_ms]
    if prev is not None and math.isfinite(prev[1]):
        if prev[0] >= start_ms:
            raise ValueError("prev must be before the window")
        points = [(prev[0], sample_decimal(prev[1])), *points]
    total = Decimal(0)
    for i, (ts, v) in enumerate(points):
        hold_end = ts + staleness_ms
        if i + 1 < len(points):
            hold_end = min(hold_end, points[i + 1][0])
        overlap = min(hold_end, end_ms) - max(ts, start_ms)
        if overlap > 0:
            total += v * overlap
    return total


def gauge_covered_ms(samples: Sequence[Sample], start_ms: int, end_ms: int, prev: Sample | None = None, staleness_ms: int = STALENESS_MS) -> int:
    """Milliseconds of [start_ms, end_ms) covered by some held sample (the integral of 1)."""
    ones = [(ts, 1.0 if math.isfinite(v) else v) for ts, v in samples]
    p = (prev[0], 1.0) if prev is not None else None
    return int(gauge_integral(ones, start_ms, end_ms, p, staleness_ms))


def gauge_peak(samples: Sequence[Sample], start_ms: int, end_ms: int, prev: Sample | None = None, staleness_ms: int = STALENESS_MS) -> Decimal | None:
    """The highest level one series holds inside the window (``prev`` may hold into it)."""
    return peak_of_sum([(samples, prev)], start_ms, end_ms, staleness_ms)


def _held(points: list[tuple[int, Decimal]], t: int, staleness_ms: int) -> Decimal | None:
    """The level a series holds at instant ``t``: its last sample at or before t, until the next
    sample or the staleness limit."""
    level = None
    for i, (ts, v) in enumerate(points):
        if ts > t:
            break
        until = ts + staleness_ms
        if i + 1 < len(points):
            until = min(until, points[i + 1][0])
        level = v if t < until else None
    return level


def peak_of_sum(
    series: Sequence[tuple[Sequence[Sample], Sample | None]],
    start_ms: int,
    end_ms: int,
    staleness_ms: int = STALENESS_MS,
) -> Decimal | None:
    """Rule 5: the maximum over instants t in [start_ms, end_ms) of the sum of the levels the series
    hold at t (instants where none holds do not count; None if there is none).

    Each series is (samples, prev): prev, its last sample before the window, may hold into it. By
    brute force: the sum only changes where a sample starts or a level stops holding, so it is
    evaluated at each such instant (and at start_ms), series by series.
    """
    tracks = []
    for samples, prev in series:
        points = [(ts, v) for ts, v in clean(samples) if start_ms <= ts < end_ms]
        if prev is not None and math.isfinite(prev[1]):
            points = [(prev[0], sample_decimal(prev[1])), *points]
        tracks.append(points)
    instants = {start_ms}
    for points in tracks:
        for ts, _ in points:
            instants.update((ts, ts + staleness_ms))
    best = None
    for t in sorted(i for i in instants if start_ms <= i < end_ms):
        levels = [lv for lv in (_held(points, t, staleness_ms) for points in tracks) if lv is not None]
        if levels and (best is None or sum(levels) > best):
            best = sum(levels)
    return best


# --- rating (rule 7) -----------------------------------------------------------------------------


def round_half_up(x: Decimal) -> int:
    """Round to an integer, ties away from zero (Decimal's ROUND_HALF_UP)."""
    with localcontext() as ctx:
        ctx.prec = _PREC
        return int(Decimal(x).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def to_minor(amount_major: Decimal, minor_unit_exponent: int = 2) -> int:
    """An exact amount in major units (dollars) to integer minor units (cents), half-up, once."""
    with localcontext() as ctx:
        ctx.prec = _PREC
        return round_half_up(Decimal(amount_major) * (Decimal(10) ** minor_unit_exponent))


def apply_allowance(quantities: Sequence[Decimal], allowance: Decimal) -> list[Decimal]:
    """Billable quantities after an allowance shared by ``quantities`` and used up in their order."""
    left = Decimal(allowance)
    out = []
    for q in quantities:
        used = min(Decimal(q), max(left, Decimal(0)))
        left -= used
        out.append(Decimal(q) - used)
    return out


def price_minor(
    quantity: Decimal,
    unit_price: Decimal,
    *,
    included: Decimal = Decimal(0),
    package_size: int = 1,
    divisor: int = 1,
    minor_unit_exponent: int = 2,
) -> int:
    """Amount in minor units of one price line.

    ``quantity`` is in the meter's base unit (bytes, ms, tokens ...); ``divisor`` converts it to
    the billing unit; ``included`` (billing units) is free; the rest is priced per unit, or per
    started package of ``package_size`` units. One half-up rounding at the end.
    """
    with localcontext() as ctx:
        ctx.prec = _PREC
        billable = max(Decimal(0), Decimal(quantity) / Decimal(divisor) - Decimal(included))
        if package_size > 1:
            packages = (billable / package_size).to_integral_value(rounding=ROUND_CEILING)
            amount = packages * Decimal(unit_price)
        else:
            amount = billable * Decimal(unit_price)
        return to_minor(amount, minor_unit_exponent)


def risk_adjustment_minor(subtotal_minor: int, risk_multiplier: Decimal) -> int:
    """Seed 002: (base fee + usage) x (multiplier - 1), rounded once, half away from zero."""
    with localcontext() as ctx:
        ctx.prec = _PREC
        return round_half_up(Decimal(subtotal_minor) * (Decimal(risk_multiplier) - 1))
