"""Reads for the support view: a click by id (one partition: its time comes from the id), its
signals and its detector state."""
from __future__ import annotations

from typing import Any, TypeAlias

import asyncpg
import orjson

from ..domain.clickid import click_time

Conn: TypeAlias = asyncpg.Pool | asyncpg.Connection


async def get_click(conn: Conn, click_id: str) -> dict[str, Any] | None:
    """A click by id (the one query that reads a click by id: the support view, observe's fallback,
    the console, postbacks)."""
    row = await conn.fetchrow(
        "SELECT click_id, created_at, user_id, merchant, source, target, device, client_ip, "
        "user_agent, bot, method FROM clicks WHERE click_id = $1 AND created_at = $2",
        click_id, click_time(click_id))
    return dict(row) if row else None


async def get_signals(conn: Conn, click_id: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT kind, network, evidence, at, late FROM signals WHERE click_id = $1 ORDER BY at, id",
        click_id)
    out = []
    for r in rows:
        item = dict(r)
        if isinstance(item["evidence"], str):
            item["evidence"] = orjson.loads(item["evidence"])
        out.append(item)
    return out


async def get_state(conn: Conn, click_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT state, overwritten_at, converted_at FROM click_states WHERE click_id = $1", click_id)
    return dict(row) if row else None
