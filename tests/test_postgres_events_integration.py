"""Against a real PostgreSQL (Debian's package): usage_events (seed 003) -> raw events -> billed tokens.

PostgreSQL started by tests/servers.py (initdb, a free 127.0.0.1 port, its own
process group); a month of rows for two LLM customers, a row of an unknown key, a failed row and,
on a separate day, a row holding a raw API key (that day must fail naming row and column).
"""

from __future__ import annotations

import hashlib
import random
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

import dagster as dg
import pyarrow.parquet as pq
import pytest
from servers import POSTGRES_BINDIRS, postgres_server

from billing_dags.core.settings import PROJECT_ROOT, resolve_paths
from billing_dags.definitions import defs as load_defs
from billing_dags.defs.ingest.sources import PostgresEvents, SimulationResource, simulated_sources
from billing_dags.defs.shared.resources import StripeResource, WarehouseResource
from billing_dags.ingest import events

#: every asset of the code location, as loaded from the defs folder
ASSETS = load_defs().assets

pytestmark = pytest.mark.integration

if not POSTGRES_BINDIRS:
    pytest.skip("PostgreSQL server binaries not installed (apt-get install -y postgresql); CI installs them", allow_module_level=True)
psycopg = pytest.importorskip("psycopg")

K1 = "dba762d30bb922c294435ed9f0a9e1a3f638e96a796317d2ac728564afcca7ee"  # llm-001
K2 = "806fa31f757683af82faa077aa2c16c873ab6ecfe914edf145812061acdd50d4"  # llm-002
UNKNOWN = hashlib.sha256(b"not-a-customer").hexdigest()
DAYS = [date(2025, 4, 1) + timedelta(days=i) for i in range(30)]
BAD_DAY = date(2025, 5, 2)
PRICE = {
    ("llm_input_tokens", "gpt-4o"): Decimal("2.50"),
    ("llm_output_tokens", "gpt-4o"): Decimal("10.00"),
    ("llm_input_tokens", "claude-3-5-sonnet"): Decimal("3.00"),
    ("llm_output_tokens", "claude-3-5-sonnet"): Decimal("15.00"),
}

SCHEMA_003 = """
create table usage_events (
    id bigserial primary key, api_key_hash varchar(64) not null, execution_id varchar, task_type varchar,
    tokens_input integer, tokens_output integer, tokens_total integer, provider varchar, model varchar,
    model_cost_input numeric, model_cost_output numeric, cost_input numeric, cost_output numeric, cost_total numeric,
    execution_time double precision, status varchar, created_at timestamp not null default now(), metadata jsonb
)"""


@pytest.fixture(scope="module")
def pg(tmp_path_factory):
    with postgres_server(tmp_path_factory.mktemp("pg")) as dsn:
        yield dsn


def _rows():
    rng = random.Random(8)
    rows = []
    for d in DAYS:
        for _ in range(6):
            key = rng.choice([K1, K2, K1, K2, UNKNOWN])
            model = rng.choice(["gpt-4o", "claude-3-5-sonnet"])
            status = rng.choice(["success", "success", "completed", "failed"])
            ts = datetime(d.year, d.month, d.day, tzinfo=UTC) + timedelta(seconds=rng.randrange(86_400))
            rows.append((key, rng.randint(0, 50_000), rng.randint(0, 8_000), "openai", model, status, ts.replace(tzinfo=None)))
    # exactly at midnight of the first day and the first day after the month
    rows.append((K1, 1000, 10, "openai", "gpt-4o", "success", datetime(2025, 4, 1)))
    rows.append((K1, 5000, 50, "openai", "gpt-4o", "success", datetime(2025, 5, 1)))
    rows.append(("sk-live-raw-key", 10, 10, "openai", "gpt-4o", "success", datetime(2025, 5, 2, 12)))
    return rows


def _resources(paths, dsn):
    return {
        "warehouse": WarehouseResource(data_dir=str(paths.data_dir), seeds_dir=str(paths.seeds_dir)),
        **simulated_sources(SimulationResource()),
        "stripe": StripeResource(),
        "event_source": PostgresEvents(dsn=dsn),
    }


