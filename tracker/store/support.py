"""Reads for the support view: a click by id (one partition: its time comes from the id), its
signals and its detector state."""
from __future__ import annotations

from typing import TypeAlias, cast

import asyncpg

from ..domain.clickid import click_time, click_time_ms
from ..domain.rows import ClickRow, ClickStateRow, SignalRow
from ..domain.states import ActivationSession, StoredState
from .db import Executor
from .sessions import SessionStore

Conn: TypeAlias = Executor
# asyncpg ships no types: a row it returns is cast, once here, to the shape its SELECT list gives it.


async def get_click(conn: Conn, click_id: str, lock: bool = False) -> ClickRow | None:
    """A click by id (the one query that reads a click by id: the support view, observe's fallback,
    the console, postbacks). `lock`: under a share lock until the transaction ends (a postback's,
    so that an erasure renaming the click's user is either waited for or waits: store/erasure.py)."""
    row = await conn.fetchrow(
        "SELECT click_id, created_at, user_id, merchant, source, target, device, client_ip, "
        "user_agent, bot, method, client_ip_truncated_at FROM clicks WHERE click_id = $1 AND created_at = $2"
        + (" FOR SHARE" if lock else ""), click_id, click_time(click_id))
    return cast(ClickRow, dict(row)) if row else None


async def load_click(sessions: SessionStore, pool: asyncpg.Pool,
                     click_id: str) -> tuple[ActivationSession | None, StoredState | None]:
    """(session, detector state) for a click: Redis first, PostgreSQL when Redis has nothing."""
    session, state, _ = await sessions.get_session_and_state(click_id)
    if session is not None:
        return session, state
    click = await get_click(pool, click_id)
    if click is None:
        return None, None
    # The creation time as /go wrote it: the one the id carries, read back without a float round trip.
    session = {"u": click["user_id"], "m": click["merchant"], "t": click_time_ms(click_id),
               "dev": click["device"], "bot": click["bot"]}
    if state is None:
        state = await get_detector_state(pool, click_id)
    return session, state


async def get_signals(conn: Conn, click_id: str) -> list[SignalRow]:
    rows = await conn.fetch(
        "SELECT kind, network, evidence, at, late, count, last_at FROM signals WHERE click_id = $1 "
        "ORDER BY at, id",
        click_id)
    return [cast(SignalRow, dict(r)) for r in rows]


async def get_detector_state(conn: Conn, click_id: str) -> StoredState | None:
    """The detector state click_states keeps for a click (what observe saved last, bound values and
    trail included), with the row's state word: a postback's `converted` is written to the row alone,
    leaving the detector JSON as the last observe saved it (or NULL)."""
    row = await conn.fetchrow("SELECT state, detector FROM click_states WHERE click_id = $1", click_id)
    if row is None:
        return None
    doc = row["detector"]
    state = cast(StoredState, doc) if isinstance(doc, dict) else StoredState()
    state["state"] = row["state"]
    return state


async def get_state(conn: Conn, click_id: str) -> ClickStateRow | None:
    row = await conn.fetchrow(
        "SELECT state, overwritten_at, converted_at FROM click_states WHERE click_id = $1", click_id)
    return cast(ClickStateRow, dict(row)) if row else None
