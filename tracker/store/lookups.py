"""Support lookups: a user's clicks newest first, orders by id, open orphan postbacks.

A user's clicks come from `clicks_user_idx (user_id, created_at)` read backwards: the planner walks
the daily partitions newest first (an ordered Append) and stops as soon as it has the page, so a
page costs one short index range per day it spans, whatever the table's size. The page's key is
(created_at, click_id): the time a click id carries, then the id for clicks of the same millisecond.
Measured plans and timings at 20 million clicks: docs/performance.md.
"""
from __future__ import annotations

from decimal import Decimal
from typing import TypeAlias, cast

from ..domain import trail
from ..domain.clickid import click_time
from ..domain.rows import ClickConversionRow, OrderRow, OrphanRow, StoredStateRow, UserClickRow
from .conversions import CURRENCY
from .db import Executor

Conn: TypeAlias = Executor

# One round trip for a page: the clicks, then each one's detector state (primary key) and its
# conversions (conversions_click_idx), money as text so that no decimal goes through a float.
PAGE = ("SELECT p.click_id, p.created_at, p.merchant, p.source, p.bot, s.state, s.overwritten_at, "
         "(SELECT json_agg(json_build_object('network', c.network, 'order_id', c.order_id, 'status', c.status, "
         "'cashback', c.cashback::text, 'currency', rtrim(c.currency)) ORDER BY c.id) "
         "FROM conversions c WHERE c.click_id = p.click_id) AS conversions "
         "FROM ({}) p LEFT JOIN click_states s ON s.click_id = p.click_id "
         "ORDER BY p.created_at DESC, p.click_id DESC")
USER_CLICKS = ("SELECT click_id, created_at, merchant, source, bot FROM clicks WHERE user_id = $1 "
               "ORDER BY created_at DESC, click_id DESC LIMIT $2")
# `created_at <= $3` names the partitions to skip; the row comparison breaks ties within a millisecond.
USER_CLICKS_BEFORE = ("SELECT click_id, created_at, merchant, source, bot FROM clicks WHERE user_id = $1 "
                      "AND created_at <= $3 AND (created_at, click_id) < ($3, $4) "
                      "ORDER BY created_at DESC, click_id DESC LIMIT $2")
CONVERSION_COLUMNS = ("id, network, order_id, click_id, user_id, merchant, status, status_word, amount, "
                      f"commission, {CURRENCY}, user_share, cashback, order_time, created_at, updated_at")
ORDER = f"SELECT {CONVERSION_COLUMNS} FROM conversions WHERE order_id = $1 ORDER BY id"
ORPHAN_COLUMNS = "id, network, order_id, click_id, reason, raw, received_at, reconciled_at, conversion_id"
ORDER_IN_NETWORK = f"SELECT {CONVERSION_COLUMNS} FROM conversions WHERE order_id = $1 AND network = $2 ORDER BY id"


async def user_clicks(conn: Conn, user_id: str, limit: int, before: str | None = None) -> list[UserClickRow]:
    """Up to `limit` of the user's clicks, newest first, older than the click `before` if given;
    each with its stored state (or None) and its conversions."""
    if before is None:
        rows = await conn.fetch(PAGE.format(USER_CLICKS), user_id, limit)
    else:
        rows = await conn.fetch(PAGE.format(USER_CLICKS_BEFORE), user_id, limit, click_time(before), before)
    return [UserClickRow(
        click_id=r["click_id"], created_at=r["created_at"], merchant=r["merchant"], source=r["source"], bot=r["bot"],
        stored=StoredStateRow(state=r["state"], overwritten_at=r["overwritten_at"]) if r["state"] else None,
        conversions=[ClickConversionRow(network=c["network"], order_id=c["order_id"], status=c["status"],
                                        cashback=Decimal(c["cashback"]), currency=c["currency"])
                     for c in r["conversions"] or ()],
    ) for r in rows]


async def orders(conn: Conn, order_id: str, network: str | None = None) -> list[OrderRow]:
    """The conversions of an order id (one per network that reported it)."""
    if network is None:
        rows = await conn.fetch(ORDER, order_id)
    else:
        rows = await conn.fetch(ORDER_IN_NETWORK, order_id, network)
    return [cast(OrderRow, dict(r)) for r in rows]


async def open_orphans(conn: Conn, limit: int, before: int | None = None) -> list[OrphanRow]:
    """Orphan postbacks not reconciled yet, newest first, older than the orphan `before` if given."""
    if before is None:
        rows = await conn.fetch(f"SELECT {ORPHAN_COLUMNS} FROM orphan_postbacks WHERE reconciled_at IS NULL "
                                "ORDER BY id DESC LIMIT $1", limit)
    else:
        rows = await conn.fetch(f"SELECT {ORPHAN_COLUMNS} FROM orphan_postbacks WHERE reconciled_at IS NULL "
                                "AND id < $2 ORDER BY id DESC LIMIT $1", limit, before)
    return [cast(OrphanRow, dict(r)) for r in rows]


async def orphans_of_order(conn: Conn, order_id: str) -> list[OrphanRow]:
    """Every orphan postback of an order id, reconciled or not (the search shows both)."""
    rows = await conn.fetch(f"SELECT {ORPHAN_COLUMNS} FROM orphan_postbacks "
                            "WHERE order_id = $1 ORDER BY id DESC LIMIT 100", order_id)
    return [cast(OrphanRow, dict(r)) for r in rows]


async def has_clicks(conn: Conn, user_id: str) -> bool:
    """Whether the user has any click (clicks_user_idx: one index probe per partition at most)."""
    return bool(await conn.fetchval("SELECT 1 FROM clicks WHERE user_id = $1 LIMIT 1", user_id))


async def count_open_orphans(conn: Conn) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM orphan_postbacks WHERE reconciled_at IS NULL"))


async def tab_trail(conn: Conn, click_id: str) -> list[trail.TrailEntry]:
    """What the shopping tab did (the detector state's trail, domain/trail.py), oldest first."""
    detector = await conn.fetchval("SELECT detector FROM click_states WHERE click_id = $1", click_id)
    return sorted(trail.load((detector or {}).get("trail")), key=lambda e: e["t"])
