"""The customer usage API on the real server (`billing remote-write serve`, its own process, 127.0.0.1 port 0).

The warehouse is a simulated month and a half of daily usage (fct_usage_by_day partitions, seeded
random numbers) for two customers with plans and allowances, mp-003 (proxy_hybrid: 12 GiB and 12,000
shares included) and iot-001 (iot_starter: 10 devices, 10 GiB pooled MQTT + HTTP traffic, 5 GiB
storage), plus usage of a customer with no subscription (zz-001, added to a copy of the seeds). The
open month is the real current month, days 1 to today computed (today included, so there is always
one), because the server reads the real clock. Each customer has an API key of its own, stored as
SHA-256 in the seeds copy's api_keys.csv. Expected figures are computed here from the numbers written.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from seed_copies import SEEDS
from servers import serve_app, stop, wait_for
from sql_helpers import USAGE_BY_DAY_SCHEMA
from stripe_server import StripeServer

from billing_dags.billing import projection
from billing_dags.core.calendar import month_start, next_month, previous_month
from billing_dags.core.settings import resolve_paths
from billing_dags.seeds.api_keys import key_sha256

pytestmark = pytest.mark.integration

GIB = 2**30
STRIPE_KEY = "sk_test_usage_api_0123456789"
KEYS = {"mp-003": "bk_test_mp003_0123456789abcdef", "iot-001": "bk_test_iot001_0123456789abcdef", "zz-001": "bk_test_zz001_0123456789abcdef"}
TODAY = datetime.now(UTC).date()
OPEN = month_start(TODAY)
LAST = previous_month(OPEN)


def _row(day, customer, meter, *, usage=None, peak=None):
    gauge = usage is None
    return {
        "day": day,
        "customer_id": customer,
        "meter_id": meter,
        "dimension": "",
        "kind": "gauge" if gauge else "counter",
        "usage": None if gauge else Decimal(usage),
        "gauge_integral": Decimal(peak) * 86_400_000 if gauge else None,
        "gauge_covered_ms": 86_400_000 if gauge else None,
        "gauge_peak": Decimal(peak) if gauge else None,
        "series": 1,
        "samples": 1440,
        "dropped_samples": 0,
        "resets": 0,
        "reappeared_series": 0,
        "max_gap_ms": 60_000,
        "events": 0,
        "duplicate_conflicts": 0,
        "gauge_held_ms": 86_400_000 if gauge else None,
    }


def simulated_days() -> dict[date, list[dict]]:
    """Every day of last month and of this month up to today: usage in whole 1/64 GiB, exact in GiB."""
    rng = random.Random(19)
    out = {}
    d = LAST
    while d <= TODAY:
        out[d] = [
            _row(d, "mp-003", "proxy_bytes", usage=rng.randint(16, 48) * GIB // 64),
            _row(d, "mp-003", "proxy_accepted_shares", usage=rng.randint(300, 500)),
            _row(d, "iot-001", "iot_devices", peak=rng.randint(5, 12)),
            _row(d, "iot-001", "iot_mqtt_bytes", usage=rng.randint(4, 20) * GIB // 64),
            _row(d, "iot-001", "iot_http_bytes", usage=rng.randint(0, 6) * GIB // 64),
            _row(d, "zz-001", "proxy_bytes", usage=GIB),
        ]
        d += timedelta(days=1)
    return out


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory):
    root = tmp_path_factory.mktemp("usage_api")
    seeds = root / "seeds"
    import shutil

    shutil.copytree(SEEDS, seeds)
    with (seeds / "customers.csv").open("a", newline="") as f:
        csv.writer(f).writerow(["zz-001", "No plan yet", "proxy", "zz-001", "usd", "", "prometheus"])
    with (seeds / "api_keys.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["customer_id", "key_sha256", "description"])
        for customer, key in KEYS.items():
            w.writerow([customer, key_sha256(key), f"test key of {customer}"])
    paths = resolve_paths(root / "data", seeds)
    days = simulated_days()
    for d, rows in days.items():
        f = paths.models / "fct_usage_by_day" / f"day={d.isoformat()}" / "data.parquet"
        f.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=USAGE_BY_DAY_SCHEMA), f)
    # one allowance notification each for mp-003 and iot-001 in the open month's outbox
    outbox = paths.data_dir / "notifications" / "outbox" / f"day={OPEN.isoformat()}.jsonl"
    outbox.parent.mkdir(parents=True)
    notes = [_notification("mp-003", "proxy_bytes", "gib"), _notification("iot-001", "iot_mqtt_bytes", "gib")]
    outbox.write_text("".join(json.dumps(n) + "\n" for n in notes))
    return paths, days


def _notification(customer: str, meter: str, unit: str) -> dict:
    from billing_dags.operations.notifications import notification_id

    period = f"{OPEN:%Y-%m}"
    return {
        "id": notification_id(customer, meter, "", period, Decimal(80)),
        "kind": "allowance_threshold",
        "customer_id": customer,
        "meter_id": meter,
        "period": period,
        "day": OPEN.isoformat(),
        "threshold_percent": "80",
        "quantity": "9",
        "allowance": "10",
        "unit": unit,
        "subject": f"80% of an allowance used: {meter}",
    }


def start_server(paths, log, *extra, env=None):
    argv = [sys.executable, "-m", "billing_dags.cli.main", "--data-dir", str(paths.data_dir), "--seeds-dir", str(paths.seeds_dir)]
    argv += ["remote-write", "serve", "--listen", "127.0.0.1:0", "--min-free-bytes", "0", *extra]
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)

    def port():
        assert proc.poll() is None, log.read_text()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", log.read_text())
        return m and m.group(1)

    url = f"http://127.0.0.1:{wait_for(port, 30, 'the server to print its port')}"
    wait_for(lambda: requests.get(url + "/-/ready", timeout=2).ok, 30, "the server to answer")
    return proc, url


@pytest.fixture(scope="module")
def stripe_server():
    with StripeServer(now=datetime.now(UTC), api_key=STRIPE_KEY) as s:
        yield s


@pytest.fixture(scope="module")
def server(warehouse, stripe_server, tmp_path_factory):
    """The receiver's server with the customer API, its Stripe calls going to the local Stripe server."""
    paths, _ = warehouse
    env = {**os.environ, "STRIPE_API_KEY": STRIPE_KEY, "STRIPE_API_BASE": stripe_server.url}
    proc, url = start_server(paths, tmp_path_factory.mktemp("log") / "server.log", env=env)
    try:
        yield url
    finally:
        stop(proc)


