"""A month of seed-001 usage reports POSTed to the real server (`billing remote-write serve`), billed exactly.

The receiver runs as its own process on 127.0.0.1. iot-010 (IoT Professional: $99, 50 devices,
100 GiB pooled traffic MQTT then HTTP, 50 GiB storage, $0.50 per 1,000 API calls) reports every
hour of the last complete month; one hour is missing, some reports are retried, one retry changes
its contents (409), one report is malformed (400). The bill is computed here, independently, from
the numbers that were sent.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from datetime import UTC, date, datetime
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal

import dagster as dg
import pyarrow.parquet as pq
import pytest
import requests
from servers import free_port, receiver_command

from billing_dags.core.calendar import last_complete_month, month_days, next_month
from billing_dags.core.settings import PROJECT_ROOT, resolve_paths
from billing_dags.definitions import defs as load_defs
from billing_dags.defs.ingest.sources import NoEvents, ReceivedReports, SimulatedSamples, SimulationResource
from billing_dags.defs.shared.resources import StripeResource, WarehouseResource
from billing_dags.ingest import events
from billing_dags.ingest.usage_reports import demo_report_token

#: every asset of the code location, as loaded from the defs folder
ASSETS = load_defs().assets

pytestmark = pytest.mark.integration

TOKEN = demo_report_token("iot-010")
GIB = Decimal(2**30)
MIB = 2**20
HOUR_MS = 3_600_000


def _month() -> date:
    """The last complete month: always inside the 90-day window the endpoint accepts."""
    return last_complete_month(datetime.now(UTC).date())


def _ms(d: date) -> int:
    return int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp()) * 1000


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _reports(month: date) -> list[dict]:
    rng = random.Random(1)
    start, end = _ms(month), _ms(next_month(month))
    out = []
    storage_mb = Decimal("40000.00")
    for ts in range(start, end + HOUR_MS, HOUR_MS):  # the last one is 00:00 of the next month
        storage_mb += Decimal(rng.randrange(0, 5000)) / 100
        out.append(
            {
                "report_id": f"h-{_iso(ts)}",
                "customer_id": "iot-010",
                "reported_at": _iso(ts),
                "interval_seconds": 3600,
                "active_devices": rng.randint(30, 60),
                "total_devices": 70,
                "mqtt_messages_published": rng.randint(0, 10_000),
                "mqtt_messages_received": rng.randint(0, 10_000),
                "mqtt_bytes_sent": rng.randint(0, 200) * MIB,
                "mqtt_bytes_received": rng.randint(0, 100) * MIB,
                "mqtt_connections": rng.randint(1, 9),
                "http_requests": rng.randint(0, 900),
                "http_bytes_sent": rng.randint(0, 20) * MIB,
                "http_bytes_received": rng.randint(0, 5) * MIB,
                "postgres_size_mb": f"{storage_mb:.2f}",  # placeholder, sent as a JSON number below
                "influxdb_size_mb": "1500.50",
                "influxdb_points": 1200,
            }
        )
    return out


def _json(doc: dict) -> str:
    # the sizes go out as JSON numbers with two decimals, as seed 001's Math.round(x * 100) / 100
    text = json.dumps(doc)
    for k in ("postgres_size_mb", "influxdb_size_mb"):
        text = text.replace(f'"{k}": "{doc[k]}"', f'"{k}": {doc[k]}')
    return text


@pytest.fixture
def server(tmp_path):
    port = free_port()
    with open(tmp_path / "receiver.log", "ab") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            receiver_command(tmp_path / "data", PROJECT_ROOT / "seeds", port),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            if requests.get(url + "/-/ready", timeout=1).ok:
                break
        except requests.ConnectionError:
            pass
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "receiver.log").read_text()
        time.sleep(0.1)
    try:
        yield url + "/api/usage/report"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def _post(url, text, token=TOKEN):
    return requests.post(url, data=text, headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"}, timeout=10)


def _run(paths, instance, names, key=None):
    resources = {
        "warehouse": WarehouseResource(data_dir=str(paths.data_dir), seeds_dir=str(paths.seeds_dir)),
        "sample_source": SimulatedSamples(simulation=SimulationResource()),
        "stripe": StripeResource(),
        # only the reports the test POSTs: no simulated reports, no usage_events rows
        "event_source": NoEvents(),
        "report_source": ReceivedReports(),
    }
    sel = [k for a in ASSETS for k in a.keys if k.to_user_string() in names]
    return dg.materialize(ASSETS, selection=sel, partition_key=key, resources=resources, instance=instance, raise_on_error=False)


def _cents(amount: Decimal) -> int:
    return int((amount * 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))


@pytest.mark.acceptance
def test_a_month_of_posted_reports_is_billed_exactly(server, tmp_path):
    month = _month()
    reports = _reports(month)
    missing = reports[4 * 24 + 10]  # day 5, 10:00 never arrives
    sent = [r for r in reports if r is not missing]
    for r in sent:
        resp = _post(server, _json(r))
        assert resp.status_code == 201, resp.text
    for r in sent[::97]:  # retries of the same report are no-ops
        assert _post(server, _json(r)).status_code == 200
    changed = {**sent[5], "http_requests": sent[5]["http_requests"] + 1}
    resp = _post(server, _json(changed))
    assert resp.status_code == 409 and resp.json()["field"] == "report_id"
    bad = {**sent[6], "report_id": "bad-1", "mqtt_bytes_sent": -1}
    resp = _post(server, _json(bad))
    assert resp.status_code == 400 and resp.json()["field"] == "mqtt_bytes_sent"

    paths = resolve_paths(tmp_path / "data", PROJECT_ROOT / "seeds")
    instance = dg.DagsterInstance.ephemeral()
    assert _run(paths, instance, {a.key.to_user_string() for a in ASSETS if a.key.to_user_string().startswith("seed_")}).success
    days = month_days(month)
    month_end_ms = _ms(next_month(month))
    stamps = [int(datetime.strptime(r["reported_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()) * 1000 for r in sent]
    for d in days:
        for names in (("usage_reports",), ("int_series_edges_by_day",), ("int_gauge_peaks_by_day",), ("fct_usage_by_day",)):
            assert _run(paths, instance, set(names), d.isoformat()).success, (d, names)
    for m in (
        "fct_usage_by_month",
        "dim_subscription_periods_by_month",
        "fct_usage_by_subscription_period",
        "fct_billable_usage_by_subscription_period",
        "fct_rated_usage_by_subscription_period",
        "fct_invoice_lines",
    ):
        assert _run(paths, instance, {m}, month.isoformat()).success, m

    # --- the independent bill, from what was sent (the next month's 00:00 report is not this month's)
    in_month = [r for r, ts in zip(sent, stamps) if ts < month_end_ms]
    assert len(in_month) == len(days) * 24 - 1
    total = lambda *fields: sum(Decimal(r[f]) for r in in_month for f in fields)  # noqa: E731
    mqtt_b, http_b = total("mqtt_bytes_sent", "mqtt_bytes_received"), total("http_bytes_sent", "http_bytes_received")
    peak_devices = max(r["active_devices"] for r in in_month)
    peak_storage = max((Decimal(r["postgres_size_mb"]) + Decimal(r["influxdb_size_mb"])) * MIB for r in in_month)

    usage = {
        r["meter_id"]: r
        for r in pq.read_table(paths.models / "fct_usage_by_month" / f"month={month:%Y-%m}" / "data.parquet").to_pylist()
        if r["customer_id"] == "iot-010"
    }
    assert usage["iot_mqtt_bytes"]["usage"] == mqtt_b and usage["iot_http_bytes"]["usage"] == http_b
    assert usage["iot_http_requests"]["usage"] == total("http_requests")
    assert usage["iot_mqtt_messages"]["usage"] == total("mqtt_messages_published", "mqtt_messages_received")
    assert usage["iot_devices"]["gauge_peak"] == peak_devices and usage["iot_storage"]["gauge_peak"] == peak_storage
    # time-weighted: each level holds until the next report, at most interval + 5 min; the missing hour leaves 55 min uncovered
    integral, covered = Decimal(0), 0
    for i, r in enumerate(sent):
        if stamps[i] >= month_end_ms:
            continue
        nxt = stamps[i + 1] if i + 1 < len(sent) else month_end_ms
        span = min(nxt, stamps[i] + HOUR_MS + 300_000, month_end_ms) - stamps[i]
        integral += r["active_devices"] * span
        covered += span
    assert covered == len(days) * 86_400_000 - 55 * 60_000
    assert (usage["iot_devices"]["gauge_integral"], usage["iot_devices"]["gauge_covered_ms"]) == (integral, covered)

    pool = Decimal(100) * GIB  # MQTT uses the pooled allowance first, then HTTP
    mqtt_over = max(mqtt_b - pool, Decimal(0))
    http_over = max(http_b - max(pool - mqtt_b, Decimal(0)), Decimal(0))
    want = {
        "iot_mqtt_bytes": _cents(mqtt_over / GIB * Decimal("0.10")),
        "iot_http_bytes": _cents(http_over / GIB * Decimal("0.15")),
        "iot_devices": _cents(max(Decimal(peak_devices) - 50, Decimal(0)) * 2),
        "iot_storage": _cents(max(peak_storage / GIB - 50, Decimal(0)) * Decimal("0.20")),
        "iot_http_requests": _cents((total("http_requests") / 1000).to_integral_value(rounding=ROUND_CEILING) * Decimal("0.50")),
    }
    assert all(want[m] > 0 for m in ("iot_mqtt_bytes", "iot_devices", "iot_storage", "iot_http_requests"))  # the data exercises overage
    lines = [
        l for l in pq.read_table(paths.models / "fct_invoice_lines" / f"month={month:%Y-%m}" / "data.parquet").to_pylist() if l["customer_id"] == "iot-010"
    ]
    got = {l["meter_id"]: l["amount_minor"] for l in lines if l["meter_id"] in want}
    assert got == want
    base = [l["amount_minor"] for l in lines if l["line_type"] == "base_fee"]
    assert base == [9900]

    # rerunning a day gives the same events file and no double counting
    d = days[3]
    f = events.events_day_dir(paths, d) / "part-usage_reports.parquet"
    before = f.read_bytes()
    assert _run(paths, instance, {"usage_reports"}, d.isoformat()).success
    assert f.read_bytes() == before
    assert _run(paths, instance, {"fct_usage_by_day"}, d.isoformat()).success
    assert _run(paths, instance, {"fct_usage_by_month"}, month.isoformat()).success
    again = {
        r["meter_id"]: r["usage"]
        for r in pq.read_table(paths.models / "fct_usage_by_month" / f"month={month:%Y-%m}" / "data.parquet").to_pylist()
        if r["customer_id"] == "iot-010"
    }
    assert again["iot_mqtt_bytes"] == mqtt_b
