"""Every typed read of the store gives the keys its type names: each query a read sends is described
by PostgreSQL itself (a prepared statement's columns) and compared with its TypedDict's keys, so a
column added to one and not the other fails here, not in a view that happens to read it."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from tracker.domain.clickid import new_click_id
from tracker.domain.rows import ClickRow, ClickStateRow, ConversionRow, OrderRow, OrphanRow, PostbackRow, SignalRow
from tracker.store import api_keys, audit, conversions, lookups, overview, support, webhooks
from tracker.store.db import json_codecs

SENT: list[str] = []  # the queries the reads sent, in order


class Recording(asyncpg.Connection):
    """A real connection that notes the text of each query it is asked to fetch."""

    async def fetch(self, query: str, *args: Any, **kwargs: Any) -> list[Any]:
        SENT.append(query)
        return await super().fetch(query, *args, **kwargs)

    async def fetchrow(self, query: str, *args: Any, **kwargs: Any) -> Any:
        SENT.append(query)
        return await super().fetchrow(query, *args, **kwargs)


@pytest.fixture
async def pool(database: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database, min_size=1, max_size=1, connection_class=Recording, init=json_codecs)
    yield pool
    await pool.close()


def keys(row_type: Any, *, without: tuple[str, ...] = ()) -> list[str]:
    return [k for k in row_type.__annotations__ if k not in without]


CID = new_click_id()[0]
SINCE = datetime(2026, 1, 1, tzinfo=timezone.utc)
Read = Callable[[asyncpg.Pool], Awaitable[object]]
READS: list[tuple[str, Read, list[list[str]]]] = [
    ("get_click", lambda p: support.get_click(p, CID), [keys(ClickRow)]),
    ("get_state", lambda p: support.get_state(p, CID), [keys(ClickStateRow)]),
    ("get_signals", lambda p: support.get_signals(p, CID), [keys(SignalRow)]),
    ("conversions_for_click", lambda p: conversions.conversions_for_click(p, CID),
     [keys(ConversionRow, without=("history",)), keys(PostbackRow)]),
    ("orders", lambda p: lookups.orders(p, "O-1"), [keys(OrderRow)]),
    ("orders of a network", lambda p: lookups.orders(p, "O-1", "admitad"), [keys(OrderRow)]),
    ("open_orphans", lambda p: lookups.open_orphans(p, 5), [keys(OrphanRow)]),
    ("open_orphans before", lambda p: lookups.open_orphans(p, 5, 10), [keys(OrphanRow)]),
    ("orphans_of_order", lambda p: lookups.orphans_of_order(p, "O-1"), [keys(OrphanRow)]),
    ("audit page", lambda p: audit.page(p, user_id="u", actor=None, before=None, limit=5), [keys(audit.AuditRow)]),
    ("api keys", lambda p: api_keys.listed(p), [keys(api_keys.ListedKey)]),
    ("webhook claim", lambda p: webhooks.claim(p, "none", 5, 30.0), [keys(webhooks.Claimed)]),
    ("overview", lambda p: overview.overview(p, SINCE),
     [keys(t) for t in (overview.Activations, overview.Hourly, overview.Overwritten, overview.ByNetwork,
                        overview.ByStatus)]),
]


@pytest.mark.parametrize("name,read,expected", READS, ids=[r[0] for r in READS])
async def test_a_read_gives_the_keys_of_its_type(pool: asyncpg.Pool, name: str, read: Read,
                                                 expected: list[list[str]]) -> None:
    del SENT[:]
    await read(pool)
    async with pool.acquire() as conn:
        described = [[a.name for a in (await conn.prepare(q)).get_attributes()] for q in SENT]
    assert [sorted(c) for c in described] == [sorted(k) for k in expected], name