def get(url, path, key=None, **params):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.get(url + path, params=params, headers=headers, timeout=60)


def auth(customer: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[customer]}"}


def gib(n_bytes) -> str:
    return f"{(Decimal(n_bytes) / GIB).normalize():f}"


def test_usage_by_meter_and_day_is_the_customers_own_and_exact(server, warehouse):
    _, days = warehouse
    end = next_month(LAST) - timedelta(days=1)
    r = get(server, "/v1/billing/usage", KEYS["mp-003"], start_date=LAST.isoformat(), end_date=end.isoformat())
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["customer_id"] == "mp-003" and doc["start_date"] == LAST.isoformat() and doc["end_date"] == end.isoformat()
    assert doc["days_computed"] == (end - LAST).days + 1
    meters = {m["meter"]: m for m in doc["meters"]}
    assert set(meters) == {"proxy_bytes", "proxy_accepted_shares"}  # nothing of iot-001 or zz-001
    mine = ("mp-003", "proxy_bytes")
    expected = {d.isoformat(): r["usage"] for d, rows in days.items() if LAST <= d <= end for r in rows if (r["customer_id"], r["meter_id"]) == mine}
    got = {x["day"]: x["quantity"] for x in meters["proxy_bytes"]["days"]}
    assert got == {d: gib(u) for d, u in expected.items()}
    assert meters["proxy_bytes"]["unit"] == "gib" and meters["proxy_bytes"]["total"] == gib(sum(expected.values()))
    shares = sum(r["usage"] for d, rows in days.items() if LAST <= d <= end for r in rows if r["meter_id"] == "proxy_accepted_shares")
    assert meters["proxy_accepted_shares"]["total"] == f"{shares.normalize():f}"
    # JSON strings, never numbers: exact decimals
    assert all(isinstance(x["quantity"], str) for m in doc["meters"] for x in m["days"])


