"""Allowance notifications: one per crossing of 80% and 100% (from the allowance_used flags), again next
month, a stable id, created_at kept on recomputation, and a consumer that marks them delivered.

The flags are computed by the real fct_anomaly_flags_by_day SQL on fixture daily usage (mp-003 on
proxy_hybrid v2, 12 GiB included: 1 GiB a day in October and November 2026, so 80% is crossed on
the 10th and 100% on the 12th of each month; iot-001 on iot_starter, 10 devices included: a peak of 8
devices on 10 October, 10 from the 12th), published as the daily partitions the asset reads,
then the allowance_notifications asset is materialized with Dagster for each day.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sql_helpers import Runner, day_window
from test_anomaly_flags import EDGE_SCHEMA, POOL_SCHEMA, SERIES
from test_pricing_models import DAY_SCHEMA, day_row

from billing_dags.core.errors import InputError
from billing_dags.core.settings import PROJECT_ROOT, resolve_paths
from billing_dags.defs.reports.notifications import allowance_notifications
from billing_dags.defs.shared.resources import WarehouseResource
from billing_dags.operations import notifications

GIB = 2**30
RUN = [date(2026, 10, 1) + timedelta(days=i) for i in range(61)]  # October and November
#: the days whose flags are computed and published (each day reads its own lookback of the usage)
PEAKS = {date(2026, 10, 10): 8, date(2026, 10, 11): 9}
FLAG_DAYS = [date(2026, 10, 9), date(2026, 10, 10), date(2026, 10, 11), date(2026, 10, 12), date(2026, 11, 10), date(2026, 11, 12)]


@pytest.fixture(scope="module")
def flagged(tmp_path_factory):
    """A data dir with fct_anomaly_flags_by_day partitions of days of October and November 2026."""
    paths = resolve_paths(tmp_path_factory.mktemp("notifications") / "data", PROJECT_ROOT / "seeds")
    days = [day_row(d, "mp-003", "proxy_bytes", usage=GIB) for d in RUN]
    # iot-001 (iot_starter, 10 devices included): a peak of 7 devices, 8 on 10 October, 9, then 10 from the 12th
    days += [day_row(d, "iot-001", "iot_devices", peak=PEAKS.get(d, 7 if d < date(2026, 10, 10) else 10), kind="gauge") for d in RUN if d.month == 10]
    with Runner() as r:
        r.set_raw({}, SERIES)
        r.set_table("external_pool_shares", pa.Table.from_pylist([], schema=POOL_SCHEMA))
        r.set_table("fct_usage_by_day", pa.Table.from_pylist(days, schema=DAY_SCHEMA))
        r.set_table("int_series_edges_by_day", pa.Table.from_pylist([], schema=EDGE_SCHEMA))
        computed = {d: r.query("fct_anomaly_flags_by_day", day_window(d)) for d in FLAG_DAYS}
    # the other days of the range: no flag of mp-003's allowance (the SQL raises none on them)
    empty = computed[FLAG_DAYS[0]].schema.empty_table()
    for d in RUN:
        f = paths.models / "fct_anomaly_flags_by_day" / f"day={d.isoformat()}" / "data.parquet"
        f.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(computed.get(d, empty), f)
    return paths


def materialize(paths, first: date, last: date | None = None) -> dg.ExecuteInProcessResult:
    """The asset for the days ``first`` to ``last`` in one run (as a backfill runs them)."""
    resources = {"warehouse": WarehouseResource(data_dir=str(paths.data_dir), seeds_dir=str(paths.seeds_dir))}
    tags = {"dagster/asset_partition_range_start": first.isoformat(), "dagster/asset_partition_range_end": (last or first).isoformat()}
    result = dg.materialize([allowance_notifications], resources=resources, tags=tags, instance=dg.DagsterInstance.ephemeral())
    assert result.success
    return result


def test_one_notification_per_crossing_and_again_next_month(flagged):
    paths = flagged
    materialize(paths, date(2026, 10, 9), date(2026, 10, 12))
    materialize(paths, date(2026, 11, 10), date(2026, 11, 12))
    got = [n for n in notifications.outbox(paths) if n["customer_id"] == "mp-003"]
    assert [(n["day"], n["threshold_percent"]) for n in got] == [("2026-10-10", "80"), ("2026-10-12", "100"), ("2026-11-10", "80"), ("2026-11-12", "100")]
    oct80 = got[0]
    assert oct80["customer_id"] == "mp-003" and oct80["meter_id"] == "proxy_bytes" and oct80["period"] == "2026-10"
    # the flag's own figures: 10 GiB of 12 included, 83.33%
    assert (oct80["quantity"], oct80["allowance"], oct80["unit"], oct80["used_percent"]) == ("10", "12", "gib", "83.33")
    assert "10 gib" in oct80["message"] and "12 gib included" in oct80["message"]
    assert oct80["id"] == notifications.notification_id("mp-003", "proxy_bytes", "", "2026-10", Decimal(80))
    assert len({n["id"] for n in got}) == 4  # the same threshold next month is a new notification
    # a day over a level but not crossing one, and a day below: no file
    assert len(list((paths.data_dir / "notifications" / "outbox").glob("*.jsonl"))) == 4
    assert not notifications.outbox_file(paths, date(2026, 10, 11)).exists()
    assert not notifications.outbox_file(paths, date(2026, 10, 9)).exists()


def test_a_peak_allowance_notifies_at_80_and_100_once_each(flagged):
    """A max-aggregation meter (peak devices) with an included quantity notifies as a counter does: on the
    day its month-to-date peak first reaches 80%, then 100%; a higher peak between the levels does not."""
    paths = flagged
    materialize(paths, date(2026, 10, 9), date(2026, 10, 12))
    got = [n for n in notifications.outbox(paths) if n["customer_id"] == "iot-001"]
    assert [(n["day"], n["meter_id"], n["threshold_percent"], n["used_percent"], n["quantity"], n["allowance"], n["unit"]) for n in got] == [
        ("2026-10-10", "iot_devices", "80", "80.00", "8", "10", "device"),
        ("2026-10-12", "iot_devices", "100", "100.00", "10", "10", "device"),
    ]
    assert got[0]["message"].startswith("Peak active devices reached 8 device in 2026-10: 80.00% of the 10 device included")
    assert "a peak over it is billed" in got[1]["message"]


def test_recomputing_a_day_keeps_ids_and_created_at_and_bytes(flagged):
    paths = flagged
    day = date(2026, 10, 10)
    materialize(paths, day)
    f = notifications.outbox_file(paths, day)
    before = f.read_bytes()
    (n, *_) = [json.loads(line) for line in before.decode().splitlines()]
    later = datetime(2030, 1, 1, tzinfo=UTC)
    assert notifications.build_day(paths, day, now=later)[0]["created_at"] == n["created_at"]
    materialize(paths, day)
    assert f.read_bytes() == before


def test_a_sender_lists_pending_and_marks_them_delivered(flagged):
    paths = flagged
    materialize(paths, date(2026, 10, 10), date(2026, 10, 12))
    pending = notifications.pending(paths)
    first = pending[0]["id"]
    assert notifications.mark_delivered(paths, [first], "email") == [first]
    assert notifications.mark_delivered(paths, [first], "email") == []  # idempotent
    assert first not in {n["id"] for n in notifications.pending(paths)}
    assert notifications.delivered(paths)[first]["channel"] == "email"
    # a recomputed day never forgets a delivery
    materialize(paths, date(2026, 10, 10))
    assert first not in {n["id"] for n in notifications.pending(paths)}
    with pytest.raises(InputError, match="not in the outbox"):
        notifications.mark_delivered(paths, ["ntf_000000000000000000000000"], "email")
    with pytest.raises(InputError, match="channel"):
        notifications.mark_delivered(paths, [first], " ")


def test_the_asset_fails_clearly_without_the_days_flags(tmp_path):
    paths = resolve_paths(tmp_path / "data", PROJECT_ROOT / "seeds")
    with pytest.raises(InputError, match="materialize fct_anomaly_flags_by_day"):
        notifications.build_day(paths, date(2026, 10, 10))


def test_the_cli_lists_pending_and_marks_delivered(flagged, capsys):
    from billing_dags.cli.main import main

    paths = flagged
    materialize(paths, date(2026, 11, 10), date(2026, 11, 12))
    base = ["--data-dir", str(paths.data_dir), "--seeds-dir", str(paths.seeds_dir), "notifications"]
    assert main([*base, "list", "--all", "--format", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    nov = [n for n in listed if n["period"] == "2026-11"]
    assert [n["threshold_percent"] for n in nov] == ["80", "100"]
    assert main([*base, "mark-delivered", nov[0]["id"], "--channel", "webhook"]) == 0
    assert "1 marked delivered" in capsys.readouterr().out
    assert main([*base, "list", "--format", "json"]) == 0
    assert nov[0]["id"] not in {n["id"] for n in json.loads(capsys.readouterr().out)}
    assert main([*base, "mark-delivered", "ntf_nope", "--channel", "webhook"]) == 2
    assert "not in the outbox" in capsys.readouterr().err


def test_the_flag_carries_the_included_quantity_and_the_notification_states_it(flagged, tmp_path):
    """The plan in force is resolved once, in SQL: the allowance_used flag carries the included quantity its
    percentage was computed against, and the notification states that one (not the seeds read again)."""
    paths = flagged
    day = date(2026, 10, 10)
    f = paths.models / "fct_anomaly_flags_by_day" / f"day={day}" / "data.parquet"
    flags = pq.read_table(f).to_pylist()
    assert {(r["rule"], r["included_quantity"]) for r in flags if r["customer_id"] == "mp-003"} >= {("allowance_used", Decimal(12))}
    assert all(r["included_quantity"] is None for r in flags if r["rule"] != "allowance_used")
    # the seeds change after the flags were computed (proxy_hybrid v2 now includes 24 GiB): the
    # notification still says 10 of 12 GiB, 83.33%, as its flag does, until the day is computed again
    seeds = tmp_path / "seeds"
    shutil.copytree(PROJECT_ROOT / "seeds", seeds)
    prices = (seeds / "prices.csv").read_text()
    assert "proxy_hybrid,2,proxy_bytes,,12," in prices
    (seeds / "prices.csv").write_text(prices.replace("proxy_hybrid,2,proxy_bytes,,12,", "proxy_hybrid,2,proxy_bytes,,24,"))
    (n,) = [n for n in notifications.build_day(resolve_paths(paths.data_dir, seeds), day) if n["customer_id"] == "mp-003"]
    assert (n["quantity"], n["allowance"], n["used_percent"]) == ("10", "12", "83.33")
    assert "of the 12 gib included" in n["message"]
