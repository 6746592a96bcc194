"""The outbox in PostgreSQL: events written inside the transaction of the change they report, each
with one delivery row per interested webhook, and the pull feed that reads them in cursor order.

Feed order is (xid, id). A reader returns only events whose transaction id is below the horizon,
`pg_snapshot_xmin` of a snapshot: every transaction below it has ended, and a transaction that has
not written yet gets a larger id than any in that snapshot, so no event can ever commit below a
position the feed has handed out. An open write transaction holds the horizon back (the feed waits
for it, it never skips past it): the writers here keep their transactions to milliseconds.
"""
from __future__ import annotations

from typing import Any, Sequence, TypeAlias

import asyncpg
import orjson

from ..domain.events import encode_cursor, envelope

# One statement, one round trip: the event and its deliveries (a subscriber's `types` filter
# applied here, so that the dispatcher only ever sees work it has to do).
EMIT = (
    "WITH e AS (INSERT INTO events (type, ordering_key, data) VALUES ($1, $2, $3::jsonb) "
    "RETURNING id, type, ordering_key) "
    "INSERT INTO webhook_deliveries (event_id, webhook, ordering_key) "
    "SELECT e.id, w.name, e.ordering_key FROM e JOIN webhooks w "
    "ON w.active AND (w.types IS NULL OR e.type = ANY (w.types))")
Conn: TypeAlias = asyncpg.Connection | asyncpg.Pool


async def emit(conn: asyncpg.Connection, type_: str, data: dict[str, Any], ordering_key: str | None = None) -> None:
    """Write one event; call it inside the transaction of the change it reports."""
    await conn.execute(EMIT, type_, ordering_key, orjson.dumps(data).decode())


async def horizon(conn: Conn) -> int:
    """The feed's visibility horizon now: every transaction id below it has ended."""
    return int(await conn.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot())::text"))


async def read_feed(conn: Conn, after: tuple[int, int], limit: int,
                    types: Sequence[str] | None) -> tuple[list[dict[str, Any]], tuple[int, int]]:
    """Up to `limit` events after the position `after`, oldest first, and the position to continue
    from. With a `types` filter that leaves a page short, the position moves past the other events
    read too, so that a consumer of a rare type does not scan the same events on every call."""
    below = await horizon(conn)
    rows = await conn.fetch(
        "SELECT id, xid::text AS xid, public_id, type, created_at, data::text AS data FROM events "
        "WHERE (xid, id) > ($1::text::xid8, $2::bigint) AND xid < $3::text::xid8 "
        "AND ($4::text[] IS NULL OR type = ANY ($4::text[])) ORDER BY xid, id LIMIT $5",
        str(after[0]), after[1], str(below), list(types) if types else None, limit)
    events = []
    for r in rows:
        xid = int(r["xid"])
        events.append(envelope(r["public_id"], r["type"], r["created_at"], encode_cursor(xid, r["id"]),
                               orjson.loads(r["data"])))
    position = (int(rows[-1]["xid"]), rows[-1]["id"]) if rows else after
    if types and len(rows) < limit:
        last = await conn.fetchrow(
            "SELECT xid::text AS xid, id FROM events WHERE (xid, id) > ($1::text::xid8, $2::bigint) "
            "AND xid < $3::text::xid8 ORDER BY xid DESC, id DESC LIMIT 1", str(after[0]), after[1], str(below))
        if last is not None:
            position = (int(last["xid"]), last["id"])
    return events, position


async def prune(conn: asyncpg.Connection, retention_days: int, chunk: int = 5000) -> int:
    """Delete events older than the retention (their deliveries go with them), a chunk per
    transaction so that no long transaction holds the feed's horizon back."""
    total = 0
    while True:
        n = await conn.fetchval(
            "WITH gone AS (DELETE FROM events WHERE id IN (SELECT id FROM events WHERE created_at < "
            "now() - make_interval(days => $1) ORDER BY id LIMIT $2) RETURNING 1) SELECT count(*) FROM gone",
            retention_days, chunk)
        total += n
        if n < chunk:
            return total
