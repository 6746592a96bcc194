"""Reads for the support view: a click by id (one partition: its time comes from the id)."""
from __future__ import annotations

from typing import Any

import asyncpg

from ..domain.clickid import click_time


async def get_click(conn: asyncpg.Pool | asyncpg.Connection, click_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "SELECT click_id, created_at, user_id, merchant, source, target, device, client_ip, "
        "user_agent, bot, method FROM clicks WHERE click_id = $1 AND created_at = $2",
        click_id, click_time(click_id))
    return dict(row) if row else None
