"""What `tracker maintain` prunes besides the clicks partitions: every table that grows with traffic.

Rows about a click (its signals, its detector state, what was quarantined) go with the click: they
are kept as long as its daily partition (TRACKER_RETENTION_DAYS) and no longer, so that nothing
outlives the click it describes. The outbox keeps its own, shorter retention. A new table that grows
is one more `Retained` line here (its time column should be indexed, or the table small).

Deletes go a chunk at a time, each its own transaction, so that a first run on a large backlog
neither holds locks for long nor builds one huge transaction.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from typing import Callable

import asyncpg

from ..settings import Settings


@dataclass(frozen=True)
class Retained:
    table: str
    column: str  # the row's time: older than the cutoff goes
    days: Callable[[Settings], int]
    where: str = "true"  # what must also hold for a row to go


def _clicks(settings: Settings) -> int:
    return settings.retention_days


RETAINED = (
    Retained("signals", "received_at", _clicks),
    Retained("click_states", "created_at", _clicks),
    Retained("clicks_quarantine", "created_at", _clicks),
    Retained("signals_quarantine", "created_at", _clicks),
    # An event still waiting for its feed number is not pruned: it has not been offered yet.
    Retained("events", "created_at", lambda s: s.event_retention_days, "seq IS NOT NULL"),
    # The audit trail has its own (TRACKER_AUDIT_RETENTION_DAYS): deleting is all that is ever done to it.
    Retained("audit_log", "at", lambda s: s.audit_retention_days),
)


def cutoff(days: int, today: date) -> datetime:
    """The start of the oldest day kept: the same line drop_old_partitions draws for clicks."""
    return datetime.combine(today - timedelta(days=days), time(), tzinfo=timezone.utc)


async def prune_table(conn: asyncpg.Connection, retained: Retained, before: datetime, chunk: int = 5000) -> int:
    """Delete the rows of one table older than `before`, a chunk per transaction; how many went.
    Table and column names come from RETAINED, never from input."""
    statement = (
        f"WITH gone AS (DELETE FROM {retained.table} WHERE ctid = ANY (ARRAY(SELECT ctid FROM {retained.table} "
        f"WHERE {retained.column} < $1 AND ({retained.where}) LIMIT $2)) RETURNING 1) SELECT count(*) FROM gone")
    total = 0
    while True:
        n: int = await conn.fetchval(statement, before, chunk)
        total += n
        if n < chunk:
            return total


async def prune(conn: asyncpg.Connection, settings: Settings, today: date | None = None,
                chunk: int = 5000) -> dict[str, int]:
    """Prune every table of RETAINED past its retention; rows deleted per table."""
    today = today or datetime.now(timezone.utc).date()
    return {r.table: await prune_table(conn, r, cutoff(r.days(settings), today), chunk) for r in RETAINED}
