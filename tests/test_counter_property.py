"""Rules 1-5: the daily SQL chain (int_series_edges_by_day -> fct_usage_by_day ->
fct_usage_by_month) agrees with the pure-Python reference, day by day and over the whole window;
so does every day computed alone, latest first, from its own raw samples and its carry-in.

Random counters and gauges over 3-4 UTC days with resets, gaps of hours (one spanning midnight),
NaN/Inf samples, a sample at 00:00:00.000 (it belongs to the new day) and one at 23:59:59.999.

Two value ranges are tested separately so that a failure says what broke:
* "exact range" (integers < 2^32, 3-decimal values < 1e6): the day/pair/reset/gap logic;
* "full range" (integers up to 1e12, 3-decimal values up to 1e9): also the exactness of the
  float64 -> DECIMAL conversion of large sample values (DESIGN rule 1: exact usage).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from fractions import Fraction

import pytest
import reference as ref
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sql_helpers import DAY_MS, Runner, day_start_ms, ms, next_day, run_days, run_days_alone

D0 = date(2025, 3, 10)
T0 = day_start_ms(D0)
NAN, INF = float("nan"), float("inf")
HOUR = 3_600_000


@dataclass(frozen=True)
class Meta:
    series_id: int
    metric: str
    labels: dict
    customer_id: str
    meter_id: str


# one series per customer, so each fct_usage_by_day row is exactly one series
COUNTERS = [
    Meta(101, "stratum_accepted_shares_total", {"client_id": "miner-001"}, "mp-001", "proxy_accepted_shares"),
    Meta(102, "stratum_accepted_shares_total", {"client_id": "miner-002"}, "mp-002", "proxy_accepted_shares"),
    Meta(103, "container_cpu_usage_seconds_total", {"namespace": "customer-001"}, "k8s-001", "k8s_cpu"),
    Meta(104, "stratum_accepted_shares_total", {"client_id": "miner-004"}, "mp-004", "proxy_accepted_shares"),
    Meta(105, "iot_http_requests_total", {"customer_id": "iot-002"}, "iot-002", "iot_http_requests"),
    Meta(106, "container_cpu_usage_seconds_total", {"namespace": "customer-003"}, "k8s-003", "k8s_cpu"),
]
GAUGES = [
    Meta(201, "container_memory_working_set_bytes", {"namespace": "customer-002"}, "k8s-002", "k8s_memory"),
    Meta(202, "iot_active_devices", {"customer_id": "iot-001"}, "iot-001", "iot_devices"),
    Meta(203, "kubelet_volume_stats_used_bytes", {"namespace": "customer-004"}, "k8s-004", "k8s_storage"),
    Meta(204, "stratum_active_connections", {"client_id": "miner-005"}, "mp-005", "proxy_connections"),
]
# per series (scale, max value in units of 1/scale): integers when scale == 1, 3 decimals when 1000.
# "exact range": values whose float64 -> DECIMAL(38, 9) cast is exact in DuckDB (v x 10^9 < 2^53 or
# a small odd part), so only the day/pair/reset/gap logic is tested; "full range": up to 10^12.
COUNTER_EXACT = [(1, 2**32 - 1), (1, 100_000), (1000, 10**9), (1, 1_000), (1, 2**32 - 1), (1000, 10**6)]
COUNTER_FULL = [(1, 10**12), (1, 10**12), (1000, 10**12), (1, 10**9), (1, 10**12), (1000, 10**9)]
GAUGE_EXACT = [(1, 2**32 - 1), (1, 100_000), (1000, 10**9), (1, 50)]
GAUGE_FULL = [(1, 10**12), (1000, 10**9), (1, 10**12), (1000, 10**12)]

PROPERTY = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))
NO_SHRINK = (Phase.explicit, Phase.generate)  # a failing full-range example is reported as drawn


@pytest.fixture(scope="module")
def runner():
    with Runner() as r:
        yield r


def as_float(units: int, scale: int) -> float:
    return float(Fraction(units, scale))


# --- strategies -------------------------------------------------------------------------------

STEPS = [1, 1_000, 15_000, 60_000, 299_999, 300_000, 300_001, 600_000, HOUR, 3 * HOUR, 7 * HOUR]


@st.composite
def timeline(draw, n_days: int, gauge: bool) -> list[int]:
    """Sorted sample times (ms offsets from day 0) with the boundary cases forced in."""
    width = n_days * DAY_MS
    ts: set[int] = set()
    for _ in range(draw(st.integers(1, 5))):
        t = draw(st.integers(0, width - 1))
        for _ in range(draw(st.integers(1, 6))):
            ts.add(t)
            t += draw(st.sampled_from(STEPS) | st.integers(1, 8 * HOUR))
            if t >= width:
                break
    # boundary 1: the last millisecond of day 0 and the first of day 1
    ts |= {DAY_MS - 1, DAY_MS}
    # boundary 2: a gap spanning midnight (hours for a counter; around the staleness limit for a gauge)
    mid = 2 * DAY_MS
    if gauge:
        before, after = draw(st.integers(1, 299_999)), draw(st.integers(0, 600_000))
    else:
        before, after = draw(st.integers(HOUR, 6 * HOUR)), draw(st.integers(HOUR, 6 * HOUR))
    ts = {t for t in ts if not (mid - before < t < mid + after)} | {mid - before, mid + after}
    return sorted(t for t in ts if t < width)


@st.composite
def counter_values(draw, n: int, scale: int, top: int) -> list[float]:
    """A counter walk in units of 1/scale with increments, flat runs, resets and NaN/Inf."""
    forced_reset = draw(st.integers(1, max(1, n - 1)))
    forced_bad = draw(st.integers(0, n - 1))
    v = draw(st.integers(0, top // 2))
    out = []
    for i in range(n):
        if i == forced_bad or draw(st.integers(0, 9)) == 0:
            out.append(draw(st.sampled_from([NAN, INF, -INF])))
            continue
        if i > 0:
            action = "reset" if i == forced_reset else draw(st.sampled_from(["inc", "inc", "inc", "same", "reset"]))
            if action == "inc":
                v = min(top, v + draw(st.integers(0, max(1, top // 8))))
            elif action == "reset" and v > 0:
                v = draw(st.just(0) | st.integers(0, v - 1))
        out.append(as_float(v, scale))
    return out


@st.composite
def gauge_values(draw, n: int, scale: int, top: int) -> list[float]:
    out = []
    for _ in range(n):
        if draw(st.integers(0, 9)) == 0:
            out.append(draw(st.sampled_from([NAN, INF, -INF])))
        else:
            out.append(as_float(draw(st.integers(0, top)), scale))
    return out


@st.composite
def scenario(draw, metas, ranges, gauge: bool):
    n_days = draw(st.integers(3, 4))
    series = {}
    for meta, (scale, top) in zip(metas, ranges):
        offsets = draw(timeline(n_days, gauge))
        values = draw((gauge_values if gauge else counter_values)(len(offsets), scale, top))
        series[meta.series_id] = [(T0 + o, v) for o, v in zip(offsets, values)]
    return n_days, series


# --- running and comparing --------------------------------------------------------------------


def run_chain(runner, metas, series, n_days):
    labels = {m.series_id: (m.metric, m.labels, min(t for t, _ in series[m.series_id])) for m in metas}
    days = [next_day(D0, k) for k in range(n_days)]
    return days, run_days(series, labels, None, days, runner=runner)


def days_alone(runner, metas, series, days):
    """Rule 3: every day alone (latest first), from its raw samples and its carry-in only."""
    labels = {m.series_id: (m.metric, m.labels, min(t for t, _ in series[m.series_id])) for m in metas}
    return run_days_alone(series, labels, days[::-1], runner).days


def row_for(rows, meta):
    found = [r for r in rows if r["customer_id"] == meta.customer_id and r["meter_id"] == meta.meter_id]
    assert len(found) <= 1, found
    return found[0] if found else None


def _fmt(problems, series):
    lines = [f"{len(problems)} mismatch(es):"] + [f"  {p}" for p in problems[:12]]
    lines.append("samples: " + repr(dict(series.items())))
    return "\n".join(lines)


def check_counters(runner, metas, n_days, series):
    days, chain = run_chain(runner, metas, series, n_days)
    alone = days_alone(runner, metas, series, days)
    problems = []
    for meta in metas:
        samples = series[meta.series_id]
        daily_ref = []
        for d in days:
            start = day_start_ms(d)
            expected = ref.counter_usage(samples, start, start + DAY_MS, ref.last_before(samples, start), True)
            daily_ref.append(expected)
            for how, rows in (("", chain.days[d]), (" alone", alone[d])):
                row = row_for(rows, meta)
                got = row["usage"] if row else Decimal(0)
                if got != expected:
                    problems.append(f"{meta.meter_id}/{meta.customer_id} {d}{how}: sql {got} != reference {expected} (diff {got - expected})")
        # rule 2: the sum of days equals one pass over the whole window, to the unit
        one_pass = ref.counter_usage(samples, T0, T0 + n_days * DAY_MS, None, True)
        assert sum(daily_ref) == one_pass, "reference is not additive over days"
        month = row_for(chain.month, meta)
        got_month = month["usage"] if month else Decimal(0)
        if got_month != one_pass:
            problems.append(f"{meta.meter_id}/{meta.customer_id} month: sql {got_month} != one-pass reference {one_pass}")
        sql_daily = sum((r["usage"] for d in days for r in chain.days[d] if r["customer_id"] == meta.customer_id), Decimal(0))
        if sql_daily != got_month:
            problems.append(f"{meta.meter_id}/{meta.customer_id}: sum of sql days {sql_daily} != sql month {got_month}")
    assert not problems, _fmt(problems, series)


def check_gauges(runner, metas, n_days, series):
    days, chain = run_chain(runner, metas, series, n_days)
    alone = days_alone(runner, metas, series, days)
    problems = []
    for meta in metas:
        samples = series[meta.series_id]
        daily_ref = []
        for d in days:
            start, end = day_start_ms(d), day_start_ms(d) + DAY_MS
            prev = ref.last_before(samples, start)
            expected = ref.gauge_integral(samples, start, end, prev)
            covered = ref.gauge_covered_ms(samples, start, end, prev)
            peak = ref.gauge_peak(samples, start, end, prev)
            daily_ref.append(expected)
            for how, rows in (("", chain.days[d]), (" alone", alone[d])):
                row = row_for(rows, meta)
                got = row["gauge_integral"] if row else Decimal(0)
                if got != expected:
                    problems.append(f"{meta.meter_id} {d}{how}: integral sql {got} != reference {expected} (diff {got - expected})")
                got_cov = row["gauge_covered_ms"] if row else 0
                if got_cov != covered:
                    problems.append(f"{meta.meter_id} {d}{how}: covered_ms sql {got_cov} != reference {covered}")
                if peak is not None and (row is None or row["gauge_peak"] != peak):
                    problems.append(f"{meta.meter_id} {d}{how}: peak sql {row and row['gauge_peak']} != reference {peak}")
        one_pass = ref.gauge_integral(samples, T0, T0 + n_days * DAY_MS, None)
        assert sum(daily_ref) == one_pass, "reference is not additive over days"
        month = row_for(chain.month, meta)
        got_month = month["gauge_integral"] if month else Decimal(0)
        if got_month != one_pass:
            problems.append(f"{meta.meter_id} month: sql {got_month} != one-pass reference {one_pass}")
    assert not problems, _fmt(problems, series)


# --- property tests ---------------------------------------------------------------------------


@settings(max_examples=20, **PROPERTY)
@given(scenario(COUNTERS, COUNTER_EXACT, gauge=False))
def test_counter_days_match_reference_exact_range(runner, case):
    n_days, series = case
    check_counters(runner, COUNTERS, n_days, series)


@pytest.mark.acceptance
@settings(max_examples=25, phases=NO_SHRINK, **PROPERTY)
@given(scenario(COUNTERS, COUNTER_FULL, gauge=False))
def test_counter_days_match_reference_full_range(runner, case):
    n_days, series = case
    check_counters(runner, COUNTERS, n_days, series)


@settings(max_examples=15, **PROPERTY)
@given(scenario(GAUGES, GAUGE_EXACT, gauge=True))
def test_gauge_days_match_reference_exact_range(runner, case):
    n_days, series = case
    check_gauges(runner, GAUGES, n_days, series)


@pytest.mark.acceptance
@settings(max_examples=20, phases=NO_SHRINK, **PROPERTY)
@given(scenario(GAUGES, GAUGE_FULL, gauge=True))
def test_gauge_days_match_reference_full_range(runner, case):
    n_days, series = case
    check_gauges(runner, GAUGES, n_days, series)


# --- hand-written counter cases ----------------------------------------------------------------

SHARES = COUNTERS[0]
D1 = next_day(D0)
D2 = next_day(D0, 2)

CASES = {
    # 100 (new series) + 50 + 0 (reset to 0 counts 0) + 30 = 180
    "reset_to_zero": ([(ms(D0, 1), 100), (ms(D0, 2), 150), (ms(D0, 3), 0), (ms(D0, 4), 30)], {D0: 180}),
    # 100 + 50 + 20 (reset to 20 counts 20) + 30 = 200
    "reset_to_higher_than_zero": ([(ms(D0, 1), 100), (ms(D0, 2), 150), (ms(D0, 3), 20), (ms(D0, 4), 50)], {D0: 200}),
    # 100 + 50 + 40 (reset) + 10 (reset again) + 15 = 215
    "two_resets_in_a_row": (
        [(ms(D0, 1), 100), (ms(D0, 2), 150), (ms(D0, 3), 40), (ms(D0, 4), 10), (ms(D0, 5), 25)],
        {D0: 215},
    ),
    # a series first seen at 12:34:56.789 on day 1 counts its first value: 500 + 20 = 520
    "series_starting_mid_day": ([(ms(D1, 12, 34, 56, 789), 500), (ms(D1, 13), 520)], {D0: 0, D1: 520}),
    # the pair (23:59:59.999 -> 00:00:00.000) belongs to the later sample's day: day 0 = 10, day 1 = 15 - 10 = 5
    "pair_straddling_midnight": ([(ms(D0, 23, 59, 59, 999), 10), (ms(D1), 15)], {D0: 10, D1: 5}),
    # reset across midnight: day 0 = 1000; day 1 = 7 (reset) + 3 = 10
    "reset_across_midnight": ([(ms(D0, 23), 1000), (ms(D1), 7), (ms(D1, 1), 10)], {D0: 1000, D1: 10}),
    # a gap of 30 hours spanning midnight: day 0 = 40; day 1 nothing; day 2 = 55 - 40 = 15
    "gap_spanning_two_midnights": ([(ms(D0, 20), 40), (ms(D2, 2), 55)], {D0: 40, D1: 0, D2: 15}),
    # NaN and a staleness marker in between are dropped: 5 + (9 - 5) = 9
    "nan_dropped": ([(ms(D0, 1), 5), (ms(D0, 2), NAN), (ms(D0, 3), INF), (ms(D0, 4), 9)], {D0: 9}),
    # flat counter: equal values are not a reset: 5 + 0 + 0 = 5
    "flat_is_not_a_reset": ([(ms(D0, 1), 5), (ms(D0, 2), 5), (ms(D0, 3), 5)], {D0: 5}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_counter_hand_cases(runner, name):
    samples, expected = CASES[name]
    samples = [(t, float(v)) for t, v in samples]
    days = sorted(expected)
    labels = {SHARES.series_id: (SHARES.metric, SHARES.labels, min(t for t, _ in samples))}
    chain = run_days({SHARES.series_id: samples}, labels, None, days, runner=runner)
    for d in days:
        row = row_for(chain.days[d], SHARES)
        got = row["usage"] if row else Decimal(0)
        start = day_start_ms(d)
        assert ref.counter_usage(samples, start, start + DAY_MS, ref.last_before(samples, start)) == expected[d]
        assert got == expected[d], f"{name} {d}: got {got}, expected {expected[d]}"
    assert row_for(chain.month, SHARES)["usage"] == sum(expected.values())


def test_reset_across_midnight_is_counted_in_resets(runner):
    """A reset between yesterday's last sample and today's first is a reset of today (rule 2)."""
    samples = [(ms(D0, 23), 1000.0), (ms(D1), 7.0), (ms(D1, 1), 10.0)]
    labels = {SHARES.series_id: (SHARES.metric, SHARES.labels, ms(D0, 23))}
    chain = run_days({SHARES.series_id: samples}, labels, None, [D0, D1], runner=runner)
    day1 = row_for(chain.days[D1], SHARES)
    assert day1["usage"] == 10
    assert ref.counter_resets(samples, ms(D1), ms(D1) + DAY_MS, ref.last_before(samples, ms(D1))) == 1
    assert day1["resets"] == 1, "the reset 1000 -> 7 at 00:00:00.000 is not counted in fct_usage_by_day.resets"


def prometheus_increase(samples, range_start_ms, range_end_ms) -> float:
    """Prometheus increase() (promql extrapolatedRate, isCounter=True) over the samples in a range."""
    pts = [(t, v) for t, v in samples if range_start_ms < t <= range_end_ms]
    (t0, v0), (tn, vn) = pts[0], pts[-1]
    delta = vn - v0 + sum(a for (_, a), (_, b) in itertools.pairwise(pts) if b < a)
    sampled = (tn - t0) / 1000
    to_start = (t0 - range_start_ms) / 1000
    to_end = (range_end_ms - tn) / 1000
    avg = sampled / (len(pts) - 1)
    threshold = avg * 1.1
    if to_start >= threshold:
        to_start = avg / 2
    if delta > 0 and v0 >= 0:
        to_zero = sampled * (v0 / delta)
        if to_zero < to_start:
            to_start = to_zero
    if to_end >= threshold:
        to_end = avg / 2
    return delta * (sampled + to_start + to_end) / sampled


def test_increase_would_extrapolate_but_usage_is_the_integer_sum(runner):
    """DESIGN rule 1: for an integer counter, usage is the exact integer sum of deltas.

    Scrapes every minute at hh:mm:30 from 00:00:30 to 00:59:30 on day 1 (60 samples), the
    counter going from 1000 to 1100 (100 accepted shares); the previous sample is 1000 at
    23:59:30 on day 0. Prometheus increase(...[1h]) at 01:00 sees 100 over 59 minutes of
    samples and extrapolates to the hour: 100 x 3600 / 3540 = 101.69..., not an integer.
    Our day-1 usage is (1000 - 1000) + 100 = 100 exactly.
    """
    day1 = [(ms(D1, 0, m, 30), float(1000 + (100 * m) // 59)) for m in range(60)]
    assert day1[-1][1] == 1100.0
    samples = [(ms(D0, 23, 59, 30), 1000.0), *day1]
    prom = prometheus_increase(samples, ms(D1), ms(D1, 1))
    assert abs(prom - 100 * 3600 / 3540) < 1e-9 and prom != int(prom)
    labels = {SHARES.series_id: (SHARES.metric, SHARES.labels, ms(D0, 23, 59, 30))}
    chain = run_days({SHARES.series_id: samples}, labels, None, [D0, D1], runner=runner)
    assert row_for(chain.days[D0], SHARES)["usage"] == 1000  # new series: its first value
    got = row_for(chain.days[D1], SHARES)["usage"]
    assert got == 100 == ref.counter_usage(samples, ms(D1), ms(D1) + DAY_MS, samples[0])
    assert got != Decimal(repr(prom))


@pytest.mark.parametrize(("gap_days", "expected_usage", "flagged"), [(30, 80, 0), (35, 80, 0), (36, 30, 1), (40, 30, 1)])
def test_series_reappearing_after_the_lookback_is_flagged(runner, gap_days, expected_usage, flagged):
    """Rule 4: seen again after a gap longer than the 35-day lookback -> flagged, first value not counted.

    Day X: 100 -> 150 (new series, usage 150). Day X + gap: 200 -> 230.
    Within the lookback the pair (150 -> 200) counts: 50 + 30 = 80.
    Beyond it the previous sample is not visible: only 230 - 200 = 30, and reappeared_series = 1.
    """
    later = next_day(D0, gap_days)
    samples = [(ms(D0, 10), 100.0), (ms(D0, 11), 150.0), (ms(later, 10), 200.0), (ms(later, 11), 230.0)]
    labels = {SHARES.series_id: (SHARES.metric, SHARES.labels, ms(D0, 10))}
    chain = run_days({SHARES.series_id: samples}, labels, None, [D0, later], runner=runner)
    assert row_for(chain.days[D0], SHARES)["usage"] == 150
    row = row_for(chain.days[later], SHARES)
    assert row["usage"] == expected_usage
    assert row["reappeared_series"] == flagged
    prev = ref.last_before(samples, ms(later)) if not flagged else None
    assert ref.counter_usage(samples, ms(later), ms(later) + DAY_MS, prev, new_series=not flagged) == expected_usage


@pytest.mark.parametrize("value", [731_978_513_570, 999_999_999_999, 4_611_686_018_427])
def test_large_integer_counter_value_is_exact(runner, value):
    """Rule 1: an integer counter is billed to the unit. A new series (1 TB-ish byte counter)
    counts its first value, so day usage must be exactly that integer."""
    samples = [(ms(D0, 1), float(value))]
    labels = {SHARES.series_id: (SHARES.metric, SHARES.labels, ms(D0, 1))}
    chain = run_days({SHARES.series_id: samples}, labels, None, [D0], runner=runner)
    got = row_for(chain.days[D0], SHARES)["usage"]
    assert got == value, f"usage {got} for a counter at {value}: off by {got - value}"


# --- hand-written gauge case -------------------------------------------------------------------


def test_gauge_sample_holds_across_midnight_up_to_staleness(runner):
    """10 devices at 23:58:00 on day 0, next sample 20 at 00:10:00 on day 1.

    Day 0: 10 x 120,000 ms (until midnight) = 1,200,000.
    Day 1: 10 x 180,000 ms (carried in until 00:03:00, the 5-minute staleness limit)
           + 20 x 300,000 ms (from 00:10, staleness) = 1,800,000 + 6,000,000 = 7,800,000.
    """
    meta = GAUGES[1]
    samples = [(ms(D0, 23, 58), 10.0), (ms(D1, 0, 10), 20.0)]
    labels = {meta.series_id: (meta.metric, meta.labels, ms(D0, 23, 58))}
    chain = run_days({meta.series_id: samples}, labels, None, [D0, D1], runner=runner)
    assert row_for(chain.days[D0], meta)["gauge_integral"] == 1_200_000
    assert row_for(chain.days[D1], meta)["gauge_integral"] == 7_800_000
    assert row_for(chain.days[D1], meta)["gauge_covered_ms"] == 480_000
    assert ref.gauge_integral(samples, ms(D1), ms(D1) + DAY_MS, samples[0]) == 7_800_000
