"""The error type of invoicing: input that cannot be invoiced."""

from __future__ import annotations

from billing_dags.core.errors import InputError


class InvoiceError(InputError):
    """Input that cannot be invoiced; the message names the input, the row and the fix."""
