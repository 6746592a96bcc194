"""Support console sign-outs: a signed session cookie stays valid until it expires, so signing out
records the session id until then, and every console request looks it up."""
from __future__ import annotations

from datetime import datetime, timezone

import asyncpg


async def sign_out(pool: asyncpg.Pool, session_id: str, expires: float) -> None:
    """Record the session as ended until `expires` (UNIX time), pruning records already past theirs."""
    await pool.execute(
        "WITH gone AS (DELETE FROM console_signouts WHERE expires_at < now()) "
        "INSERT INTO console_signouts (session_id, expires_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        session_id, datetime.fromtimestamp(expires, timezone.utc))


async def signed_out(pool: asyncpg.Pool, session_id: str) -> bool:
    return bool(await pool.fetchval("SELECT 1 FROM console_signouts WHERE session_id = $1", session_id))
