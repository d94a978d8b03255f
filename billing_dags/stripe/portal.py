"""Stripe customer portal sessions: ``POST /v1/billing_portal/sessions`` with ``customer`` and ``return_url``.

A session is short-lived (Stripe expires it if the customer does not visit its URL): one is created
each time a customer asks for one, never stored. The caller decides who the customer is; this module
only talks to Stripe, through the client ``stripe.sender.make_client`` builds (STRIPE_API_KEY,
STRIPE_API_BASE).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from billing_dags.core.errors import InputError
from billing_dags.stripe.sender import _error_text

#: the longest return_url accepted (Stripe's own limit is larger; a longer one is a mistake here)
MAX_RETURN_URL = 2048


class PortalError(Exception):
    """Stripe did not create the session: ``status`` is what the caller should answer (502, 503)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class PortalSession:
    id: str
    url: str
    return_url: str | None


def check_return_url(value: object) -> str:
    """An absolute http(s) URL, else an InputError naming return_url and the fix."""
    if not isinstance(value, str) or not value:
        raise InputError('return_url must be a string: the absolute URL Stripe sends the customer back to, e.g. "https://example.com/billing"')
    if len(value) > MAX_RETURN_URL or any(ord(c) < 33 for c in value):
        raise InputError(f"return_url must be an absolute URL of at most {MAX_RETURN_URL} characters without spaces or control characters")
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise InputError(f'return_url {value[:100]!r} is not an absolute http(s) URL; give e.g. "https://example.com/billing"')
    return value


def create_portal_session(client, stripe_customer_id: str, return_url: str | None) -> PortalSession:
    """A new portal session of ``stripe_customer_id``; PortalError when Stripe refuses or cannot be reached."""
    import stripe

    params = {"customer": stripe_customer_id}
    if return_url:
        params["return_url"] = return_url
    try:
        session = client.v1.billing_portal.sessions.create(params=params)
    except stripe.AuthenticationError as e:
        raise PortalError(503, f"the billing portal is unavailable: Stripe refused the server's API key ({_error_text(e)})") from None
    except stripe.InvalidRequestError as e:
        raise PortalError(502, f"Stripe did not create a portal session: {_error_text(e)}") from None
    except stripe.StripeError as e:
        raise PortalError(503, f"Stripe could not be reached or failed; retry in a moment ({_error_text(e)})") from None
    return PortalSession(session.id, session.url, getattr(session, "return_url", None))
