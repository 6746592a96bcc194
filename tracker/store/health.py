"""Whether the click writer's PostgreSQL takes batches: down at the first one it cannot take (batches then
go straight to the spool without trying), up again when a probe answers."""
from __future__ import annotations

import asyncpg
import structlog

from .. import metrics
from .unreachable import POSTGRES_DOWN

log = structlog.get_logger("tracker.clicks")

# A COPY that PostgreSQL cancelled (QueryCanceledError) is spooled too, as one it could not take.
UNREACHABLE = POSTGRES_DOWN + (asyncpg.QueryCanceledError,)
CONNECT_TIMEOUT = 3.0  # seconds for a flusher's connection or the probe's pool acquire


class PostgresHealth:
    __slots__ = ("pool", "ok")

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.ok = True

    def down(self, exc: BaseException) -> None:
        if self.ok:
            log.error("postgres_unreachable", error=repr(exc)[:300])
        self.ok = False
        metrics.DEPENDENCY_UP.labels("postgres").set(0)

    async def probe(self) -> None:
        """Up again if PostgreSQL answers; raises what it raised if not."""
        async with self.pool.acquire(timeout=CONNECT_TIMEOUT) as conn:
            await conn.fetchval("SELECT 1")
        self.up()

    def up(self) -> None:
        """PostgreSQL answered (the probe, or /readyz's query): batches go to it again."""
        if not self.ok:
            log.info("postgres_back")
        self.ok = True
        metrics.DEPENDENCY_UP.labels("postgres").set(1)
