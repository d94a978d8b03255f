"""A local Stripe-compatible HTTP server for tests (billing meters and v1 meter events).

It answers the few endpoints billing_dags uses, through the real ``stripe`` library pointed at it
with ``base_addresses={"api": server.url}`` (STRIPE_API_BASE):

- ``GET /v1/billing/meters`` (list: ``object``/``data``/``has_more``/``url``, ``limit``,
  ``starting_after``, ``ending_before``, ``status``), ``GET /v1/billing/meters/{id}``,
  ``POST /v1/billing/meters`` (create; a second active meter with the same ``event_name`` is a 400),
- ``GET /v1/billing/meters/{id}/event_summaries`` (per day/hour or per whole range),
- ``POST /v1/billing_portal/sessions`` (``customer`` required, ``return_url`` an absolute URL; a
  customer in ``unknown_customers`` is a 400 ``resource_missing``),
- ``POST /v1/billing/meter_events`` with the checks Stripe documents: a meter for ``event_name``,
  the meter's customer and value payload keys, an integer value, ``identifier`` at most 100
  characters and unique, ``timestamp`` within the past 35 days and at most 5 minutes ahead.

Every object is built from Stripe's own example objects (``tests/fixtures/stripe_fixtures.json``, a subset of ../shared/stripe/fixtures3.json)
(``billing.meter``, ``billing.meter_event``, ``billing.meter_event_summary``), with the fields the
request decides replaced. Errors are shaped like Stripe's (``{"error": {"type", "code", "message",
"param", "doc_url"}}``); the messages are modelled on Stripe's, not copied from it.

Idempotency works as Stripe documents it: a POST with an ``Idempotency-Key`` seen before replays
the saved response (``Idempotent-Replayed: true``) if the parameters are the same and is a 400
``idempotency_error`` otherwise; only requests that started executing are saved (validation
errors and injected faults are not). Meters with ``event_time_window`` day or hour keep only the
newest event per customer and window, so a test can read back what a corrected day is worth.

The server validates timestamps against an injected ``now`` (epoch seconds), never the wall
clock, so tests are deterministic. Fault injection: ``fail_next(n, status)`` (500/502/503...),
``rate_limit_next(n, retry_after)`` (429 with Retry-After), ``delay_next(seconds)`` (the request
executes, then the response is held back past the client's timeout), ``reject_identifier(ident)``
(a 400 for one event). Standard-library ``ThreadingHTTPServer``: a test fixture, not a product.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "stripe_fixtures.json"
MAX_PAST_S = 35 * 86_400
MAX_FUTURE_S = 300
IDENTIFIER_MAX = 100
_INT_RE = re.compile(r"^-?\d+$")
_DOC = "https://stripe.com/docs/error-codes"


def load_fixtures(path: Path = FIXTURES) -> dict[str, dict]:
    return json.loads(Path(path).read_text())["resources"]


class StripeHTTPError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.headers = status, headers or {}
        err: dict[str, Any] = {"message": message, "type": type_}
        if code:
            err["code"] = code
            err["doc_url"] = f"{_DOC}#{code.replace('_', '-')}"
        if param:
            err["param"] = param
        self.body = {"error": err}


def _bad(message: str, param: str | None = None, code: str | None = None) -> StripeHTTPError:
    return StripeHTTPError(400, message, param=param, code=code)


def _missing(param: str) -> StripeHTTPError:
    return _bad(f"Missing required param: {param}.", param=param, code="parameter_missing")


@dataclass
class Fault:
    status: int | None = None  # respond with this status instead of executing
    retry_after: int | None = None
    delay_s: float = 0.0  # execute, then hold the response back this long
    path: str = "/v1/billing/meter_events"
    identifier: str | None = None  # only a request for this identifier (v1 meter events) takes it


@dataclass
class Received:
    """One request as the server saw it (the API key itself is not kept, only whether it matched)."""

    method: str
    path: str
    form: dict[str, str]
    idempotency_key: str | None
    authorized: bool
    content_type: str | None
    status: int = 0
    replayed: bool = False
    key_in_body: bool = False
    at: float = field(default_factory=time.monotonic)  # when it arrived


@dataclass
class AcceptedEvent:
    seq: int
    meter_id: str
    event_name: str
    customer: str
    value: int
    identifier: str
    timestamp: int
    idempotency_key: str | None
    obj: dict = field(repr=False, default_factory=dict)


class StripeServer:
    """``with StripeServer(now=...) as s: ... s.url ...``; state and counters are plain attributes."""

    def __init__(self, *, now: int | datetime, api_key: str | None = None, fixtures: Path = FIXTURES, page_limit_default: int = 10):
        self.now = int(now.timestamp()) if isinstance(now, datetime) else int(now)
        self.api_key = api_key  # None: any "sk_test_..." bearer key is accepted
        self.fixtures = load_fixtures(fixtures)
        self.page_limit_default = page_limit_default
        self.lock = threading.RLock()
        self.requests: list[Received] = []
        self.meters: dict[str, dict] = {}  # id -> billing.meter, insertion (creation) order
        self.events: list[AcceptedEvent] = []
        self.by_identifier: dict[str, AcceptedEvent] = {}
        self.idempotency: dict[str, tuple[dict, int, dict]] = {}  # key -> (params, status, body)
        self.faults: deque[Fault] = deque()
        self.rejected_identifiers: dict[str, str] = {}
        self.portal_sessions: list[dict] = []  # billing_portal.session objects created, in order
        self.unknown_customers: set[str] = set()  # customer ids the portal refuses as missing
        self._seq = 0
        self._init_concurrency_and_stream()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                # headers and body go out as separate writes: without this, Nagle's algorithm and
                # delayed ACKs add ~40 ms to every keep-alive request
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_GET(self):
                outer._handle(self, "GET")

            def do_POST(self):
                outer._handle(self, "POST")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="stripe-server", daemon=True)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> StripeServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> StripeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ fault injection

    def fail_next(self, n: int = 1, status: int = 500, path: str = "/v1/billing/meter_events", identifier: str | None = None) -> None:
        with self.lock:
            self.faults.extend(Fault(status=status, path=path, identifier=identifier) for _ in range(n))

    def rate_limit_next(self, n: int = 1, retry_after: int | None = 1, path: str = "/v1/billing/meter_events", identifier: str | None = None) -> None:
        with self.lock:
            self.faults.extend(Fault(status=429, retry_after=retry_after, path=path, identifier=identifier) for _ in range(n))

    def delay_next(self, seconds: float, n: int = 1, path: str = "/v1/billing/meter_events", identifier: str | None = None) -> None:
        with self.lock:
            self.faults.extend(Fault(delay_s=seconds, path=path, identifier=identifier) for _ in range(n))

    def reject_identifier(self, identifier: str, message: str = "This event was rejected by the test server.") -> None:
        with self.lock:
            self.rejected_identifiers[identifier] = message

    # ------------------------------------------------------------------ one call per customer and meter, periodic faults (v1)

    def _init_concurrency_and_stream(self) -> None:
        #: seconds each v1 meter event takes to execute (its pair stays busy meanwhile): with a
        #: latency, calls for the same pair that overlap are caught, as Stripe catches them
        self.latency_s = 0.0
        self.gate: threading.Event | None = None
        self.pairs_in_flight: set[tuple[str, str]] = set()
        self.concurrent_rejections = 0  # v1 meter events refused: their (customer, meter) was busy
        self.max_in_flight = 0  # the most v1 meter events executing at once (any pairs)
        self._executing = 0
        self._claimed = threading.local()
        self.every: dict[str, list[tuple[int, Fault]]] = {}
        self.posts_seen: dict[str, int] = {}
        self._init_stream()

    def rate_limit_every(self, n: int, retry_after: int | None = None, path: str = "/v1/billing/meter_events") -> None:
        """Answer every ``n``-th POST to ``path`` with a 429 (after the queued faults)."""
        with self.lock:
            self.every.setdefault(path, []).append((n, Fault(status=429, retry_after=retry_after, path=path)))

    def fail_every(self, n: int, status: int = 500, path: str = "/v1/billing/meter_events") -> None:
        """Answer every ``n``-th POST to ``path`` with ``status`` (500, 503...)."""
        with self.lock:
            self.every.setdefault(path, []).append((n, Fault(status=status, path=path)))

    def _periodic_fault(self, path: str) -> Fault | None:
        rules = self.every.get(path)
        if not rules:
            return None
        seen = self.posts_seen[path] = self.posts_seen.get(path, 0) + 1
        for n, f in rules:
            if seen % n == 0:
                return Fault(status=f.status, retry_after=f.retry_after, path=path)
        return None

    def _claim_pair(self, path: str, method: str, form: dict[str, str]) -> bool:
        """Marks this v1 meter event's (customer, event name) busy; True if it already was (the
        call is then refused with a 429, as Stripe allows one concurrent call per customer and meter)."""
        if method != "POST" or path != "/v1/billing/meter_events":
            return False
        pair = (form.get("payload[stripe_customer_id]", ""), form.get("event_name", ""))
        with self.lock:
            if pair in self.pairs_in_flight:
                self.concurrent_rejections += 1
                return True
            self.pairs_in_flight.add(pair)
            self._executing += 1
            self.max_in_flight = max(self.max_in_flight, self._executing)
        self._claimed.pair = pair
        return False

    def _hold_pair(self) -> None:
        if getattr(self._claimed, "pair", None) is None:
            return
        if self.gate is not None:
            self.gate.wait(30)  # a test holds v1 meter events in flight until it opens the gate
        if self.latency_s:
            time.sleep(self.latency_s)  # simulated processing time, not synchronisation

    def _release_pair(self) -> None:
        pair = getattr(self._claimed, "pair", None)
        if pair is None:
            return
        self._claimed.pair = None
        with self.lock:
            self.pairs_in_flight.discard(pair)
            self._executing -= 1

    def _concurrent_call_error(self) -> StripeHTTPError:
        return StripeHTTPError(
            429,
            "Too many concurrent requests for this customer and meter: send one meter event at a time per customer and meter.",
            code="rate_limit",
        )

    # ------------------------------------------------------------------ v2 meter event stream

    def _init_stream(self) -> None:
        self.sessions: dict[str, dict] = {}  # token -> {"id", "expired", "uses"}
        self.session_ttl_s = 900
        self.expire_after: int | None = None  # a session expires after this many stream requests
        self.stream_requests: list[dict] = []  # {"status", "identifiers", "session", "idempotency_key"}
        self.stream_duplicates: list[str] = []  # identifiers dropped: Stripe already had them
        self.stream_errors: list[dict] = []  # asynchronous validation failures: {"identifier", "code", "message"}

    def expire_sessions(self) -> None:
        """Every meter event session issued so far expires now."""
        with self.lock:
            for s in self.sessions.values():
                s["expired"] = True

    def expire_sessions_after(self, n: int) -> None:
        """A session expires after it authenticated ``n`` stream requests."""
        with self.lock:
            self.expire_after = n

    def stream_posts(self) -> list[dict]:
        return list(self.stream_requests)

    def _v2_error(self, status: int, type_: str, message: str, code: str | None = None) -> StripeHTTPError:
        e = StripeHTTPError(status, message, type_=type_)
        e.body = {"error": {"type": type_, "code": code or type_, "message": message}}
        return e

    def _handle_v2(self, h: BaseHTTPRequestHandler, method: str, path: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length).decode() if length else ""
        auth = h.headers.get("Authorization") or ""
        key = auth[len("Bearer ") :] if auth.startswith("Bearer ") else ""
        idem = h.headers.get("Idempotency-Key")
        rec = Received(method, path, {}, idem, False, h.headers.get("Content-Type"))
        with self.lock:
            self.requests.append(rec)
            fault = self._take_fault(path, method)
        headers: dict[str, str] = {}
        try:
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                raise self._v2_error(400, "invalid_request_error", "The request body is not valid JSON.") from None
            if method == "POST" and path == "/v2/billing/meter_event_session":
                rec.authorized = bool(key) and (key == self.api_key if self.api_key else key.startswith(("sk_test_", "rk_test_")))
                if not rec.authorized:
                    raise self._v2_error(401, "invalid_request_error", "Invalid API Key provided.", code="api_key_invalid")
                if fault is not None and fault.status is not None:
                    raise self._v2_error(fault.status, "rate_limit" if fault.status == 429 else "api_error", "Injected fault.")
                status, out = 200, self._new_session()
            elif method == "POST" and path == "/v2/billing/meter_event_stream":
                status, out = 200, self._stream(key, body, fault, idem, rec)
            else:
                raise self._v2_error(404, "invalid_request_error", f"Unrecognized request URL ({method}: {path}).")
        except StripeHTTPError as e:
            status, out = e.status, e.body
            headers.update(e.headers)
        rec.status = status
        if path == "/v2/billing/meter_event_stream":
            with self.lock:
                self.stream_requests[-1]["status"] = status
        self._reply(h, status, out, headers)

    def _new_session(self) -> dict:
        with self.lock:
            self._seq += 1
            n = self._seq
            token = f"mes_tok_test_{n:08d}_{threading.get_ident() % 10_000:04d}"
            self.sessions[token] = {"id": f"mes_test_{n:012d}", "expired": False, "uses": 0}
        iso = lambda t: datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")  # noqa: E731
        return {
            "id": self.sessions[token]["id"],
            "object": "v2.billing.meter_event_session",
            "authentication_token": token,
            "created": iso(self.now),
            "expires_at": iso(self.now + self.session_ttl_s),
            "livemode": False,
        }

    def _stream(self, token: str, body: dict, fault: Fault | None, idem: str | None, rec: Received) -> dict:
        events = body.get("events")
        idents = [e.get("identifier") for e in events] if isinstance(events, list) else []
        with self.lock:
            self.stream_requests.append({"status": 0, "identifiers": idents, "session": None, "idempotency_key": idem})
            session = self.sessions.get(token)
            if session is None:
                raise self._v2_error(401, "invalid_request_error", "Invalid meter event session token.", code="authentication_failed")
            rec.authorized = True
            self.stream_requests[-1]["session"] = session["id"]
            if session["expired"]:
                raise self._v2_error(
                    401, "temporary_session_expired", "The meter event session has expired; create a new one.", code="billing_meter_event_session_expired"
                )
            session["uses"] += 1
            if self.expire_after is not None and session["uses"] >= self.expire_after:
                session["expired"] = True  # this request still goes through; the next one is refused
        if fault is not None and fault.status is not None:
            if fault.status == 429:
                raise self._v2_error(429, "rate_limit", "Request rate limit exceeded. Retry after a short delay.")
            raise self._v2_error(fault.status, "api_error", "An unknown error occurred while processing the request.")
        if not isinstance(events, list) or not 1 <= len(events) <= 100:
            raise self._v2_error(400, "invalid_request_error", "events must be a list of 1 to 100 meter events.")
        for e in events:
            if not isinstance(e, dict) or not e.get("event_name") or not isinstance(e.get("payload"), dict):
                raise self._v2_error(400, "invalid_request_error", "Every event needs an event_name and a payload object.")
        with self.lock:
            if idem and idem in self.idempotency:
                return {}  # a replayed batch: every identifier in it was handled already
            for e in events:
                self._stream_event(e)
            if idem:
                self.idempotency[idem] = (("stream", tuple(idents)), 200, {})
        return {}

    def _stream_event(self, e: dict) -> None:
        """Asynchronous validation, as Stripe does it after the 200: an invalid event is only recorded
        in ``stream_errors`` (Stripe reports it through a meter error report), a known identifier is dropped."""
        identifier = e.get("identifier") or f"auto_{self._seq + 1:012d}"

        def error(code: str, message: str) -> None:
            self.stream_errors.append({"identifier": identifier, "code": code, "message": message})

        if identifier in self.by_identifier:
            self.stream_duplicates.append(identifier)
            return
        meter = self._meter_by_event(e["event_name"])
        if meter is None:
            return error("meter_event_no_meter", f"No active meter was found matching event_name '{e['event_name']}'.")
        ckey, vkey = meter["customer_mapping"]["event_payload_key"], meter["value_settings"]["event_payload_key"]
        customer, value = e["payload"].get(ckey), e["payload"].get(vkey)
        if not customer:
            return error("meter_event_no_customer_defined", f"The payload is missing the customer mapping key '{ckey}'.")
        if value is None or not _INT_RE.match(str(value)):
            return error("meter_event_value_not_found", f"Invalid value {value!r} for payload[{vkey}]: whole numbers only.")
        if not 1 <= len(identifier) <= IDENTIFIER_MAX:
            return error("meter_event_invalid_identifier", f"identifier must be between 1 and {IDENTIFIER_MAX} characters.")
        try:
            ts = int(datetime.fromisoformat(str(e.get("timestamp")).replace("Z", "+00:00")).timestamp()) if e.get("timestamp") else self.now
        except ValueError:
            return error("timestamp_invalid", f"Invalid timestamp {e.get('timestamp')!r}.")
        if ts < self.now - MAX_PAST_S:
            return error("timestamp_too_far_in_past", "Timestamp must be within the past 35 days.")
        if ts > self.now + MAX_FUTURE_S:
            return error("timestamp_in_future", "Timestamp must not be more than 5 minutes in the future.")
        self._seq += 1
        obj = {"object": "v2.billing.meter_event", "event_name": e["event_name"], "identifier": identifier, "payload": dict(e["payload"]), "timestamp": ts}
        ev = AcceptedEvent(self._seq, meter["id"], e["event_name"], customer, int(value), identifier, ts, None, obj)
        self.events.append(ev)
        self.by_identifier[identifier] = ev

    # ------------------------------------------------------------------ state for another process (benchmarks, tests running the server apart)

    def state(self) -> dict:
        with self.lock:
            by_status: dict[str, dict[str, int]] = {}
            for r in self.requests:
                d = by_status.setdefault(r.path, {})
                d[str(r.status)] = d.get(str(r.status), 0) + 1
            idents = [e.identifier for e in self.events]
            return {
                "events": len(idents),
                "unique_identifiers": len(set(idents)),
                "requests": len(self.requests),
                "by_path_and_status": by_status,
                "replayed": sum(r.replayed for r in self.requests),
                "concurrent_rejections": self.concurrent_rejections,
                "max_in_flight": self.max_in_flight,
                "stream_requests": len(self.stream_requests),
                "stream_duplicates": len(self.stream_duplicates),
                "stream_errors": len(self.stream_errors),
                "sessions": len(self.sessions),
            }

    # ------------------------------------------------------------------ helpers for tests

    def add_meter(
        self,
        event_name: str,
        *,
        display_name: str | None = None,
        formula: str = "sum",
        event_time_window: str | None = "day",
        customer_key: str = "stripe_customer_id",
        value_key: str = "value",
        status: str = "active",
    ) -> dict:
        with self.lock:
            return self._create_meter(
                {
                    "display_name": display_name or event_name,
                    "event_name": event_name,
                    "default_aggregation[formula]": formula,
                    "customer_mapping[event_payload_key]": customer_key,
                    "customer_mapping[type]": "by_id",
                    "value_settings[event_payload_key]": value_key,
                    **({"event_time_window": event_time_window} if event_time_window else {}),
                },
                status=status,
            )

    def event_posts(self) -> list[Received]:
        return [r for r in self.requests if r.method == "POST" and r.path == "/v1/billing/meter_events"]

    def window_values(self, event_name: str) -> dict[tuple[str, date], int]:
        """{(customer, UTC day): value} for a meter, as its aggregation and event window see it."""
        with self.lock:
            meter = self._meter_by_event(event_name)
            assert meter is not None, f"no meter for {event_name!r}"
            out: dict[tuple[str, date], int] = {}
            for (customer, start), value in self._windows(meter).items():
                d = datetime.fromtimestamp(start, UTC).date()
                out[(customer, d)] = out.get((customer, d), 0) + value
            return out

    # ------------------------------------------------------------------ request handling

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = urlsplit(h.path).path
        if path.startswith("/v2/"):
            return self._handle_v2(h, method, path)
        if path == "/_test/state" and method == "GET":
            return self._reply(h, 200, self.state(), {})
        try:
            self._handle_v1(h, method)
        finally:
            self._release_pair()

    def _handle_v1(self, h: BaseHTTPRequestHandler, method: str) -> None:
        split = urlsplit(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length).decode() if length else ""
        query = split.query if method == "GET" else raw
        form = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        auth = h.headers.get("Authorization") or ""
        key = auth[len("Bearer ") :] if auth.startswith("Bearer ") else ""
        authorized = bool(key) and (key == self.api_key if self.api_key else key.startswith(("sk_test_", "rk_test_")))
        rec = Received(
            method, split.path, form, h.headers.get("Idempotency-Key"), authorized, h.headers.get("Content-Type"), key_in_body=bool(key) and key in raw
        )
        headers: dict[str, str] = {}
        delay = 0.0
        with self.lock:
            self.requests.append(rec)
            fault = self._take_fault(split.path, method, form)
        busy = self._claim_pair(split.path, method, form)
        try:
            if not key:
                raise StripeHTTPError(
                    401,
                    "You did not provide an API key. You need to provide your API key in the Authorization header, "
                    "using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY').",
                )
            if not authorized:
                raise StripeHTTPError(401, f"Invalid API Key provided: {key[:8]}{'*' * 8}{key[-4:]}", code="api_key_invalid")
            if busy:
                raise self._concurrent_call_error()
            if fault is not None and fault.status is not None:
                if fault.status == 429:
                    raise StripeHTTPError(
                        429,
                        "Request rate limit exceeded. Retry after a short delay.",
                        code="rate_limit",
                        headers={"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {},
                    )
                raise StripeHTTPError(fault.status, "An unknown error occurred while processing the request.", type_="api_error")
            if fault is not None:
                delay = fault.delay_s
            self._hold_pair()
            status, body, replayed = self._route(method, split.path, form, rec.idempotency_key)
            if replayed:
                headers["Idempotent-Replayed"] = "true"
                rec.replayed = True
        except StripeHTTPError as e:
            status, body = e.status, e.body
            headers.update(e.headers)
        rec.status = status
        self._release_pair()  # the call is over for Stripe; the response may still be held back
        if delay:
            time.sleep(delay)
        self._reply(h, status, body, headers)

    def _take_fault(self, path: str, method: str, form: dict[str, str] | None = None) -> Fault | None:
        if method != "POST":
            return None
        for i, f in enumerate(self.faults):
            if f.path == path and (f.identifier is None or f.identifier == (form or {}).get("identifier")):
                del self.faults[i]
                return f
        return self._periodic_fault(path)

    def _reply(self, h: BaseHTTPRequestHandler, status: int, body: dict, headers: dict[str, str]) -> None:
        data = json.dumps(body).encode()
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            h.send_header("Request-Id", f"req_test{len(self.requests):06d}")
            h.send_header("Stripe-Version", "2026-10-28")
            for k, v in headers.items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout); it retries with the same Idempotency-Key

    def _route(self, method: str, path: str, form: dict[str, str], idem: str | None) -> tuple[int, dict, bool]:
        with self.lock:
            if method == "POST" and idem:
                saved = self.idempotency.get(idem)
                if saved is not None:
                    params, status, body = saved
                    if params != (path, form):
                        raise StripeHTTPError(
                            400,
                            f"Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other "
                            f"than '{idem}' if you meant to execute a different request.",
                            type_="idempotency_error",
                        )
                    return status, copy.deepcopy(body), True
            status, body = self._execute(method, path, form)
            if method == "POST" and idem:
                self.idempotency[idem] = ((path, form), status, copy.deepcopy(body))
            return status, body, False

    def _execute(self, method: str, path: str, form: dict[str, str]) -> tuple[int, dict]:
        parts = path.strip("/").split("/")
        if method == "POST" and path == "/v1/billing/meter_events":
            return 200, self._create_event(form)
        if path == "/v1/billing/meters":
            if method == "POST":
                return 200, self._create_meter(form)
            return 200, self._list_meters(form)
        if len(parts) == 4 and parts[:3] == ["v1", "billing", "meters"] and method == "GET":
            return 200, self._get_meter(parts[3])
        if len(parts) == 5 and parts[:3] == ["v1", "billing", "meters"] and parts[4] == "event_summaries" and method == "GET":
            return 200, self._event_summaries(self._get_meter(parts[3]), form)
        if method == "POST" and path == "/v1/billing_portal/sessions":
            return 200, self._create_portal_session(form)
        raise StripeHTTPError(
            404, f"Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs or we can help at https://support.stripe.com/."
        )

    # ------------------------------------------------------------------ meters

    def _meter_by_event(self, event_name: str) -> dict | None:
        for m in self.meters.values():
            if m["event_name"] == event_name and m["status"] == "active":
                return m
        return None

    def _get_meter(self, meter_id: str) -> dict:
        m = self.meters.get(meter_id)
        if m is None:
            raise StripeHTTPError(404, f"No such billing.meter: '{meter_id}'", code="resource_missing", param="id")
        return copy.deepcopy(m)

    def _create_meter(self, form: dict[str, str], status: str = "active") -> dict:
        for p in ("display_name", "event_name", "default_aggregation[formula]"):
            if not form.get(p):
                raise _missing(p)
        formula = form["default_aggregation[formula]"]
        if formula not in ("count", "sum", "last"):
            raise _bad(
                "Invalid default_aggregation[formula]: must be one of count, sum, or last", param="default_aggregation[formula]", code="parameter_invalid"
            )
        window = form.get("event_time_window") or None
        if window not in (None, "day", "hour"):
            raise _bad("Invalid event_time_window: must be one of day or hour", param="event_time_window", code="parameter_invalid")
        mapping_type = form.get("customer_mapping[type]", "by_id")
        if mapping_type != "by_id":
            raise _bad("Invalid customer_mapping[type]: must be by_id", param="customer_mapping[type]", code="parameter_invalid")
        if len(form["display_name"]) > 250:
            raise _bad("display_name must be at most 250 characters.", param="display_name", code="parameter_invalid")
        if self._meter_by_event(form["event_name"]) is not None:
            raise _bad(f"A meter with event_name '{form['event_name']}' already exists.", param="event_name", code="resource_already_exists")
        self._seq += 1
        meter = copy.deepcopy(self.fixtures["billing.meter"])
        meter.update(
            {
                "id": f"mtr_test_61{self._seq:030d}",
                "created": self.now,
                "updated": self.now,
                "livemode": False,
                "display_name": form["display_name"],
                "event_name": form["event_name"],
                "default_aggregation": {"formula": formula},
                "customer_mapping": {"event_payload_key": form.get("customer_mapping[event_payload_key]", "stripe_customer_id"), "type": mapping_type},
                "value_settings": {"event_payload_key": form.get("value_settings[event_payload_key]", "value")},
                "event_time_window": window,
                "status": status,
                "status_transitions": {"deactivated_at": None if status == "active" else self.now},
            }
        )
        self.meters[meter["id"]] = meter
        return copy.deepcopy(meter)

    def _list_meters(self, form: dict[str, str]) -> dict:
        try:
            limit = int(form.get("limit") or self.page_limit_default)
        except ValueError:
            raise _bad("Invalid integer: limit", param="limit", code="parameter_invalid") from None
        if not 1 <= limit <= 100:
            raise _bad("Invalid limit: must be between 1 and 100", param="limit", code="parameter_invalid")
        items = list(reversed(self.meters.values()))  # newest first, as Stripe lists
        if form.get("status"):
            items = [m for m in items if m["status"] == form["status"]]
        ids = [m["id"] for m in items]
        if form.get("starting_after"):
            if form["starting_after"] not in ids:
                raise StripeHTTPError(404, f"No such billing.meter: '{form['starting_after']}'", code="resource_missing", param="starting_after")
            items = items[ids.index(form["starting_after"]) + 1 :]
            page, has_more = items[:limit], len(items) > limit
        elif form.get("ending_before"):
            if form["ending_before"] not in ids:
                raise StripeHTTPError(404, f"No such billing.meter: '{form['ending_before']}'", code="resource_missing", param="ending_before")
            items = items[: ids.index(form["ending_before"])]
            page, has_more = items[-limit:], len(items) > limit
        else:
            page, has_more = items[:limit], len(items) > limit
        return {"object": "list", "data": copy.deepcopy(page), "has_more": has_more, "url": "/v1/billing/meters"}

    # ------------------------------------------------------------------ meter events

    def _create_event(self, form: dict[str, str]) -> dict:
        for p in ("event_name", "payload"):
            if not form.get(p) and not any(k.startswith(p + "[") for k in form):
                raise _missing(p)
        event_name = form["event_name"]
        meter = self._meter_by_event(event_name)
        if meter is None:
            raise _bad(f"No active meter was found matching event_name '{event_name}'.", param="event_name", code="resource_missing")
        ckey, vkey = meter["customer_mapping"]["event_payload_key"], meter["value_settings"]["event_payload_key"]
        customer = form.get(f"payload[{ckey}]")
        if not customer:
            raise _bad(
                f"The payload is missing the customer mapping key '{ckey}' required by the meter for event_name '{event_name}'.",
                param=f"payload[{ckey}]",
                code="parameter_missing",
            )
        value = form.get(f"payload[{vkey}]")
        if value is None:
            raise _bad(f"The payload is missing the value key '{vkey}'.", param=f"payload[{vkey}]", code="parameter_missing")
        if not _INT_RE.match(value):
            raise _bad(
                f"Invalid value '{value}' for payload[{vkey}]: meter event values must be whole numbers.", param=f"payload[{vkey}]", code="parameter_invalid"
            )
        identifier = form.get("identifier")
        if identifier is not None and not 1 <= len(identifier) <= IDENTIFIER_MAX:
            raise _bad(f"identifier must be between 1 and {IDENTIFIER_MAX} characters.", param="identifier", code="parameter_invalid")
        if identifier in self.rejected_identifiers:
            raise _bad(self.rejected_identifiers[identifier], param="payload")
        if "timestamp" in form:
            if not _INT_RE.match(form["timestamp"]):
                raise _bad("Invalid integer: timestamp", param="timestamp", code="parameter_invalid")
            ts = int(form["timestamp"])
        else:
            ts = self.now
        if ts < self.now - MAX_PAST_S:
            raise _bad("Timestamp must be within the past 35 days.", param="timestamp", code="timestamp_too_far_in_past")
        if ts > self.now + MAX_FUTURE_S:
            raise _bad("Timestamp must not be more than 5 minutes in the future.", param="timestamp", code="timestamp_in_future")
        if identifier is None:
            identifier = f"auto_{self._seq + 1:012d}"
        if identifier in self.by_identifier:
            raise _bad(
                f"An event with identifier '{identifier}' already exists. Identifiers must be unique.", param="identifier", code="resource_already_exists"
            )
        self._seq += 1
        obj = copy.deepcopy(self.fixtures["billing.meter_event"])
        obj.update(
            {
                "created": self.now,
                "event_name": event_name,
                "identifier": identifier,
                "livemode": False,
                "payload": {k[len("payload[") : -1]: v for k, v in form.items() if k.startswith("payload[")},
                "timestamp": ts,
            }
        )
        ev = AcceptedEvent(self._seq, meter["id"], event_name, customer, int(value), identifier, ts, None, obj)
        self.events.append(ev)
        self.by_identifier[identifier] = ev
        return copy.deepcopy(obj)

    def _windows(self, meter: dict) -> dict[tuple[str, int], int]:
        """{(customer, window start): aggregated value}; with a day/hour window only the newest event
        of each (customer, window) counts, without one every event of the day counts."""
        size = {"day": 86_400, "hour": 3_600}.get(meter["event_time_window"] or "", 86_400)
        kept: dict[tuple[str, int], list[AcceptedEvent]] = {}
        for ev in sorted((e for e in self.events if e.meter_id == meter["id"]), key=lambda e: e.seq):
            key = (ev.customer, ev.timestamp - ev.timestamp % size)
            if meter["event_time_window"]:
                kept[key] = [ev]  # the newest event replaces the earlier ones of its window
            else:
                kept.setdefault(key, []).append(ev)
        formula = meter["default_aggregation"]["formula"]
        agg = {"sum": lambda evs: sum(e.value for e in evs), "count": len, "last": lambda evs: evs[-1].value}[formula]
        return {k: agg(v) for k, v in kept.items()}

    # ------------------------------------------------------------------ meter event summaries

    def _kept_events(self, meter: dict, customer: str) -> list[AcceptedEvent]:
        """The customer's events the meter aggregates: with a day/hour ``event_time_window`` only the
        newest event (the last accepted) of each window; without one, every event."""
        evs = sorted((e for e in self.events if e.meter_id == meter["id"] and e.customer == customer), key=lambda e: e.seq)
        size = {"day": 86_400, "hour": 3_600}.get(meter["event_time_window"] or "")
        if not size:
            return evs
        kept: dict[int, AcceptedEvent] = {}
        for ev in evs:
            kept[ev.timestamp - ev.timestamp % size] = ev
        return list(kept.values())

    @staticmethod
    def _aggregate(formula: str, evs: list[AcceptedEvent]) -> int:
        """``sum`` adds the values, ``count`` counts the events, ``last`` is the value of the event with
        the latest timestamp (the newest accepted among equal timestamps)."""
        if formula == "count":
            return len(evs)
        if formula == "last":
            return max(evs, key=lambda e: (e.timestamp, e.seq)).value if evs else 0
        return sum(e.value for e in evs)

    def summary_value(self, event_name: str, customer: str, start: int, end: int) -> int:
        """Stripe's aggregated value of a meter for a customer over [start, end) (for tests)."""
        with self.lock:
            meter = self._meter_by_event(event_name)
            assert meter is not None, f"no meter for {event_name!r}"
            evs = [e for e in self._kept_events(meter, customer) if start <= e.timestamp < end]
            return self._aggregate(meter["default_aggregation"]["formula"], evs)

    def _event_summaries(self, meter: dict, form: dict[str, str]) -> dict:
        """One summary over [start_time, end_time), or one per day/hour with ``value_grouping_window``;
        the meter's formula over the events it keeps; buckets without events are left out."""
        for p in ("customer", "start_time", "end_time"):
            if not form.get(p):
                raise _missing(p)
        for p in ("start_time", "end_time"):
            if not _INT_RE.match(form[p]):
                raise _bad(f"Invalid integer: {p}", param=p, code="parameter_invalid")
            if int(form[p]) % 60:
                raise _bad(f"{p} must be aligned with minute boundaries.", param=p, code="parameter_invalid")
        start, end = int(form["start_time"]), int(form["end_time"])
        if start >= end:
            raise _bad("start_time must be before end_time.", param="start_time", code="parameter_invalid")
        grouping = form.get("value_grouping_window")
        if grouping not in (None, "", "day", "hour"):
            raise _bad("Invalid value_grouping_window: must be one of day or hour", param="value_grouping_window", code="parameter_invalid")
        size = {"day": 86_400, "hour": 3_600}.get(grouping or "")
        buckets: dict[int, list[AcceptedEvent]] = {}
        for ev in self._kept_events(meter, form["customer"]):
            if start <= ev.timestamp < end:
                b = ev.timestamp - ev.timestamp % size if size else start
                buckets.setdefault(b, []).append(ev)
        data = []
        for b in sorted(buckets):
            s = copy.deepcopy(self.fixtures["billing.meter_event_summary"])
            s.update(
                {
                    "id": f"mtrusg_test_{meter['id'][-8:]}_{b}",
                    "aggregated_value": self._aggregate(meter["default_aggregation"]["formula"], buckets[b]),
                    "start_time": b,
                    "end_time": min(b + size, end) if size else end,
                    "meter": meter["id"],
                    "livemode": False,
                }
            )
            data.append(s)
        return {"object": "list", "data": data, "has_more": False, "url": f"/v1/billing/meters/{meter['id']}/event_summaries"}

    # ------------------------------------------------------------------ billing portal sessions

    def _create_portal_session(self, form: dict[str, str]) -> dict:
        """``POST /v1/billing_portal/sessions``: ``customer`` (required here), ``return_url`` (optional, absolute)."""
        customer = form.get("customer")
        if not customer:
            raise _missing("customer")
        if customer in self.unknown_customers or not customer.startswith("cus_"):
            raise StripeHTTPError(400, f"No such customer: '{customer}'", code="resource_missing", param="customer")
        return_url = form.get("return_url") or None
        if return_url is not None and not re.match(r"^https?://[^\s/]+", return_url):
            raise _bad("Invalid URL: return_url must be an absolute URL", param="return_url", code="url_invalid")
        session = copy.deepcopy(self.fixtures["billing_portal.session"])
        n = len(self.portal_sessions) + 1
        session.update(
            {
                "id": f"bps_test_{n:06d}",
                "created": self.now,
                "customer": customer,
                "flow": None,
                "livemode": False,
                "return_url": return_url,
                "url": f"{self.url}/p/session/test_{n:06d}",
            }
        )
        self.portal_sessions.append(session)
        return session


