"""fct_anomaly_flags on fixture rows: each rule fires at its threshold from seeds/anomaly_rules.csv."""

from __future__ import annotations

from datetime import date, timedelta
from decimal import Decimal

import pyarrow as pa

from sql_helpers import Runner, day_window, ms
from test_pricing_models import DAY_SCHEMA, day_row

D = date(2026, 10, 20)
GIB = 2**30

EDGE_SCHEMA = pa.schema(
    [
        ("day", pa.date32()), ("series_id", pa.int64()), ("samples", pa.int64()), ("dropped_samples", pa.int64()),
        ("first_ts_ms", pa.int64()), ("first_value", pa.float64()), ("last_ts_ms", pa.int64()), ("last_value", pa.float64()),
        ("in_day_increase", pa.decimal128(38, 9)), ("resets", pa.int64()), ("peak", pa.decimal128(38, 9)),
        ("in_day_integral", pa.decimal128(38, 9)), ("in_day_covered_ms", pa.int64()), ("max_gap_ms", pa.int64()),
    ]
)
SERIES = {
    1: ("stratum_bytes_sent_total", {"client_id": "miner-003"}, ms(D - timedelta(days=40), 0)),
    2: ("stratum_accepted_shares_total", {"client_id": "miner-zzz"}, ms(D - timedelta(days=40), 0)),
    3: ("stratum_submits_total", {"client_id": "miner-003"}, ms(D - timedelta(days=40), 0)),
}


def edge(series_id: int, max_gap_ms: int) -> dict:
    return {
        "day": D, "series_id": series_id, "samples": 100, "dropped_samples": 0, "first_ts_ms": ms(D, 0), "first_value": 1.0,
        "last_ts_ms": ms(D, 23), "last_value": 2.0, "in_day_increase": Decimal(1), "resets": 0, "peak": Decimal(2),
        "in_day_integral": Decimal(0), "in_day_covered_ms": 0, "max_gap_ms": max_gap_ms,
    }


POOL_SCHEMA = pa.schema([("day", pa.date32()), ("customer_id", pa.string()), ("accepted_shares", pa.decimal128(38, 9))])


def flags(days: list[dict], edges: list[dict], *, samples: dict | None = None, pool: list[dict] = ()) -> dict:
    with Runner() as r:
        r.set_raw(samples or {}, SERIES)
        r.set_table("external_pool_shares", pa.Table.from_pylist(list(pool), schema=POOL_SCHEMA))
        r.set_table("fct_usage_by_day", pa.Table.from_pylist(days, schema=DAY_SCHEMA))
        r.set_table("fct_series_edges_by_day", pa.Table.from_pylist(edges, schema=EDGE_SCHEMA))
        rows = r.run("fct_anomaly_flags", day_window(D)).to_pylist()
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
    days = [day_row(D - timedelta(days=i), "mp-003", "proxy_bytes", usage=GIB // 10 + (i % 3)) for i in range(0, 20)]
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
    assert "gpt-9-preview (5000)" in flag["detail"] and "gpt-4o (" not in flag["detail"]
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
        r.set_table("fct_series_edges_by_day", pa.Table.from_pylist([], schema=EDGE_SCHEMA))
        rows = r.run("fct_anomaly_flags", day_window(day)).to_pylist()
    return {(f["customer_id"], f["meter_id"], f["rule"]): f for f in rows}


OUTSIDE = ("outside_subscription", "outside_subscription_unpriced")


def test_usage_outside_every_subscription_is_flagged(tmp_path):
    seeds = _seeds_with_an_unsubscribed_customer(tmp_path)
    # tb-004 joins testbed_basic on 2026-10-10 (which prices API calls): 1,000 calls on the 5th are on no invoice
    before = date(2026, 10, 5)
    got = _flags_of_day(seeds, before, [
        day_row(before, "tb-004", "testbed_api_calls", usage=1000),
        day_row(before, "tb-001", "testbed_api_calls", usage=500),  # subscribed since 2025: billed
    ])
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
    got = _flags_of_day(seeds, D, [
        day_row(D, "mp-nosub", "proxy_bytes", usage=2 * GIB),
        day_row(D, "mp-nosub", "proxy_rejected_shares", usage=7),
        day_row(D, "tb-004", "testbed_api_calls", usage=1000),  # subscribed by now
    ])
    flag = got[("mp-nosub", "proxy_bytes", "outside_subscription")]
    assert flag["severity"] == "critical" and flag["value"] == 2 * GIB and "no subscription" in flag["detail"]
    flag = got[("mp-nosub", "proxy_rejected_shares", "outside_subscription_unpriced")]
    assert flag["severity"] == "warning" and flag["value"] == 7
    assert ("mp-nosub", "proxy_rejected_shares", "outside_subscription") not in got
    assert not [k for k in got if k[0] == "tb-004" and k[2] in OUTSIDE]


def test_daily_summary_lists_usage_outside_every_subscription(tmp_path, capsys):
    import pyarrow.parquet as pq

    from billing_dags.cli import main

    seeds = _seeds_with_an_unsubscribed_customer(tmp_path)
    days = [
        day_row(D, "mp-nosub", "proxy_bytes", usage=2 * GIB),
        day_row(D, "mp-003", "proxy_bytes", usage=GIB),
    ]
    flags_rows = list(_flags_of_day(seeds, D, days).values())
    data = tmp_path / "data"
    for model, rows, schema in (("fct_usage_by_day", days, DAY_SCHEMA), ("fct_anomaly_flags", flags_rows, None)):
        f = data / "models" / model / f"day={D}" / "data.parquet"
        f.parent.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), f)
    assert main(["--data-dir", str(data), "--seeds-dir", str(seeds), "report", "daily", "--date", str(D)]) == 0
    out = capsys.readouterr().out
    assert "- Usage outside any subscription (not billed): mp-nosub (proxy_bytes)" in out
    assert "| critical | mp-nosub | proxy_bytes | outside_subscription |" in out
