"""Sending the Stripe outbox: v1 meter events posted with their identifier as Idempotency-Key (DESIGN rule 9).

The outbox (``billing_dags.stripe.outbox``) is the single source of truth; the sender only moves rows
from ``pending``/``failed``/``dry_run``/``future`` to ``sent``, ``failed``, ``too_old`` or ``future``
and records what Stripe acknowledged. No API key means dry-run.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Callable
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
#: Stripe keys, and the masked form Stripe echoes in errors (sk_test_********1234)
_KEY_RE = re.compile(r"\b(?:sk|rk|pk|whsec)_(?:(?:test|live)_)?[A-Za-z0-9*]+")


def make_client(api_key: str | None, api_base: str | None = None, max_network_retries: int = 3, timeout_s: float = DEFAULT_TIMEOUT_S):
    """A StripeClient, or None without an API key (dry-run). ``api_base`` (STRIPE_API_BASE) overrides
    the API address (a local test server, a proxy). The library retries 409/5xx, timeouts and
    connection errors ``max_network_retries`` times with backoff (0.5 s doubling up to 5 s, jittered)
    and keeps the request's Idempotency-Key on every attempt; a request times out after ``timeout_s``."""
    import stripe

    stripe.enable_telemetry = False
    if not api_key:
        return None
    kwargs: dict[str, Any] = {
        "max_network_retries": max_network_retries,
        "http_client": stripe.RequestsClient(timeout=timeout_s),
    }
    if api_base:
        kwargs["base_addresses"] = {"api": api_base.rstrip("/")}
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


