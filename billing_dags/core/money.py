"""Money as integer minor units: formatting an amount with its currency's exact number of digits."""

from __future__ import annotations

from decimal import Decimal

from billing_dags.core.errors import InputError


def format_minor(amount_minor: int, exponent: int) -> str:
    """Integer minor units as a decimal string with exactly ``exponent`` digits (1230, 2 -> ``12.30``)."""
    if isinstance(amount_minor, Decimal) and amount_minor.is_finite() and amount_minor == amount_minor.to_integral_value():
        amount_minor = int(amount_minor)
    if isinstance(amount_minor, bool) or not isinstance(amount_minor, int):
        raise InputError(f"amount_minor: {amount_minor!r} is not a whole number of minor units")
    return _minor_text(amount_minor, exponent)


def _minor_text(amount_minor: int, exponent: int) -> str:
    """``format_minor`` of an int."""
    if exponent < 0:
        raise InputError(f"minor unit exponent {exponent} must not be negative")
    sign = "-" if amount_minor < 0 else ""
    whole, frac = divmod(abs(amount_minor), 10**exponent)
    return f"{sign}{whole}" if exponent == 0 else f"{sign}{whole}.{frac:0{exponent}d}"
