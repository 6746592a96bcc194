"""The click writer: batches clicks and group-commits them, off the request path.

Requests append a click to the open batch (store/batches.py). Two flusher tasks, each with its own
connection, take the batches (store/flushers.py) and write each in one statement, one commit (an
INSERT of arrays under 32 rows, a COPY above). In `commit` mode a request awaits its batch's commit,
so the next write starts the moment the previous one ends (group commit, no timer); the second flusher
starts a batch beside it only when that write has run for COMMIT_LINGER (a slow commit) or when a full
batch is waiting. In `async` mode a request does not wait, and a batch that is not full starts
ASYNC_LINGER after the previous write did. A batch that PostgreSQL cannot take goes to the spool
(fsynced, then acknowledged) and is replayed when PostgreSQL is back (store/replay.py, with the probe
of store/health.py); rows PostgreSQL refuses are found by bisection and quarantined (store/refused.py).
"""
from __future__ import annotations

import asyncio
import functools

import asyncpg
import structlog

from ..errors import Unavailable
from ..settings import BATCH_LIMIT, QUEUE_LIMIT
from .batches import MERGE_LIMIT, Batches
from .click import Click
from .flushers import FLUSH_TIMEOUT, FLUSHERS, Flushers
from .health import PostgresHealth
from .replay import REPLAY_CHUNK, ClickSpool, not_stored
from .spool import Spool
from .tasks import Supervised, cancel_and_wait

__all__ = ["Click", "ClickWriter"]
log = structlog.get_logger("tracker.clicks")


class ClickWriter:
    """The one object the app and /go use: `write` a click; `start` and `close` in the app's cleanup
    context; `replay` the spool now; `queued`, `pg_ok` and `pending_spool` for /readyz and tests."""

    def __init__(self, pool: asyncpg.Pool, spool: Spool, *, durability: str = "commit",
                 queue_limit: int = QUEUE_LIMIT, batch_limit: int = BATCH_LIMIT, merge_limit: int = MERGE_LIMIT,
                 flushers: int = FLUSHERS, flush_timeout: float = FLUSH_TIMEOUT, dsn: str | None = None,
                 linger: float | None = None, pooler: str | None = None) -> None:
        self.durability = durability
        self.wait_commit = durability == "commit"
        self.batches = Batches(wait_commit=self.wait_commit, queue_limit=queue_limit, batch_limit=batch_limit,
                               merge_limit=merge_limit, linger=linger)
        self.health = PostgresHealth(pool)
        self.spool = ClickSpool(pool, spool)
        self.flushers = Flushers(pool, self.batches, self.health, self.spool.spill, count=flushers,
                                 flush_timeout=flush_timeout, dsn=dsn, pooler=pooler)
        self._loop = asyncio.get_running_loop()
        self._tasks: list[Supervised] = []

    async def write(self, click: Click) -> None:
        """Queue a click; in commit mode return once it is committed (or spooled). Raises
        Unavailable (503) when it cannot be stored: at once while PostgreSQL is down and the spool
        refuses, or once its batch could go to neither."""
        # The batches' fields are used here directly: this runs for every redirect.
        batches = self.batches
        if not self.health.ok and self.spool.state != "ok":
            raise not_stored()
        while batches.queued >= batches.queue_limit and not batches.closing:
            if not self.wait_commit:
                # async mode never grows memory without bound: overflow goes to the spool.
                await self.spool.spill([click])
                return
            batches.room.clear()
            await batches.room.wait()
        if batches.closing:
            await self.spool.spill([click])
            return
        batch = batches.open
        batch.rows.append(click)
        batches.queued += 1
        if len(batch.rows) >= batches.batch_limit:
            batches.seal()
        batches.wake.set()
        if self.wait_commit:
            waiter = self._loop.create_future()
            batch.waiters.append(waiter)
            await waiter

    async def settle(self) -> None:
        """Return once every click queued before this call is committed or spooled (an erasure's
        sweep then sees them). Each batch present now, open, sealed or being written, gets a
        waiter of its own; nothing changes for the clicks."""
        batches = self.batches
        waits = []
        for batch in (*batches.running, *batches.sealed, *((batches.open,) if batches.open.rows else ())):
            waiter = self._loop.create_future()
            batch.waiters.append(waiter)
            waits.append(waiter)
        batches.wake.set()
        await asyncio.gather(*waits)

    async def start(self) -> None:
        await self.spool.count()
        await self.spool.check()
        self._tasks = self.flushers.start()
        self._tasks.append(Supervised("spool-replayer", functools.partial(self.spool.replayer, self.health)))

    async def close(self, timeout: float = 10.0) -> None:
        """Stop taking clicks into the queue, commit (or spool) what is queued, stop the tasks."""
        batches = self.batches
        batches.closing = True
        batches.room.set()
        deadline = self._loop.time() + timeout
        while not batches.empty() and self._loop.time() < deadline:
            batches.wake.set()
            await asyncio.sleep(0.01)
        await cancel_and_wait(t.task for t in self._tasks)
        while (batch := batches.take()) is not None:  # whatever is left after the deadline
            try:
                await self.spool.spill(batch.rows)
            except Unavailable:
                # commit mode: these requests answer 503; async mode answered them already.
                log.error("clicks_not_stored_at_shutdown", rows=len(batch.rows), durability=self.durability)
                batches.done(batch, not_stored)
                continue
            batches.done(batch)
        self.spool.close()

    async def replay(self, chunk: int = REPLAY_CHUNK) -> int:
        """Replay every closed spool segment into clicks, exactly once; returns clicks inserted."""
        return await self.spool.replay(chunk)

    @property
    def queued(self) -> int:
        return self.batches.queued

    @property
    def alive(self) -> bool:
        """Every flusher and the replayer running (none waiting to be started again after a death)."""
        return bool(self._tasks) and all(t.running for t in self._tasks)

    async def spool_state(self, probe: bool = False) -> str:
        """"ok", "full" or "failing"; with `probe` (PostgreSQL down) the spool is tried now if it
        has not refused yet, so that readiness tells what the next click would meet."""
        if probe and self.spool.state == "ok":
            await self.spool.check()
        return self.spool.state

    @property
    def pg_ok(self) -> bool:
        return self.health.ok

    @property
    def pending_spool(self) -> int:
        return self.spool.pending