def test_a_peak_meter_reports_each_days_peak_and_the_ranges_peak(server, warehouse):
    _, days = warehouse
    r = get(server, "/v1/billing/usage", KEYS["iot-001"], start_date=LAST.isoformat(), end_date=(LAST + timedelta(days=6)).isoformat())
    assert r.status_code == 200, r.text
    meters = {m["meter"]: m for m in r.json()["meters"]}
    assert set(meters) == {"iot_devices", "iot_mqtt_bytes", "iot_http_bytes"}
    peaks = [r["gauge_peak"] for d in sorted(days)[:7] for r in days[d] if r["meter_id"] == "iot_devices"]
    assert [x["quantity"] for x in meters["iot_devices"]["days"]] == [str(p) for p in peaks]
    assert meters["iot_devices"]["peak"] == str(max(peaks)) and meters["iot_devices"]["total"] is None


def test_current_period_prices_the_open_month_with_the_invoice_models(server, warehouse):
    paths, days = warehouse
    r = get(server, "/v1/billing/usage/current-period", KEYS["mp-003"])
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["period"] == {"start_date": OPEN.isoformat(), "end_date": (next_month(OPEN) - timedelta(days=1)).isoformat(), "month": f"{OPEN:%Y-%m}"}
    assert doc["days_computed"] == TODAY.day and doc["last_computed_day"] == TODAY.isoformat()
    mtd = sum(r["usage"] for d, rows in days.items() if d >= OPEN for r in rows if (r["customer_id"], r["meter_id"]) == ("mp-003", "proxy_bytes"))
    meters = {m["meter"]: m for m in doc["meters"]}
    assert meters["proxy_bytes"]["month_to_date"] == gib(mtd)
    assert len(meters["proxy_bytes"]["days"]) == TODAY.day
    # allowance: 12 GiB included on proxy_hybrid v2
    allowance = next(a for a in doc["allowances"] if a["meters"] == ["proxy_bytes"])
    used = Decimal(mtd) / GIB
    assert allowance["included"] == "12" and allowance["used"] == gib(mtd)
    assert allowance["used_percent"] == f"{(used * 100 / 12).quantize(Decimal('0.01'), ROUND_HALF_UP):f}"
    assert allowance["remaining"] == f"{max(Decimal(12) - used, Decimal(0)).normalize():f}"
    assert allowance["thresholds_reached"] == [t for t in ("80", "100") if used * 100 >= Decimal(t) * 12]
    # the same projection, in this process, over every customer: the same lines and total
    p = projection.project_month(paths, OPEN, TODAY)
    inv = doc["projected_invoice"]
    assert inv["currency"] == "usd"
    assert Decimal(inv["total"]) * 100 == p.totals["mp-003"]["amount_minor"]
    assert [l["amount"] for l in inv["lines"]] == [f"{Decimal(l['amount_minor']) / 100:.2f}" for l in p.lines if l["customer_id"] == "mp-003"]
    assert "projected, not an invoice" in inv["note"]
    # the customer's own allowance notifications of the period, nobody else's
    assert [(n["meter_id"], n["threshold_percent"]) for n in doc["notifications"]] == [("proxy_bytes", "80")]


