"""The audit trail over HTTP: what handlers call to record a read or a change, and GET /v1/audit
(scope audit:read), newest first, a page at a time."""
from __future__ import annotations

from typing import Iterable

from aiohttp import web

from .. import keys
from ..domain.access import AUDIT_READ, Actor
from ..domain.text import has_control
from ..domain.times import iso
from ..domain.tokens import USER_ID
from ..errors import BadRequest
from ..store import audit
from .access import authorize
from .common import client_ip, json_response, one

MAX_ACTOR = 200
Subject = tuple[str | None, str | None, str | None]  # (user_id, click_id, order_id)


async def audited(request: web.Request, actor: Actor, action: str, subjects: Iterable[Subject] = ((None, None, None),)
                  ) -> None:
    """Record that `actor` did `action` to each subject, from the request's client address."""
    address = client_ip(request, request.app[keys.SETTINGS].trusted_proxies) or None
    entries = [audit.Entry(actor.name, action, address, u, c, o) for u, c, o in dict.fromkeys(subjects)]
    await audit.record(request.app[keys.POOL], entries)


def _limit(raw: str | None) -> int:
    if raw is None:
        return 50
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 3 and 1 <= int(raw) <= 200):
        raise BadRequest("limit must be a whole number from 1 to 200")
    return int(raw)


async def audit_view(request: web.Request) -> web.Response:
    actor = await authorize(request, AUDIT_READ)
    user_id, by, before_raw = one(request, "user_id"), one(request, "actor"), one(request, "before")
    if user_id is not None and not USER_ID.fullmatch(user_id):
        raise BadRequest("user_id is 1-64 characters of A-Z a-z 0-9 _ @ : . -")
    if by is not None and (not 0 < len(by) <= MAX_ACTOR or has_control(by)):
        raise BadRequest(f"actor must be 1 to {MAX_ACTOR} characters, no control characters")
    if before_raw is not None and not (before_raw.isascii() and before_raw.isdigit() and len(before_raw) <= 18):
        raise BadRequest("before must be the `next` of the previous page")
    limit = _limit(one(request, "limit"))
    await audited(request, actor, "audit.read", [(user_id, None, None)])
    rows = await audit.page(request.app[keys.POOL], user_id=user_id, actor=by,
                            before=None if before_raw is None else int(before_raw), limit=limit + 1)
    entries = [{"at": iso(r["at"]), "actor": r["actor"], "action": r["action"], "user_id": r["user_id"],
                "click_id": r["click_id"], "order_id": r["order_id"], "address": r["address"]} for r in rows[:limit]]
    return json_response({"entries": entries, "next": str(rows[limit - 1]["id"]) if len(rows) > limit else None})
