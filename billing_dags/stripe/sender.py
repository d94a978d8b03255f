"""Sending the Stripe outbox: meter events posted with their identifier as Idempotency-Key (DESIGN rule 9).

The outbox (``billing_dags.stripe.outbox``) is the single source of truth; the sender only moves rows
from ``pending``/``failed``/``dry_run``/``future`` to ``sent``, ``failed``, ``too_old`` or ``future``
and records what Stripe acknowledged. No API key means dry-run.

Two ways to post, behind the same outbox:

- ``api="v1"`` (default): one ``POST /v1/billing/meter_events`` per row, validated synchronously
  (a row is ``sent`` only once Stripe accepted it). Concurrent across (Stripe customer, event
  name) pairs with at most one request in flight per pair (Stripe allows one concurrent call per
  customer and meter); a 429 backs off only its pair.
- ``api="v2"``: the meter event stream, ``POST /v2/billing/meter_event_stream`` with up to 100
  events per request, authenticated by a meter event session token (about 15 minutes, renewed
  when Stripe says it expired). Stripe validates these events asynchronously: ``sent`` means
  "accepted into the stream", and an invalid event surfaces later (Stripe's
  ``v1.billing.meter.error_report_triggered`` event, the Dashboard, and a reconciliation of the
  meter's event summaries), never as a ``failed`` row. Stripe drops an identifier it has seen in
  the last 24 hours, so a resent batch counts once.
"""

from __future__ import annotations

import calendar
import collections
import hashlib
import heapq
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import UTC, datetime
from typing import Any

from billing_dags.core.settings import EDGE_LOOKBACK_DAYS
from billing_dags.stripe.outbox import OutboxError

#: statuses the sender (re)tries: a failed row is retried, a future one once it is due, a dry-run
#: one once a key is configured; ``sent`` and ``too_old`` are final
SENDABLE = ("pending", "failed", "dry_run", "future")
#: seconds before a request to Stripe times out (the library default is 80)
DEFAULT_TIMEOUT_S = 30.0
#: Stripe accepts timestamps at most 5 minutes ahead; keep the same margin at the old end
CLOCK_SLACK_S = 300
#: requests in flight at once (v1: at most one per customer and meter)
DEFAULT_CONCURRENCY = 16
#: the meter event stream takes at most this many events per request
STREAM_BATCH_MAX = 100
#: a session is renewed this long before Stripe says it expires
SESSION_MARGIN_S = 60.0
#: sessions that expire before a single batch goes through: then the batch fails (retryable)
MAX_RENEWALS_IN_A_ROW = 3
#: progress is written to the outbox files after this many rows changed, or this many seconds
CHECKPOINT_ROWS = 50
CHECKPOINT_S = 0.25
APIS = ("v1", "v2")
#: Stripe keys, and the masked form Stripe echoes in errors (sk_test_********1234)
_KEY_RE = re.compile(r"\b(?:sk|rk|pk|whsec)_(?:(?:test|live)_)?[A-Za-z0-9*]+")


def make_client(api_key: str | None, api_base: str | None = None, max_network_retries: int = 3, timeout_s: float = DEFAULT_TIMEOUT_S):
    """A StripeClient, or None without an API key (dry-run). ``api_base`` (STRIPE_API_BASE) overrides
    the API address (a local test server, a proxy), for the meter event stream too (whose live
    address is Stripe's separate meter-events host). The library retries 409/5xx, timeouts and
    connection errors ``max_network_retries`` times with backoff (0.5 s doubling up to 5 s, jittered)
    and keeps the request's Idempotency-Key on every attempt; a request times out after ``timeout_s``.

    One client serves every sender thread: its ``RequestsClient`` keeps a ``requests.Session`` per
    thread, and request options travel with each call."""
    import stripe

    stripe.enable_telemetry = False
    if not api_key:
        return None
    kwargs: dict[str, Any] = {
        "max_network_retries": max_network_retries,
        "http_client": stripe.RequestsClient(timeout=timeout_s),
    }
    if api_base:
        base = api_base.rstrip("/")
        kwargs["base_addresses"] = {"api": base, "meter_events": base}
    return stripe.StripeClient(api_key, **kwargs)


def redact(text: str) -> str:
    """Anything that looks like a Stripe key replaced (errors and logs never carry a key)."""
    return _KEY_RE.sub("[redacted]", text)


