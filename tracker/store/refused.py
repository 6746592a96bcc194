"""Rows PostgreSQL refuses (an encoding error, a value out of range): a refused batch is bisected,
every good row committed and each bad one kept in clicks_quarantine with the reason, so that one row
never poisons the rest. The spool's replay (store/replay.py) bisects its chunks the same way.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Awaitable, Callable

import asyncpg
import orjson
import structlog

from .. import metrics
from .click import Record
from .db import ensure_partitions

log = structlog.get_logger("tracker.clicks")
REFUSED = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, UnicodeError, ValueError)


def missing_partition(exc: BaseException) -> bool:
    return "no partition of relation" in str(exc)


async def add_partitions(pool: asyncpg.Pool, records: list[Record]) -> None:
    days = sorted({r[1].date() for r in records})
    async with pool.acquire() as conn:
        for day in days:
            await ensure_partitions(conn, day, 1)


async def isolate(pool: asyncpg.Pool, records: list[Record], exc: BaseException,
                  copy: Callable[[list[Record]], Awaitable[None]]) -> None:
    """Bisect a refused batch: commit every good row, quarantine each bad one with its reason. A part
    refused only for a day without its partition gets the partition and is written again, so a good
    row is never quarantined for that (whichever refusal PostgreSQL reported first)."""
    if missing_partition(exc):
        await add_partitions(pool, records)
        try:
            await copy(records)
            return
        except REFUSED as again:
            exc = again
    if len(records) == 1:
        await quarantine(pool, records[0], exc)
        return
    mid = len(records) // 2
    for half in (records[:mid], records[mid:]):
        try:
            await copy(half)
        except REFUSED as sub:
            await isolate(pool, half, sub, copy)


async def quarantine(pool: asyncpg.Pool, record: Record, exc: BaseException) -> None:
    values = [storable(v) for v in record]
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO clicks_quarantine (click_id, record, reason) VALUES ($1, $2, $3)",
            values[0], orjson.dumps(values).decode(), storable(f"{type(exc).__name__}: {exc}")[:500])
    metrics.QUARANTINED.inc()
    log.warning("click_quarantined", click_id=str(record[0])[:32], reason=str(exc)[:200])


def storable(value: Any) -> Any:
    """A value PostgreSQL text and JSON accept whatever it was: NUL bytes and lone surrogates (the
    usual reasons a row is refused) become visible escapes instead of failing again."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
    return value