class Sender:
    """Posts outbox rows as v1 meter events and records the outcome; reusable across days of one run.

    Per row: ``sent`` / ``dry_run`` rows that Stripe (or nobody) needs are skipped, rows whose day is
    older than the Stripe horizon become ``too_old``, rows more than 5 minutes ahead become ``future``
    (both flagged, never posted). Each event is posted with its identifier as Idempotency-Key, the
    same key on every attempt. 5xx, timeouts and connection errors are retried by the stripe
    library (``max_network_retries`` of the client); a 429 is retried here up to ``retries`` times
    after ``Retry-After`` (capped at ``retry_after_cap``) or an exponential backoff
    (``backoff_base`` doubling, capped at ``backoff_cap``). A 4xx marks only that row ``failed``
    with Stripe's message; a retryable error that outlives the retries marks it ``failed`` too,
    and after ``max_consecutive_errors`` such rows in a row the sender stops posting for this run
    (the API is down or throttling hard): the remaining rows keep their status for the next run.
    """

    def __init__(
        self,
        client: Any | None,
        *,
        now: datetime,
        max_age_days: int = EDGE_LOOKBACK_DAYS,
        retries: int = 4,
        backoff_base: float = 0.5,
        backoff_cap: float = 8.0,
        retry_after_cap: float = 30.0,
        max_consecutive_errors: int = 5,
        sleep: Callable[[float], None] = time.sleep,
        log: Callable[[str], None] | None = None,
    ):
        self.client = client
        self.now_ts = _now_ts(now)
        self.oldest_ok = self.now_ts - max_age_days * 86_400 + CLOCK_SLACK_S
        self.retries, self.backoff_base, self.backoff_cap, self.retry_after_cap = retries, backoff_base, backoff_cap, retry_after_cap
        self.max_consecutive_errors = max_consecutive_errors
        self.sleep, self.log = sleep, log
        self.consecutive_errors = 0
        self.aborted = False
        #: what this sender did: posted (HTTP calls made by the sender, library retries not counted),
        #: sent, failed, retried (429 retries), too_old, future, dry_run, skipped (left for a later run)
        self.stats: dict[str, int] = dict.fromkeys(("posted", "sent", "failed", "retried", "too_old", "future", "dry_run", "skipped"), 0)

    @property
    def mode(self) -> str:
        return "live" if self.client is not None else "dry_run"

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self.backoff_cap, self.backoff_base * 2**attempt)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.retry_after_cap))
        return delay

    def send(self, rows: list[dict]) -> list[dict]:
        """All rows, updated (new dicts, same order); the input is not modified."""
        out: list[dict] = []
        for row in rows:
            r = dict(row)
            out.append(r)
            if r["status"] not in SENDABLE:
                continue
            ts = int(r["timestamp"])
            if ts < self.oldest_ok:
                r["status"] = "too_old"
                r["last_error"] = f"day {r['day']} is older than Stripe accepts ({EDGE_LOOKBACK_DAYS} days); not sent"
                self.stats["too_old"] += 1
                continue
            if ts > self.now_ts + CLOCK_SLACK_S:
                r["status"] = "future"
                r["last_error"] = f"timestamp {ts} is more than {CLOCK_SLACK_S // 60} minutes ahead of now ({self.now_ts}); sent once it is due"
                self.stats["future"] += 1
                continue
            if self.client is None:
                if r["status"] in ("pending", "future"):
                    r["status"], r["last_error"] = "dry_run", None
                self.stats["dry_run"] += 1
                continue
            if self.aborted:
                self.stats["skipped"] += 1
                continue
            self._post(r, ts)
        return out

    def _post(self, r: dict, ts: int) -> None:
        import stripe

        params = {
            "event_name": r["event_name"],
            "payload": {"stripe_customer_id": r["stripe_customer_id"], "value": str(int(r["value"]))},
            "identifier": r["identifier"],
            "timestamp": ts,
        }
        r["attempts"] = int(r.get("attempts") or 0) + 1
        for attempt in range(self.retries + 1):
            self.stats["posted"] += 1
            try:
                event = self.client.v1.billing.meter_events.create(params=params, options={"idempotency_key": r["identifier"]})
            except stripe.RateLimitError as e:
                if attempt < self.retries:
                    self.stats["retried"] += 1
                    self.sleep(self.backoff(attempt, _retry_after(e)))
                    continue
                self._failed(r, e, retryable=True)
            except (stripe.AuthenticationError, stripe.PermissionError) as e:
                # a wrong or restricted key fails every event alike: stop instead of failing them all
                self._failed(r, e, retryable=False)
                self.aborted = True
                if self.log:
                    self.log(f"Stripe refused the API key ({r['last_error']}); nothing more is sent this run")
            except (stripe.APIConnectionError, stripe.APIError) as e:
                # the library already retried these (5xx, timeouts, connection errors)
                self._failed(r, e, retryable=True)
            except stripe.StripeError as e:
                status = getattr(e, "http_status", None) or 0
                self._failed(r, e, retryable=status >= 500 or status in (409, 429))
            else:
                r["status"], r["last_error"] = "sent", None
                r["stripe_response_id"] = getattr(event, "id", None) or getattr(event, "identifier", None) or r["identifier"]
                self.stats["sent"] += 1
                self.consecutive_errors = 0
            return

    def _failed(self, r: dict, e: Exception, *, retryable: bool) -> None:
        r["status"], r["last_error"] = "failed", _error_text(e)
        self.stats["failed"] += 1
        if not retryable:
            self.consecutive_errors = 0  # a bad row, not a bad API: carry on with the rest
            return
        self.consecutive_errors += 1
        if self.max_consecutive_errors and self.consecutive_errors >= self.max_consecutive_errors:
            self.aborted = True
            if self.log:
                self.log(f"Stripe failed {self.consecutive_errors} events in a row ({r['last_error']}); the remaining events wait for the next run")


def send_outbox(
    rows: list[dict],
    client: Any | None,
    *,
    now: datetime,
    max_age_days: int = EDGE_LOOKBACK_DAYS,
    rate_limit_retries: int = 4,
    sleep: Callable[[float], None] = time.sleep,
    **sender_options: Any,
) -> list[dict]:
    """Send the pending, failed, dry-run and future rows of one outbox; return all rows updated (new
    dicts, same order). See :class:`Sender` for statuses, retries and limits."""
    return Sender(client, now=now, max_age_days=max_age_days, retries=rate_limit_retries, sleep=sleep, **sender_options).send(rows)