def _error_text(e: Exception) -> str:
    """The error's message only (no request body, no headers), with anything key-like redacted."""
    msg = getattr(e, "user_message", None) or str(e) or type(e).__name__
    status = getattr(e, "http_status", None)
    code = getattr(e, "code", None)
    text = f"{type(e).__name__}" + (f" (HTTP {status})" if status else "") + (f" [{code}]" if code else "") + f": {msg}"
    return redact(text)[:500]


def _now_ts(now: datetime) -> int:
    if not isinstance(now, datetime) or now.tzinfo is None or now.utcoffset() is None:
        raise OutboxError(f"now {now!r} must be a timezone-aware datetime, e.g. datetime.now(timezone.utc)")
    return calendar.timegm(now.astimezone(UTC).utctimetuple())


def _retry_after(e: Exception) -> float | None:
    """Seconds from a Retry-After header (delta-seconds form), if any."""
    headers = getattr(e, "headers", None) or {}
    for k, v in dict(headers).items():
        if str(k).lower() == "retry-after":
            try:
                return max(0.0, float(v))
            except (TypeError, ValueError):
                return None
    return None


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: Any) -> float | None:
    """Epoch seconds of an ISO 8601 timestamp (v2 objects) or an integer one."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class RateLimiter:
    """A token bucket shared by the sender's threads: at most ``rate`` requests per second on
    average, bursts of at most ``burst``. ``acquire`` blocks the calling thread until a token is free."""

    def __init__(self, rate: float, burst: int | None = None, *, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        if not rate or rate <= 0:
            raise OutboxError(f"rate limit {rate!r} must be a positive number of requests per second, e.g. 500")
        self.rate = float(rate)
        self.burst = max(1, int(burst if burst is not None else min(self.rate, max(1.0, self.rate / 10))))
        self.clock, self.sleep = clock, sleep
        self.tokens = float(self.burst)
        self.stamp = clock()
        self.lock = threading.Lock()

    def acquire(self) -> None:
        with self.lock:
            now = self.clock()
            self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            self.tokens -= 1.0  # reserved now; a negative balance is the wait of this caller
            wait_s = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait_s > 0:
            self.sleep(wait_s)


class _Session:
    """A meter event session: its token and when to renew it (on this machine's monotonic clock,
    from the lifetime Stripe gave it, so clock skew does not matter)."""

    def __init__(self, obj: Any, clock: Callable[[], float], generation: int):
        self.id = getattr(obj, "id", None) or "mes_unknown"
        self.token = obj.authentication_token
        created, expires = _parse_time(getattr(obj, "created", None)), _parse_time(getattr(obj, "expires_at", None))
        life = (expires - created) if created is not None and expires is not None else 900.0
        self.renew_at = clock() + max(0.0, life - SESSION_MARGIN_S)
        self.generation = generation


class Sender:
    """Posts outbox rows and records the outcome; reusable across calls of one run.

    Per row: ``sent`` / ``too_old`` rows are skipped; rows whose timestamp is older than the
    Stripe horizon become ``too_old`` and rows more than 5 minutes ahead become ``future`` (both
    flagged, never posted); without a client the rest become ``dry_run``.

    v1 (``api="v1"``): each event is posted with its identifier as Idempotency-Key, the same key on
    every attempt, by ``concurrency`` threads with at most one request in flight per (Stripe
    customer, event name). 5xx, timeouts and connection errors are retried by the stripe library
    (``max_network_retries`` of the client); a 429 is retried here up to ``retries`` times after
    ``Retry-After`` (capped at ``retry_after_cap``) or an exponential backoff (``backoff_base``
    doubling, capped at ``backoff_cap``), and only its pair waits: the other pairs keep going. An
    identifier Stripe already has (a 400 ``resource_already_exists`` on ``identifier``: acknowledged
    by a run that was stopped before it could record it) counts as sent.

    v2 (``api="v2"``): rows go to the meter event stream in batches of up to ``batch_size``; a 429
    backs off that batch, an expired session is renewed and the batch resent (Stripe drops
    identifiers it already has). See the module docstring for what ``sent`` means there.

    Both: a 4xx marks only its row(s) ``failed`` with Stripe's message; a retryable error that
    outlives the retries marks them ``failed`` too, and after ``max_consecutive_errors`` such
    failures in a row the sender stops posting for this run (the API is down or throttling hard):
    the requests in flight finish and the remaining rows keep their status for the next run. A
    refused key stops the run at once. Until the first success only one request is in flight, so
    a bad key or a down API costs one request, not ``concurrency``. ``rate_limit`` (requests per
    second, all threads together; library retries not counted) keeps the run under Stripe's limit.
    """

    def __init__(
        self,
        client: Any | None,
        *,
        now: datetime,
        max_age_days: int = EDGE_LOOKBACK_DAYS,
        retries: int = 8,
        backoff_base: float = 0.5,
        backoff_cap: float = 8.0,
        retry_after_cap: float = 30.0,
        max_consecutive_errors: int = 5,
        concurrency: int = DEFAULT_CONCURRENCY,
        rate_limit: float | None = None,
        api: str = "v1",
        batch_size: int = STREAM_BATCH_MAX,
        checkpoint_rows: int = CHECKPOINT_ROWS,
        checkpoint_s: float = CHECKPOINT_S,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] | None = None,
        log: Callable[[str], None] | None = None,
    ):
        if api not in APIS:
            raise OutboxError(f"Stripe API {api!r} is not one of {', '.join(APIS)}; use v1 (meter events) or v2 (meter event stream)")
        if not isinstance(concurrency, int) or concurrency < 1:
            raise OutboxError(f"concurrency {concurrency!r} must be a whole number of at least 1, e.g. {DEFAULT_CONCURRENCY}")
        if not isinstance(batch_size, int) or not 1 <= batch_size <= STREAM_BATCH_MAX:
            raise OutboxError(f"batch size {batch_size!r} must be between 1 and {STREAM_BATCH_MAX} (the meter event stream's limit per request)")
        self.client = client
        self.now_ts = _now_ts(now)
        self.oldest_ok = self.now_ts - max_age_days * 86_400 + CLOCK_SLACK_S
        self.retries, self.backoff_base, self.backoff_cap, self.retry_after_cap = retries, backoff_base, backoff_cap, retry_after_cap
        self.max_consecutive_errors = max_consecutive_errors
        self.concurrency, self.api, self.batch_size = concurrency, api, batch_size
        self.checkpoint_rows, self.checkpoint_s = checkpoint_rows, checkpoint_s
        self.limiter = RateLimiter(rate_limit) if rate_limit else None
        self.log = log
        if clock is None and sleep is not time.sleep:
            # an injected sleep (tests) does not pass time: the sender's clock moves on by what it slept
            slept = [0.0]

            def virtual_sleep(s: float) -> None:
                sleep(s)
                slept[0] += s

            self.sleep, self.clock = virtual_sleep, (lambda: time.monotonic() + slept[0])
        else:
            self.sleep, self.clock = sleep, clock or time.monotonic
        self.consecutive_errors = 0
        self.aborted = False
        self.confirmed = False  # a request succeeded: from then on, ``concurrency`` in flight
        self.session: _Session | None = None
        self._sessions = 0
        #: the backoff delays chosen on 429s, in order (seconds)
        self.backoffs: list[float] = []
        #: what this sender did: posted (HTTP calls made by the sender, library retries not counted),
        #: sent, failed, retried (429 retries), too_old, future, dry_run, skipped (left for a later
        #: run), already_sent (Stripe had the identifier), sessions (v2 sessions created)
        self.stats: dict[str, int] = dict.fromkeys(
            ("posted", "sent", "failed", "retried", "too_old", "future", "dry_run", "skipped", "already_sent", "sessions"), 0
        )

    @property
    def mode(self) -> str:
        return "live" if self.client is not None else "dry_run"

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self.backoff_cap, self.backoff_base * 2**attempt)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.retry_after_cap))
        return delay

    # ------------------------------------------------------------------ the run

    def send(self, rows: list[dict], on_progress: Callable[[list[dict], set[int]], None] | None = None) -> list[dict]:
        """All rows, updated (new dicts, same order); the input is not modified.

        ``on_progress(out, changed)`` is called, from the calling thread, with the rows so far and
        the indexes changed since the previous call: after every ``checkpoint_rows`` changed rows
        or ``checkpoint_s`` seconds, and once at the end. The caller persists them (the outbox
        files), so a run stopped mid-way loses at most what changed since the last calls. While
        sending, the calls come from a writer thread (one at a time, on a copy of the rows), so
        posting goes on while a file is written; if the writer falls behind by more than two
        checkpoints, posting waits for it."""
        out = [dict(r) for r in rows]
        to_post: list[int] = []
        changed: set[int] = set()
        for i, r in enumerate(out):
            if r["status"] not in SENDABLE:
                continue
            ts = int(r["timestamp"])
            if ts < self.oldest_ok:
                r["status"] = "too_old"
                r["last_error"] = f"day {r['day']} is older than Stripe accepts ({EDGE_LOOKBACK_DAYS} days); not sent"
                self.stats["too_old"] += 1
                changed.add(i)
            elif ts > self.now_ts + CLOCK_SLACK_S:
                r["status"] = "future"
                r["last_error"] = f"timestamp {ts} is more than {CLOCK_SLACK_S // 60} minutes ahead of now ({self.now_ts}); sent once it is due"
                self.stats["future"] += 1
                changed.add(i)
            elif self.client is None:
                if r["status"] in ("pending", "future"):
                    r["status"], r["last_error"] = "dry_run", None
                    changed.add(i)
                self.stats["dry_run"] += 1
            elif self.aborted:
                self.stats["skipped"] += 1
            else:
                to_post.append(i)
        if to_post:
            _Run(self, out, changed, on_progress).go(to_post)
        elif on_progress is not None and changed:
            on_progress(out, set(changed))
        return out

    # ------------------------------------------------------------------ one request (worker threads)

    def _post_v1(self, params: dict, key: str) -> Any:
        if self.limiter:
            self.limiter.acquire()
        return self.client.v1.billing.meter_events.create(params=params, options={"idempotency_key": key})

    def _post_v2(self, events: list[dict], key: str, token: str) -> None:
        if self.limiter:
            self.limiter.acquire()
        self.client.v2.billing.meter_event_stream.create(params={"events": events}, options={"api_key": token, "idempotency_key": key})

    def _new_session(self) -> _Session:
        if self.limiter:
            self.limiter.acquire()
        obj = self.client.v2.billing.meter_event_session.create()
        self._sessions += 1
        self.stats["sessions"] += 1
        return _Session(obj, self.clock, self._sessions)

    # ------------------------------------------------------------------ outcomes (the calling thread)

    def _sent(self, r: dict, response_id: str | None, already: bool = False) -> None:
        r["status"], r["last_error"] = "sent", None
        r["stripe_response_id"] = response_id or r["identifier"]
        self.stats["already_sent" if already else "sent"] += 1
        self.consecutive_errors = 0
        self.confirmed = True

    def _failed(self, r: dict, e: Exception, *, retryable: bool, counts: bool = True) -> None:
        """``counts``: this row's request counts towards the stop rule (a batch counts once)."""
        r["status"], r["last_error"] = "failed", _error_text(e)
        self.stats["failed"] += 1
        if not counts:
            return
        if not retryable:
            self.consecutive_errors = 0  # a bad row, not a bad API: carry on with the rest
            return
        self.consecutive_errors += 1
        if self.max_consecutive_errors and self.consecutive_errors >= self.max_consecutive_errors and not self.aborted:
            self.aborted = True
            if self.log:
                self.log(f"Stripe failed {self.consecutive_errors} events in a row ({r['last_error']}); the remaining events wait for the next run")

    def _refused_key(self, r: dict, e: Exception) -> None:
        # a wrong or restricted key fails every event alike: stop instead of failing them all
        self._failed(r, e, retryable=False)
        if not self.aborted:
            self.aborted = True
            if self.log:
                self.log(f"Stripe refused the API key ({r['last_error']}); nothing more is sent this run")


