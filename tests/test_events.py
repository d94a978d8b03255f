"""The raw events layout (billing_dags/ingest/events.py) and delta events billed through fct_usage_by_day."""

from __future__ import annotations

import hashlib
from datetime import date
from decimal import Decimal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sql_helpers import SEEDS_DIR, Runner, day_window, ms

from billing_dags.core.settings import resolve_paths
from billing_dags.ingest import events
from billing_dags.ingest.events import EVENTS_SCHEMA, EventsLayoutError, write_events_day
from billing_dags.ingest.postgres_events import PostgresEventsError, UsageEventsTable, rows_to_batch
from billing_dags.models.sqlmodels import Window
from billing_dags.operations import retention

DAY = date(2025, 3, 10)
K1 = "dba762d30bb922c294435ed9f0a9e1a3f638e96a796317d2ac728564afcca7ee"  # llm-001
K2 = "806fa31f757683af82faa077aa2c16c873ab6ecfe914edf145812061acdd50d4"  # llm-002
UNKNOWN = hashlib.sha256(b"nobody").hexdigest()


def ev(event_id, ts, key, meter, dim, qty, kind="delta", attrs=None, hold_ms=0):
    return {
        "event_id": event_id,
        "ts": ts,
        "customer_key": key,
        "meter_id": meter,
        "dimension": dim,
        "kind": kind,
        "quantity": Decimal(qty),
        "hold_ms": hold_ms,
        "attributes": list((attrs or {}).items()),
    }


def table(rows):
    return pa.Table.from_pylist(rows, schema=EVENTS_SCHEMA)


@pytest.fixture
def paths(tmp_path):
    return resolve_paths(tmp_path / "data", SEEDS_DIR)


def test_write_dedupes_last_wins_sorts_and_is_byte_stable(paths):
    rows = [
        ev("b:in", ms(DAY, 5), K1, "llm_input_tokens", "gpt-4o", "10"),
        ev("a:in", ms(DAY, 3), K1, "llm_input_tokens", "gpt-4o", "7", attrs={"provider": "openai"}),
        ev("b:in", ms(DAY, 5), K1, "llm_input_tokens", "gpt-4o", "12"),  # the later write of b:in wins
    ]
    fig = write_events_day(paths, DAY, table(rows), "postgres")
    assert (fig["events_in"], fig["events"], fig["duplicates_dropped"]) == (3, 2, 1)
    f = events.events_day_dir(paths, DAY) / "part-postgres.parquet"
    got = pq.read_table(f)
    assert got.schema.equals(EVENTS_SCHEMA)
    assert [(r["event_id"], r["quantity"]) for r in got.to_pylist()] == [("a:in", Decimal(7)), ("b:in", Decimal(12))]
    assert got.to_pylist()[0]["attributes"] == [("provider", "openai")]
    before = f.read_bytes()
    write_events_day(paths, DAY, iter(table(rows).to_batches(max_chunksize=1)), "postgres")  # streamed batches
    assert f.read_bytes() == before
    # a rewrite replaces the source's day (here with nothing)
    write_events_day(paths, DAY, table([]), "postgres")
    assert pq.read_table(f).num_rows == 0
    assert [p.name for p in events.event_files(paths, DAY)] == ["part-postgres.parquet"]


def test_a_day_larger_than_a_batch_keeps_the_same_rows_as_a_day_in_memory(paths, monkeypatch):
    """Days of at most one batch are de-duplicated in memory, larger ones out of core by DuckDB: same rows."""
    import random

    rnd = random.Random(5)
    rows = [
        ev(f"e{rnd.randrange(400)}:{'in' if i % 2 else 'out'}", ms(DAY, rnd.randrange(24)), K1, "llm_input_tokens", rnd.choice(["gpt-4o", "claude"]), str(i))
        for i in range(1000)
    ]
    f = events.events_day_dir(paths, DAY) / "part-postgres.parquet"
    small = write_events_day(paths, DAY, table(rows), "postgres")
    in_memory = pq.read_table(f)
    monkeypatch.setattr(events, "_BATCH_ROWS", 64)
    large = write_events_day(paths, DAY, table(rows), "postgres")
    assert pq.ParquetFile(f).metadata.num_row_groups > 1  # the out-of-core path wrote it
    assert small == {**large, "bytes": small["bytes"]} and small["duplicates_dropped"] > 0
    assert pq.read_table(f).equals(in_memory)