def test_a_pooled_allowance_is_one_entry_over_its_meters(server, warehouse):
    _, days = warehouse
    doc = get(server, "/v1/billing/usage/current-period", KEYS["iot-001"]).json()
    pool = next(a for a in doc["allowances"] if a["pool"] == "traffic")
    assert pool["meters"] == ["iot_mqtt_bytes", "iot_http_bytes"] and pool["included"] == "10"
    traffic = sum(r["usage"] for d, rows in days.items() if d >= OPEN for r in rows if r["customer_id"] == "iot-001" and r["meter_id"].endswith("_bytes"))
    assert pool["used"] == gib(traffic)
    assert "mp-003" not in r_text(doc) and "zz-001" not in r_text(doc)


def r_text(doc) -> str:
    return json.dumps(doc)


@pytest.mark.parametrize("path", ["/v1/billing/usage", "/v1/billing/usage/current-period"])
def test_keys_only_ever_open_their_own_customer(server, path):
    """Crossed keys, a missing key, a wrong key, a key of a customer without a subscription."""
    a = get(server, path, KEYS["mp-003"])
    b = get(server, path, KEYS["iot-001"])
    assert a.status_code == b.status_code == 200
    assert a.json()["customer_id"] == "mp-003" and b.json()["customer_id"] == "iot-001"
    assert "iot" not in a.text and "mp-003" not in b.text and "proxy" not in b.text
    # no way to name another customer: unknown parameters are refused, not ignored
    r = get(server, path, KEYS["mp-003"], customer_id="iot-001")
    assert r.status_code == 400 and r.json()["param"] == "customer_id"
    for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Basic bXAtMDAzOng="}, {"Authorization": "Bearer not-a-key"}):
        r = requests.get(server + path, headers=headers, timeout=10)
        assert r.status_code == 401 and "WWW-Authenticate" in r.headers and "usage" not in r.json(), headers
    # the hash itself is not a key
    r = get(server, path, key_sha256(KEYS["mp-003"]))
    assert r.status_code == 401
    r = get(server, path, KEYS["zz-001"])
    assert r.status_code == 403 and "no subscription" in r.json()["error"] and "proxy_bytes" not in r.text


def _from(url: str, source: str, key: str, path: str = "/v1/billing/usage/current-period") -> tuple[int, Any, dict]:
    """A request from another loopback address (127.0.0.2, ...): another client for the server."""
    import http.client
    from urllib.parse import urlsplit

    conn = http.client.HTTPConnection("127.0.0.1", urlsplit(url).port, timeout=60, source_address=(source, 0))
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {key}"})
        r = conn.getresponse()
        return r.status, r.headers, json.loads(r.read())
    finally:
        conn.close()


def test_failed_api_keys_are_rate_limited_per_client_address(server):
    """20 failed authentications from one address within a minute, then 429 with Retry-After for any key from
    it (a blocked address cannot go on trying keys); other addresses are not affected."""
    for i in range(20):
        assert _from(server, "127.0.0.2", f"bk_guess_{i:04d}")[0] == 401
    status, headers, body = _from(server, "127.0.0.2", "bk_guess_9999")
    assert status == 429 and 1 <= int(headers["Retry-After"]) <= 60, (status, headers)
    assert "too many requests with a missing or invalid API key" in body["error"] and headers["Retry-After"] in body["error"]
    assert _from(server, "127.0.0.2", KEYS["mp-003"])[0] == 429
    assert _from(server, "127.0.0.2", KEYS["mp-003"], "/v1/billing/usage")[0] == 429
    # another client: its own count
    assert _from(server, "127.0.0.3", "bk_guess_0000")[0] == 401
    assert _from(server, "127.0.0.3", KEYS["mp-003"])[0] == 200


def test_the_failed_authentication_window_slides():
    from billing_dags.operations.customer_api import AuthFailures

    now = [1000.0]
    limiter = AuthFailures(limit=3, window_s=60, clock=lambda: now[0])
    for t in (0, 10, 20):
        now[0] = 1000 + t
        assert limiter.retry_after("a") is None
        limiter.failed("a")
    assert limiter.retry_after("a") == 40 and limiter.retry_after("b") is None  # until the first failure is 60 s old
    now[0] = 1060
    assert limiter.retry_after("a") is None  # one failure left the window: one more try
    limiter.failed("a")
    assert limiter.retry_after("a") == 10
    small = AuthFailures(limit=1, window_s=60, clock=lambda: now[0], max_clients=2)
    for client in ("x", "y", "z"):
        small.failed(client)
    assert small.retry_after("x") is None and small.retry_after("z") == 60  # at most max_clients remembered


