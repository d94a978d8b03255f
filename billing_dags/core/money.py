"""Exact money and quantities: parsing to ``Decimal`` or integer minor units, and formatting as plain decimal strings.

No float ever becomes an amount: a float is refused with a message saying what to pass instead.
Strings never use exponent notation. Every error is a ``MoneyError`` naming the value; ``what``
(a string, or a function returning one, called only when the message is needed) says where it is.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

from billing_dags.core.errors import InputError

#: where a value comes from, for the message: text, or a function building it (only on an error)
What = str | Callable[[], str]


class MoneyError(InputError):
    """An amount or quantity that is not an exact number; the message names the value and what to pass."""


def _where(what: What) -> str:
    return what if isinstance(what, str) else what()


def parse_decimal(value: Any, what: What) -> Decimal:
    """An exact finite Decimal from Decimal, int or a decimal string; floats are refused."""
    if type(value) is Decimal and value.is_finite():
        return value
    if isinstance(value, bool):
        raise MoneyError(f"{_where(what)}: {value!r} is a boolean, not a number")
    if isinstance(value, Decimal):
        d = value
    elif isinstance(value, int):
        d = Decimal(value)
    elif isinstance(value, str):
        try:
            d = Decimal(value.strip())
        except InvalidOperation:
            raise MoneyError(f"{_where(what)}: {value!r} is not a decimal number") from None
    elif isinstance(value, float):
        raise MoneyError(f"{_where(what)}: {value!r} is a float; pass a Decimal, an int or a decimal string (money is exact)")
    else:
        raise MoneyError(f"{_where(what)}: {value!r} ({type(value).__name__}) is not a decimal number")
    if not d.is_finite():
        raise MoneyError(f"{_where(what)}: {value!r} is not a finite number")
    return d


def parse_minor(value: Any, what: What) -> int:
    """Integer minor units from an int or an integral Decimal (or decimal string)."""
    if type(value) is int:
        return value
    if isinstance(value, bool):
        raise MoneyError(f"{_where(what)}: {value!r} is a boolean, not an amount")
    if isinstance(value, int):
        return value
    d = parse_decimal(value, what)
    if d != d.to_integral_value():
        raise MoneyError(f"{_where(what)}: {value!r} is not a whole number of minor units")
    return int(d)


def format_decimal(value: Any, what: What = "value") -> str:
    """Exact plain decimal string without needless trailing zeros and never in exponent notation."""
    d = parse_decimal(value, what)
    if d == 0:
        return "0"
    s = format(d, "f")  # exact: no context rounding without a precision
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return s


def format_price(value: Any, exponent: int, what: What = "value") -> str:
    """A unit price: exact, with at least the currency's minor digits (``0.10``, ``0.0001``, ``10.00``)."""
    s = format_decimal(value, what)
    if exponent <= 0:
        return s
    whole, _, frac = s.partition(".")
    if len(frac) < exponent:
        frac = frac + "0" * (exponent - len(frac))
    return f"{whole}.{frac}"


def format_minor(amount_minor: int, exponent: int) -> str:
    """Integer minor units as a decimal string with exactly ``exponent`` digits (1230, 2 -> ``12.30``)."""
    if type(amount_minor) is not int:
        if isinstance(amount_minor, Decimal) and amount_minor.is_finite() and amount_minor == amount_minor.to_integral_value():
            amount_minor = int(amount_minor)
        if isinstance(amount_minor, bool) or not isinstance(amount_minor, int):
            raise MoneyError(f"amount_minor: {amount_minor!r} is not a whole number of minor units")
    if exponent < 0:
        raise MoneyError(f"minor unit exponent {exponent} must not be negative")
    sign = "-" if amount_minor < 0 else ""
    whole, frac = divmod(abs(amount_minor), 10**exponent)
    return f"{sign}{whole}" if exponent == 0 else f"{sign}{whole}.{frac:0{exponent}d}"