@pytest.mark.parametrize(
    ("row", "match"),
    [
        (ev("x", ms(DAY) - 1, K1, "llm_input_tokens", "", "1"), "outside"),
        (ev("x", ms(DAY, 24), K1, "llm_input_tokens", "", "1"), "outside"),
        (ev("x", ms(DAY, 1), K1, "no_such_meter", "", "1"), "not in seeds/meters.csv"),
        (ev("x", ms(DAY, 1), K1, "proxy_connections", "", "1"), "delta events need a counter meter"),
        (ev("x", ms(DAY, 1), K1, "llm_input_tokens", "", "-1"), "negative"),
        (ev("x", ms(DAY, 1), K1, "llm_input_tokens", "", "1", kind="gauge", hold_ms=1000), "gauge events need a gauge meter"),
        (ev("x", ms(DAY, 1), K1, "llm_input_tokens", "", "1", hold_ms=1000), "hold_ms is 0 for a delta"),
        ({**ev("x", ms(DAY, 1), K1, "llm_input_tokens", "", "1"), "hold_ms": None}, "hold_ms has 1 null"),
        (ev("x", ms(DAY, 1), K1, "llm_input_tokens", "", "1", kind="level"), "not one of"),
        ({**ev("x", ms(DAY, 1), K1, "llm_input_tokens", "", "1"), "customer_key": None}, "customer_key has 1 null"),
    ],
)
def test_bad_events_are_refused_and_the_old_day_stays(paths, row, match):
    good = [ev("ok", ms(DAY, 1), K1, "llm_input_tokens", "gpt-4o", "1")]
    write_events_day(paths, DAY, table(good), "postgres")
    with pytest.raises(EventsLayoutError, match=match):
        write_events_day(paths, DAY, pa.Table.from_pylist([*good, row], schema=pa.schema([f.with_nullable(True) for f in EVENTS_SCHEMA])), "postgres")
    assert [r["event_id"] for r in pq.read_table(events.event_files(paths, DAY)[0]).to_pylist()] == ["ok"]
    assert not [p for p in events.events_day_dir(paths, DAY).iterdir() if p.name.startswith(".")]


def test_raw_api_key_is_refused_naming_row_and_column():
    cfg = UsageEventsTable()
    ok = ("7", ms(DAY, 1), K1, "gpt-4o", "openai", "success", "5", "0")
    batch = rows_to_batch([ok], cfg)
    assert batch.to_pylist()[0]["event_id"] == "7:in" and batch.num_rows == 1  # zero output tokens: no row
    with pytest.raises(PostgresEventsError, match=r"row id=8: column api_key_hash is not a SHA-256") as e:
        rows_to_batch([ok, ("8", ms(DAY, 2), "sk-live-abc", "gpt-4o", "openai", "success", "5", "1")], cfg)
    assert "sk-live-abc" not in str(e.value)
    with pytest.raises(PostgresEventsError, match="row id=9: column api_key_hash"):
        rows_to_batch([("9", ms(DAY, 2), K1.upper(), "gpt-4o", "openai", "success", "5", "1")], cfg)


def test_retention_covers_raw_events(paths):
    write_events_day(paths, DAY, table([]), "postgres")
    plan = retention.plan(paths, today=date(2025, 12, 1))
    assert events.events_day_dir(paths, DAY) in [c.path for c in plan]


def _fixture_events():
    rows, want = [], {}
    for i in range(40):
        key = (K1, K2, UNKNOWN)[i % 3]
        model = ("gpt-4o", "gpt-4o-mini")[i % 2]
        tin, tout = Decimal(1000 + 37 * i), Decimal(200 + 11 * i)
        rows.append(ev(f"{i}:in", ms(DAY, i % 24, i), key, "llm_input_tokens", model, tin))
        rows.append(ev(f"{i}:out", ms(DAY, i % 24, i), key, "llm_output_tokens", model, tout))
        if key != UNKNOWN:
            c = {K1: "llm-001", K2: "llm-002"}[key]
            for m, q in (("llm_input_tokens", tin), ("llm_output_tokens", tout)):
                want[(c, m, model)] = want.get((c, m, model), Decimal(0)) + q
    # an event of the day after is not this day's usage
    rows.append(ev("late:in", ms(date(2025, 3, 11), 0), K1, "llm_input_tokens", "gpt-4o", "999"))
    return rows, want


def test_delta_events_add_to_daily_usage_exactly_and_price_per_model():
    rows, want = _fixture_events()
    with Runner() as r:
        r.set_raw({}, {})
        r.set_events(table(rows))
        r.run("int_series_edges_by_day", day_window(DAY))
        r.run("int_gauge_peaks_by_day", day_window(DAY))
        day = r.run("fct_usage_by_day", day_window(DAY)).to_pylist()
        got = {(x["customer_id"], x["meter_id"], x["dimension"]): x["usage"] for x in day}
        assert got == want  # the unknown key is billed to nobody
        assert all(x["kind"] == "counter" and x["series"] == 0 and x["samples"] == 0 for x in day)
        assert sum(x["events"] for x in day) == sum(1 for x in rows if x["customer_key"] != UNKNOWN) - 1
        month = Window(date(2025, 3, 1), date(2025, 4, 1))
        for model in (
            "fct_usage_by_month",
            "dim_subscription_periods_by_month",
            "fct_usage_by_subscription_period",
            "fct_billable_usage_by_subscription_period",
            "fct_rated_usage_by_subscription_period",
            "fct_invoice_lines",
        ):
            out = r.run(model, month)
        lines = out.to_pylist()
    price = {
        ("llm_input_tokens", "gpt-4o"): Decimal("2.50"),
        ("llm_output_tokens", "gpt-4o"): Decimal("10.00"),
        ("llm_input_tokens", "gpt-4o-mini"): Decimal("0.15"),
        ("llm_output_tokens", "gpt-4o-mini"): Decimal("0.60"),
    }
    for (c, m, model), q in want.items():
        cents = (q * price[(m, model)] / Decimal(1_000_000) * 100).quantize(Decimal(1), rounding="ROUND_HALF_UP")
        got_line = [l["amount_minor"] for l in lines if (l["customer_id"], l["meter_id"], l["dimension"]) == (c, m, model)]
        assert got_line == [int(cents)], (c, m, model)
