"""Reads for the support view: a click by id (one partition: its time comes from the id), its
signals and its detector state."""
from __future__ import annotations

from typing import Any, TypeAlias

import asyncpg
import orjson

from ..domain.clickid import click_time
from .sessions import SessionStore

Conn: TypeAlias = asyncpg.Pool | asyncpg.Connection


async def get_click(conn: Conn, click_id: str) -> dict[str, Any] | None:
    """A click by id (the one query that reads a click by id: the support view, observe's fallback,
    the console, postbacks)."""
    row = await conn.fetchrow(
        "SELECT click_id, created_at, user_id, merchant, source, target, device, client_ip, "
        "user_agent, bot, method FROM clicks WHERE click_id = $1 AND created_at = $2",
        click_id, click_time(click_id))
    return dict(row) if row else None


async def load_click(sessions: SessionStore, pool: asyncpg.Pool,
                     click_id: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(session, detector state) for a click: Redis first, PostgreSQL when Redis has nothing."""
    session, state, _ = await sessions.get_session_and_state(click_id)
    if session is not None:
        return session, state
    click = await get_click(pool, click_id)
    if click is None:
        return None, None
    stored = await get_state(pool, click_id)
    session = {"u": click["user_id"], "m": click["merchant"], "t": int(click["created_at"].timestamp() * 1000),
               "dev": click["device"], "bot": click["bot"]}
    if state is None and stored is not None:
        detector = stored.get("detector")
        state = orjson.loads(detector) if isinstance(detector, str) else (detector or {})
        state["state"] = stored["state"]
    return session, state


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
