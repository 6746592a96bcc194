"""Postbacks read through a network profile, the conversion status machine, and cashback.

Pure code: money is Decimal from the first character to the last, never float.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, Mapping

from .clickid import is_click_id
from .currencies import is_currency, minor_unit
from .networks import Network
from .profiles import Profile, profiles
from .times import iso

MAX_ID = 128
MAX_AMOUNT = Decimal("1e12")  # more than any real order; anything above is a broken macro
# Money is ASCII digits with at most one dot: `\d` would also take other scripts' digits (١٢ is 12 to
# Decimal), and a sign or an exponent is never what a network meant.
_DECIMAL = re.compile(r"[0-9]{1,13}(\.[0-9]{1,8})?")
_UNIX_TIME = re.compile(r"[0-9]{9,13}(\.[0-9]{1,6})?")
_ISO_DAY_SPACE_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]")
# An order time outside these bounds is a broken macro, not an order; PostgreSQL could not even
# store some of what datetime parses (9999-12-31T23:59:59-14:00 is past year 9999 in UTC).
EARLIEST_ORDER = datetime(2000, 1, 1, tzinfo=timezone.utc)
LATEST_ORDER = datetime(2100, 1, 1, tzinfo=timezone.utc)
_SPACE = " \t\r\n"  # only ASCII blanks are trimmed: "12\u00a0" is not a number a network sent
_CURRENCY = re.compile(r"[A-Za-z]{3}", re.ASCII)
DEFAULT_CURRENCY = "USD"  # the currency of a postback that names none
# Orphans that reconcile never attaches, however the click or the merchants file changes: the order
# is another offer's, not a click that was late.
NEVER_ATTACHED = frozenset({"wrong_offer"})
# Allowed moves; anything else (a late pending after approved, anything after declined or
# reversed) is kept in the history and changes nothing.
FORWARD = {("pending", "approved"), ("pending", "declined"), ("approved", "reversed")}


class MalformedPostback(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Terms:
    """What a conversion says now: the values a postback may change."""
    status: str
    amount: Decimal | None
    commission: Decimal
    currency: str


@dataclass(frozen=True, slots=True)
class Conversion:
    """An order attributed to a click, as it stands after a postback: what an event tells of it
    (data.conversion, domain/events.conversion_payload)."""
    network: str
    order_id: str
    click_id: str
    user_id: str
    merchant: str
    status: str  # pending | approved | declined | reversed
    amount: Decimal | None
    commission: Decimal
    currency: str
    cashback: Decimal  # what the user is owed
    order_time: datetime | None


@dataclass(frozen=True, slots=True)
class Postback:
    click_id: str | None
    order_id: str
    status: str
    status_word: str
    amount: Decimal | None
    commission: Decimal | None  # None: the postback does not say
    currency: str | None  # None: the postback does not say
    order_time: datetime | None
    offer_id: str | None = None  # the network's offer the order belongs to, where its profile reads one

    def terms(self, current: Terms | None) -> Terms:
        """The conversion's terms once this postback applies. What it leaves out stays as it was; a
        new conversion without them has commission 0 (a network that reports none pays none we know
        of, corrected by any later postback that carries one) in DEFAULT_CURRENCY."""
        if current is None:
            return Terms(self.status, self.amount, Decimal(0) if self.commission is None else self.commission,
                         self.currency or DEFAULT_CURRENCY)
        return Terms(self.status, current.amount if self.amount is None else self.amount,
                     current.commission if self.commission is None else self.commission,
                     self.currency or current.currency)


def _field(params: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    """The value of a field the profile reads under several names: the one given, trimmed of ASCII
    blanks. Two of its names with different values are two meanings: refused."""
    found = None
    for name in names:
        value = params.get(name)
        if value is None or value.strip(_SPACE) == "":
            continue
        value = value.strip(_SPACE)
        if found is not None and value != found:
            raise MalformedPostback(f"{'/'.join(names)}: given twice with different values")
        found = value
    return found


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
    """An order time (unix seconds or milliseconds, or ISO 8601) between EARLIEST_ORDER and
    LATEST_ORDER."""
    parsed: datetime | None = None
    if not raw.isascii():
        pass
    elif fmt in ("unix", "auto") and _UNIX_TIME.fullmatch(raw):
        seconds = float(raw)
        if seconds > 1e11:  # milliseconds
            seconds /= 1000
        parsed = datetime.fromtimestamp(seconds, tz=timezone.utc)
    elif fmt in ("iso8601", "auto"):
        text = raw.replace(" ", "T", 1) if _ISO_DAY_SPACE_TIME.match(raw) else raw
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            pass
        else:
            parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    if parsed is None:
        raise MalformedPostback(f"order_time: {raw[:40]!r} is not a {fmt} time")
    # Compared in UTC: the aware comparison never overflows, whatever the offset.
    if not EARLIEST_ORDER <= parsed < LATEST_ORDER:
        raise MalformedPostback(f"order_time: {raw[:40]!r} is out of range (years 2000 to 2099)")
    return parsed


def fold(name: str) -> str:
    """A parameter name as profiles spell them: ASCII letters lower-cased, nothing else folded
    ("to\u212aen", with a Kelvin sign, lower-cases to "token" and must not read as it)."""
    return name.lower() if name.isascii() else name


def read_raw(network: Network, raw: Mapping[str, Any]) -> Postback | None:
    """Re-read a stored raw postback (reconciliation); None if it no longer reads."""
    try:
        return read_postback({fold(k): str(v) for k, v in raw.items()}, profiles()[network.profile])
    except (MalformedPostback, KeyError):
        return None


def read_postback(params: Mapping[str, str], profile: Profile) -> Postback:
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
    # ASCII case folding only: "chargebac\u212a" (a Kelvin sign) must not read as "chargeback".
    status = profile.statuses.get(word.lower()) if word.isascii() else None
    if status is None:
        raise MalformedPostback(f"status: {word[:40]!r} is not a status word of {profile.name}")
    raw_commission = _field(params, p["commission"])
    commission = parse_money(raw_commission, "commission") if raw_commission is not None else None
    raw_amount = _field(params, p["amount"])
    amount = parse_money(raw_amount, "amount") if raw_amount is not None else None
    currency = _field(params, p["currency"])
    if currency is not None:
        if not _CURRENCY.fullmatch(currency) or not is_currency(currency.upper()):
            raise MalformedPostback(f"currency: {currency[:10]!r} is not an ISO 4217 currency code")
        currency = currency.upper()
    raw_time = _field(params, p["order_time"])
    order_time = parse_time(raw_time, profile.time) if raw_time is not None else None
    click_id = _field(params, p["click_id"])
    offer_id = _field(params, p["offer_id"])
    if offer_id is not None and (len(offer_id) > MAX_ID or not offer_id.isprintable()):
        raise MalformedPostback("offer id is too long or not printable")
    return Postback(click_id=click_id[:MAX_ID] if click_id else None, order_id=order_id,
                    status=status, status_word=word[:64], amount=amount, commission=commission,
                    currency=currency, order_time=order_time, offer_id=offer_id)


def orphan_reason(click_id: str | None, found: bool, bot: bool, merchant_network: str | None,
                  network: str, offer_id: str | None = None,
                  merchant_offers: frozenset[str] = frozenset()) -> str | None:
    """Why a postback cannot be attributed to the click it names, or None when it can. A network's
    credentials speak for that network's orders only: a click whose merchant reports through
    another network (or whose merchant is gone) is never theirs to convert. Nor is an order of an
    offer the click's merchant does not list: a shopper who puts one merchant's click id into
    another merchant's link on the same network would be paid at the first one's share. With no
    offer id on either side there is nothing to compare, and the check is skipped."""
    if not click_id:
        return "no_click_id"
    if not is_click_id(click_id):
        return "malformed_click_id"
    if not found:
        return "unknown_click"
    if bot:
        return "bot_click"
    if merchant_network != network:
        return "wrong_network"
    if offer_id is not None and merchant_offers and offer_id not in merchant_offers:
        return "wrong_offer"
    return None


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


def settle(current: Terms, pb: Postback) -> str:
    """What a postback about a known order does to it:

    - `moved`: a forward status move, with the postback's amounts;
    - `corrected`: same status, new amounts, while the order is pending (nothing is owed yet, and
      networks fix commissions before they confirm);
    - `adjusted`: same status after approval, commission and amount only lowered (a partial return);
    - `refused`: same status after approval with a higher commission or amount, another currency,
      or any change to a declined or reversed order: money owed never grows without a status move;
    - `duplicate`: nothing new; `ignored`: a backward or sideways status (a late pending).
    Whatever it is, the postback is kept in the history with the values it met."""
    move = transition(current.status, pb.status)
    if move == "ignored":
        return "ignored"
    if move == "forward":
        return "moved"
    new = pb.terms(current)
    if (new.commission, new.amount, new.currency) == (current.commission, current.amount, current.currency):
        return "duplicate"
    if current.status == "pending":
        return "corrected"
    lowered = (current.status == "approved" and new.currency == current.currency
               and new.commission <= current.commission
               and (current.amount is None or (new.amount is not None and new.amount <= current.amount)))
    return "adjusted" if lowered else "refused"


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


# A conversion's fields as every answer and event spells them (docs/api.md), in this order: money as
# decimal strings at the currency's minor unit (the user's share as a plain decimal), times in ISO
# 8601 UTC. Each answer carries the fields its rows have (an event no status_word, a user's click
# list only network, order, status and cashback).
_FIELDS = ("network", "order_id", "click_id", "user_id", "merchant", "status", "status_word", "amount",
           "commission", "currency", "user_share", "cashback", "order_time", "created_at", "updated_at")
_MONEY = ("amount", "commission", "cashback")
_TIMES = ("order_time", "created_at", "updated_at")


def conversion_json(conversion: Mapping[str, Any]) -> dict[str, Any]:
    """The one serializer of a conversion (the order lookup, the support view, a user's clicks, the
    events): the fields of `conversion` among _FIELDS, each written as its kind is."""
    out = {name: conversion[name] for name in _FIELDS if name in conversion}
    currency = out.get("currency")
    for name in _MONEY:
        if name in out:
            out[name] = money(out[name], currency)
    if "user_share" in out:
        out["user_share"] = money(out["user_share"])
    for name in _TIMES:
        if name in out:
            out[name] = iso(out[name])
    return out