def _run(paths, dsn, instance, names, key=None, days=None):
    """One run of the assets ``names``: of partition ``key``, or of the range ``days`` (first, last) as a backfill runs it."""
    sel = [k for a in ASSETS for k in a.keys if k.to_user_string() in names]
    tags = {"dagster/asset_partition_range_start": days[0], "dagster/asset_partition_range_end": days[1]} if days else None
    return dg.materialize(ASSETS, selection=sel, partition_key=key, resources=_resources(paths, dsn), instance=instance, raise_on_error=False, tags=tags)


@pytest.mark.acceptance
def test_month_of_usage_events_is_billed_exactly(pg, tmp_path):
    rows = _rows()
    with psycopg.connect(pg, autocommit=True) as conn:
        conn.execute(SCHEMA_003)
        with conn.cursor() as cur:
            cur.executemany(
                "insert into usage_events (api_key_hash, tokens_input, tokens_output, provider, model, status, created_at) values (%s, %s, %s, %s, %s, %s, %s)",
                rows,
            )
    paths = resolve_paths(tmp_path / "data", PROJECT_ROOT / "seeds")
    instance = dg.DagsterInstance.ephemeral()
    assert _run(paths, pg, instance, {a.key.to_user_string() for a in ASSETS if a.key.to_user_string().startswith("seed_")}).success
    # the month's days in one run (as a backfill of the daily assets runs them), then the month's models in one run
    daily = {"usage_events", "int_series_edges_by_day", "int_gauge_peaks_by_day", "fct_usage_by_day"}
    assert _run(paths, pg, instance, daily, days=(DAYS[0].isoformat(), DAYS[-1].isoformat())).success
    month = {
        "fct_usage_by_month",
        "dim_subscription_periods_by_month",
        "fct_usage_by_subscription_period",
        "fct_billable_usage_by_subscription_period",
        "fct_rated_usage_by_subscription_period",
        "fct_invoice_lines",
    }
    assert _run(paths, pg, instance, month, "2025-04-01").success

    want: dict[tuple, Decimal] = {}
    for key, tin, tout, _, model, status, ts in rows:
        if key in (K1, K2) and status in ("success", "completed") and ts < datetime(2025, 5, 1):
            c = {K1: "llm-001", K2: "llm-002"}[key]
            for meter, q in (("llm_input_tokens", tin), ("llm_output_tokens", tout)):
                if q:
                    want[(c, meter, model)] = want.get((c, meter, model), Decimal(0)) + q
    got = {
        (r["customer_id"], r["meter_id"], r["dimension"]): r["usage"]
        for r in pq.read_table(paths.models / "fct_usage_by_month" / "month=2025-04" / "data.parquet").to_pylist()
        if r["meter_id"].startswith("llm_") and r["customer_id"] in ("llm-001", "llm-002")
    }
    assert got == want
    lines = pq.read_table(paths.models / "fct_invoice_lines" / "month=2025-04" / "data.parquet").to_pylist()
    for (c, meter, model), q in want.items():
        cents = int((q * PRICE[(meter, model)] / 1_000_000 * 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))
        assert [l["amount_minor"] for l in lines if (l["customer_id"], l["meter_id"], l["dimension"]) == (c, meter, model)] == [cents]

    # a rerun of a day gives the same file
    f = events.events_day_dir(paths, DAYS[3]) / "part-postgres.parquet"
    before = f.read_bytes()
    assert _run(paths, pg, instance, {"usage_events"}, DAYS[3].isoformat()).success
    assert f.read_bytes() == before

    # the raw-key day fails naming the row and the column, and writes nothing
    result = _run(paths, pg, instance, {"usage_events"}, BAD_DAY.isoformat())
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    msg = str(failure.event_specific_data.user_failure_data) + failure.event_specific_data.error.message
    assert f"id={len(rows)}" in msg and "column api_key_hash" in msg and "sk-live" not in msg
    assert not events.event_files(paths, BAD_DAY)
