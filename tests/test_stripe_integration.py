"""Stripe end to end (DESIGN rule 9): the outbox and sync-meters through the real
``stripe`` library against the local Stripe-compatible server of tests/stripe_server.py.

The server checks timestamps against the same fixed ``NOW`` the sender is given, so nothing here
depends on the wall clock except the CLI and Dagster tests, which use "yesterday".
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
import requests
from stripe_server import StripeServer

from billing_dags.core.settings import Paths
from billing_dags.stripe import outbox as ob
from billing_dags.stripe import sender as sd
from billing_dags.stripe.meters import desired_meters, send_days, sync_meters

pytestmark = pytest.mark.integration

UTC = UTC
NOW = datetime(2026, 4, 1, 6, 0, tzinfo=UTC)
MONTH = [date(2026, 3, 1) + timedelta(days=i) for i in range(31)]
API_KEY = "sk_test_51IntegrationKeyNeverLogged0123456789"

METERS = [
    {"meter_id": "api_calls", "kind": "counter", "aggregation": "sum", "stripe_event_name": "bd_api_calls", "description": "API calls"},
    {"meter_id": "devices", "kind": "gauge", "aggregation": "max", "stripe_event_name": "bd_devices", "description": "Peak devices"},
    {"meter_id": "internal", "kind": "counter", "aggregation": "sum", "stripe_event_name": None, "description": "not sent"},
]
CUSTOMERS = [
    {"customer_id": "acme", "stripe_customer_id": "cus_QXg1o8vcGmoR32"},
    {"customer_id": "beta", "stripe_customer_id": "cus_QXg1o8vcGmoR33"},
    {"customer_id": "gamma", "stripe_customer_id": "cus_QXg1o8vcGmoR34"},
    {"customer_id": "nostripe", "stripe_customer_id": None},
]


def usage_rows(day: date, bump: dict | None = None) -> list[dict]:
    """fct_usage_by_day-like rows: a counter in two dimensions and a gauge for each customer."""
    bump = bump or {}
    rows = []
    for i, c in enumerate(CUSTOMERS):
        base = (i + 1) * 1000 + day.day
        for dim, share in (("GET", Decimal("0.75")), ("POST", Decimal("0.25"))):
            rows.append(
                {
                    "day": day,
                    "customer_id": c["customer_id"],
                    "meter_id": "api_calls",
                    "dimension": dim,
                    "kind": "counter",
                    "usage": Decimal(base) * share + bump.get((c["customer_id"], "api_calls"), 0),
                    "gauge_integral": None,
                    "gauge_covered_ms": None,
                    "gauge_peak": None,
                }
            )
        rows.append(
            {
                "day": day,
                "customer_id": c["customer_id"],
                "meter_id": "devices",
                "dimension": "",
                "kind": "gauge",
                "usage": None,
                "gauge_integral": Decimal(0),
                "gauge_covered_ms": 0,
                "gauge_peak": Decimal(i + day.day) + Decimal("0.5"),
            }
        )
        rows.append(
            {
                "day": day,
                "customer_id": c["customer_id"],
                "meter_id": "internal",
                "dimension": "",
                "kind": "counter",
                "usage": Decimal(7),
                "gauge_integral": None,
                "gauge_covered_ms": None,
                "gauge_peak": None,
            }
        )
    return rows


def quantities(rows: list[dict]) -> list[dict]:
    """The billable quantities of fct_usage_by_day-like rows of sum and max meters, as
    ``ob.day_quantities`` gives them (that function is tested against the SQL model in test_stripe_outbox)."""
    return [
        {
            "customer_id": r["customer_id"],
            "meter_id": r["meter_id"],
            "dimension": r["dimension"],
            "base_quantity": r["usage"] if r["kind"] == "counter" else r["gauge_peak"],
        }
        for r in rows
    ]


def fill_outbox(paths: Paths, days: list[date]) -> int:
    n = 0
    for d in days:
        rows = ob.build_outbox(d, quantities(usage_rows(d)), CUSTOMERS, METERS, ob.read_outbox(paths, d))
        ob.write_outbox(paths, d, rows)
        n += len(rows)
    return n


def all_rows(paths: Paths, days: list[date]) -> list[dict]:
    return [r for d in days for r in ob.read_outbox(paths, d)]


@pytest.fixture
def server(no_proxy):
    with StripeServer(now=NOW, api_key=API_KEY) as s:
        yield s


@pytest.fixture
def outbox_paths(tmp_path) -> Paths:
    return Paths(tmp_path / "data", tmp_path / "seeds")


def client_for(server, **kw):
    return sd.make_client(API_KEY, server.url, **kw)


def synced(server) -> None:
    report = sync_meters(client_for(server), METERS)
    assert report.by_action() == {"created": 2}, report


# --------------------------------------------------------------------------- sync-meters


def test_sync_meters_creates_missing_once_then_is_a_no_op(server):
    from billing_dags.core.settings import PROJECT_ROOT
    from billing_dags.seeds.catalog import load_seeds

    seeds_meters = load_seeds(PROJECT_ROOT / "seeds")["meters"].to_pylist()
    wanted = desired_meters(seeds_meters)
    assert len(wanted) == sum(1 for m in seeds_meters if m["stripe_event_name"])
    # an account with 120 unrelated meters (the list spans two pages), one right meter, one conflicting
    for i in range(120):
        server.add_meter(f"other_{i:03d}")
    right = server.add_meter("proxy_bytes", display_name="named by hand")
    wrong = server.add_meter("proxy_submits", event_time_window=None, formula="count")
    # a level meter made as `sum` (as every meter used to be): Stripe would add the daily peaks
    summed_peaks = server.add_meter("iot_devices", formula="sum")
    client = client_for(server)

    first = sync_meters(client, seeds_meters)
    by_event = {i.event_name: i for i in first.items}
    assert by_event["iot_devices"].action == "conflicting" and by_event["iot_devices"].stripe_meter_id == summed_peaks["id"]
    assert "formula is 'sum', needs 'last'" in by_event["iot_devices"].detail
    assert by_event["proxy_bytes"].action == "existing" and by_event["proxy_bytes"].stripe_meter_id == right["id"]
    conflict = by_event["proxy_submits"]
    assert conflict.action == "conflicting" and conflict.stripe_meter_id == wrong["id"]
    assert "event_time_window is None, needs 'day'" in conflict.detail and "formula is 'count', needs 'sum'" in conflict.detail
    assert first.by_action() == {"existing": 1, "conflicting": 2, "created": len(wanted) - 3}
    assert not first.ok
    lists = [r for r in server.requests if r.method == "GET" and r.path == "/v1/billing/meters"]
    assert len(lists) == 2 and lists[1].form.get("starting_after")  # paginated
    # the conflicting meter was never modified (meters are immutable)
    assert server.meters[wrong["id"]] == wrong
    creates = [r for r in server.requests if r.method == "POST" and r.path == "/v1/billing/meters"]
    assert len(creates) == len(wanted) - 3 and all(r.status == 200 and r.idempotency_key for r in creates)
    aggregation = {m["stripe_event_name"]: m["aggregation"] for m in seeds_meters}
    for r in creates:
        want = "last" if aggregation[r.form["event_name"]] in ("max", "avg", "unit_months") else "sum"
        assert r.form["default_aggregation[formula]"] == want
        assert r.form["event_time_window"] == "day"
        assert r.form["customer_mapping[event_payload_key]"] == "stripe_customer_id"
        assert r.form["customer_mapping[type]"] == "by_id"
        assert r.form["value_settings[event_payload_key]"] == "value"
        assert r.form["display_name"]
    created = {m["event_name"]: m for m in server.meters.values() if m["event_name"] in by_event}
    assert created["k8s_memory"]["object"] == "billing.meter" and created["k8s_memory"]["event_time_window"] == "day"

    n_requests = len(server.requests)
    second = sync_meters(client, seeds_meters)
    assert second.by_action() == {"existing": len(wanted) - 2, "conflicting": 2}
    assert not [r for r in server.requests[n_requests:] if r.method == "POST"]
    assert len([m for m in server.meters.values() if m["event_name"] == "proxy_bytes"]) == 1

    # a duplicate create is rejected by the server as Stripe does, and reported, not raised
    import stripe

    with pytest.raises(stripe.InvalidRequestError, match="already exists"):
        client.v1.billing.meters.create(params={"display_name": "x", "event_name": "proxy_bytes", "default_aggregation": {"formula": "sum"}})


def test_sync_meters_without_a_key_is_a_dry_run(server):
    report = sync_meters(None, METERS)
    assert report.mode == "dry_run" and report.by_action() == {"missing": 2}
    assert server.requests == []


# --------------------------------------------------------------------------- sending a month


@pytest.mark.acceptance
def test_full_month_is_sent_and_a_rerun_sends_nothing(server, outbox_paths):
    synced(server)
    n = fill_outbox(outbox_paths, MONTH)
    assert n == 31 * 3 * 2  # three customers with a Stripe id, two meters with an event name
    client = client_for(server)
    summary, sender = send_days(outbox_paths, MONTH, client, now=NOW)
    assert sender.stats["sent"] == n and sender.stats["failed"] == 0 and not sender.aborted
    assert [s["day"] for s in summary] == [d.isoformat() for d in MONTH] and all(s["sent"] == 6 for s in summary)
    rows = all_rows(outbox_paths, MONTH)
    assert {r["status"] for r in rows} == {"sent"} and all(r["attempts"] == 1 and r["last_error"] is None for r in rows)

    posts = server.event_posts()
    assert len(posts) == n and len(server.events) == n
    assert len({e.identifier for e in server.events}) == n
    by_ident = {r["identifier"]: r for r in rows}
    for p in posts:
        row = by_ident[p.form["identifier"]]
        assert p.status == 200 and p.authorized and not p.key_in_body
        assert p.idempotency_key == row["identifier"] == ob.event_identifier(row["customer_id"], row["meter_id"], row["day"], 1)
        assert p.content_type.startswith("application/x-www-form-urlencoded")
        assert p.form == {
            "event_name": row["event_name"],
            "payload[stripe_customer_id]": row["stripe_customer_id"],
            "payload[value]": str(row["value"]),
            "identifier": row["identifier"],
            "timestamp": str(ob.day_timestamp(row["day"])),
        }
    # what Stripe's daily windows hold is exactly the outbox, per customer and day
    for event_name in ("bd_api_calls", "bd_devices"):
        expected = {(r["stripe_customer_id"], r["day"]): r["value"] for r in rows if r["event_name"] == event_name}
        assert server.window_values(event_name) == expected
    acme = next(r for r in rows if r["customer_id"] == "acme" and r["meter_id"] == "api_calls" and r["day"] == MONTH[0])
    assert acme["value"] == 1001  # 750.75 + 250.25, summed exactly over dimensions
    # ... and the same through Stripe's meter event summaries, read with the library
    meter_id = next(m["id"] for m in server.meters.values() if m["event_name"] == "bd_api_calls")
    start, end = ob.day_timestamp(MONTH[0]), ob.day_timestamp(MONTH[-1]) + 86_400
    month_total = client.v1.billing.meters.event_summaries.list(meter_id, params={"customer": "cus_QXg1o8vcGmoR32", "start_time": start, "end_time": end})
    assert [s.aggregated_value for s in month_total.data] == [sum(r["value"] for r in rows if r["customer_id"] == "acme" and r["meter_id"] == "api_calls")]
    daily = client.v1.billing.meters.event_summaries.list(
        meter_id, params={"customer": "cus_QXg1o8vcGmoR32", "start_time": start, "end_time": end, "value_grouping_window": "day"}
    )
    assert len(daily.data) == 31 and daily.data[0].object == "billing.meter_event_summary"

    # rerun: nothing is sent again, the server sees no request at all
    before = len(server.requests)
    _again_summary, again = send_days(outbox_paths, MONTH, client, now=NOW)
    assert len(server.requests) == before
    assert again.stats["sent"] == 0 and again.stats["posted"] == 0
    assert all_rows(outbox_paths, MONTH) == rows
    # rebuilding the outbox from unchanged usage changes nothing either
    fill_outbox(outbox_paths, MONTH)
    assert all_rows(outbox_paths, MONTH) == rows
    send_days(outbox_paths, MONTH, client, now=NOW)
    assert len(server.requests) == before


def test_a_corrected_day_sends_revision_2_and_the_daily_window_keeps_it(server, outbox_paths):
    synced(server)
    days = MONTH[-3:]
    fill_outbox(outbox_paths, days)
    client = client_for(server)
    send_days(outbox_paths, days, client, now=NOW)
    day = days[1]
    old = {(r["customer_id"], r["meter_id"]): r for r in ob.read_outbox(outbox_paths, day)}
    # late data: beta's api calls on that day go up by 40
    rows = ob.build_outbox(day, quantities(usage_rows(day, bump={("beta", "api_calls"): 20})), CUSTOMERS, METERS, ob.read_outbox(outbox_paths, day))
    ob.write_outbox(outbox_paths, day, rows)
    changed = [r for r in rows if r["status"] == "pending"]
    assert [(r["customer_id"], r["meter_id"], r["revision"], r["value"]) for r in changed] == [
        ("beta", "api_calls", 2, old[("beta", "api_calls")]["value"] + 40)
    ]
    assert changed[0]["identifier"].endswith(f"-{day:%Y%m%d}-r2")
    before = len(server.event_posts())
    _, sender = send_days(outbox_paths, days, client, now=NOW)
    assert sender.stats["sent"] == 1 and len(server.event_posts()) == before + 1
    values = server.window_values("bd_api_calls")
    assert values[("cus_QXg1o8vcGmoR33", day)] == old[("beta", "api_calls")]["value"] + 40  # the newest event of the day wins
    assert values[("cus_QXg1o8vcGmoR33", days[0])] == old[("beta", "api_calls")]["value"] - 1  # other days untouched
    beta_events = [e for e in server.events if e.customer == "cus_QXg1o8vcGmoR33" and e.event_name == "bd_api_calls" and e.timestamp == ob.day_timestamp(day)]
    assert [e.identifier[-2:] for e in beta_events] == ["r1", "r2"]


# --------------------------------------------------------------------------- failures


def test_500s_429s_and_a_timeout_are_retried_without_duplicates(server, outbox_paths):
    synced(server)
    days = MONTH[-2:]
    n = fill_outbox(outbox_paths, days)
    first = ob.read_outbox(outbox_paths, days[0])[0]["identifier"]
    # one event meets: 500, 500 (the library retries), 429, 429 (the sender retries its pair after
    # Retry-After while the other pairs carry on), then a response held back past the client's
    # timeout (the library retries and the server replays the saved response for the same key)
    server.fail_next(2, status=500, identifier=first)
    server.rate_limit_next(2, retry_after=2, identifier=first)
    server.delay_next(1.5, identifier=first)
    sleeps: list[float] = []
    client = client_for(server, max_network_retries=3, timeout_s=0.5)
    _, sender = send_days(outbox_paths, days, client, now=NOW, sleep=sleeps.append)
    rows = all_rows(outbox_paths, days)
    assert {r["status"] for r in rows} == {"sent"} and sender.stats["sent"] == n
    assert sender.backoffs == [2.0, 2.0]  # Retry-After honoured (it exceeds the 0.5 s / 1 s backoff)
    assert sum(sleeps) <= 4.0  # the sender waited (virtually) only once nothing else was left to send
    attempts = [p for p in server.event_posts() if p.form["identifier"] == first]
    assert [p.status for p in attempts] == [500, 500, 429, 429, 200, 200]
    assert [p.replayed for p in attempts] == [False] * 5 + [True]
    assert {p.idempotency_key for p in attempts} == {first}  # one key across every attempt
    # the other events did not wait for it: they were all sent before its second 429 was retried
    order = [p.form["identifier"] for p in server.event_posts() if p.status == 200]
    assert order.index(first) >= n - 2
    # one accepted event per identifier, nothing twice
    assert len(server.events) == n == len({e.identifier for e in server.events})
    assert server.concurrent_rejections == 0
    for event_name in ("bd_api_calls", "bd_devices"):
        assert server.window_values(event_name) == {(r["stripe_customer_id"], r["day"]): r["value"] for r in rows if r["event_name"] == event_name}


def test_a_400_marks_only_that_row_failed_with_stripes_message(server, outbox_paths):
    synced(server)
    days = MONTH[-2:]
    n = fill_outbox(outbox_paths, days)
    bad = ob.read_outbox(outbox_paths, days[0])[2]["identifier"]
    server.reject_identifier(bad, "No such customer: 'cus_QXg1o8vcGmoR33'")
    # and one event whose meter does not exist in Stripe (a meter missing from sync-meters)
    extra_meters = [*METERS, {"meter_id": "unsynced", "kind": "counter", "aggregation": "sum", "stripe_event_name": "bd_unsynced"}]
    extra = ob.build_outbox(
        days[1],
        quantities(
            [{"day": days[1], "customer_id": "gamma", "meter_id": "unsynced", "dimension": "", "kind": "counter", "usage": Decimal(3)}, *usage_rows(days[1])]
        ),
        CUSTOMERS,
        extra_meters,
        ob.read_outbox(outbox_paths, days[1]),
    )
    ob.write_outbox(outbox_paths, days[1], extra)
    _, sender = send_days(outbox_paths, days, client_for(server), now=NOW)
    rows = {r["identifier"]: r for r in all_rows(outbox_paths, days)}
    failed = {i: r for i, r in rows.items() if r["status"] == "failed"}
    assert set(failed) == {bad, f"gamma-unsynced-{days[1]:%Y%m%d}-r1"}
    assert "No such customer: 'cus_QXg1o8vcGmoR33'" in failed[bad]["last_error"] and "HTTP 400" in failed[bad]["last_error"]
    assert "No active meter was found matching event_name 'bd_unsynced'" in failed[f"gamma-unsynced-{days[1]:%Y%m%d}-r1"]["last_error"]
    assert len(rows) == n + 1 and sum(r["status"] == "sent" for r in rows.values()) == n - 1  # the rest went through
    assert not sender.aborted and sender.stats["failed"] == 2
    assert all(API_KEY not in (r["last_error"] or "") for r in rows.values())
    # next run: only the failed rows are posted again, with the same identifiers
    before = len(server.event_posts())
    send_days(outbox_paths, days, client_for(server), now=NOW)
    assert sorted(p.form["identifier"] for p in server.event_posts()[before:]) == sorted(failed)


def test_a_down_api_stops_the_run_after_consecutive_failures(server, outbox_paths):
    synced(server)
    days = MONTH[-2:]
    n = fill_outbox(outbox_paths, days)
    server.fail_next(1000, status=503)
    logged: list[str] = []
    _, sender = send_days(outbox_paths, days, client_for(server, max_network_retries=0), now=NOW, log=logged.append)
    rows = all_rows(outbox_paths, days)
    assert sender.aborted and sender.stats["failed"] == 5 and sender.stats["skipped"] == n - 5
    assert [r["status"] for r in rows].count("failed") == 5 and [r["status"] for r in rows].count("pending") == n - 5
    assert len(server.event_posts()) == 5 and server.events == []
    assert logged and "5 events in a row" in logged[0] and API_KEY not in logged[0]


def test_dry_run_without_a_key_sends_nothing(server, outbox_paths):
    n = fill_outbox(outbox_paths, MONTH)
    _summary, sender = send_days(outbox_paths, MONTH, sd.make_client(None, server.url), now=NOW)
    assert sender.mode == "dry_run" and sender.stats["dry_run"] == n
    assert {r["status"] for r in all_rows(outbox_paths, MONTH)} == {"dry_run"}
    assert server.requests == []
    # once a key is configured the dry-run rows are sent
    synced(server)
    _, live = send_days(outbox_paths, MONTH, client_for(server), now=NOW)
    assert live.stats["sent"] == n and len(server.events) == n


def test_too_old_and_future_events_are_flagged_not_sent(server, outbox_paths):
    synced(server)
    old_day, future_day, ok_day = date(2026, 2, 24), date(2026, 4, 2), date(2026, 2, 26)  # NOW is 2026-04-01 06:00
    fill_outbox(outbox_paths, [old_day, future_day, ok_day])
    _, _sender = send_days(outbox_paths, [old_day, future_day, ok_day], client_for(server), now=NOW)
    assert {r["status"] for r in ob.read_outbox(outbox_paths, old_day)} == {"too_old"}
    assert {r["status"] for r in ob.read_outbox(outbox_paths, future_day)} == {"future"}
    assert {r["status"] for r in ob.read_outbox(outbox_paths, ok_day)} == {"sent"}  # 34 days 6 h back
    assert all("older than Stripe accepts" in r["last_error"] for r in ob.read_outbox(outbox_paths, old_day))
    assert {e.timestamp for e in server.events} == {ob.day_timestamp(ok_day)}
    # a day later the future events are due and go out; too-old ones never do
    server.now = int((NOW + timedelta(days=1, hours=1)).timestamp())
    _, later = send_days(outbox_paths, [old_day, future_day], client_for(server), now=NOW + timedelta(days=1, hours=1))
    assert {r["status"] for r in ob.read_outbox(outbox_paths, future_day)} == {"sent"}
    assert {r["status"] for r in ob.read_outbox(outbox_paths, old_day)} == {"too_old"} and later.stats["sent"] == 6


# --------------------------------------------------------------------------- the server keeps Stripe's rules


def test_server_enforces_stripes_documented_limits(server):
    import stripe

    server.add_meter("bd_api_calls")
    client = client_for(server)
    ok = {"event_name": "bd_api_calls", "payload": {"stripe_customer_id": "cus_1", "value": "5"}, "identifier": "id-1", "timestamp": int(NOW.timestamp())}
    first = client.v1.billing.meter_events.create(params=ok, options={"idempotency_key": "k1"})
    assert first.object == "billing.meter_event" and first.identifier == "id-1" and first.payload["value"] == "5"
    # same key, same params: the saved response is replayed; other params: idempotency error
    assert client.v1.billing.meter_events.create(params=ok, options={"idempotency_key": "k1"}).identifier == "id-1"
    assert server.event_posts()[-1].replayed
    with pytest.raises(stripe.IdempotencyError):
        client.v1.billing.meter_events.create(params={**ok, "identifier": "id-2"}, options={"idempotency_key": "k1"})
    # the same identifier under another key is a duplicate
    with pytest.raises(stripe.InvalidRequestError, match="already exists") as dup:
        client.v1.billing.meter_events.create(params=ok, options={"idempotency_key": "k2"})
    assert dup.value.http_status == 400 and dup.value.param == "identifier"
    bad = {
        "payload[value]": ({**ok, "identifier": "v", "payload": {"stripe_customer_id": "cus_1", "value": "1.5"}}, "whole numbers"),
        "payload[stripe_customer_id]": ({**ok, "identifier": "c", "payload": {"value": "1"}}, "customer mapping key"),
        "identifier": ({**ok, "identifier": "x" * 101}, "at most|between 1 and 100"),
        "timestamp": ({**ok, "identifier": "t", "timestamp": int(NOW.timestamp()) - 35 * 86_400 - 1}, "past 35 days"),
        "event_name": ({**ok, "identifier": "e", "event_name": "nope"}, "No active meter"),
    }
    for param, (params, message) in bad.items():
        with pytest.raises(stripe.InvalidRequestError, match=message) as err:
            client.v1.billing.meter_events.create(params=params)
        assert err.value.param == param, param
    with pytest.raises(stripe.InvalidRequestError, match="5 minutes"):
        client.v1.billing.meter_events.create(params={**ok, "identifier": "f", "timestamp": int(NOW.timestamp()) + 301})
    client.v1.billing.meter_events.create(params={**ok, "identifier": "f2", "timestamp": int(NOW.timestamp()) + 300})
    with pytest.raises(stripe.AuthenticationError):
        sd.make_client("sk_test_wrong", server.url, max_network_retries=0).v1.billing.meter_events.create(params={**ok, "identifier": "a"})
    raw = requests.post(f"{server.url}/v1/billing/meter_events", data={"event_name": "bd_api_calls"}, timeout=5)
    assert raw.status_code == 401 and raw.json()["error"]["type"] == "invalid_request_error"
    listed = requests.get(f"{server.url}/v1/billing/meters", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5).json()
    assert set(listed) == {"object", "data", "has_more", "url"} and listed["object"] == "list"


# --------------------------------------------------------------------------- CLI and Dagster


@pytest.fixture
def seed_paths(data_dir, monkeypatch) -> Paths:
    """A fresh data dir and the project's seeds (read, never written)."""
    from billing_dags.core.settings import PROJECT_ROOT

    monkeypatch.setenv("BILLING_SEEDS_DIR", str(PROJECT_ROOT / "seeds"))
    return Paths(data_dir, PROJECT_ROOT / "seeds")


