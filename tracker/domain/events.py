"""Events out: the types, their payloads, the envelope and the feed's cursor. Pure code.

A cursor is the event's place in feed order (its sequencer number) as 12 URL-safe characters;
clients treat it as opaque. `START` (0) comes before every event.
"""
from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import fields
from datetime import datetime
from decimal import Decimal
from typing import Any, TypedDict

from .conversions import Conversion, conversion_json
from .times import iso

CONVERSION_CREATED = "conversion.created"
CONVERSION_STATUS_CHANGED = "conversion.status_changed"
# Besides the status moves: a conversion's money changed without one (a pending order's
# commission corrected, an approved one partly returned), so that a ledger never pays out on an
# amount the network has since lowered.
CONVERSION_AMOUNT_CHANGED = "conversion.amount_changed"
CLICK_OVERWRITTEN = "click.overwritten"
POSTBACK_ORPHANED = "postback.orphaned"
TYPES = (CONVERSION_CREATED, CONVERSION_STATUS_CHANGED, CONVERSION_AMOUNT_CHANGED, CLICK_OVERWRITTEN,
         POSTBACK_ORPHANED)

_CURSOR = struct.Struct(">BQ")  # version, seq
_CURSOR_VERSION = 1
CURSOR_LENGTH = 12  # base64 of 9 bytes


class BadCursor(ValueError):
    pass


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(_CURSOR.pack(_CURSOR_VERSION, seq)).decode()


START = encode_cursor(0)


def decode_cursor(cursor: str) -> int:
    """The position of a cursor this service handed out; BadCursor for anything else."""
    if len(cursor) != CURSOR_LENGTH or not cursor.isascii():
        raise BadCursor("not a cursor of this feed")
    try:
        raw = base64.urlsafe_b64decode(cursor)
    except (binascii.Error, ValueError):
        raise BadCursor("not a cursor of this feed") from None
    if len(raw) != _CURSOR.size:
        raise BadCursor("not a cursor of this feed")
    version: int
    seq: int
    version, seq = _CURSOR.unpack(raw)
    # One position, one spelling; PostgreSQL's bigint is signed 64-bit.
    if version != _CURSOR_VERSION or seq >= 2**63 or encode_cursor(seq) != cursor:
        raise BadCursor("not a cursor of this feed")
    return seq


_CONVERSION_FIELDS = tuple(f.name for f in fields(Conversion))


def conversion_payload(conv: Conversion) -> dict[str, Any]:
    """An event's `data.conversion` (docs/api.md)."""
    return conversion_json({name: getattr(conv, name) for name in _CONVERSION_FIELDS})


def money_payload(amount: Decimal | None, commission: Decimal, currency: str, cashback: Decimal) -> dict[str, Any]:
    """An event's `data.previous`: the money a conversion had before it changed."""
    return conversion_json({"amount": amount, "commission": commission, "currency": currency, "cashback": cashback})


def conversion_key(conversion_id: int) -> str:
    return f"conversion:{conversion_id}"


class Envelope(TypedDict):
    """An event as the feed answers it and a webhook receives it (docs/api.md)."""
    id: str
    type: str
    created_at: str  # ISO 8601, UTC
    cursor: str
    data: dict[str, Any]


def envelope(public_id: str, type_: str, created_at: datetime, cursor: str, data: dict[str, Any]) -> Envelope:
    return {"id": public_id, "type": type_, "created_at": iso(created_at), "cursor": cursor, "data": data}
