"""ISO 4217 currencies: the codes a postback may name, and each one's minor unit.

From the iso4217 package's copy of the maintenance agency's table. Only entries with a minor unit
are money a network pays in: the table's codes without one (XAU and the other metals, bond-market
units, XDR, XTS for tests, XXX for "no currency") are refused like any three letters."""
from __future__ import annotations

from iso4217 import Currency

MINOR_UNITS: dict[str, int] = {c.code: c.exponent for c in Currency if c.exponent is not None}


def is_currency(code: str) -> bool:
    """`code` (upper case) is an ISO 4217 currency."""
    return code in MINOR_UNITS


def minor_unit(code: str) -> int:
    """Digits after the decimal point of `code`'s minor unit (2 for a code not in the table)."""
    return MINOR_UNITS.get(code.upper(), 2)