def _yesterday() -> date:
    return datetime.now(UTC).date() - timedelta(days=1)


def _write_seed_outbox(paths: Paths, day: date) -> list[dict]:
    from billing_dags.seeds.catalog import load_seeds

    seeds = load_seeds(paths.seeds_dir)
    customers = seeds["customers"].to_pylist()
    # meters priced as a whole (sync-meters makes one Stripe meter per priced dimension)
    whole = {p["meter_id"] for p in seeds["prices"].to_pylist() if not p["dimension"]}
    meters = [m for m in seeds["meters"].to_pylist() if m["meter_id"] in whole]
    usage = [
        {"day": day, "customer_id": c["customer_id"], "meter_id": m["meter_id"], "dimension": "", "kind": "counter", "usage": Decimal(10 + i)}
        for i, c in enumerate(customers)
        for m in meters
        if m["kind"] == "counter"
    ][:12]
    rows = ob.build_outbox(day, quantities(usage), customers, meters, [])
    ob.write_outbox(paths, day, rows)
    return rows


def test_cli_sync_meters_and_send(seed_paths, no_proxy, monkeypatch, capsys):
    from billing_dags.cli.main import main

    paths = seed_paths
    day = _yesterday()
    rows = _write_seed_outbox(paths, day)
    with StripeServer(now=datetime.now(UTC), api_key=API_KEY) as s:
        monkeypatch.setenv("STRIPE_API_BASE", s.url)
        # no key: dry-run, nothing reaches the server
        assert main(["stripe", "sync-meters", "--format", "json"]) == 0
        assert {r["action"] for r in json.loads(capsys.readouterr().out)} == {"missing"}
        assert main(["stripe", "send", "--day", day.isoformat(), "--format", "json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out[0]["dry_run"] == len(rows) and s.requests == []

        monkeypatch.setenv("STRIPE_API_KEY", API_KEY)
        assert main(["stripe", "sync-meters", "--format", "json"]) == 0
        assert {r["action"] for r in json.loads(capsys.readouterr().out)} == {"created"}
        assert main(["stripe", "sync-meters"]) == 0
        assert "existing" in capsys.readouterr().out
        assert main(["stripe", "send", "--month", f"{day:%Y-%m}", "--format", "json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out == [{**out[0], "day": day.isoformat(), "sent_now": len(rows), "sent": len(rows)}]
        assert len(s.events) == len(rows)
        assert main(["stripe", "send", "--day", day.isoformat()]) == 0  # rerun: nothing new
        assert len(s.event_posts()) == len(rows)
        text = capsys.readouterr().out
        assert API_KEY not in text
    assert main(["stripe", "send", "--day", "yesterday"]) == 2
    assert "not YYYY-MM-DD" in capsys.readouterr().err
    assert main(["stripe", "send"]) == 2


def test_stripe_meter_events_asset_reports_counts(seed_paths, no_proxy):
    import dagster as dg

    from billing_dags.defs.shared.resources import StripeResource, WarehouseResource
    from billing_dags.defs.stripe.assets import stripe_meter_events

    paths = seed_paths
    day = _yesterday()
    rows = _write_seed_outbox(paths, day)
    with StripeServer(now=datetime.now(UTC), api_key=API_KEY) as s:
        client = sd.make_client(API_KEY, s.url)
        from billing_dags.seeds.catalog import load_seeds

        sync_meters(client, load_seeds(paths.seeds_dir)["meters"].to_pylist())
        s.reject_identifier(rows[0]["identifier"], "No such customer")
        resources = {
            "warehouse": WarehouseResource(data_dir=str(paths.data_dir), seeds_dir=str(paths.seeds_dir)),
            "stripe": StripeResource(api_key=API_KEY, api_base=s.url, max_network_retries=1),
        }
        result = dg.materialize([stripe_meter_events], partition_key=day.isoformat(), resources=resources)
        assert result.success
        meta = result.asset_materializations_for_node("stripe_meter_events")[0].metadata
        assert meta["mode"].value == "live" and meta["sent_now"].value == len(rows) - 1 and meta["failed_now"].value == 1
        assert meta["by_status"].value == {"sent": len(rows) - 1, "failed": 1}
        assert len(s.events) == len(rows) - 1


# --------------------------------------------------------------------------- sender details


def test_backoff_is_exponential_bounded_and_honours_retry_after_up_to_a_cap():
    s = sd.Sender(None, now=NOW, backoff_base=0.5, backoff_cap=8.0, retry_after_cap=30.0)
    assert [s.backoff(a, None) for a in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert s.backoff(0, 3) == 3 and s.backoff(4, 3) == 8.0  # Retry-After is a floor ...
    assert s.backoff(0, 3600) == 30.0  # ... capped


def test_a_rate_limit_that_outlasts_the_retries_fails_the_row_and_a_wrong_key_stops_the_run(server, outbox_paths):
    synced(server)
    day = MONTH[-1]
    n = fill_outbox(outbox_paths, [day])
    throttled = ob.read_outbox(outbox_paths, day)[0]["identifier"]
    server.rate_limit_next(3, retry_after=100, identifier=throttled)
    sleeps: list[float] = []
    _, sender = send_days(outbox_paths, [day], client_for(server), now=NOW, sleep=sleeps.append, retries=2)
    rows = ob.read_outbox(outbox_paths, day)
    assert sender.backoffs == [30.0, 30.0] and rows[0]["status"] == "failed" and "429" in rows[0]["last_error"]
    assert sender.stats["sent"] == n - 1 and sender.stats["retried"] == 2
    # a wrong key: the first 401 stops the run (one request: nothing else is in flight before a
    # first success), the key is not in the stored error
    fill_outbox(outbox_paths, [MONTH[-2]])
    wrong = "sk_test_51WrongKeyAlsoNeverStored987654321"
    before = len(server.event_posts())
    _, stopped = send_days(outbox_paths, [MONTH[-2]], sd.make_client(wrong, server.url), now=NOW)
    assert stopped.aborted and len(server.event_posts()) == before + 1
    failed = [r for r in ob.read_outbox(outbox_paths, MONTH[-2]) if r["status"] == "failed"]
    assert len(failed) == 1 and "HTTP 401" in failed[0]["last_error"]
    assert "sk_" not in failed[0]["last_error"] and "[redacted]" in failed[0]["last_error"]  # not even Stripe's masked echo