@pytest.mark.parametrize(
    ("params", "param", "words"),
    [
        ({"start_date": "2026-13-01"}, "start_date", "YYYY-MM-DD"),
        ({"start_date": "20261101"}, "start_date", "YYYY-MM-DD"),
        ({"end_date": "yesterday"}, "end_date", "YYYY-MM-DD"),
        ({"start_date": "2026-11-10", "end_date": "2026-11-01"}, "end_date", "before start_date"),
        ({"start_date": "2020-01-01", "end_date": "2026-01-01"}, "end_date", "at most 366 days"),
        ({"start_date": "2999-01-01", "end_date": "2999-01-02"}, "start_date", "after today"),
        ({"start": "2026-11-01"}, "start", "start_date and end_date"),
    ],
)
def test_bad_input_is_a_400_naming_the_parameter(server, params, param, words):
    r = get(server, "/v1/billing/usage", KEYS["mp-003"], **params)
    assert r.status_code == 400, r.text
    assert r.json()["param"] == param and words in r.json()["error"]


def test_repeated_parameters_and_parameters_of_current_period_are_refused(server):
    r = requests.get(server + "/v1/billing/usage?start_date=2026-11-01&start_date=2026-11-02", headers=auth("mp-003"), timeout=10)
    assert r.status_code == 400 and r.json()["param"] == "start_date" and "twice" in r.json()["error"]
    r = get(server, "/v1/billing/usage/current-period", KEYS["mp-003"], month="2026-11")
    assert r.status_code == 400 and r.json()["param"] == "month"


def test_defaults_are_this_month_to_today(server):
    doc = get(server, "/v1/billing/usage", KEYS["mp-003"]).json()
    assert doc["start_date"] == OPEN.isoformat() and doc["end_date"] == TODAY.isoformat()


def portal(url, customer=None, **kw):
    return requests.post(url + "/v1/billing/portal", headers=auth(customer) if customer else {}, timeout=30, **kw)


def test_portal_returns_a_stripe_session_url_for_the_calling_customer(server, stripe_server):
    r = portal(server, "mp-003", json={"return_url": "https://example.com/billing"})
    assert r.status_code == 200, r.text
    doc = r.json()
    session = stripe_server.portal_sessions[-1]
    assert doc == {"object": "billing_portal.session", "customer_id": "mp-003", "url": session["url"], "return_url": "https://example.com/billing"}
    # Stripe was asked for the caller's own Stripe customer (seeds/customers.csv), with the server's key
    (req,) = [q for q in stripe_server.requests if q.path == "/v1/billing_portal/sessions" and q.form.get("customer") == "cus_demoMP003"]
    assert req.authorized and req.form["return_url"] == "https://example.com/billing"
    r = portal(server, "iot-001")  # no body: Stripe's default return URL
    assert r.status_code == 200 and stripe_server.portal_sessions[-1]["customer"] == "cus_demoIOT001"


def test_portal_refuses_bad_requests_with_a_4xx(server, stripe_server):
    before = len(stripe_server.portal_sessions)
    assert portal(server, json={"return_url": "https://example.com"}).status_code == 401
    r = portal(server, "mp-003", json={"return_url": "javascript:alert(1)"})
    assert r.status_code == 400 and r.json()["param"] == "return_url"
    r = portal(server, "mp-003", data="{not json")
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    r = portal(server, "mp-003", json={"customer": "cus_demoIOT001"})  # no naming another customer
    assert r.status_code == 400 and r.json()["param"] == "customer"
    r = portal(server, "zz-001", json={})  # a customer without a Stripe customer
    assert r.status_code == 409 and "no Stripe customer" in r.json()["error"]
    assert len(stripe_server.portal_sessions) == before
    stripe_server.unknown_customers.add("cus_demoMP003")
    try:
        r = portal(server, "mp-003", json={})
        assert r.status_code == 502 and "No such customer" in r.json()["error"]
    finally:
        stripe_server.unknown_customers.discard("cus_demoMP003")


