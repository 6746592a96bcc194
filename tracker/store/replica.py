"""Support reads (lookups, the support view, the console) on a streaming replica when there is one
(TRACKER_DATABASE_REPLICA_URL), on the primary when there is none or it cannot answer.

Only reads that may show data a moment old come here: writes, postbacks, the event feed, key and
sign-out checks, and whatever must not show what an erasure removed read the primary's pool
directly. A replica that fails a read (down, restarting, a query cancelled for a conflict with
recovery) is left alone for RETRY_AFTER seconds, its reads going to the primary meanwhile; then the
next read tries it again.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable, TypeVar

import asyncpg
import structlog

from .. import metrics
from ..settings import censor_dsn
from .db import create_pool
from .unreachable import POSTGRES_DOWN

log = structlog.get_logger("tracker.replica")
T = TypeVar("T")

RETRY_AFTER = 5.0
CONNECT_TIMEOUT = 2.0
# What a replica answers when it cannot serve a read that the primary could: away, or the query
# cancelled because replay needed what it read (SQLSTATE 40001, "conflict with recovery").
REPLICA_CANNOT = POSTGRES_DOWN + (asyncpg.QueryCanceledError, asyncpg.SerializationError)
# Seconds the replica's data is behind the primary's: 0 while it has replayed all it received (an
# idle primary sends nothing, and the last replayed commit's age would only say how idle it is).
LAG = ("SELECT CASE WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn() THEN 0 "
       "ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp()) END")


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a read's data came from: the replica (and how far behind it was), or the primary."""
    replica: bool
    lag: float | None = None


PRIMARY = Origin(replica=False)


class SupportReads:
    def __init__(self, primary: asyncpg.Pool, replica_url: str | None, pooler: str | None = None) -> None:
        self.primary, self.replica_url, self.pooler = primary, replica_url, pooler
        self.replica: asyncpg.Pool | None = None
        self._down_until = 0.0

    async def start(self) -> None:
        if self.replica_url:
            # min_size=0: a replica that is down at start does not keep the worker from serving.
            self.replica = await create_pool(self.replica_url, min_size=0, max_size=4, pooler=self.pooler,
                                             timeout=CONNECT_TIMEOUT, check=False)
            metrics.DEPENDENCY_UP.labels("replica").set(1)
            # One probe, so that a replica unreachable at start is said at start (reads then go to
            # the primary for RETRY_AFTER seconds), not at the first support read.
            try:
                await asyncio.wait_for(self.replica.fetchval("SELECT 1"), CONNECT_TIMEOUT)
            except REPLICA_CANNOT + (TimeoutError,) as exc:
                log.warning("replica_unreachable_at_start", dsn=censor_dsn(self.replica_url), error=repr(exc)[:300])
                metrics.DEPENDENCY_UP.labels("replica").set(0)
                self._down_until = time.monotonic() + RETRY_AFTER

    async def stop(self) -> None:
        if self.replica is not None:
            await self.replica.close()

    async def read(self, query: Callable[[asyncpg.Pool], Awaitable[T]], lag: bool = False,
                   users: Callable[[T], Iterable[str | None]] | None = None) -> tuple[T, Origin]:
        """`query(pool)` on the replica, or on the primary when there is no replica or it cannot
        answer. With `lag`, how far behind the replica was is read too (one more round trip).

        `users` names the user ids the replica's answer is about: when the primary has erased any
        of them, the answer is read again on the primary, so that a replica that has not replayed
        an erasure yet never shows what it removed (one indexed probe of `erasures`)."""
        replica = self.replica
        if replica is not None and time.monotonic() >= self._down_until:
            try:
                result = await query(replica)
                behind = float(await replica.fetchval(LAG) or 0.0) if lag else None
            except REPLICA_CANNOT as exc:
                self._down(exc)
            else:
                if self._down_until:
                    self._down_until = 0.0
                    log.info("replica_back")
                    metrics.DEPENDENCY_UP.labels("replica").set(1)
                if users is None or not await self._erased([u for u in users(result) if u]):
                    return result, Origin(replica=True, lag=behind)
        return await query(self.primary), PRIMARY

    async def _erased(self, user_ids: list[str]) -> bool:
        return bool(user_ids) and bool(await self.primary.fetchval(
            "SELECT EXISTS (SELECT 1 FROM erasures WHERE user_id = ANY($1::text[]))", user_ids))

    def _down(self, exc: BaseException) -> None:
        log.warning("replica_unavailable", error=repr(exc)[:300], retry_after=RETRY_AFTER)
        metrics.DEPENDENCY_UP.labels("replica").set(0)
        self._down_until = time.monotonic() + RETRY_AFTER
