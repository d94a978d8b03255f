"""fct_anomaly_flags_by_day on fixture rows: each rule fires at its threshold from seeds/anomaly_rules.csv."""

from __future__ import annotations

from datetime import date, timedelta
from decimal import Decimal

import pyarrow as pa
import pytest
from sql_helpers import Runner, day_window, ms
from test_pricing_models import DAY_SCHEMA, day_row

D = date(2026, 10, 20)
GIB = 2**30

EDGE_SCHEMA = pa.schema(
    [
        ("day", pa.date32()),
        ("series_id", pa.int64()),
        ("samples", pa.int64()),
        ("dropped_samples", pa.int64()),
        ("first_ts_ms", pa.int64()),
        ("first_value", pa.float64()),
        ("last_ts_ms", pa.int64()),
        ("last_value", pa.float64()),
        ("in_day_increase", pa.decimal128(38, 9)),
        ("resets", pa.int64()),
        ("peak", pa.decimal128(38, 9)),
        ("in_day_integral", pa.decimal128(38, 9)),
        ("in_day_covered_ms", pa.int64()),
        ("max_gap_ms", pa.int64()),
    ]
)
SERIES = {
    1: ("stratum_bytes_sent_total", {"client_id": "miner-003"}, ms(D - timedelta(days=40), 0)),
    2: ("stratum_accepted_shares_total", {"client_id": "miner-zzz"}, ms(D - timedelta(days=40), 0)),
    3: ("stratum_submits_total", {"client_id": "miner-003"}, ms(D - timedelta(days=40), 0)),
}


def edge(series_id: int, max_gap_ms: int) -> dict:
    return {
        "day": D,
        "series_id": series_id,
        "samples": 100,
        "dropped_samples": 0,
        "first_ts_ms": ms(D, 0),
        "first_value": 1.0,
        "last_ts_ms": ms(D, 23),
        "last_value": 2.0,
        "in_day_increase": Decimal(1),
        "resets": 0,
        "peak": Decimal(2),
        "in_day_integral": Decimal(0),
        "in_day_covered_ms": 0,
        "max_gap_ms": max_gap_ms,
    }


POOL_SCHEMA = pa.schema([("day", pa.date32()), ("customer_id", pa.string()), ("accepted_shares", pa.decimal128(38, 9))])


def flags(days: list[dict], edges: list[dict], *, samples: dict | None = None, pool: list[dict] = ()) -> dict:
    with Runner() as r:
        r.set_raw(samples or {}, SERIES)
        r.set_table("external_pool_shares", pa.Table.from_pylist(list(pool), schema=POOL_SCHEMA))
        r.set_table("fct_usage_by_day", pa.Table.from_pylist(days, schema=DAY_SCHEMA))
        r.set_table("int_series_edges_by_day", pa.Table.from_pylist(edges, schema=EDGE_SCHEMA))
        rows = r.run("fct_anomaly_flags_by_day", day_window(D)).to_pylist()
    return {(f["customer_id"], f["meter_id"], f["rule"]): f for f in rows}


