"""Gauge usage events (raw/events kind 'gauge', held hold_ms at most) billed through fct_usage_by_day,
and the cross-day duplicate event_id check.

The expected figures come from a reference written here in plain Decimal arithmetic (each level
held until the next event of its stream or ts + hold_ms, clipped to the day), and each case also
states its figures by hand.
"""

from dataclasses import dataclass
from datetime import date
from decimal import Decimal

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sql_helpers import DAY_MS, SEEDS_DIR, Runner, day_start_ms, day_window, ms, run_days

from billing_dags.core.settings import resolve_paths
from billing_dags.defs.ingest.checks import event_ids_unique_across_days_check
from billing_dags.defs.seeds.assets import write_seed_snapshots
from billing_dags.defs.shared.partitions import billing_daily
from billing_dags.defs.shared.resources import WarehouseResource
from billing_dags.ingest import events
from billing_dags.ingest.events import EVENTS_SCHEMA, EventsLayoutError, cross_day_duplicates, write_events_day
from billing_dags.models.sqlmodels import run_model

PREV, DAY, NEXT = date(2025, 3, 9), date(2025, 3, 10), date(2025, 3, 11)
H, M = 3_600_000, 60_000
METER = "k8s_memory"  # a gauge meter (unit_hours), customer label namespace
KEY, CUSTOMER = "customer-001", "k8s-001"
KEY2, CUSTOMER2 = "customer-002", "k8s-002"
UNKNOWN = "customer-999"  # no such label_value in seeds/customers.csv
LLM_KEY = "dba762d30bb922c294435ed9f0a9e1a3f638e96a796317d2ac728564afcca7ee"  # llm-001


def gauge(event_id, ts, qty, hold_ms=65 * M, key=KEY, meter=METER, dim=""):
    return {
        "event_id": event_id,
        "ts": ts,
        "customer_key": key,
        "meter_id": meter,
        "dimension": dim,
        "kind": "gauge",
        "quantity": Decimal(qty),
        "hold_ms": hold_ms,
        "attributes": [],
    }


def delta(event_id, ts, qty, key=LLM_KEY, meter="llm_input_tokens", dim="gpt-4o", hold_ms=0):
    return {
        "event_id": event_id,
        "ts": ts,
        "customer_key": key,
        "meter_id": meter,
        "dimension": dim,
        "kind": "delta",
        "quantity": Decimal(qty),
        "hold_ms": hold_ms,
        "attributes": [],
    }


def table(rows):
    return pa.Table.from_pylist(rows, schema=EVENTS_SCHEMA)


# --- the independent reference ------------------------------------------------------------------


@dataclass
class Expected:
    integral: Decimal = Decimal(0)
    covered_ms: int = 0
    peak: Decimal | None = None
    events: int = 0


def reference(rows, day: date) -> dict[tuple, Expected]:
    """Per (customer key, meter, dimension): what ``day`` bills for the gauge events ``rows`` (any days)."""
    start, end = day_start_ms(day), day_start_ms(day) + DAY_MS
    streams: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["kind"] == "gauge":
            streams.setdefault((r["customer_key"], r["meter_id"], r["dimension"]), []).append(r)
    out: dict[tuple, Expected] = {}
    for key, stream in streams.items():
        stream.sort(key=lambda r: (r["ts"], r["event_id"]))
        acc = Expected()
        touched = False
        for i, r in enumerate(stream):
            held_until = r["ts"] + r["hold_ms"]
            if i + 1 < len(stream):
                held_until = min(held_until, stream[i + 1]["ts"])
            lo, hi = max(r["ts"], start), min(held_until, end)
            if hi > lo:  # a level held today, carried in or not, is a candidate for the peak
                acc.integral += r["quantity"] * (hi - lo)
                acc.covered_ms += hi - lo
                acc.peak = r["quantity"] if acc.peak is None else max(acc.peak, r["quantity"])
                touched = True
            if start <= r["ts"] < end:
                acc.events += 1
                touched = True
        if touched:
            out[key] = acc
    return out


def billed(reference_rows: dict[tuple, Expected]) -> dict[tuple, Expected]:
    """The reference keyed by customer_id as the model bills it (unknown keys dropped)."""
    ids = {KEY: CUSTOMER, KEY2: CUSTOMER2}
    return {(ids[k], m, d): e for (k, m, d), e in reference_rows.items() if k in ids}


def hourly(levels: dict[int, str], day=DAY, hold_ms=65 * M, prefix="h"):
    return [gauge(f"{prefix}{h:02d}", ms(day, h), q, hold_ms) for h, q in levels.items()]


