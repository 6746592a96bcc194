"""Support lookups (scope lookups:read; reconciling: orphans:write): a user's clicks, an order's
conversions, orphan postbacks."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Mapping

import structlog
from aiohttp import web

from .. import keys
from ..domain.access import LOOKUPS_READ, ORPHANS_WRITE
from ..domain.clickid import is_click_id
from ..domain.conversions import MAX_ID, Postback, conversion_json, read_raw
from ..domain.diagnosis import click_state
from ..domain.merchants import SESSION_TTL
from ..domain.rows import OrderRow, OrphanRow, UserClickRow
from ..domain.text import has_control
from ..domain.times import iso
from ..domain.tokens import USER_ID
from ..errors import BadRequest, NotFound
from ..store import lookups
from ..store.conversions import reconcile
from ..store.replica import Origin
from .access import authorize
from .audit import audited
from .common import json_response, one

log = structlog.get_logger("tracker.lookups")
MAX_ORDER_ID = MAX_ID  # the longest order id a postback stores
MAX_PAGE, DEFAULT_PAGE = 200, 50
MAX_NETWORK = 64


def limit_of(request: web.Request, default: int = DEFAULT_PAGE, high: int = MAX_PAGE) -> int:
    raw = one(request, "limit")
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= high:
        raise BadRequest(f"limit must be a whole number from 1 to {high}")
    return int(raw)


def click_item(app: web.Application, click: UserClickRow, now: datetime) -> dict[str, Any]:
    """A click of a user's list, with its state as the support view would decide it."""
    merchant = app[keys.MERCHANTS].merchants.get(click["merchant"])
    stored = click["stored"]
    state = click_state(click["created_at"], now, merchant.session_ttl if merchant else SESSION_TTL,
                        stored["state"] if stored else None, bool(click["conversions"]),
                        stored is not None and stored["overwritten_at"] is not None)
    return {"click_id": click["click_id"], "merchant": click["merchant"], "source": click["source"],
            "created_at": iso(click["created_at"]), "bot": click["bot"], "state": state,
            "conversions": [conversion_json(c) for c in click["conversions"]]}


def conversion_item(row: OrderRow) -> dict[str, Any]:
    return conversion_json(row)


def orphan_item(row: OrphanRow) -> dict[str, Any]:
    return {"id": row["id"], "network": row["network"], "order_id": row["order_id"], "click_id": row["click_id"],
            "reason": row["reason"], "received_at": iso(row["received_at"])}


async def user_page(app: web.Application, user_id: str, limit: int, before: str | None,
                    lag: bool = False) -> tuple[list[dict[str, Any]], str | None, Origin]:
    """A page of a user's clicks as the API shapes them, the `before` of the next page, and where
    the page was read (store/replica.py)."""
    rows, origin = await app[keys.READS].read(lambda pool: lookups.user_clicks(pool, user_id, limit + 1, before), lag,
                                              users=lambda _: [user_id])
    now = datetime.now(timezone.utc)
    items = [click_item(app, r, now) for r in rows[:limit]]
    return items, (items[-1]["click_id"] if len(rows) > limit else None), origin


async def user_clicks(request: web.Request) -> web.Response:
    actor = await authorize(request, LOOKUPS_READ)
    user_id = request.match_info["user_id"]
    if not USER_ID.fullmatch(user_id):
        raise NotFound("no such user")
    limit = limit_of(request)
    before = one(request, "before")
    if before is not None and not is_click_id(before):
        raise BadRequest("before must be a click id (the `next` of the previous page)")
    await audited(request, actor, "user.read", [(user_id, None, None)])
    items, nxt, _ = await user_page(request.app, user_id, limit, before)
    return json_response({"clicks": items, "next": nxt})


def order_query(request: web.Request) -> tuple[str, str | None]:
    order_id, network = one(request, "order_id"), one(request, "network")
    if not order_id or len(order_id) > MAX_ORDER_ID or has_control(order_id):
        raise BadRequest(f"order_id is required: at most {MAX_ORDER_ID} characters, no control characters")
    if network is not None and (not 0 < len(network) <= MAX_NETWORK or has_control(network)):
        raise BadRequest(f"network must be 1 to {MAX_NETWORK} characters, no control characters")
    return order_id, network


def order_subjects(order_id: str, rows: list[OrderRow]) -> list[tuple[str | None, str | None, str | None]]:
    """Reading an order is reading its users' data: one audit subject per conversion found."""
    return [(r["user_id"], r["click_id"], order_id) for r in rows] or [(None, None, order_id)]


async def conversions(request: web.Request) -> web.Response:
    actor = await authorize(request, LOOKUPS_READ)
    order_id, network = order_query(request)
    rows, _ = await request.app[keys.READS].read(lambda pool: lookups.orders(pool, order_id, network),
                                                 users=lambda found: [r["user_id"] for r in found])
    await audited(request, actor, "order.read", order_subjects(order_id, rows))
    return json_response({"conversions": [conversion_item(r) for r in rows]})


async def orphan_page(app: web.Application, limit: int, before: int | None,
                      lag: bool = False) -> tuple[list[OrphanRow], int | None, Origin]:
    rows, origin = await app[keys.READS].read(lambda pool: lookups.open_orphans(pool, limit + 1, before), lag)
    return rows[:limit], (rows[limit - 1]["id"] if len(rows) > limit else None), origin


def before_id(request: web.Request) -> int | None:
    raw = one(request, "before")
    if raw is None:
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise BadRequest("before must be an orphan id (the `next` of the previous page)")
    return int(raw)


async def orphans(request: web.Request) -> web.Response:
    await authorize(request, LOOKUPS_READ)
    rows, nxt, _ = await orphan_page(request.app, limit_of(request), before_id(request))
    return json_response({"orphans": [orphan_item(r) for r in rows], "next": nxt})


async def reconcile_orphans(app: web.Application) -> dict[str, int]:
    """Attach the open orphans whose click has arrived (the CLI's `postbacks reconcile`)."""
    cache = app[keys.MERCHANTS]

    def reader(network: str, raw: Mapping[str, Any]) -> Postback | None:
        known = cache.networks.get(network)
        return read_raw(known, raw) if known else None

    async with app[keys.POOL].acquire() as conn:
        attached = await reconcile(conn, reader, cache.merchants.get)
        still = await lookups.count_open_orphans(conn)
    log.info("orphans_reconciled", attached=len(attached), still_orphaned=still)
    return {"attached": len(attached), "still_orphaned": still}


async def reconcile_view(request: web.Request) -> web.Response:
    actor = await authorize(request, ORPHANS_WRITE)
    await audited(request, actor, "orphans.reconcile")
    return json_response(await reconcile_orphans(request.app))
