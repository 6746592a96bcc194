"""The click writer: batches clicks (COPY) and group-commits them, off the request path.

Requests append a row to the open batch. Two flusher tasks, each with its own connection, take the
batches. In `commit` mode a request awaits its batch's commit, so the next COPY starts the moment the
previous one ends (group commit, no timer); the second flusher starts a batch beside it only when that
COPY has run for COMMIT_LINGER (a slow commit) or when a full batch is waiting. In `async` mode a
request does not wait, and a batch that is not full starts ASYNC_LINGER after the previous COPY did.
A batch that PostgreSQL cannot take goes to the spool (fsynced, then acknowledged) and is replayed
when PostgreSQL is back; rows PostgreSQL refuses are found by bisection and quarantined.
"""
from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Any

import asyncpg
import structlog

from .. import metrics
from .refused import COLUMNS, REFUSED, add_partitions, all_rows, insert_missing, isolate, missing_partition
from .spool import SegmentLock, Spool, count_rows
from .tasks import cancel_and_wait
from .unreachable import POSTGRES_DOWN

log = structlog.get_logger("tracker.clicks")

# Row: the tuple above, with created_at as Unix milliseconds (converted at flush time, in bulk).
Row = tuple[str, int, str, str, str, str, str | None, str | None, str | None, bool, str]

# A COPY that PostgreSQL cancelled (QueryCanceledError) is spooled too, as one it could not take.
_UNREACHABLE = POSTGRES_DOWN + (asyncpg.QueryCanceledError,)


# Measured with benchmarks/ab.py (docs/performance.md): commit 1 -> 10 ms, 11 -> 14 rows per COPY, worker CPU per
# redirect 112 -> 97 us (6 alternating rounds); async 0 -> 10 ms, 65-109 -> 201-268 rows per COPY.
COMMIT_LINGER = 0.010
ASYNC_LINGER = 0.010


def to_record(row: Row | list[Any]) -> tuple[Any, ...]:
    ms = row[1]
    return (row[0], datetime.fromtimestamp(ms / 1000, tz=timezone.utc), *row[2:])


class _Batch:
    __slots__ = ("rows", "waiters", "parts")

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.parts: list[_Batch] = []  # the batches a merged batch stands for
        # One future per waiting request, not a shared one: a cancelled request cancels only its
        # own wait. (An asyncio.Event does the same with a deque and a loop check per wait.)
        self.waiters: list[asyncio.Future[None]] = []

    def release(self) -> None:
        """The batch is committed or spooled: wake every request waiting on it (or on its parts)."""
        for batch in (self, *self.parts):
            for waiter in batch.waiters:
                if not waiter.done():
                    waiter.set_result(None)
            batch.waiters.clear()


