"""GET /v1/events: the outbox as a pull feed (scope events:read), in cursor order, oldest first."""
from __future__ import annotations

from aiohttp import web

from .. import keys
from ..domain.access import EVENTS_READ
from ..domain.events import START, TYPES, BadCursor, decode_cursor, encode_cursor
from ..errors import BadRequest
from ..store.events import read_feed
from .access import authorize
from .common import json_response, one

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 4 and 1 <= int(raw) <= MAX_LIMIT):
        raise BadRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}", code="bad_limit")
    return int(raw)


def _types(raw: str | None) -> list[str] | None:
    if raw is None:
        return None
    names = raw.split(",")
    unknown = [t for t in names if t not in TYPES]
    if unknown:
        raise BadRequest(f"types: {unknown[0][:60]!r} is not one of {', '.join(TYPES)}", code="bad_types")
    return sorted(set(names))


async def events_feed(request: web.Request) -> web.Response:
    app = request.app
    await authorize(request, EVENTS_READ)
    after_raw = one(request, "after")
    try:
        after = decode_cursor(after_raw if after_raw is not None else START)
    except BadCursor:
        raise BadRequest("after: not a cursor this feed handed out", code="bad_cursor") from None
    limit, types = _limit(one(request, "limit")), _types(one(request, "types"))
    events, position = await read_feed(app[keys.POOL], after, limit, types)
    # Caught up: no events and `next` is `after` exactly as given (a cursor has one spelling).
    return json_response({"events": events, "next": encode_cursor(position)})
