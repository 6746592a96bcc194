"""Rows PostgreSQL refuses, and replaying spooled rows exactly once.

A batch that PostgreSQL refuses (an encoding error, a value out of range) is bisected: every good
row is committed and each bad one kept in clicks_quarantine with the reason, so one row never
poisons the rest. A spooled segment is replayed through a temporary table and
`INSERT ... ON CONFLICT DO NOTHING`, so a replay that crashed halfway can simply run again.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Awaitable, Callable

import asyncpg
import orjson
import structlog

from .. import metrics
from .db import ensure_partitions
from .spool import SegmentLock

log = structlog.get_logger("tracker.clicks")
COLUMNS = ("click_id", "created_at", "user_id", "merchant", "source", "target", "device",
           "client_ip", "user_agent", "bot", "method")
REFUSED = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, UnicodeError, ValueError)
Record = tuple[Any, ...]


def missing_partition(exc: BaseException) -> bool:
    return "no partition of relation" in str(exc)


async def add_partitions(pool: asyncpg.Pool, records: list[Record]) -> None:
    days = sorted({r[1].date() for r in records})
    async with pool.acquire() as conn:
        for day in days:
            await ensure_partitions(conn, day, 1)


async def isolate(pool: asyncpg.Pool, records: list[Record], exc: BaseException,
                  copy: Callable[[list[Record]], Awaitable[None]]) -> None:
    """Bisect a refused batch: commit every good row, quarantine each bad one with its reason."""
    if len(records) == 1:
        await quarantine(pool, records[0], exc)
        return
    mid = len(records) // 2
    for half in (records[:mid], records[mid:]):
        try:
            await copy(half)
        except REFUSED as sub:
            if missing_partition(sub):
                await add_partitions(pool, half)
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


def all_rows(lock: SegmentLock) -> list[list[Any]]:
    return [row for record in lock.records() for row in record]


async def insert_missing(pool: asyncpg.Pool, records: list[Record]) -> int:
    """Insert the records that clicks does not have yet; refused ones are bisected out and
    quarantined. Returns how many were inserted."""
    await add_partitions(pool, records)
    try:
        return await _insert_new(pool, records)
    except REFUSED as exc:
        if len(records) == 1:
            await quarantine(pool, records[0], exc)
            return 0
        mid = len(records) // 2
        return await insert_missing(pool, records[:mid]) + await insert_missing(pool, records[mid:])


async def _insert_new(pool: asyncpg.Pool, records: list[Record]) -> int:
    async with pool.acquire() as conn:
        async with conn.transaction():
            await conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS clicks_replay "
                "(LIKE clicks INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
            await conn.copy_records_to_table("clicks_replay", records=records, columns=COLUMNS)
            status = await conn.execute(
                f"INSERT INTO clicks ({', '.join(COLUMNS)}) SELECT {', '.join(COLUMNS)} "
                "FROM clicks_replay ON CONFLICT (click_id, created_at) DO NOTHING")
    return int(status.rsplit(" ", 1)[-1])
