"""The customer API over HTTP: Starlette routes the receiver's server mounts beside its own endpoints.

``billing remote-write serve`` builds them here and hands them to
``ingest.remote_write.server.create_app(config, extra_routes=...)``: the server knows nothing of
billing (ingest/ imports no billing/ or operations/ module), this module knows nothing of the
receiver. Endpoints (JSON in and out; errors are ``{"error": message, "param": name}``):

- ``GET /v1/billing/usage?start_date=YYYY-MM-DD&end_date=YYYY-MM-DD``: the customer's usage by
  meter and day (``operations.usage_api.usage``);
- ``GET /v1/billing/usage/current-period``: the open month to date, allowances used and the
  projected invoice (``operations.usage_api.current_period``);
- ``POST /v1/billing/portal`` ``{"return_url": ...}``: a Stripe customer portal session URL.

Every request carries ``Authorization: Bearer <the customer's API key>``; the key's SHA-256 is looked
up in seeds/api_keys.csv (reloaded when it changes) and the answer is about that customer only: no
endpoint takes a customer id. 401 without a known key, 403 for a customer with no subscription, 400
for a bad parameter (named), 503 when the server cannot answer now (key file invalid, busy, Stripe
not configured). Work runs in a small thread pool, off the receiver's event loop; over
``max_pending`` requests at once the API answers 503 rather than queueing.

Failed authentications (a missing or unknown key) are counted per client address: after
``max_auth_failures`` of them within ``auth_failure_window_s``, every request of that address gets
429 with ``Retry-After`` (the seconds until its oldest counted failure leaves the window), its right
key included, so an address cannot go on trying keys; other addresses are not affected.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from billing_dags.core.calendar import utc_today
from billing_dags.core.errors import InputError
from billing_dags.core.settings import Paths
from billing_dags.operations import usage_api
from billing_dags.operations.usage_api import ApiError
from billing_dags.seeds.api_keys import ApiKeys, api_keys_file, load_api_keys

log = logging.getLogger("billing_dags.customer_api")

USAGE_PATH = "/v1/billing/usage"
CURRENT_PATH = "/v1/billing/usage/current-period"
PORTAL_PATH = "/v1/billing/portal"
#: the largest portal request body (it holds one URL)
MAX_PORTAL_BODY = 8 << 10
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="billing"'}


@dataclass
class CustomerApiConfig:
    paths: Paths
    #: Stripe secret key for portal sessions; None: the portal answers 503
    stripe_api_key: str | None = None
    #: Stripe API address (a local test server, a proxy); None: Stripe's own
    stripe_api_base: str | None = None
    #: where Stripe sends the customer back when the request names no return_url
    default_return_url: str | None = None
    #: requests computed at once; more wait for a thread
    threads: int = 2
    #: requests being computed or waiting at once before answering 503
    max_pending: int = 16
    today: Callable[[], date] = field(default=utc_today)
    #: failed authentications a client address may make within auth_failure_window_s before it gets 429
    max_auth_failures: int = 20
    auth_failure_window_s: float = 60.0

    @classmethod
    def from_env(cls, paths: Paths, **kw) -> CustomerApiConfig:
        return cls(paths, stripe_api_key=os.environ.get("STRIPE_API_KEY") or None, stripe_api_base=os.environ.get("STRIPE_API_BASE") or None, **kw)


class _KeyCache:
    """seeds/api_keys.csv, reloaded when it (or customers.csv) changes."""

    def __init__(self, paths: Paths):
        self.paths = paths
        self._stamp: tuple | None = None
        self._keys: ApiKeys | None = None

    def get(self) -> ApiKeys:
        files = (api_keys_file(self.paths.seeds_dir), self.paths.seeds_dir / "customers.csv")
        stamp = tuple(f.stat().st_mtime_ns if f.exists() else None for f in files)
        if stamp != self._stamp or self._keys is None:
            self._keys = load_api_keys(self.paths.seeds_dir)
            self._stamp = stamp
        return self._keys


class AuthFailures:
    """Failed authentications per client address in a sliding window of ``window_s`` seconds. At most
    ``max_clients`` addresses are remembered (the one whose last failure is oldest is forgotten first), so
    the memory is bounded whatever the number of addresses. Used from the event loop only."""

    def __init__(self, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic, max_clients: int = 100_000):
        self.limit, self.window_s, self.clock, self.max_clients = limit, window_s, clock, max_clients
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, client: str) -> deque[float]:
        failures = self._failures.get(client) or deque()
        oldest_kept = self.clock() - self.window_s
        while failures and failures[0] <= oldest_kept:
            failures.popleft()
        return failures

    def retry_after(self, client: str) -> int | None:
        """Whole seconds until ``client`` may try again; None when it may now."""
        failures = self._recent(client)
        if len(failures) < self.limit:
            return None
        return max(1, math.ceil(failures[-self.limit] + self.window_s - self.clock()))

    def failed(self, client: str) -> None:
        failures = self._recent(client)
        failures.append(self.clock())
        self._failures.pop(client, None)
        self._failures[client] = failures
        if len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)


def _error(status: int, message: str, param: str | None = None, **headers) -> JSONResponse:
    body = {"error": message}
    if param is not None:
        body["param"] = param
    return JSONResponse(body, status_code=status, headers=headers or None)


def customer_routes(config: CustomerApiConfig) -> list[Route]:
    """The customer API's routes, to mount on the receiver's app."""
    keys = _KeyCache(config.paths)
    pool = ThreadPoolExecutor(config.threads, thread_name_prefix="customer-api")
    state = {"pending": 0}

    failures = AuthFailures(config.max_auth_failures, config.auth_failure_window_s)

    def authenticate(request: Request) -> str | JSONResponse:
        client = request.client.host if request.client else ""
        wait = failures.retry_after(client)
        if wait is not None:
            return _error(
                429,
                f"too many requests with a missing or invalid API key from this address (over {config.max_auth_failures} in "
                f"{config.auth_failure_window_s:g} s); retry in {wait} s with a valid key",
                **{"Retry-After": str(wait)},
            )
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return refused(client, "send Authorization: Bearer <your API key>")
        try:
            customer = keys.get().customer_of(key)
        except InputError as e:
            log.error("customer API refused: the key file cannot be used: %s", e)
            return _error(503, "the usage API is not configured on this server (its key file is invalid); retry later")
        if customer is None:
            return refused(client, "the API key is not valid; check it, or ask support for a new one")
        return customer

    def refused(client: str, message: str) -> JSONResponse:
        failures.failed(client)
        if failures.retry_after(client) is not None:
            window = config.auth_failure_window_s
            log.warning("customer API: %s failed to authenticate %s times in %g s; 429 for a while", client, config.max_auth_failures, window)
        return _error(401, message, **_CHALLENGE)

    answers = usage_api.AnswerCache()

    def cached(endpoint: str, customer: str, start: date, end: date, today: date) -> dict:
        """The answer of ``endpoint``, recomputed only when a file it reads has changed."""
        key = (endpoint, customer, start, end, today, usage_api.inputs_stamp(config.paths, start, end))
        if endpoint == "usage":
            return answers.get(key, lambda: usage_api.usage(config.paths, customer, start, end, today))
        return answers.get(key, lambda: usage_api.current_period(config.paths, customer, today))

    async def run(fn, *args) -> Response:
        if state["pending"] >= config.max_pending:
            return _error(503, f"over {config.max_pending} usage requests at once; retry in a moment", **{"Retry-After": "1"})
        state["pending"] += 1
        try:
            doc = await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        except ApiError as e:
            return _error(e.status, str(e), e.param)
        except InputError as e:  # seeds or warehouse state the customer cannot fix: say what, not a 500
            log.error("customer API: %s", e)
            return _error(503, "usage cannot be computed right now (the warehouse or seeds need attention); retry later")
        except OSError as e:
            log.error("customer API: reading the warehouse failed: %s", e)
            return _error(503, "the warehouse could not be read; retry later")
        finally:
            state["pending"] -= 1
        return JSONResponse(doc)

    async def usage(request: Request) -> Response:
        customer = authenticate(request)
        if isinstance(customer, Response):
            return customer
        today = config.today()
        try:
            start, end = usage_api.parse_range(request.query_params.multi_items(), today)
        except ApiError as e:
            return _error(e.status, str(e), e.param)
        return await run(cached, "usage", customer, start, end, today)

    async def current_period(request: Request) -> Response:
        customer = authenticate(request)
        if isinstance(customer, Response):
            return customer
        if request.query_params:
            name = next(iter(request.query_params))
            return _error(400, f"unknown parameter {name[:40]!r}; current-period takes no parameters (for a range use {USAGE_PATH})", name[:40])
        today = config.today()
        return await run(cached, "current_period", customer, today, today, today)

    async def portal(request: Request) -> Response:
        customer = authenticate(request)
        if isinstance(customer, Response):
            return customer
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_PORTAL_BODY:
            return _error(413, f'body over {MAX_PORTAL_BODY} bytes; send {{"return_url": "https://..."}}', Connection="close")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_PORTAL_BODY:
                return _error(413, f'body over {MAX_PORTAL_BODY} bytes; send {{"return_url": "https://..."}}')
        try:
            doc = json.loads(body) if body.strip() else {}
        except (ValueError, RecursionError):
            return _error(400, 'the body is not JSON; send {"return_url": "https://example.com/billing"} (or nothing)')
        if not isinstance(doc, dict):
            return _error(400, 'the body must be a JSON object, e.g. {"return_url": "https://example.com/billing"}')
        unknown = sorted(set(doc) - {"return_url"})
        if unknown:
            return _error(400, f"unknown field {unknown[0][:40]!r}; the body takes return_url only", unknown[0][:40])
        return await run(_portal_session, config, customer, doc.get("return_url"))

    return [
        Route(USAGE_PATH, usage, methods=["GET"]),
        Route(CURRENT_PATH, current_period, methods=["GET"]),
        Route(PORTAL_PATH, portal, methods=["POST"]),
    ]


def _portal_session(config: CustomerApiConfig, customer_id: str, return_url) -> dict:
    from billing_dags.stripe.portal import PortalError, check_return_url, create_portal_session
    from billing_dags.stripe.sender import make_client

    acct = usage_api.account(config.paths, customer_id)
    if return_url is None:
        return_url = config.default_return_url
    if return_url is not None:
        try:
            return_url = check_return_url(return_url)
        except InputError as e:
            raise ApiError(400, str(e), "return_url") from None
    if not acct["stripe_customer_id"]:
        raise ApiError(409, f"customer {customer_id} has no Stripe customer yet, so there is no billing portal; ask support to link the account")
    if not config.stripe_api_key:
        raise ApiError(503, "the billing portal is not configured on this server (no Stripe API key: set STRIPE_API_KEY where it runs)")
    client = make_client(config.stripe_api_key, config.stripe_api_base, max_network_retries=1, timeout_s=15)
    try:
        session = create_portal_session(client, acct["stripe_customer_id"], return_url)
    except PortalError as e:
        log.error("portal session for %s failed: %s", customer_id, e)
        raise ApiError(e.status, str(e)) from None
    return {"object": "billing_portal.session", "customer_id": customer_id, "url": session.url, "return_url": session.return_url}
