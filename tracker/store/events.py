"""The outbox in PostgreSQL: events written inside the transaction of the change they report, the
sequencer that numbers them after commit (feed order) and fans them out to the webhooks, and the
pull feed that reads them in that order.

The sequencer runs in one transaction at a time (a transaction-scoped advisory lock, tried by every
worker in turn), numbers the committed events that have none yet, in id order, and commits. Its
numbers therefore become visible in order, all of a run's at once: a reader that has seen number n
has seen every number below n, and nothing can appear behind a cursor it was given. A writer's
transaction only ever inserts its events; how long it stays open costs nothing but its own delay.
"""
from __future__ import annotations

from typing import Any, Sequence, TypeAlias

from ..domain.events import Envelope, encode_cursor, envelope
from .db import Connection, Executor

Conn: TypeAlias = Executor
SEQUENCER_LOCK = 7_403_911_004  # pg_advisory_xact_lock key (store/db.py has the others)
INSERT = "INSERT INTO events (type, ordering_key, data) VALUES ($1, $2, $3)"
# One statement: number a batch of committed events after the last number given, move that number
# on, and write a delivery for each subscriber whose `types` take the event (so that a subscriber
# added by a sync receives the events numbered after it).
_SEQUENCE = (
    "WITH top AS (SELECT top FROM events_sequencer), "
    "batch AS (SELECT id, row_number() OVER (ORDER BY id) AS n FROM events WHERE seq IS NULL ORDER BY id LIMIT $1), "
    "numbered AS (UPDATE events e SET seq = top.top + batch.n FROM top, batch WHERE e.id = batch.id "
    "RETURNING e.id, e.type, e.ordering_key, e.created_at), "
    "moved AS (UPDATE events_sequencer SET top = top + (SELECT count(*) FROM batch)), "
    "fanned AS (INSERT INTO webhook_deliveries (event_id, webhook, ordering_key, created_at) "
    "SELECT n.id, w.name, n.ordering_key, n.created_at FROM numbered n JOIN webhooks w "
    "ON w.active AND (w.types IS NULL OR n.type = ANY (w.types)) RETURNING 1) "
    "SELECT (SELECT count(*) FROM numbered) AS numbered, (SELECT count(*) FROM fanned) AS fanned")
# After a burst (a backlog numbered after an outage, a bulk import) the planner's statistics of the
# deliveries table describe the table before it: with them, a claim's per-conversion order check
# scanned the whole backlog for each candidate (560 ms a claim at 18,000 pending, measured). Past
# this many new rows the sequencer refreshes them at once instead of waiting for autovacuum.
ANALYZE_AFTER = 1000


async def emit(conn: Connection, type_: str, data: dict[str, Any], ordering_key: str | None = None) -> None:
    """Write one event; call it inside the transaction of the change it reports."""
    await conn.execute(INSERT, type_, ordering_key, data)


async def sequence(conn: Connection, batch: int = 5000) -> int | None:
    """Number the events committed since the last run (at most `batch`); None when another worker
    is sequencing right now. The numbering statement runs after the lock is held, so its snapshot
    sees everything the previous run committed. Nothing to number (the common case, checked first
    through the partial index of unnumbered events) costs one round trip instead of a transaction."""
    if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM events WHERE seq IS NULL)"):
        return 0
    async with conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", SEQUENCER_LOCK):
            return None
        row = await conn.fetchrow(_SEQUENCE, batch)
        assert row is not None  # a SELECT of two counts: always one row
    if row["fanned"] >= ANALYZE_AFTER:
        await conn.execute("ANALYZE webhook_deliveries")
    return int(row["numbered"])


# The page and the newest number given, in one statement and so one snapshot. The sequencer's
# numbers become visible in order, all of a run's at once, so a snapshot that shows number n shows
# every number below it: a short page has every event of its types up to `top`, and moving the
# position there skips only events the page looked at. (Read in a second statement, `top` took in
# events numbered in between: a filtered consumer lost them for ever.)
_PAGE = (
    "WITH page AS (SELECT seq, public_id, type, created_at, data FROM events "
    "WHERE seq > $1 AND ($2::text[] IS NULL OR type = ANY ($2::text[])) ORDER BY seq LIMIT $3) "
    "SELECT top.top, page.* FROM (SELECT max(seq) AS top FROM events) AS top "
    "LEFT JOIN page ON true ORDER BY page.seq")


async def read_feed(conn: Conn, after: int, limit: int,
                    types: Sequence[str] | None) -> tuple[list[Envelope], int]:
    """Up to `limit` events numbered after `after`, in order, and the number to continue from. With
    a `types` filter that leaves a page short, the position moves past the other events read too
    (to the newest number of the page's snapshot), so that a consumer of a rare type does not read
    the same events on every call."""
    rows = await conn.fetch(_PAGE, after, list(types) if types else None, limit)
    page = [r for r in rows if r["seq"] is not None]  # no events: one row, of `top` alone
    events = [envelope(r["public_id"], r["type"], r["created_at"], encode_cursor(r["seq"]), r["data"])
              for r in page]
    position = page[-1]["seq"] if page else after
    top = rows[0]["top"]
    if types and len(page) < limit and top is not None and top > position:
        position = top
    return events, position