# --------------------------------------------------------------------------- as its own process


def main(argv: list[str] | None = None) -> None:
    """``python tests/stripe_server.py --now EPOCH --meter NAME ...``: serve on 127.0.0.1 (port 0),
    print the URL on the first line of stdout, run until SIGTERM. ``GET /_test/state`` returns the
    counters (events, unique identifiers, requests by status, concurrent calls refused...)."""
    import argparse
    import signal

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--now", type=int, required=True, help="the server's now, epoch seconds")
    ap.add_argument("--api-key")
    ap.add_argument("--meter", action="append", default=[], help="an event name to create a meter for (sum, daily window)")
    ap.add_argument("--rate-limit-every", type=int, help="every N-th POST of meter events (v1 and v2) answered 429")
    ap.add_argument("--retry-after", type=int, help="the Retry-After of those 429s (default: none)")
    ap.add_argument("--fail-every", type=int, help="every N-th POST of meter events answered 500")
    ap.add_argument("--latency-ms", type=float, default=0.0, help="execution time of each v1 meter event")
    args = ap.parse_args(argv)
    server = StripeServer(now=args.now, api_key=args.api_key)
    for name in args.meter:
        server.add_meter(name)
    server.latency_s = args.latency_ms / 1000
    for path in ("/v1/billing/meter_events", "/v2/billing/meter_event_stream"):
        if args.fail_every:
            server.fail_every(args.fail_every, 500, path=path)
        if args.rate_limit_every:
            server.rate_limit_every(args.rate_limit_every, args.retry_after, path=path)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with server:
        print(server.url, flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