class ClickWriter:
    def __init__(self, pool: asyncpg.Pool, spool: Spool, *, durability: str = "commit",
                 queue_limit: int = 50_000, batch_limit: int = 100, merge_limit: int = 300, flushers: int = 2,
                 flush_timeout: float = 5.0, dsn: str | None = None, linger: float | None = None) -> None:
        self.pool, self.spool = pool, spool
        self.wait_commit = durability == "commit"
        # A batch that is not full starts its COPY only `linger` seconds after the previous COPY
        # started (or, in commit mode, at once when no COPY is running). Every COPY costs the same
        # two round trips and one commit whatever its size (~150 us of client CPU and ~250 us of the
        # server's for a dozen rows), so fewer, bigger COPYs leave more CPU to the redirects.
        self.linger = (COMMIT_LINGER if self.wait_commit else ASYNC_LINGER) if linger is None else linger
        self._last_start = 0.0
        self._in_flight = 0
        self.queue_limit, self.batch_limit = queue_limit, batch_limit
        self.merge_limit = max(batch_limit, merge_limit)
        self.flush_timeout = flush_timeout
        self.pg_ok = True
        self._flushers = flushers
        # Each flusher keeps a connection of its own when it has a DSN: a pool acquire and release
        # per batch cost more client CPU than the COPY of a small batch itself.
        self._dsn = dsn
        self._conns: list[asyncpg.Connection | None] = [None] * flushers
        self._loop = asyncio.get_running_loop()
        self._open = _Batch()
        self._sealed: list[_Batch] = []
        self._queued = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._replay_lock = asyncio.Lock()
        self._spool_lock = asyncio.Lock()
        self.pending_spool = 0

    # -- request side -------------------------------------------------------------------------
    async def write(self, row: Row) -> None:
        """Queue a click; in commit mode return once it is committed (or spooled)."""
        while self._queued >= self.queue_limit and not self._closing:
            if not self.wait_commit:
                # async mode never grows memory without bound: overflow goes to the spool.
                await self._spill([row])
                return
            self._room.clear()
            await self._room.wait()
        if self._closing:
            await self._spill([row])
            return
        batch = self._open
        batch.rows.append(row)
        self._queued += 1
        if len(batch.rows) >= self.batch_limit:
            self._seal()
        self._wake.set()
        if self.wait_commit:
            waiter = self._loop.create_future()
            batch.waiters.append(waiter)
            await waiter

    def _seal(self) -> None:
        self._sealed.append(self._open)
        self._open = _Batch()

    def _take(self) -> _Batch | None:
        if self._sealed:
            batch = self._sealed.pop(0)
            if not self._sealed or self.merge_limit <= self.batch_limit:
                return batch
            # A backlog (the writer fell behind): one COPY for several sealed batches, up to
            # merge_limit rows, so that throughput grows with the backlog while batches stay small
            # (short loop stalls) when the writer keeps up.
            merged, parts = _Batch(), [batch]
            merged.rows = list(batch.rows)
            while self._sealed and len(merged.rows) + len(self._sealed[0].rows) <= self.merge_limit:
                part = self._sealed.pop(0)
                parts.append(part)
                merged.rows.extend(part.rows)
            merged.parts = parts
            return merged
        if self._open.rows and self._may_start():
            batch = self._open
            self._open = _Batch()
            return batch
        return None

    def _may_start(self) -> bool:
        """Whether a batch that is not full may start its COPY now."""
        return ((self.wait_commit and self._in_flight == 0) or self._closing
                or self._loop.time() - self._last_start >= self.linger)

    # -- writer side --------------------------------------------------------------------------
    async def start(self) -> None:
        self.pending_spool = await asyncio.to_thread(count_rows, self.spool.dir)
        metrics.SPOOL_PENDING.set(self.pending_spool)
        self._tasks = [asyncio.create_task(self._flusher(i), name=f"click-flusher-{i}")
                       for i in range(self._flushers)]
        self._tasks.append(asyncio.create_task(self._replayer(), name="spool-replayer"))

    async def close(self, timeout: float = 10.0) -> None:
        """Stop taking clicks into the queue, commit (or spool) what is queued, stop the tasks."""
        self._closing = True
        self._room.set()
        deadline = self._loop.time() + timeout
        while (self._queued or self._sealed or self._open.rows) and self._loop.time() < deadline:
            self._wake.set()
            await asyncio.sleep(0.01)
        await cancel_and_wait(self._tasks)
        while (batch := self._take()) is not None:  # whatever is left after the deadline
            await self._to_spool(batch)
        self.spool.close()

    async def _flusher(self, slot: int = 0) -> None:
        try:
            while True:
                batch = self._take()
                if batch is None:
                    if self._open.rows:  # too soon for another COPY: wait out the linger
                        await asyncio.sleep(max(0.0, self._last_start + self.linger - self._loop.time()))
                        continue
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                self._last_start = self._loop.time()
                self._in_flight += 1
                try:
                    await self._flush(batch, slot)
                finally:
                    self._in_flight -= 1
        finally:
            self._drop_conn(slot)

    async def _flush(self, batch: _Batch, slot: int = 0) -> None:
        rows = batch.rows
        try:
            if self.pg_ok:
                await self._copy(rows, slot)
            else:
                await self._to_spool(batch, resolve=False)
        except _UNREACHABLE as exc:
            self._drop_conn(slot)
            self._mark_down(exc)
            await self._to_spool(batch, resolve=False)
        except Exception as exc:  # noqa: BLE001 - never lose a batch to an unexpected error
            self._drop_conn(slot)
            log.error("click_batch_failed", error=repr(exc), rows=len(rows), exc_info=True)
            await self._to_spool(batch, resolve=False)
        finally:
            self._queued -= len(rows)
            metrics.WRITER_QUEUE.set(self._queued)
            if self._queued < self.queue_limit:
                self._room.set()
            batch.release()

    async def _copy(self, rows: list[Row], slot: int = 0) -> None:
        started = self._loop.time()
        records = [to_record(r) for r in rows]
        try:
            # asyncio.timeout, not wait_for: wait_for wraps the COPY in a task of its own, which
            # costs ~20 us of the ~150 us of client CPU a small COPY takes (docs/performance.md).
            async with asyncio.timeout(self.flush_timeout):
                await self._copy_records(records, slot)
        except REFUSED as exc:
            if not missing_partition(exc):
                await self._isolate(records, exc)
            else:
                await add_partitions(self.pool, records)
                try:
                    async with asyncio.timeout(self.flush_timeout):
                        await self._copy_records(records, slot)
                except REFUSED as again:  # a bad row in a batch that also needed a partition
                    await self._isolate(records, again)
        metrics.WRITER_BATCH.observe(len(rows))
        metrics.WRITER_FLUSH_SECONDS.observe(self._loop.time() - started)

    def _drop_conn(self, slot: int) -> None:
        conn, self._conns[slot] = self._conns[slot], None
        if conn is not None:
            conn.terminate()

    async def _copy_records(self, records: list[tuple[Any, ...]], slot: int | None = None) -> None:
        if slot is not None and self._dsn:
            conn = self._conns[slot]
            if conn is None or conn.is_closed():
                conn = self._conns[slot] = await asyncpg.connect(
                    self._dsn, timeout=3, server_settings={"application_name": "tracker-writer"})
            # One COPY is one statement and one commit: the group commit of the whole batch.
            await conn.copy_records_to_table("clicks", records=records, columns=COLUMNS)
            return
        async with self.pool.acquire() as conn:
            # One COPY is one statement and one commit: the group commit of the whole batch.
            await conn.copy_records_to_table("clicks", records=records, columns=COLUMNS)

    async def _isolate(self, records: list[tuple[Any, ...]], exc: BaseException) -> None:
        async def copy(part: list[tuple[Any, ...]]) -> None:
            await asyncio.wait_for(self._copy_records(part), self.flush_timeout)

        await isolate(self.pool, records, exc, copy)

    # -- the spool ----------------------------------------------------------------------------
    async def _to_spool(self, batch: _Batch, resolve: bool = True) -> None:
        await self._spill(batch.rows)
        if resolve:
            batch.release()

    async def _spill(self, rows: list[Row] | list[list[Any]]) -> None:
        async with self._spool_lock:
            await asyncio.to_thread(self.spool.append, [list(r) for r in rows])
        self.pending_spool += len(rows)
        metrics.SPOOLED.inc(len(rows))
        metrics.SPOOL_PENDING.set(self.pending_spool)

    def _mark_down(self, exc: BaseException) -> None:
        if self.pg_ok:
            log.error("postgres_unreachable", error=repr(exc)[:300])
        self.pg_ok = False
        metrics.DEPENDENCY_UP.labels("postgres").set(0)

    async def _replayer(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                if not self.pg_ok:
                    async with self.pool.acquire(timeout=3) as conn:
                        await conn.fetchval("SELECT 1")
                    self.pg_ok = True
                    metrics.DEPENDENCY_UP.labels("postgres").set(1)
                    log.info("postgres_back")
                if self.spool.has_backlog():
                    await self.replay()
            except asyncio.CancelledError:
                raise
            except _UNREACHABLE as exc:
                self._mark_down(exc)
            except Exception as exc:  # noqa: BLE001 - keep trying; the spool keeps the clicks
                log.error("spool_replay_failed", error=repr(exc)[:300])

    async def replay(self, chunk: int = 5_000) -> int:
        """Replay every closed spool segment into clicks, exactly once; returns clicks inserted."""
        inserted = 0
        async with self._replay_lock:
            async with self._spool_lock:
                self.spool.rotate()
            for path in self.spool.segments():
                lock = await asyncio.to_thread(SegmentLock.take, path)
                if lock is None:
                    continue  # its writer is alive, or another worker is replaying it
                try:
                    rows = await asyncio.to_thread(all_rows, lock)
                    for start in range(0, len(rows), chunk):
                        inserted += await insert_missing(self.pool, [to_record(r) for r in rows[start:start + chunk]])
                    await asyncio.to_thread(lock.remove)  # only after every chunk committed
                except BaseException:
                    lock.release()
                    raise
                metrics.REPLAYED.inc(len(rows))
                log.info("spool_replayed", segment=path.name, rows=len(rows))
            # Every worker reports the whole directory (the gauge takes the max over workers).
            self.pending_spool = await asyncio.to_thread(count_rows, self.spool.dir)
            metrics.SPOOL_PENDING.set(self.pending_spool)
        return inserted

    @property
    def queued(self) -> int:
        return self._queued