def test_week_over_week_outlier_allowance_gap_and_unmatched():
    days = []
    # mp-003 (proxy_hybrid v2: 12 GiB included): 0.1 GiB a day for 19 days, then 12 GiB on D
    for i in range(1, 20):
        days.append(day_row(D - timedelta(days=i), "mp-003", "proxy_bytes", usage=GIB // 10 + i))
    days.append(day_row(D, "mp-003", "proxy_bytes", usage=12 * GIB))
    got = flags(days, [edge(1, 2 * 3600_000), edge(2, 60_000)])
    wow = got[("mp-003", "proxy_bytes", "week_over_week")]
    # last 7 days: 12 GiB + days 1..6 (GIB//10 + i); the 7 before: days 7..13
    this_week = 12 * GIB + sum(GIB // 10 + i for i in range(1, 7))
    last_week = sum(GIB // 10 + i for i in range(7, 14))
    assert wow["value"] == (Decimal(this_week) / Decimal(last_week)).quantize(Decimal("1e-9"))
    assert wow["threshold"] == 10 and wow["severity"] == "warning"  # proxy_bytes has its own row: 10x
    assert got[("mp-003", "proxy_bytes", "outlier_mad")]["severity"] == "warning"
    # month to date: 12 GiB + Oct 1..19 -> over 100% of 12 GiB: the highest level crossed is reported
    allowance = got[("mp-003", "proxy_bytes", "allowance_used")]
    assert allowance["threshold"] == 100 and allowance["value"] > 100
    assert got[("mp-003", "proxy_bytes", "scrape_gap")]["value"] == 2 * 3600_000
    unmatched = got[("", "proxy_accepted_shares", "unmatched_series")]
    assert unmatched["value"] == 1 and "client_id=miner-zzz" in unmatched["detail"]


def test_quiet_customer_raises_nothing():
    days = [day_row(D - timedelta(days=i), "mp-003", "proxy_bytes", usage=GIB // 10 + (i % 3)) for i in range(20)]
    got = flags(days, [edge(1, 60_000)])
    assert not [k for k in got if k[0] == "mp-003"]


def test_reappeared_series_is_critical():
    row = day_row(D, "mp-003", "proxy_bytes", usage=5)
    row["reappeared_series"] = 1
    got = flags([row], [edge(1, 60_000)])
    assert got[("mp-003", "proxy_bytes", "reappeared_series")]["severity"] == "critical"


def test_submit_rate_above_200_per_minute():
    # one scrape a minute; +100 a minute, then +250 in one minute (over 200), then a reset to 5
    values = [1000 + 100 * i for i in range(10)] + [1900 + 250, 5, 105]
    samples = {3: [(ms(D, 1) + 60_000 * i, float(v)) for i, v in enumerate(values)]}
    got = flags([day_row(D, "mp-003", "proxy_submits", usage=1)], [edge(3, 60_000)], samples=samples)
    rate = got[("mp-003", "proxy_submits", "rate_per_minute")]
    assert rate["value"] == 250 and rate["threshold"] == 200
    # at most 200 a minute: no flag
    calm = {3: [(ms(D, 1) + 60_000 * i, float(1000 + 200 * i)) for i in range(10)]}
    got = flags([day_row(D, "mp-003", "proxy_submits", usage=1)], [edge(3, 60_000)], samples=calm)
    assert ("mp-003", "proxy_submits", "rate_per_minute") not in got


def test_proxy_shares_against_the_pool_figures():
    # proxy counted 1,100 accepted shares, the pool 1,000: 10% apart, over the 5% tolerance
    days = [day_row(D, "mp-003", "proxy_accepted_shares", usage=1100)]
    got = flags(days, [edge(1, 60_000)], pool=[{"day": D, "customer_id": "mp-003", "accepted_shares": Decimal(1000)}])
    mismatch = got[("mp-003", "proxy_accepted_shares", "pool_share_mismatch")]
    assert mismatch["value"] == 10 and "the pool reported 1000" in mismatch["detail"]
    got = flags(days, [edge(1, 60_000)], pool=[{"day": D, "customer_id": "mp-003", "accepted_shares": Decimal(1060)}])
    assert ("mp-003", "proxy_accepted_shares", "pool_share_mismatch") not in got


def test_usage_of_an_unknown_llm_model_is_flagged_critical_not_priced_at_zero():
    # llm-001 is on llm_payg, which prices llm_input_tokens per model (gpt-4o, gpt-4o-mini, ...)
    known = {**day_row(D, "llm-001", "llm_input_tokens", usage=1_000_000), "dimension": "gpt-4o"}
    unknown = {**day_row(D, "llm-001", "llm_input_tokens", usage=5_000), "dimension": "gpt-9-preview"}
    got = flags([known, unknown], [])
    flag = got[("llm-001", "llm_input_tokens", "unpriced_usage")]
    assert flag["severity"] == "critical" and flag["value"] == 1
    # in the meter's billing unit: 5,000 tokens are 0.005 million
    assert "gpt-9-preview (0.005 mtok)" in flag["detail"] and "gpt-4o (" not in flag["detail"]
    assert not [k for k in flags([known], []) if k[2] == "unpriced_usage"]


def _seeds_with_an_unsubscribed_customer(tmp_path):
    """The real seeds plus mp-nosub, a customer with no subscription at all."""
    import shutil

    from sql_helpers import SEEDS_DIR

    seeds = tmp_path / "seeds"
    shutil.copytree(SEEDS_DIR, seeds)
    with (seeds / "customers.csv").open("a") as f:
        f.write("mp-nosub,Miner no subscription,proxy,miner-nosub,usd,,prometheus\n")
    return seeds


def _flags_of_day(seeds_dir, day: date, days: list[dict]) -> dict:
    from sql_helpers import seed_tables

    with Runner(seed_tables(seeds_dir)) as r:
        r.set_raw({}, SERIES)
        r.set_table("external_pool_shares", pa.Table.from_pylist([], schema=POOL_SCHEMA))
        r.set_table("fct_usage_by_day", pa.Table.from_pylist(days, schema=DAY_SCHEMA))
        r.set_table("int_series_edges_by_day", pa.Table.from_pylist([], schema=EDGE_SCHEMA))
        rows = r.run("fct_anomaly_flags_by_day", day_window(day)).to_pylist()
    return {(f["customer_id"], f["meter_id"], f["rule"]): f for f in rows}


OUTSIDE = ("outside_subscription", "outside_subscription_unpriced")


def test_usage_outside_every_subscription_is_flagged(tmp_path):
    seeds = _seeds_with_an_unsubscribed_customer(tmp_path)
    # tb-004 joins testbed_basic on 2026-10-10 (which prices API calls): 1,000 calls on the 5th are on no invoice
    before = date(2026, 10, 5)
    got = _flags_of_day(
        seeds,
        before,
        [
            day_row(before, "tb-004", "testbed_api_calls", usage=1000),
            day_row(before, "tb-001", "testbed_api_calls", usage=500),  # subscribed since 2025: billed
        ],
    )
    flag = got[("tb-004", "testbed_api_calls", "outside_subscription")]
    assert flag["severity"] == "critical" and flag["value"] == 1000
    assert "before the subscription to testbed_basic starting 2026-10-10" in flag["detail"]
    assert not [k for k in got if k[0] == "tb-001" and k[2] in OUTSIDE]

    # k8s-005 left k8s_starter on 2026-10-21 (exclusive): 5 GiB of network on the 25th
    after = date(2026, 10, 25)
    got = _flags_of_day(seeds, after, [day_row(after, "k8s-005", "k8s_network", usage=5 * GIB)])
    flag = got[("k8s-005", "k8s_network", "outside_subscription")]
    assert flag["severity"] == "critical" and flag["value"] == 5 * GIB
    assert "after the subscription to k8s_starter ended 2026-10-21" in flag["detail"]

    # mp-nosub has no subscription: 2 GiB (a meter plans price) is critical; rejected shares, which
    # no plan prices, change no money: a warning
    got = _flags_of_day(
        seeds,
        D,
        [
            day_row(D, "mp-nosub", "proxy_bytes", usage=2 * GIB),
            day_row(D, "mp-nosub", "proxy_rejected_shares", usage=7),
            day_row(D, "tb-004", "testbed_api_calls", usage=1000),  # subscribed by now
        ],
    )
    flag = got[("mp-nosub", "proxy_bytes", "outside_subscription")]
    assert flag["severity"] == "critical" and flag["value"] == 2 * GIB and "no subscription" in flag["detail"]
    flag = got[("mp-nosub", "proxy_rejected_shares", "outside_subscription_unpriced")]
    assert flag["severity"] == "warning" and flag["value"] == 7
    assert ("mp-nosub", "proxy_rejected_shares", "outside_subscription") not in got
    assert not [k for k in got if k[0] == "tb-004" and k[2] in OUTSIDE]


def test_daily_summary_lists_usage_outside_every_subscription(tmp_path, capsys):
    import pyarrow.parquet as pq

    from billing_dags.cli.main import main

    seeds = _seeds_with_an_unsubscribed_customer(tmp_path)
    days = [
        day_row(D, "mp-nosub", "proxy_bytes", usage=2 * GIB),
        day_row(D, "mp-003", "proxy_bytes", usage=GIB),
    ]
    flags_rows = list(_flags_of_day(seeds, D, days).values())
    data = tmp_path / "data"
    for model, rows, schema in (("fct_usage_by_day", days, DAY_SCHEMA), ("fct_anomaly_flags_by_day", flags_rows, None)):
        f = data / "models" / model / f"day={D}" / "data.parquet"
        f.parent.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), f)
    assert main(["--data-dir", str(data), "--seeds-dir", str(seeds), "report", "daily", "--date", str(D)]) == 0
    out = capsys.readouterr().out
    assert "- Usage outside any subscription (not billed): mp-nosub (proxy_bytes)" in out
    assert "| critical | mp-nosub | proxy_bytes | outside_subscription |" in out


def edge_on(day: date, series_id: int, max_gap_ms: int) -> dict:
    return {**edge(series_id, max_gap_ms), "day": day, "first_ts_ms": ms(day, 0), "last_ts_ms": ms(day, 23)}


def flags_per_day(days: list[dict], edges: list[dict], run: list[date]) -> dict[date, dict]:
    """fct_anomaly_flags_by_day of each day of ``run``, computed in the order given (each day reads only its lookback)."""
    out = {}
    with Runner() as r:
        r.set_raw({}, SERIES)
        r.set_table("external_pool_shares", pa.Table.from_pylist([], schema=POOL_SCHEMA))
        r.set_table("fct_usage_by_day", pa.Table.from_pylist(days, schema=DAY_SCHEMA))
        r.set_table("int_series_edges_by_day", pa.Table.from_pylist(edges, schema=EDGE_SCHEMA))
        for d in run:
            rows = r.query("fct_anomaly_flags_by_day", day_window(d)).to_pylist()
            out[d] = {(f["customer_id"], f["meter_id"], f["rule"]): f for f in rows}
    return out


def raised(per_day: dict[date, dict], key: tuple) -> dict[date, dict]:
    return {d: got[key] for d, got in sorted(per_day.items()) if key in got}


def _span(first: date, last: date) -> list[date]:
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


@pytest.mark.acceptance
def test_allowance_flag_is_raised_once_per_crossing_and_level_again_each_month():
    # mp-003 (proxy_hybrid v2: 12 GiB included): 1 GiB a day in October and November. 80% (9.6 GiB)
    # is crossed on the 10th, 100% on the 12th; every other day already over a level raises nothing
    # mp-008 (same plan) uses nothing until 13 GiB on Oct 5: both levels at once, the higher reported
    run = _span(date(2026, 10, 1), date(2026, 11, 30))
    days = [day_row(d, "mp-003", "proxy_bytes", usage=GIB) for d in run]
    days += [day_row(d, "mp-008", "proxy_bytes", usage=13 * GIB if d == date(2026, 10, 5) else 0) for d in run]
    in_order = flags_per_day(days, [], run)
    got = raised(in_order, ("mp-003", "proxy_bytes", "allowance_used"))
    assert {d: f["threshold"] for d, f in got.items()} == {
        date(2026, 10, 10): 80,
        date(2026, 10, 12): 100,
        date(2026, 11, 10): 80,
        date(2026, 11, 12): 100,
    }
    oct10 = got[date(2026, 10, 10)]
    assert oct10["severity"] == "info" and oct10["value"] == Decimal("83.333333333")
    # in the meter's billing unit (GiB), not bytes
    assert "10 gib used this month of 12 gib included" in oct10["detail"]
    assert oct10["quantity"] == 10 and oct10["unit"] == "gib"
    jump = raised(in_order, ("mp-008", "proxy_bytes", "allowance_used"))
    assert {d: f["threshold"] for d, f in jump.items()} == {date(2026, 10, 5): 100}
    # a day computed alone (here: the days in reverse order) gives the same flags
    assert flags_per_day(days, [], run[::-1]) == in_order


def test_week_over_week_is_raised_on_the_day_the_ratio_crosses_not_while_it_stays_above():
    # 1 GiB a day, 100 GiB on D: the last 7 days stay over 10x the 7 before for D..D+6
    run = _span(D - timedelta(days=20), D + timedelta(days=10))
    days = [day_row(d, "mp-003", "proxy_bytes", usage=100 * GIB if d == D else GIB) for d in run]
    got = raised(flags_per_day(days, [], run), ("mp-003", "proxy_bytes", "week_over_week"))
    assert list(got) == [D]
    assert "usage 106 gib in the last 7 days vs 7 gib the 7 before" in got[D]["detail"]


def test_scrape_gaps_on_consecutive_days_are_one_flag_per_run():
    # series 1 (mp-003, proxy_bytes): 2-hour gaps on Oct 27, then Oct 29 .. Nov 2 (not Oct 28, no
    # data on Nov 3). Raised on the first day of each run, and again on Nov 1 (a run still going
    # when a month starts, so each month lists it), carrying the day the run started
    run = _span(date(2026, 10, 27), date(2026, 11, 3))
    gap_days = {date(2026, 10, 27), *_span(date(2026, 10, 29), date(2026, 11, 2))}
    edges = [edge_on(d, 1, 2 * 3600_000 if d in gap_days else 60_000) for d in run if d != date(2026, 11, 3)]
    # series 2 bills to nobody (miner-zzz) on every day: one flag when it starts, again on Nov 1
    edges += [edge_on(d, 2, 60_000) for d in run]
    days = [day_row(d, "mp-003", "proxy_bytes", usage=GIB // 10) for d in run]
    in_order = flags_per_day(days, edges, run)
    gaps = raised(in_order, ("mp-003", "proxy_bytes", "scrape_gap"))
    assert list(gaps) == [date(2026, 10, 27), date(2026, 10, 29), date(2026, 11, 1)]
    assert gaps[date(2026, 10, 29)]["value"] == 2 * 3600_000
    assert "since 2026-10-29 (4 days)" in gaps[date(2026, 11, 1)]["detail"]
    assert "since" not in gaps[date(2026, 10, 29)]["detail"]
    unmatched = raised(in_order, ("", "proxy_accepted_shares", "unmatched_series"))
    assert list(unmatched) == [date(2026, 10, 27), date(2026, 11, 1)]
    assert flags_per_day(days, edges, run[::-1]) == in_order


def test_quantities_in_messages_are_in_billing_units():
    # k8s-005 left k8s_starter on 2026-10-21: 5 GiB of network after it is 5 GiB (the value stays
    # the quantity compared against the threshold, in base units)
    after = date(2026, 10, 25)
    run = [after, after + timedelta(days=1)]
    per_day = flags_per_day([day_row(d, "k8s-005", "k8s_network", usage=5 * GIB + GIB // 2) for d in run], [], run)
    # money depends on it: raised on every day it holds, not once
    assert list(raised(per_day, ("k8s-005", "k8s_network", "outside_subscription"))) == run
    flag = per_day[after][("k8s-005", "k8s_network", "outside_subscription")]
    assert flag["value"] == 5 * GIB + GIB // 2
    assert flag["detail"].startswith("5.5 gib used after the subscription")
    assert flag["quantity"] == Decimal("5.5") and flag["unit"] == "gib"


def test_a_gap_across_midnight_or_over_whole_days_is_a_scrape_gap():
    # series 1 (mp-003, proxy_bytes) samples 00:00-23:00 each day with data: nothing on Oct 28, so
    # the gap before Oct 29's first sample is 25 hours; Oct 30 starts 1 hour after Oct 29's last
    # sample (not over the threshold); Oct 31 starts at 00:30, 90 minutes after Oct 30's last
    def at(day: date, first: int, last: int) -> dict:
        return {**edge_on(day, 1, 60_000), "first_ts_ms": first, "last_ts_ms": last}

    edges = [
        at(date(2026, 10, 27), ms(date(2026, 10, 27), 0), ms(date(2026, 10, 27), 23)),
        at(date(2026, 10, 29), ms(date(2026, 10, 29), 0), ms(date(2026, 10, 29), 23)),
        at(date(2026, 10, 30), ms(date(2026, 10, 30), 0), ms(date(2026, 10, 30), 23)),
        at(date(2026, 10, 31), ms(date(2026, 10, 31), 0, 30), ms(date(2026, 10, 31), 23)),
    ]
    run = _span(date(2026, 10, 27), date(2026, 10, 31))
    days = [day_row(d, "mp-003", "proxy_bytes", usage=GIB // 10) for d in run]
    gaps = raised(flags_per_day(days, edges, run), ("mp-003", "proxy_bytes", "scrape_gap"))
    assert {d: f["value"] for d, f in gaps.items()} == {date(2026, 10, 29): 25 * 3600_000, date(2026, 10, 31): 90 * 60_000}
    assert "longest gap between two samples: 1500 min" in gaps[date(2026, 10, 29)]["detail"]


def test_outlier_baseline_is_per_dimension_of_a_meter():
    # llm-001's input tokens per model: gpt-4o-mini ~20M a day, gpt-4o ~1M, claude ~1,000, for 19 days.
    # Each model is priced on its own line, so each is measured against its own 30-day history
    def tokens(day: date, model: str, usage: int) -> dict:
        return {**day_row(day, "llm-001", "llm_input_tokens", usage=usage), "dimension": model}

    history = []
    for i in range(1, 20):
        d = D - timedelta(days=i)
        history += [
            tokens(d, "gpt-4o-mini", 20_000_000 + 1000 * i),
            tokens(d, "gpt-4o", 1_000_000 + 1000 * i),
            tokens(d, "claude-3-5-sonnet", 1000 + i),
        ]
    key = ("llm-001", "llm_input_tokens", "outlier_mad")
    # a usual day is no outlier (pooled, claude's 1,000 tokens sat far from a median of the three models)
    usual = [tokens(D, "gpt-4o-mini", 20_005_000), tokens(D, "gpt-4o", 1_005_000), tokens(D, "claude-3-5-sonnet", 1005)]
    assert key not in flags(history + usual, [])
    # gpt-4o at 10x its usual day is (pooled, it sat between the models' medians); 19 days of history, not 57.
    # claude at 1,100 is an outlier too (12 deviations), gpt-4o the furthest: the one reported
    spike = [tokens(D, "gpt-4o-mini", 20_005_000), tokens(D, "gpt-4o", 10_000_000), tokens(D, "claude-3-5-sonnet", 1100)]
    flag = flags(history + spike, [])[key]
    assert flag["severity"] == "warning" and flag["quantity"] == 10
    assert flag["detail"].startswith("gpt-4o: usage 10 mtok vs 30-day median 1.01 mtok")
    assert flag["detail"].endswith(", 19 days)")
    # median 1,010,000; MAD 5,000 (the deviations 1,000 .. 9,000 of the 19 days)
    assert flag["value"] == (Decimal(8_990_000) / (Decimal("1.4826") * 5000)).quantize(Decimal("1e-9"))