class _Saver:
    """Calls ``on_progress`` from its own thread with a copy of the rows (the calling thread keeps
    sending meanwhile); hands it what changed since its previous call, newest version of each row."""

    def __init__(self, out: list[dict], on_progress: Callable[[list[dict], set[int]], None]):
        self.mirror = [dict(r) for r in out]
        self.on_progress = on_progress
        self.cv = threading.Condition()
        self.queue: dict[int, dict] = {}
        self.busy = 0
        self.error: BaseException | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="stripe-outbox-writer", daemon=True)
        self.thread.start()

    def put(self, rows: dict[int, dict]) -> None:
        with self.cv:
            self._raise()
            self.queue.update(rows)
            self.cv.notify_all()

    def wait_below(self, n: int) -> None:
        with self.cv:
            while len(self.queue) + self.busy > n and self.error is None:
                self.cv.wait()
            self._raise()

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify_all()
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.queue and not self.closed:
                    self.cv.wait()
                if not self.queue:
                    return
                batch, self.queue = self.queue, {}
                self.busy = len(batch)
            try:
                for i, r in batch.items():
                    self.mirror[i] = r
                self.on_progress(self.mirror, set(batch))
            except BaseException as e:  # the sending thread re-raises it
                with self.cv:
                    self.error, self.busy = e, 0
                    self.cv.notify_all()
                return
            with self.cv:
                self.busy = 0
                self.cv.notify_all()


