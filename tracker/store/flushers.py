"""The flushers: tasks that take batches and write them into `clicks`, each on a connection of its own:
one statement and one commit per batch (the group commit), a prepared INSERT of arrays for a small
batch and COPY for a larger one.

A batch PostgreSQL cannot take (down, timed out, an unexpected error) goes to the spool; one it
refuses (a bad row) is bisected through refused.py, so that every good row is committed.
"""
from __future__ import annotations

import asyncio
import functools
from typing import Awaitable, Callable

import asyncpg
import structlog

from .. import metrics
from ..errors import Unavailable
from .batches import Batch, Batches
from .click import COLUMNS, INSERT_ARRAYS, Click, Record, insert_arguments, to_record
from .db import Connection, connect, connect_options
from .health import CONNECT_TIMEOUT, UNREACHABLE, PostgresHealth
from .refused import REFUSED, isolate
from .replay import SPOOL_RETRY, not_stored
from .tasks import Supervised

log = structlog.get_logger("tracker.clicks")

FLUSHERS = 2
FLUSH_TIMEOUT = 5.0  # seconds for one batch's write before it counts as one PostgreSQL cannot take
# Below this many rows a batch is one prepared INSERT ... SELECT FROM unnest($1::text[], ...) instead of
# a COPY: one round trip instead of two, no COPY statement to parse, and created_at computed by
# PostgreSQL instead of a datetime per row. Measured (300 batches alternating, embedded PostgreSQL,
# CPU from /proc): 8 rows 275 -> 207 us of client CPU and 378 -> 339 us of the backend's per batch,
# 16 rows 274 -> 229 and 383 -> 372, even at 32, and COPY ahead from there (100 rows: 627 vs 768
# client, 928 vs 1,100 server). Commit mode's batches hold 11-16 rows under load, fewer below it.
SMALL_BATCH = 32


class Flushers:
    def __init__(self, pool: asyncpg.Pool, batches: Batches, health: PostgresHealth,
                 spill: Callable[[list[Click]], Awaitable[None]], *, count: int, flush_timeout: float,
                 dsn: str | None, pooler: str | None = None) -> None:
        self.pool, self.batches, self.health, self.spill = pool, batches, health, spill
        self.count, self.flush_timeout = count, flush_timeout
        # Each flusher keeps a connection of its own when it has a DSN: a pool acquire and release
        # per batch cost more client CPU than the COPY of a small batch itself.
        self._dsn, self._options = dsn, connect_options(pooler)
        self._conns: list[asyncpg.Connection | None] = [None] * count
        self._loop = asyncio.get_running_loop()

    def start(self) -> list[Supervised]:
        return [Supervised(f"click-flusher-{i}", functools.partial(self._run, i)) for i in range(self.count)]

    async def _run(self, slot: int) -> None:
        batches = self.batches
        try:
            while True:
                batch = batches.take()
                if batch is None:
                    if batches.open.rows:  # too soon for another write: wait out the linger
                        await asyncio.sleep(batches.linger_left())
                        continue
                    batches.wake.clear()
                    await batches.wake.wait()
                    continue
                batches.last_start = self._loop.time()
                batches.in_flight += 1
                batches.running.add(batch)
                try:
                    await self._flush(batch, slot)
                finally:
                    batches.in_flight -= 1
                    batches.running.discard(batch)
        finally:
            self._drop_conn(slot)

    async def _flush(self, batch: Batch, slot: int) -> None:
        batches = self.batches
        try:
            stored = await self._store(batch.rows, slot)
        except BaseException:
            # Cancelled mid-write (the worker stopping): neither committed nor spooled as far as
            # anyone knows. Back in the queue, where close() spools it; a replay skips the rows the
            # write may have committed after all.
            batches.put_back(batch)
            raise
        if stored:
            batches.done(batch)
        elif batches.wait_commit:
            batches.done(batch, not_stored)  # each waiting request answers 503
        else:
            # async mode answered these requests already: keep the batch and try again once
            # PostgreSQL or the spool may take it (lost only if the process dies meanwhile).
            batches.put_back(batch)
            await asyncio.sleep(SPOOL_RETRY)
        metrics.WRITER_QUEUE.set(batches.queued)

    async def _store(self, rows: list[Click], slot: int) -> bool:
        """Commit the rows, or spool them when PostgreSQL cannot take them; False if neither could."""
        if self.health.ok:
            try:
                await self._write_batch(rows, slot)
                return True
            except UNREACHABLE as exc:
                self._drop_conn(slot)
                self.health.down(exc)
            except Exception as exc:  # noqa: BLE001 - never lose a batch to an unexpected error
                self._drop_conn(slot)
                log.error("click_batch_failed", error=repr(exc), rows=len(rows), exc_info=True)
        try:
            await self.spill(rows)
        except Unavailable:
            return False
        return True

    async def _write_batch(self, rows: list[Click], slot: int) -> None:
        started = self._loop.time()
        try:
            # asyncio.timeout, not wait_for: wait_for wraps the write in a task of its own, which
            # cost ~20 us of the ~150 us of client CPU a small COPY took (docs/performance.md).
            async with asyncio.timeout(self.flush_timeout):
                await self.write_rows(rows, slot)
        except REFUSED as exc:  # a bad row, or a day without its partition: isolate() sees to both
            await self._isolate([to_record(r) for r in rows], exc)
        metrics.WRITER_BATCH.observe(len(rows))
        metrics.WRITER_FLUSH_SECONDS.observe(self._loop.time() - started)

    def _drop_conn(self, slot: int) -> None:
        conn, self._conns[slot] = self._conns[slot], None
        if conn is not None:
            conn.terminate()

    async def _own_conn(self, slot: int) -> asyncpg.Connection:
        conn = self._conns[slot]
        if conn is None or conn.is_closed():
            conn = self._conns[slot] = await connect(
                self._dsn, timeout=CONNECT_TIMEOUT, server_settings={"application_name": "tracker-writer"},
                **self._options)
        return conn

    async def write_rows(self, rows: list[Click], slot: int | None = None) -> None:
        """A batch in one statement, one commit: on the flusher's own connection (`slot`), or on
        one of the pool's."""
        if slot is not None and self._dsn:
            await _write(await self._own_conn(slot), rows)
            return
        async with self.pool.acquire() as conn:
            await _write(conn, rows)

    async def copy_records(self, records: list[Record]) -> None:
        """COPY on one of the pool's connections (the bisection of a refused batch)."""
        async with self.pool.acquire() as conn:
            await conn.copy_records_to_table("clicks", records=records, columns=COLUMNS)

    async def _isolate(self, records: list[Record], exc: BaseException) -> None:
        async def copy(part: list[Record]) -> None:
            await asyncio.wait_for(self.copy_records(part), self.flush_timeout)

        await isolate(self.pool, records, exc, copy)


async def _write(conn: Connection, rows: list[Click]) -> None:
    if len(rows) < SMALL_BATCH:
        # The batch's columns as arrays (click.insert_arguments); prepared once per connection
        # (behind a transaction pooler, unnamed and described again each time, in one transaction: store/db.py).
        await conn.execute(INSERT_ARRAYS, *insert_arguments(rows))
    else:
        await conn.copy_records_to_table("clicks", records=[to_record(r) for r in rows], columns=COLUMNS)
