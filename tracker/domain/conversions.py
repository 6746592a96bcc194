"""Postbacks read through a network profile, the conversion status machine, and cashback.

Pure code: money is Decimal from the first character to the last, never float.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Mapping

from .profiles import Profile

MAX_ID = 128
MAX_AMOUNT = Decimal("1e12")  # more than any real order; anything above is a broken macro
_DECIMAL = re.compile(r"[+]?\d{1,13}(\.\d{1,8})?")
_CURRENCY = re.compile(r"[A-Za-z]{3}")
# ISO 4217 currencies whose minor unit is not 2 digits.
_MINOR_UNITS = {"BIF": 0, "CLP": 0, "DJF": 0, "GNF": 0, "ISK": 0, "JPY": 0, "KMF": 0, "KRW": 0,
                "PYG": 0, "RWF": 0, "UGX": 0, "UYI": 0, "VND": 0, "VUV": 0, "XAF": 0, "XOF": 0,
                "XPF": 0, "BHD": 3, "IQD": 3, "JOD": 3, "KWD": 3, "LYD": 3, "OMR": 3, "TND": 3,
                "CLF": 4, "UYW": 4}
# Allowed moves; anything else (a late pending after approved, anything after declined or
# reversed) is kept in the history and changes nothing.
FORWARD = {("pending", "approved"), ("pending", "declined"), ("approved", "reversed")}


class MalformedPostback(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Postback:
    click_id: str | None
    order_id: str
    status: str
    status_word: str
    amount: Decimal | None
    commission: Decimal
    currency: str
    order_time: datetime | None


def _field(params: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    for name in names:
        value = params.get(name)
        if value is not None and value.strip() != "":
            return value.strip()
    return None


def parse_money(raw: str, name: str) -> Decimal:
    if not _DECIMAL.fullmatch(raw):
        raise MalformedPostback(f"{name}: {raw[:40]!r} is not a non-negative decimal number")
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise MalformedPostback(f"{name}: not a number") from None
    if not value.is_finite() or value < 0 or value >= MAX_AMOUNT:
        raise MalformedPostback(f"{name}: {raw[:40]!r} is out of range")
    return value


def parse_time(raw: str, fmt: str) -> datetime:
    if fmt in ("unix", "auto") and re.fullmatch(r"\d{9,13}(\.\d+)?", raw):
        seconds = float(raw)
        if seconds > 1e11:  # milliseconds
            seconds /= 1000
        return datetime.fromtimestamp(seconds, tz=timezone.utc)
    if fmt in ("iso8601", "auto"):
        text = raw.replace(" ", "T", 1) if re.match(r"\d{4}-\d\d-\d\d \d", raw) else raw
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    raise MalformedPostback(f"order_time: {raw[:40]!r} is not a {fmt} time")


def read_postback(params: Mapping[str, str], profile: Profile, default_currency: str = "USD") -> Postback:
    """The canonical postback from a network's parameters (names already lower-cased)."""
    p = profile.params
    order_id = _field(params, p["order_id"])
    if order_id is None:
        raise MalformedPostback("order id is missing")
    if len(order_id) > MAX_ID or not order_id.isprintable():
        raise MalformedPostback("order id is too long or not printable")
    word = _field(params, p["status"])
    if word is None:
        raise MalformedPostback("status is missing")
    status = profile.statuses.get(word.lower())
    if status is None:
        raise MalformedPostback(f"status: {word[:40]!r} is not a status word of {profile.name}")
    # A network that reports no commission (some generic set-ups) pays none we know of: 0, shown
    # as a zero-commission order, corrected by any later postback that carries one.
    raw_commission = _field(params, p["commission"])
    commission = parse_money(raw_commission, "commission") if raw_commission is not None else Decimal(0)
    raw_amount = _field(params, p["amount"])
    amount = parse_money(raw_amount, "amount") if raw_amount is not None else None
    currency = (_field(params, p["currency"]) or default_currency).upper()
    if not _CURRENCY.fullmatch(currency):
        raise MalformedPostback(f"currency: {currency[:10]!r} is not an ISO 4217 code")
    raw_time = _field(params, p["order_time"])
    order_time = parse_time(raw_time, profile.time) if raw_time is not None else None
    click_id = _field(params, p["click_id"])
    return Postback(click_id=click_id[:MAX_ID] if click_id else None, order_id=order_id,
                    status=status, status_word=word[:64], amount=amount, commission=commission,
                    currency=currency, order_time=order_time)


def minor_unit(currency: str) -> int:
    return _MINOR_UNITS.get(currency.upper(), 2)


def cashback(commission: Decimal, user_share: Decimal, currency: str, status: str) -> Decimal:
    """What the user is owed: commission x share, rounded half-up to the currency's minor unit;
    nothing for a declined or reversed order."""
    quantum = Decimal(1).scaleb(-minor_unit(currency))
    if status in ("declined", "reversed"):
        return Decimal(0).quantize(quantum)
    return (commission * user_share).quantize(quantum, rounding=ROUND_HALF_UP)


def transition(current: str, new: str) -> str:
    """'same', 'forward' or 'ignored' for a postback saying `new` about an order at `current`."""
    if current == new:
        return "same"
    if (current, new) in FORWARD:
        return "forward"
    return "ignored"


def money(value: Decimal | None, currency: str | None = None) -> str | None:
    """A decimal string for JSON: at the currency's minor unit when that loses nothing (\"12.50\"),
    else every significant digit."""
    if value is None:
        return None
    if currency:
        quantum = Decimal(1).scaleb(-minor_unit(currency))
        fixed = value.quantize(quantum)
        if fixed == value:
            return format(fixed, "f")
    return format(value.normalize(), "f")
