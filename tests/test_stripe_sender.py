"""Sending the outbox fast without sending anything twice: concurrency across (customer, meter)
pairs with one call in flight per pair (the local Stripe server refuses a second one, as Stripe
does), per-pair backoff, a global rate cap, the v2 meter event stream (sessions, renewal, dedup by
identifier, asynchronous validation), and a sender killed mid-way (its own process, SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta

import pytest
import stripe
from servers import wait_for
from stripe_server import StripeServer

from billing_dags.core.settings import PROJECT_ROOT, Paths
from billing_dags.stripe import outbox as ob
from billing_dags.stripe import sender as sd
from billing_dags.stripe.meters import send_days

pytestmark = pytest.mark.integration

NOW = datetime(2026, 4, 1, 6, 0, tzinfo=UTC)
API_KEY = "sk_test_51SenderKeyNeverLogged0123456789"
EVENTS = ("bd_api_calls", "bd_devices")


def outbox_rows(day: date, customers: int, events=EVENTS) -> list[dict]:
    """One pending outbox row per customer and event name (the fields the sender reads)."""
    rows = []
    for c in range(customers):
        for m, event_name in enumerate(events):
            cid, mid = f"c{c:03d}", f"m{m}"
            rows.append(ob.pending_row(cid, f"cus_T{c:06d}", mid, event_name, day, 100 * c + 10 * m + day.day, identifier_name=mid))
    return rows


def fill(paths: Paths, days: list[date], customers: int) -> int:
    for d in days:
        ob.write_outbox(paths, d, outbox_rows(d, customers))
    return len(days) * customers * len(EVENTS)


def stored(paths: Paths, days: list[date]) -> list[dict]:
    return [r for d in days for r in ob.read_outbox(paths, d)]


@pytest.fixture
def server(no_proxy):
    with StripeServer(now=NOW, api_key=API_KEY) as s:
        for name in EVENTS:
            s.add_meter(name)
        yield s


@pytest.fixture
def paths(tmp_path) -> Paths:
    return Paths(tmp_path / "data", tmp_path / "seeds")


DAYS = [date(2026, 3, 1) + timedelta(days=i) for i in range(10)]


# --------------------------------------------------------------------------- one call per customer and meter


def test_the_server_refuses_a_second_concurrent_call_for_a_customer_and_meter(server):
    client = sd.make_client(API_KEY, server.url, max_network_retries=0)
    event = {"event_name": "bd_api_calls", "payload": {"stripe_customer_id": "cus_1", "value": "1"}, "timestamp": int(NOW.timestamp())}
    server.gate = threading.Event()  # calls stay in flight until the gate opens
    other_customer = {**event, "identifier": "b", "payload": {"stripe_customer_id": "cus_2", "value": "1"}}
    with ThreadPoolExecutor(2) as pool:
        try:
            first = pool.submit(client.v1.billing.meter_events.create, params={**event, "identifier": "a"})
            wait_for(lambda: server.pairs_in_flight == {("cus_1", "bd_api_calls")}, 10, "the first call to be in flight")
            other = pool.submit(client.v1.billing.meter_events.create, params=other_customer)
            wait_for(lambda: len(server.pairs_in_flight) == 2, 10, "a call for another customer to be in flight too")
            with pytest.raises(stripe.RateLimitError, match="concurrent") as err:
                client.v1.billing.meter_events.create(params={**event, "identifier": "c"})
        finally:
            server.gate.set()
        assert first.result(10).identifier == "a" and other.result(10).identifier == "b"
    assert err.value.http_status == 429 and err.value.json_body["error"]["code"] == "rate_limit"
    assert server.concurrent_rejections == 1 and server.max_in_flight == 2
    assert [e.identifier for e in server.events] == ["a", "b"] or [e.identifier for e in server.events] == ["b", "a"]
    # the pair is free again once its call is over
    assert client.v1.billing.meter_events.create(params={**event, "identifier": "c"}).identifier == "c"


def test_the_sender_runs_pairs_concurrently_never_two_calls_for_one_pair(server, paths):
    n = fill(paths, DAYS, customers=6)  # 12 pairs x 10 days
    server.latency_s = 0.01  # each call takes 10 ms in "Stripe": calls for one pair would overlap if sent together
    server.rate_limit_every(7)  # and one request in seven is throttled (no Retry-After: backoff 0.05 s)
    _, sender = send_days(paths, DAYS, sd.make_client(API_KEY, server.url), now=NOW, concurrency=8, backoff_base=0.05)
    rows = stored(paths, DAYS)
    assert server.concurrent_rejections == 0
    assert {r["status"] for r in rows} == {"sent"} and sender.stats["sent"] == n, [r["last_error"] for r in rows if r["last_error"]]
    assert server.max_in_flight >= 4  # concurrency was used (up to 8 of the 12 pairs at once)
    assert sender.stats["retried"] >= n // 7  # the throttled calls were retried ...
    assert len(server.events) == n == len({e.identifier for e in server.events})  # ... and nothing counted twice
    # a sender without the per-pair rule is caught by the server
    naive_rows = outbox_rows(date(2026, 3, 20), customers=1)
    naive = [dict(r, identifier=f"{r['identifier']}-{k}") for k in range(4) for r in naive_rows]
    client = sd.make_client(API_KEY, server.url, max_network_retries=0)

    def post(r):
        params = {
            "event_name": r["event_name"],
            "payload": {"stripe_customer_id": r["stripe_customer_id"], "value": "1"},
            "identifier": r["identifier"],
            "timestamp": r["timestamp"],
        }
        try:
            client.v1.billing.meter_events.create(params=params)
        except stripe.RateLimitError:
            pass

    server.every.clear()
    server.latency_s = 0.2
    with ThreadPoolExecutor(len(naive)) as pool:
        list(pool.map(post, naive))
    assert server.concurrent_rejections > 0


def test_a_throttled_pair_waits_alone(server, paths):
    n = fill(paths, DAYS[:3], customers=4)
    slow = ob.read_outbox(paths, DAYS[0])[0]["identifier"]
    server.rate_limit_next(1, retry_after=1, identifier=slow)  # a real 1 s wait for this pair only
    _, sender = send_days(paths, DAYS[:3], sd.make_client(API_KEY, server.url), now=NOW, concurrency=4)
    ok = [p.form["identifier"] for p in server.event_posts() if p.status == 200]
    assert sender.backoffs == [1.0] and len(ok) == n
    # every other pair finished its three days while this one waited out its Retry-After
    pair_of_slow = [r["identifier"] for r in stored(paths, DAYS[:3]) if r["customer_id"] == "c000" and r["meter_id"] == "m0"]
    assert ok[-3:] == pair_of_slow


def test_the_rate_cap_holds_across_threads(server, paths):
    fake = {"t": 0.0}
    limiter = sd.RateLimiter(50, burst=5, clock=lambda: fake["t"], sleep=lambda s: fake.__setitem__("t", fake["t"] + s))
    for _ in range(105):
        limiter.acquire()
    assert fake["t"] == pytest.approx((105 - 5) / 50)
    with pytest.raises(ob.OutboxError, match="positive number"):
        sd.RateLimiter(0)
    # against the server: 30 events at 20 requests/s (bursts of 2) take 1.4 s at least
    n = fill(paths, DAYS[:3], customers=5)
    _, sender = send_days(paths, DAYS[:3], sd.make_client(API_KEY, server.url), now=NOW, concurrency=8, rate_limit=20)
    assert sender.stats["sent"] == n == 30
    at = sorted(p.at for p in server.event_posts())
    assert at[-1] - at[0] >= (n - 3) / 20
    assert max(sum(1 for t in at if t0 <= t < t0 + 0.5) for t0 in at) <= 20 * 0.5 + 2 + 1


# --------------------------------------------------------------------------- the v2 meter event stream


def test_v2_stream_sends_batches_renews_an_expired_session_and_counts_each_identifier_once(server, paths):
    n = fill(paths, DAYS, customers=6)  # 120 events
    server.expire_sessions_after(2)  # a session serves two requests, then Stripe says it expired
    server.rate_limit_next(1, path="/v2/billing/meter_event_stream")
    server.fail_next(1, 500, path="/v2/billing/meter_event_stream")  # retried by the library
    client = sd.make_client(API_KEY, server.url, max_network_retries=2)
    _, sender = send_days(paths, DAYS, client, now=NOW, api="v2", batch_size=20, concurrency=2, backoff_base=0.01)
    rows = stored(paths, DAYS)
    assert {r["status"] for r in rows} == {"sent"} and sender.stats["sent"] == n
    assert all(r["stripe_response_id"].startswith("stream:mes_test_") and r["attempts"] == 1 for r in rows)
    posts = server.stream_posts()
    assert all(len(p["identifiers"]) <= 20 for p in posts)
    assert [p["status"] for p in posts].count(401) >= 1 and sender.stats["sessions"] >= 3  # renewed
    assert sender.stats["retried"] == 1
    assert len(server.events) == n == len({e.identifier for e in server.events})
    for event_name in EVENTS:
        assert server.window_values(event_name) == {(r["stripe_customer_id"], r["day"]): r["value"] for r in rows if r["event_name"] == event_name}
    # the same events again (an outbox that lost its record): Stripe drops known identifiers
    for d in DAYS:
        ob.write_outbox(paths, d, [dict(r, status="pending") for r in ob.read_outbox(paths, d)])
    _, again = send_days(paths, DAYS, client, now=NOW, api="v2", batch_size=30)  # other batches: other Idempotency-Keys
    assert again.stats["sent"] == n and len(server.events) == n
    assert len(server.stream_duplicates) == n


def test_v2_validates_asynchronously_so_a_bad_event_is_sent_not_failed(server, paths):
    day = DAYS[0]
    # four good events and one whose event name has no meter in Stripe
    rows = [*outbox_rows(day, customers=2), dict(outbox_rows(day, 1, ("bd_unsynced",))[0], customer_id="c900", identifier="c900-m0-x")]
    ob.write_outbox(paths, day, rows)
    _, sender = send_days(paths, [day], sd.make_client(API_KEY, server.url), now=NOW, api="v2")
    assert sender.stats["sent"] == len(rows) and sender.stats["failed"] == 0
    # Stripe accepted the request; the event without a meter only shows up in its error reports
    assert [e["identifier"] for e in server.stream_errors] == ["c900-m0-x"]
    assert "c900-m0-x" not in server.by_identifier and len(server.events) == len(rows) - 1
    # v1 validates before answering: the same event is refused there
    ob.write_outbox(paths, day, [dict(r, status="pending", identifier=r["identifier"] + "-v1") for r in rows])
    _, v1 = send_days(paths, [day], sd.make_client(API_KEY, server.url), now=NOW)
    assert v1.stats["failed"] == 1 and "No active meter" in next(r["last_error"] for r in ob.read_outbox(paths, day) if r["status"] == "failed")


def test_v2_with_a_wrong_key_stops_at_the_session(server, paths):
    n = fill(paths, DAYS[:2], customers=3)
    _, sender = send_days(paths, DAYS[:2], sd.make_client("sk_test_51Wrong000000000000", server.url), now=NOW, api="v2", batch_size=4)
    assert sender.aborted and server.stream_posts() == []
    rows = stored(paths, DAYS[:2])
    assert [r["status"] for r in rows].count("failed") == 4 and [r["status"] for r in rows].count("pending") == n - 4
    assert all("Wrong" not in (r["last_error"] or "") for r in rows)


def test_session_renewal_follows_the_lifetime_stripe_gives(server):
    class Obj:
        id, authentication_token = "mes_1", "tok"
        created, expires_at = "2026-04-01T06:00:00.000Z", "2026-04-01T06:15:00.000Z"

    assert sd._Session(Obj, lambda: 1000.0, 1).renew_at == 1000.0 + 900 - sd.SESSION_MARGIN_S
    with pytest.raises(ob.OutboxError, match="between 1 and 100"):
        sd.Sender(None, now=NOW, api="v2", batch_size=101)
    with pytest.raises(ob.OutboxError, match=r"v1 .* or v2"):
        sd.Sender(None, now=NOW, api="v3")


# --------------------------------------------------------------------------- killed mid-way


def _cli(data_dir, server_url, *args, api="v1"):
    env = {
        **os.environ,
        "PYTHONPATH": str(PROJECT_ROOT),
        "BILLING_DATA_DIR": str(data_dir),
        "STRIPE_API_KEY": API_KEY,
        "STRIPE_API_BASE": server_url,
        "NO_PROXY": "127.0.0.1",
        "no_proxy": "127.0.0.1",
    }
    cmd = [sys.executable, "-m", "billing_dags.cli", "stripe", "send", "--api", api, "--format", "json", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_a_sender_killed_mid_way_resends_nothing_it_recorded_and_nothing_counts_twice(tmp_path, no_proxy):
    today = datetime.now(UTC).date()
    last = today - timedelta(days=1) if today.day > 10 else today.replace(day=1) - timedelta(days=1)
    days = [last - timedelta(days=i) for i in range(9, -1, -1)]  # ten days of one month, all within Stripe's 35
    paths = Paths(tmp_path / "data", tmp_path / "seeds")
    concurrency = 4
    with StripeServer(now=datetime.now(UTC), api_key=API_KEY) as server:
        for name in EVENTS:
            server.add_meter(name)
        n = fill(paths, days, customers=24)  # 480 events, 48 pairs
        server.latency_s = 0.02  # 4 calls in flight at 20 ms: about 200 events/s, a run of ~2.5 s
        server.rate_limit_every(7)
        month = f"{days[0]:%Y-%m}"
        proc = _cli(paths.data_dir, server.url, "--concurrency", str(concurrency), "--month", month)
        wait_for(lambda: len(server.events) >= 2 * n // 3 or proc.poll() is not None, 300, "two thirds of the events to be accepted", step=0.005)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        with server.lock:
            accepted = {e.identifier for e in server.events}
        assert len(accepted) < n, "the sender finished before it could be killed"
        recorded = {r["identifier"] for r in stored(paths, days) if r["status"] == "sent"}
        assert recorded <= accepted  # nothing is recorded sent that Stripe did not acknowledge
        # progress was written as it was made: what Stripe acknowledged but the outbox does not
        # record yet is at most three checkpoints' worth (one being written, one waiting, one
        # collecting) and what was in flight
        assert len(accepted - recorded) <= 3 * sd.CHECKPOINT_ROWS + 3 * concurrency, (len(accepted), len(recorded))
        # the killed sender's last calls may still be executing in the server (its simulated latency): the
        # rerun starts once they have ended, as a sender restarted after a crash finds Stripe; that the rerun
        # itself never makes two calls at once for a pair is checked below
        wait_for(lambda: not server.pairs_in_flight, 30, "the killed sender's calls to end in the server", step=0.005)
        before = len(server.event_posts())
        rerun = _cli(paths.data_dir, server.url, "--month", month)
        _out, err = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, err[-3000:]
        reposted = server.event_posts()[before:]
        assert not {p.form["identifier"] for p in reposted} & recorded  # what was recorded is never posted again
        for p in reposted:
            if p.form["identifier"] in accepted and p.status == 200:
                assert p.replayed  # acknowledged but not recorded: Stripe replays, it does not count again
        assert {r["status"] for r in stored(paths, days)} == {"sent"}
        assert len(server.events) == n == len({e.identifier for e in server.events})
        assert server.concurrent_rejections == 0


def test_cli_refuses_bad_sender_options_with_the_fix(data_dir, monkeypatch, capsys):
    from billing_dags.cli.main import main

    for args, message in (
        (["--api", "v3"], "--api='v3' is not a Stripe meter API; use v1"),
        (["--concurrency", "0"], "--concurrency='0' is not a whole number of at least 1"),
        (["--rate-limit", "fast"], "--rate-limit='fast' is not a positive number of requests per second"),
    ):
        assert main(["stripe", "send", "--day", "2026-03-01", *args]) == 2
        assert message in capsys.readouterr().err
    monkeypatch.setenv("STRIPE_RATE_LIMIT", "-5")
    assert main(["stripe", "send", "--day", "2026-03-01"]) == 2
    assert "STRIPE_RATE_LIMIT='-5'" in capsys.readouterr().err
    assert sd.sender_options("v2", "4", "250", environ={}) == {"api": "v2", "concurrency": 4, "rate_limit": 250.0}
    assert sd.sender_options(environ={"STRIPE_METER_API": "v2", "STRIPE_CONCURRENCY": "32"}) == {"api": "v2", "concurrency": 32}


class _HeldStream:
    """A stand-in client for the v2 stream whose second batch (the first goes alone, to confirm the
    key) is answered only after the third batch's session expired and a new session was made: the
    second batch was posted with the old session and must be recorded under it, whatever session
    is current when its answer arrives."""

    def __init__(self):
        self.sessions, self.posted = 0, []
        self.renewed = threading.Event()
        outer = self

        class _Sessions:
            def create(self):
                outer.sessions += 1
                if outer.sessions == 2:
                    outer.renewed.set()
                k = outer.sessions
                return type("S", (), {"id": f"mes_test_{k}", "authentication_token": f"tok_{k}", "created": None, "expires_at": None})()

        class _Stream:
            def create(self, params, options):
                first = params["events"][0]["identifier"]
                outer.posted.append((first, options["api_key"]))
                if len(outer.posted) == 2:  # the second batch: held until the session was renewed
                    assert outer.renewed.wait(10), "the session was never renewed"
                elif len(outer.posted) == 3:  # the third batch: its session expired
                    raise stripe.TemporarySessionExpiredError("session expired")

        self.v2 = type("V2", (), {"billing": type("B", (), {"meter_event_session": _Sessions(), "meter_event_stream": _Stream()})()})()


def test_a_v2_batch_is_recorded_under_the_session_it_was_posted_with(paths):
    n = fill(paths, DAYS[:1], customers=6)  # 12 events, batches of 4
    client = _HeldStream()
    _, sender = send_days(paths, DAYS[:1], client, now=NOW, api="v2", batch_size=4, concurrency=2)
    rows = stored(paths, DAYS[:1])
    assert sender.stats["sent"] == n and {r["status"] for r in rows} == {"sent"}
    tokens = dict(client.posted)  # the first identifier of a batch -> the token it went out with (last post)
    by_token = {"tok_1": "stream:mes_test_1", "tok_2": "stream:mes_test_2"}
    for batch in (rows[:4], rows[4:8], rows[8:]):
        assert {r["stripe_response_id"] for r in batch} == {by_token[tokens[batch[0]["identifier"]]]}
    assert [t for _, t in client.posted] == ["tok_1", "tok_1", "tok_1", "tok_2"]