class _Run:
    """One ``Sender.send`` call with a client: the scheduling state, touched only by the calling
    thread; worker threads only make HTTP calls and hand back the result or the exception."""

    def __init__(self, sender: Sender, out: list[dict], changed: set[int], on_progress):
        self.s, self.out, self.changed = sender, out, changed
        self.saver = _Saver(out, on_progress) if on_progress is not None else None
        self.unsaved = 0
        self.saved_at = sender.clock()
        self.in_flight: dict[Future, tuple] = {}
        self.delayed: list[tuple[float, int, Any]] = []  # (ready at, seq, unit), a heap
        self.ready: collections.deque = collections.deque()
        self.attempts: dict[Any, int] = {}  # 429 attempts of the unit's current head
        self.renewals = 0  # sessions renewed since the last batch that went through
        self._seq = 0

    # units of work: v1 = a (customer, event name) pair with its rows in order; v2 = a batch of rows

    def go(self, to_post: list[int]) -> None:
        s = self.s
        for i in to_post:
            self.out[i]["attempts"] = int(self.out[i].get("attempts") or 0)
        if s.api == "v1":
            self.queues: dict[tuple, collections.deque] = {}
            for i in to_post:
                r = self.out[i]
                self.queues.setdefault((r["stripe_customer_id"], r["event_name"]), collections.deque()).append(i)
            self.ready.extend(self.queues)
        else:
            self.ready.extend(tuple(to_post[k : k + s.batch_size]) for k in range(0, len(to_post), s.batch_size))
        workers = s.concurrency
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stripe-sender") as pool:
            self.pool = pool
            try:
                self._loop()
            finally:
                for f in list(self.in_flight):
                    f.cancel()
                if self.saver is not None:
                    self._checkpoint(force=True)
                    self.saver.close()
        # what was never posted (the run stopped): left for the next run
        units = list(self.queues.values()) if s.api == "v1" else [*self.ready, *(u for _, _, u in self.delayed)]
        s.stats["skipped"] += sum(len(u) for u in units)

    def _loop(self) -> None:
        s = self.s
        while True:
            now = s.clock()
            while self.delayed and self.delayed[0][0] <= now:
                self.ready.append(heapq.heappop(self.delayed)[2])
            limit = s.concurrency if s.confirmed else 1
            while not s.aborted and self.ready and len(self.in_flight) < limit:
                self._submit(self.ready.popleft())
            if not self.in_flight:
                if s.aborted or not self.delayed:
                    return
                self._checkpoint(force=True)
                s.sleep(max(0.0, self.delayed[0][0] - s.clock()))
                continue
            timeout = max(0.0, min(s.checkpoint_s, (self.delayed[0][0] - now) if self.delayed else s.checkpoint_s))
            done, _ = wait(self.in_flight, timeout=timeout, return_when=FIRST_COMPLETED)
            for f in done:
                self._outcome(f, *self.in_flight.pop(f))
            self._checkpoint()

    def _delay(self, unit: Any, seconds: float) -> None:
        self._seq += 1
        heapq.heappush(self.delayed, (self.s.clock() + seconds, self._seq, unit))

    def _touch(self, idx: int) -> None:
        self.changed.add(idx)
        self.unsaved += 1

    def _checkpoint(self, force: bool = False) -> None:
        if self.saver is None or not self.changed:
            return
        now = self.s.clock()
        if force or self.unsaved >= self.s.checkpoint_rows or now - self.saved_at >= self.s.checkpoint_s:
            self.saver.put({i: dict(self.out[i]) for i in self.changed})
            self.changed = set()
            self.unsaved, self.saved_at = 0, self.s.clock()
            # backpressure: never more than about two checkpoints acknowledged and not yet written
            self.saver.wait_below(2 * self.s.checkpoint_rows + self.s.concurrency)

    # ------------------------------------------------------------------ v1 and v2 submissions

    def _submit(self, unit: Any) -> None:
        s = self.s
        if s.api == "v1":
            i = self.queues[unit][0]
            r = self.out[i]
            if unit not in self.attempts:
                r["attempts"] += 1
                self.attempts[unit] = 0
            params = {
                "event_name": r["event_name"],
                "payload": {"stripe_customer_id": r["stripe_customer_id"], "value": str(int(r["value"]))},
                "identifier": r["identifier"],
                "timestamp": int(r["timestamp"]),
            }
            fut = self.pool.submit(s._post_v1, params, r["identifier"])
        else:
            if s.session is None or s.clock() >= s.session.renew_at:
                try:
                    s.session = s._new_session()
                except Exception as e:  # a session that cannot be had fails the batch as its request would
                    s.stats["posted"] += 1
                    self._v2_error(unit, e)
                    return
            if unit not in self.attempts:
                for i in unit:
                    self.out[i]["attempts"] += 1
                self.attempts[unit] = 0
            events = [
                {
                    "event_name": self.out[i]["event_name"],
                    "identifier": self.out[i]["identifier"],
                    "payload": {"stripe_customer_id": self.out[i]["stripe_customer_id"], "value": str(int(self.out[i]["value"]))},
                    "timestamp": _iso(int(self.out[i]["timestamp"])),
                }
                for i in unit
            ]
            key = "billing-dags-stream-" + hashlib.sha256("\n".join(e["identifier"] for e in events).encode()).hexdigest()[:40]
            fut = self.pool.submit(s._post_v2, events, key, s.session.token)
            self.in_flight[fut] = (unit, s.session)
            s.stats["posted"] += 1
            return
        self.in_flight[fut] = (unit, None)
        s.stats["posted"] += 1

    def _outcome(self, fut: Future, unit: Any, session: _Session | None) -> None:
        """``session``: the v2 session the request went out with (another batch may have renewed
        the current one since); its id is what the rows record."""
        exc = fut.exception()
        if self.s.api == "v1":
            self._v1_outcome(unit, fut.result() if exc is None else None, exc)
        elif exc is None:
            self.renewals = 0
            for i in unit:
                self.s._sent(self.out[i], f"stream:{session.id}")
                self._touch(i)
            self.attempts.pop(unit, None)
        else:
            self._v2_error(unit, exc, session.generation if session is not None else None)

    def _next_in_pair(self, pair: tuple) -> None:
        q = self.queues[pair]
        q.popleft()
        self.attempts.pop(pair, None)
        if q:
            self.ready.append(pair)

    def _v1_outcome(self, pair: tuple, event: Any, e: BaseException | None) -> None:
        import stripe

        s = self.s
        i = self.queues[pair][0]
        r = self.out[i]
        if e is None:
            s._sent(r, getattr(event, "id", None) or getattr(event, "identifier", None))
        elif isinstance(e, stripe.RateLimitError):
            attempt = self.attempts[pair]
            if attempt < s.retries:
                s.stats["retried"] += 1
                delay = s.backoff(attempt, _retry_after(e))
                s.backoffs.append(delay)
                self.attempts[pair] = attempt + 1
                self._delay(pair, delay)  # this pair waits; the others carry on
                return
            s._failed(r, e, retryable=True)
        elif isinstance(e, stripe.AuthenticationError | stripe.PermissionError):
            s._refused_key(r, e)
        elif isinstance(e, stripe.InvalidRequestError) and getattr(e, "code", None) == "resource_already_exists" and getattr(e, "param", None) == "identifier":
            # Stripe has this identifier: a run stopped before recording the ack sent it (and the
            # Idempotency-Key's 24 hours have passed); the event counts once
            s._sent(r, r["identifier"], already=True)
        elif isinstance(e, stripe.APIConnectionError | stripe.APIError):
            s._failed(r, e, retryable=True)  # the library already retried these (5xx, timeouts, connection errors)
        elif isinstance(e, stripe.StripeError):
            status = getattr(e, "http_status", None) or 0
            s._failed(r, e, retryable=status >= 500 or status in (409, 429))
        else:
            raise e
        self._touch(i)
        self._next_in_pair(pair)

    def _v2_error(self, batch: tuple, e: BaseException, generation: int | None = None) -> None:
        import stripe

        s = self.s
        if isinstance(e, stripe.TemporarySessionExpiredError) and self.renewals < MAX_RENEWALS_IN_A_ROW:
            if s.session is not None and s.session.generation == generation:
                s.session = None  # renewed before the next batch goes out
                self.renewals += 1
            self.ready.appendleft(batch)  # not a failure: the same batch again with a new session
            return
        if isinstance(e, stripe.RateLimitError):
            attempt = self.attempts.get(batch, 0)
            if attempt < s.retries:
                s.stats["retried"] += 1
                delay = s.backoff(attempt, _retry_after(e))
                s.backoffs.append(delay)
                self.attempts[batch] = attempt + 1
                self._delay(batch, delay)
                return
            retryable, refused = True, False
        elif isinstance(e, stripe.AuthenticationError | stripe.PermissionError):
            retryable, refused = False, True
        elif isinstance(e, stripe.APIConnectionError | stripe.APIError):
            retryable, refused = True, False
        elif isinstance(e, stripe.StripeError):
            status = getattr(e, "http_status", None) or 0
            retryable, refused = status >= 500 or status in (409, 429), False
        else:
            raise e
        self.attempts.pop(batch, None)
        for i in batch:
            r = self.out[i]
            if refused:
                s._refused_key(r, e)
            else:
                # a whole batch is one request: it counts once towards the stop rule
                s._failed(r, e, retryable=retryable, counts=i == batch[-1])
            self._touch(i)