LEVELS = {h: f"{100 + h}.125" for h in range(24)}  # 100.125 .. 123.125

CASES = {
    # every hour, each held 65 min: each level holds exactly until the next report; the 23:00 level
    # until midnight (its 5 minutes past midnight belong to the next day)
    "hourly levels, hold 65 min": (
        hourly(LEVELS),
        Expected(sum(Decimal(q) for q in LEVELS.values()) * H, 24 * H, Decimal("123.125"), 24),
    ),
    # the 10:00 report is missing: 09:00 holds 65 min (to 10:05); 10:05..11:00 is not covered
    "missing report: hold cuts the span": (
        hourly({h: q for h, q in LEVELS.items() if h != 10}),
        Expected(
            sum(Decimal(q) for h, q in LEVELS.items() if h not in (9, 10)) * H + Decimal("109.125") * 65 * M,
            24 * H - 55 * M,
            Decimal("123.125"),
            23,
        ),
    ),
    # yesterday 23:30 (500, 65 min) carries in until today's first report at 00:10: it is not one of
    # today's events, but its level held today, so it is today's peak
    "carry-in from 23:30 until the first report": (
        [gauge("y1", ms(PREV, 22), "7"), gauge("y2", ms(PREV, 23, 30), "500"), gauge("t1", ms(DAY, 0, 10), "10")],
        Expected(Decimal(500) * 10 * M + Decimal(10) * 65 * M, 75 * M, Decimal(500), 1),
    ),
    # yesterday 23:30 holds 65 min: to 00:35 today, before today's first report at 02:00
    "carry-in cut by its hold": (
        [gauge("y2", ms(PREV, 23, 30), "500"), gauge("t1", ms(DAY, 2), "3", 30 * M)],
        Expected(Decimal(500) * 35 * M + Decimal(3) * 30 * M, 65 * M, Decimal(500), 1),
    ),
    # only a carry-in: a row with the carried time and level, no events
    "carry-in only": (
        [gauge("y2", ms(PREV, 23, 30), "500")],
        Expected(Decimal(500) * 35 * M, 35 * M, Decimal(500), 0),
    ),
    # a one-day hold from yesterday 00:00:00.001 reaches 1 ms into today; from 00:00:00.000 none
    "one-day hold reaches 1 ms past midnight": (
        [gauge("y0", ms(PREV), "8", DAY_MS, key=KEY2), gauge("y1", ms(PREV, millis=1), "9", DAY_MS)],
        Expected(Decimal(9), 1, Decimal(9), 0),
    ),
    # two reports at the same ts: the later event_id holds (peak 7: 9 never holds); both are today's reports
    "two events at the same ts": (
        [gauge("a", ms(DAY, 12), "9", H), gauge("b", ms(DAY, 12), "7", H)],
        Expected(Decimal(7) * H, H, Decimal(7), 2),
    ),
    # an unknown customer key is billed to nobody; the known one is billed alone
    "unknown customer key": (
        [gauge("u", ms(DAY, 6), "1000", H, key=UNKNOWN), gauge("k", ms(DAY, 6), "2", H)],
        Expected(Decimal(2) * H, H, Decimal(2), 1),
    ),
    # exact decimals past double precision: 123456789012.123456789 x 3,600,000 ms (22 digits)
    "exact decimal integral": (
        [gauge("x", ms(DAY, 1), "123456789012.123456789", H)],
        Expected(Decimal("444444440443644444.440400000"), H, Decimal("123456789012.123456789"), 1),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gauge_events_integral_covered_peak_and_average(case):
    rows, by_hand = CASES[case]
    want = billed(reference(rows, DAY))
    want_by_hand = by_hand.__dict__
    assert want[(CUSTOMER, METER, "")].__dict__ == want_by_hand, "the reference and the hand figures disagree"
    with Runner() as r:
        r.set_events(table(rows))
        got_rows = run_days({}, {}, None, [DAY], runner=r).days[DAY]
    got = {(x["customer_id"], x["meter_id"], x["dimension"]): x for x in got_rows}
    assert set(got) == set(want)
    for key, e in want.items():
        x = got[key]
        assert x["kind"] == "gauge" and x["usage"] is None and (x["series"], x["samples"]) == (0, 0)
        assert x["gauge_integral"] == e.integral, key
        assert x["gauge_covered_ms"] == e.covered_ms, key
        assert x["gauge_peak"] == (e.peak if e.peak is not None else 0), key
        assert x["events"] == e.events, key
        assert isinstance(x["gauge_integral"], Decimal)
    x, e = got[(CUSTOMER, METER, "")], want[(CUSTOMER, METER, "")]
    # the time-weighted average is integral / covered time, exactly
    assert x["gauge_integral"] / x["gauge_covered_ms"] == e.integral / e.covered_ms
    if case == "hourly levels, hold 65 min":  # equal weights: the plain mean of the levels
        assert e.integral / e.covered_ms == sum(Decimal(q) for q in LEVELS.values()) / 24


def test_gauge_integral_stays_decimal_inside_the_model():
    """quantity (decimal(38, 9)) x covered ms (bigint) is DECIMAL in DuckDB, never DOUBLE."""
    with Runner() as r:
        r.set_raw({}, {})
        r.set_events(table([gauge("x", ms(DAY, 1), "1.5", H)]))
        r.run("int_series_edges_by_day", day_window(DAY))
        r.run("int_gauge_peaks_by_day", day_window(DAY))
        r.query("fct_usage_by_day", day_window(DAY))
        sql = r.project.models["fct_usage_by_day"].sql
        body = "events as (select * from stg_raw__events), " + sql[sql.index("event_spans as (") : sql.index("-- one row per series")]
        params = day_window(DAY).params()
        types = r.con.execute(
            "with " + body.rstrip().rstrip(",") + " select typeof(any_value(quantity * covered_ms)), typeof(sum(quantity * covered_ms)),"
            " (select typeof(integral) from event_usage) from event_spans",
            {k: params[k] for k in ("start_ms", "end_ms")},
        ).fetchall()
    assert types == [("DECIMAL(38,9)", "DECIMAL(38,9)", "DECIMAL(38,9)")]


def test_month_gauge_integral_is_the_sum_of_its_days():
    rows = [
        *hourly({h: f"{h}.5" for h in range(0, 24, 2)}, day=PREV, hold_ms=125 * M, prefix="p"),
        gauge("p-late", ms(PREV, 23, 30), "50", 90 * M),  # carries 60 min into DAY
        *hourly({h: f"{3 * h}.25" for h in range(0, 24, 3)}, day=DAY, hold_ms=65 * M, prefix="d"),
        gauge("d-late", ms(DAY, 23, 45), "77", 20 * M),  # 15 min today, 5 min tomorrow
        gauge("n1", ms(NEXT, 0, 2), "1", 10 * M),
        gauge("n2", ms(NEXT, 8), "4.75", 1 * M, key=KEY2),
        gauge("u", ms(DAY, 5), "999", H, key=UNKNOWN),
    ]
    days = [PREV, DAY, NEXT]
    with Runner() as r:
        r.set_events(table(rows))
        chain = run_days({}, {}, None, days, runner=r)
    for d in days:
        want = billed(reference(rows, d))
        got = {(x["customer_id"], x["meter_id"], x["dimension"]): (x["gauge_integral"], x["gauge_covered_ms"]) for x in chain.days[d]}
        assert got == {k: (e.integral, e.covered_ms) for k, e in want.items()}, d
    month = {(x["customer_id"], x["meter_id"]): x for x in chain.month}
    for cust in (CUSTOMER, CUSTOMER2):
        day_rows = [x for d in days for x in chain.days[d] if x["customer_id"] == cust]
        m = month[(cust, METER)]
        assert m["gauge_integral"] == sum(x["gauge_integral"] for x in day_rows)
        assert m["gauge_covered_ms"] == sum(x["gauge_covered_ms"] for x in day_rows)
        assert m["gauge_peak"] == max(x["gauge_peak"] for x in day_rows)
    # and the days together equal one pass over the three days (no event lost or counted twice at midnight)
    whole = {k: Expected() for k in [(CUSTOMER, METER, ""), (CUSTOMER2, METER, "")]}
    for d in days:
        for k, e in billed(reference(rows, d)).items():
            whole[k].integral += e.integral
    one_pass = Decimal(0)
    start, end = day_start_ms(PREV), day_start_ms(NEXT) + DAY_MS
    known = sorted((r for r in rows if r["customer_key"] == KEY), key=lambda r: (r["ts"], r["event_id"]))
    for i, r in enumerate(known):
        until = min(r["ts"] + r["hold_ms"], known[i + 1]["ts"] if i + 1 < len(known) else end, end)
        one_pass += r["quantity"] * max(0, until - max(r["ts"], start))
    assert month[(CUSTOMER, METER)]["gauge_integral"] == whole[(CUSTOMER, METER, "")].integral == one_pass


def test_gauge_samples_and_gauge_events_of_a_customer_add_up():
    """Samples (4 at 06:00, 6 at 06:01: 2,040,000 over 360,000 ms, peak 6) and an event (10 for 1 h):
    integrals and covered time add; the peak is the sum's over time: they never hold at once, so 10."""
    series = {7: ("container_memory_working_set_bytes", {"namespace": KEY, "pod": "a"}, ms(DAY, 6))}
    samples = {7: [(ms(DAY, 6), 4.0), (ms(DAY, 6, 1), 6.0)]}
    with Runner() as r:
        r.set_events(table([gauge("e", ms(DAY, 12), "10", H)]))
        day = run_days(samples, series, None, [DAY], runner=r).days[DAY]
    assert len(day) == 1
    x = day[0]
    assert (x["customer_id"], x["meter_id"], x["kind"]) == (CUSTOMER, METER, "gauge")
    assert x["gauge_integral"] == 2_040_000 + 10 * H
    assert x["gauge_covered_ms"] == 360_000 + H
    assert x["gauge_peak"] == 10
    assert (x["series"], x["samples"], x["events"]) == (1, 2, 1)


# --- the writer (billing_dags/ingest/events.py) ------------------------------------------------------


@pytest.fixture
def paths(tmp_path):
    return resolve_paths(tmp_path / "data", SEEDS_DIR)


def test_gauge_events_are_written_and_hold_ms_defaults_to_zero_for_deltas(paths):
    fig = write_events_day(paths, DAY, table([gauge("g", ms(DAY, 3), "1.5", DAY_MS), gauge("g0", ms(DAY, 1), "0", 1)]), "reports")
    got = pq.read_table(fig["path"])
    assert got.schema.equals(EVENTS_SCHEMA)
    assert [(r["event_id"], r["hold_ms"], r["quantity"]) for r in got.to_pylist()] == [("g0", 1, Decimal(0)), ("g", DAY_MS, Decimal("1.5"))]
    # an input without the hold_ms column holds deltas only: hold_ms 0
    no_hold = table([delta("d", ms(DAY, 2), "5")]).drop_columns(["hold_ms"])
    fig = write_events_day(paths, DAY, no_hold, "postgres")
    assert pq.read_table(fig["path"]).column("hold_ms").to_pylist() == [0]


@pytest.mark.parametrize(
    ("row", "match"),
    [
        (
            gauge("x", ms(DAY, 1), "1", meter="llm_input_tokens", key=LLM_KEY),
            r"meter 'llm_input_tokens' is a counter; gauge events need a gauge meter \(send its increments as kind 'delta'",
        ),
        (
            delta("x", ms(DAY, 1), "1", meter="k8s_memory", key=KEY, dim=""),
            r"meter 'k8s_memory' is a gauge; delta events need a counter meter \(send its levels as kind 'gauge'",
        ),
        (gauge("x", ms(DAY, 1), "1", hold_ms=0), r"gauge event 'x' has hold_ms 0; give how long the level holds at most, 1\.\.86400000 ms"),
        (gauge("x", ms(DAY, 1), "1", hold_ms=DAY_MS + 1), r"gauge event 'x' has hold_ms 86400001"),
        (gauge("x", ms(DAY, 1), "1", hold_ms=-5), r"gauge event 'x' has hold_ms -5"),
        (delta("x", ms(DAY, 1), "1", hold_ms=60_000), r"delta event 'x' has hold_ms 60000; hold_ms is 0 for a delta"),
        (gauge("x", ms(DAY, 1), "-0.5"), r"event 'x' has a negative quantity; a gauge level is never below zero"),
    ],
)
def test_bad_gauge_and_delta_events_are_refused(paths, row, match):
    good = [gauge("ok", ms(DAY, 1), "1")]
    write_events_day(paths, DAY, table(good), "reports")
    with pytest.raises(EventsLayoutError, match=match) as e:
        write_events_day(paths, DAY, table([*good, row]), "reports")
    assert f"events for {DAY} from source 'reports'" in str(e.value)
    assert [r["event_id"] for r in pq.read_table(events.event_files(paths, DAY)[0]).to_pylist()] == ["ok"]


# --- the files as the models read them (the day before is read for the carry-in) -------------------


def test_models_read_the_day_before_for_gauges_and_never_bill_its_deltas_twice(paths):
    write_seed_snapshots(paths)
    write_events_day(paths, PREV, table([gauge("y", ms(PREV, 23, 30), "500"), delta("p1", ms(PREV, 12), "1000")]), "reports")
    write_events_day(paths, DAY, table([gauge("t", ms(DAY, 0, 10), "10"), delta("d1", ms(DAY, 1), "7")]), "reports")
    w = day_window(DAY)
    run_model(paths, "int_series_edges_by_day", w, engine="sql")
    run_model(paths, "int_gauge_peaks_by_day", w)
    got = {(x["customer_id"], x["meter_id"]): x for x in run_model(paths, "fct_usage_by_day", w).table.to_pylist()}
    assert got[("llm-001", "llm_input_tokens")]["usage"] == 7  # DAY's 7; PREV's 1000 is PREV's
    g = got[(CUSTOMER, METER)]
    # the 500 carried in from PREV holds 00:00-00:10: it is today's peak of the sum
    assert (g["gauge_integral"], g["gauge_covered_ms"], g["gauge_peak"], g["events"]) == (500 * 10 * M + 10 * 65 * M, 75 * M, 500, 1)


# --- cross-day duplicate event ids ----------------------------------------------------------------


def test_cross_day_duplicates_finds_ids_of_the_same_source_on_other_days(paths):
    d = lambda n: date.fromordinal(DAY.toordinal() + n)  # noqa: E731
    write_events_day(paths, DAY, table([delta("a", ms(DAY, 1), "1"), delta("b", ms(DAY, 2), "1"), delta("c", ms(DAY, 3), "1")]), "postgres")
    write_events_day(paths, d(1), table([delta("a", ms(d(1), 1), "1"), delta("z", ms(d(1), 1), "1")]), "postgres")
    write_events_day(paths, d(-35), table([delta("b", ms(d(-35), 1), "1")]), "postgres")
    write_events_day(paths, d(-36), table([delta("c", ms(d(-36), 1), "1")]), "postgres")  # outside the lookback
    write_events_day(paths, d(2), table([delta("c", ms(d(2), 1), "1")]), "other")  # another source's ids are its own
    assert cross_day_duplicates(paths, DAY, "postgres") == [("b", d(-35).isoformat()), ("a", d(1).isoformat())]
    assert cross_day_duplicates(paths, DAY, "postgres", lookback_days=34) == [("a", d(1).isoformat())]
    assert cross_day_duplicates(paths, d(1), "postgres") == [("a", DAY.isoformat())]
    assert cross_day_duplicates(paths, DAY, "other") == []  # no partition of that source on the day
    assert cross_day_duplicates(paths, d(2), "other") == []
    with pytest.raises(EventsLayoutError, match="source name"):
        cross_day_duplicates(paths, DAY, "../x")


def _stub_usage_events(day_rows: dict[str, list[dict]]):
    """Stands for usage_events: writes the fixture rows of the partition's day as source 'postgres'."""

    @dg.asset(name="usage_events", partitions_def=billing_daily)
    def usage_events(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> None:
        write_events_day(warehouse.paths(), date.fromisoformat(context.partition_key), table(day_rows.get(context.partition_key, [])), "postgres")

    return usage_events


@pytest.mark.parametrize("overlap", [True, False])
def test_event_ids_unique_across_days_check_in_dagster(paths, overlap):
    second = [delta("e1" if overlap else "e3", ms(DAY, 4), "1"), delta("e4", ms(DAY, 5), "1")]
    rows = {PREV.isoformat(): [delta("e1", ms(PREV, 4), "1"), delta("e2", ms(PREV, 5), "1")], DAY.isoformat(): second}
    check = event_ids_unique_across_days_check("usage_events", "postgres")
    resources = {"warehouse": WarehouseResource(data_dir=str(paths.data_dir), seeds_dir=str(paths.seeds_dir))}
    instance = dg.DagsterInstance.ephemeral()
    evaluations = []
    for day in (PREV, DAY):
        result = dg.materialize([_stub_usage_events(rows), check], partition_key=day.isoformat(), resources=resources, instance=instance, raise_on_error=False)
        evaluations += result.get_asset_check_evaluations()
    assert [e.asset_check_key.name for e in evaluations] == ["event_ids_unique_across_days"] * 2
    first, last = evaluations
    assert first.passed  # PREV alone: nothing to compare with yet
    assert last.passed is (not overlap)
    assert last.metadata["duplicates"].value == (1 if overlap else 0)
    if overlap:
        assert last.metadata["examples"].value == [{"event_id": "e1", "other_day": PREV.isoformat()}]
        assert "e1 (also on 2025-03-09)" in last.description and "rerun usage_events for 2025-03-09" in last.description
        assert last.severity == dg.AssetCheckSeverity.ERROR