def test_portal_without_a_stripe_key_is_a_503_that_says_so(warehouse):
    from starlette.applications import Starlette

    from billing_dags.operations.customer_api import CustomerApiConfig, customer_routes

    paths, _ = warehouse
    with serve_app(Starlette(routes=customer_routes(CustomerApiConfig(paths)))) as url:
        r = portal(url, "mp-003", json={"return_url": "https://example.com/billing"})
        assert r.status_code == 503 and "STRIPE_API_KEY" in r.json()["error"]


def test_answers_are_recomputed_when_a_day_is_computed_again(server, warehouse):
    """The server keeps answers while the files they come from are unchanged: a recomputed day shows at once."""
    paths, days = warehouse
    before = get(server, "/v1/billing/usage/current-period", KEYS["mp-003"]).json()
    assert get(server, "/v1/billing/usage/current-period", KEYS["mp-003"]).json() == before
    f = paths.models / "fct_usage_by_day" / f"day={TODAY.isoformat()}" / "data.parquet"
    original = f.read_bytes()
    rows = [dict(r, usage=r["usage"] + GIB) if (r["customer_id"], r["meter_id"]) == ("mp-003", "proxy_bytes") else r for r in days[TODAY]]
    try:
        pq.write_table(pa.Table.from_pylist(rows, schema=USAGE_BY_DAY_SCHEMA), f)
        after = get(server, "/v1/billing/usage/current-period", KEYS["mp-003"]).json()
        mtd = {m["meter"]: Decimal(m["month_to_date"]) for m in before["meters"]}["proxy_bytes"]
        assert {m["meter"]: Decimal(m["month_to_date"]) for m in after["meters"]}["proxy_bytes"] == mtd + 1
    finally:
        f.write_bytes(original)


def test_serve_refuses_a_bad_default_portal_return_url(tmp_path, capsys):
    from billing_dags.cli.main import main

    assert main(["--data-dir", str(tmp_path), "remote-write", "serve", "--listen", "127.0.0.1:0", "--portal-return-url", "ftp://example.com"]) == 2
    assert "--portal-return-url" in capsys.readouterr().err


def test_the_key_file_is_validated_and_holds_only_digests(tmp_path):
    import shutil

    from billing_dags.seeds.api_keys import load_api_keys
    from billing_dags.seeds.errors import SeedError

    seeds = tmp_path / "seeds"
    shutil.copytree(SEEDS, seeds)
    keys = load_api_keys(seeds)
    assert keys.customer_of(None) is None and keys.customer_of("") is None
    (seeds / "api_keys.csv").unlink()
    assert load_api_keys(seeds).customers() == set()  # no file: nobody can use the API
    header = "customer_id,key_sha256,description\n"
    (seeds / "api_keys.csv").write_text(header + f"mp-003,{KEYS['mp-003']},the key itself\n")
    with pytest.raises(SeedError, match=r"api_keys.csv:2: column key_sha256: .*store sha256"):
        load_api_keys(seeds)
    (seeds / "api_keys.csv").write_text(header + f"nobody,{key_sha256('k')},x\n")
    with pytest.raises(SeedError, match=r"api_keys.csv:2: customer 'nobody' is not in customers.csv"):
        load_api_keys(seeds)
    (seeds / "api_keys.csv").write_text(header + f"mp-003,{key_sha256('k')},a\niot-001,{key_sha256('k')},b\n")
    with pytest.raises(SeedError, match=r"api_keys.csv:3: duplicate key"):
        load_api_keys(seeds)