def send_outbox(
    rows: list[dict],
    client: Any | None,
    *,
    now: datetime,
    max_age_days: int = EDGE_LOOKBACK_DAYS,
    rate_limit_retries: int = 8,
    sleep: Callable[[float], None] = time.sleep,
    **sender_options: Any,
) -> list[dict]:
    """Send the pending, failed, dry-run and future rows of one outbox; return all rows updated (new
    dicts, same order). See :class:`Sender` for statuses, retries, concurrency and limits."""
    return Sender(client, now=now, max_age_days=max_age_days, retries=rate_limit_retries, sleep=sleep, **sender_options).send(rows)


#: environment variables of the sender's options (the CLI's flags and the Dagster resource default to them)
ENV_OPTIONS = {"STRIPE_METER_API": "api", "STRIPE_CONCURRENCY": "concurrency", "STRIPE_RATE_LIMIT": "rate_limit"}


def as_of(value: str | None, what: str = "--as-of") -> datetime:
    """The time Stripe's 35-day limit is judged at: ``value`` (ISO 8601 with a UTC offset, e.g.
    2026-12-01T02:00:00Z; replays and tests), or now when it is empty."""
    if not value:
        return datetime.now(UTC)
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        t = None
    if t is None or t.tzinfo is None:
        raise OutboxError(f"{what} {value!r} is not an ISO 8601 time with a UTC offset; give e.g. 2026-12-01T02:00:00Z")
    return t.astimezone(UTC)


def sender_options(api: str | None = None, concurrency: int | str | None = None, rate_limit: float | str | None = None, *, environ=None) -> dict:
    """Sender options from explicit values, else STRIPE_METER_API (v1 | v2), STRIPE_CONCURRENCY
    (requests in flight) and STRIPE_RATE_LIMIT (requests per second); unset ones keep the defaults.
    A bad value raises OutboxError naming the variable and the fix."""
    import os

    env = os.environ if environ is None else environ
    given = {"api": api, "concurrency": concurrency, "rate_limit": rate_limit}
    out: dict[str, Any] = {}
    for var, name in ENV_OPTIONS.items():
        value, source = given[name], f"--{name.replace('_', '-')}"
        if value in (None, ""):
            value, source = env.get(var) or None, var
        if value is None:
            continue
        text = str(value).strip()
        if name == "api":
            if text not in APIS:
                raise OutboxError(f"{source}={text!r} is not a Stripe meter API; use v1 (meter events) or v2 (meter event stream)")
            out[name] = text
        elif name == "concurrency":
            if not text.isdigit() or int(text) < 1:
                raise OutboxError(f"{source}={text!r} is not a whole number of at least 1; give e.g. {DEFAULT_CONCURRENCY}")
            out[name] = int(text)
        else:
            try:
                rate = float(text)
            except ValueError:
                rate = -1.0
            if not rate > 0 or rate != rate or rate == float("inf"):
                raise OutboxError(f"{source}={text!r} is not a positive number of requests per second; give e.g. 500 (Stripe allows about 1,000 in live mode)")
            out[name] = rate
    return out
