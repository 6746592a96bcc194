"""A filtered consumer of GET /v1/events (`types=`) pages on while postbacks write events and the
sequencer numbers them: it must receive every event of its types exactly once. A short filtered
page moves `next` past the other types' events too, and that position has to come from the same
snapshot as the page; taken in a second statement it passed events numbered in between, never to
be seen again."""
from __future__ import annotations

import asyncio

from tracker import keys
from tracker.domain.clickid import new_click_id
from tracker.domain.events import CONVERSION_CREATED, POSTBACK_ORPHANED, decode_cursor, encode_cursor
from tracker.store.db import connect
from tracker.store.events import emit, read_feed, sequence

from .conftest import ADMIN
from .test_postbacks import admitad
from .waiting import until

WRITERS = 6
ROUNDS = 60


async def sequenced(database: str) -> None:
    """Every event committed so far has its number (None: another sequencer was running)."""
    conn = await connect(database)
    try:
        async def all_numbered() -> bool:
            return await sequence(conn) is not None and not await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM events WHERE seq IS NULL)")
        await until(all_numbered, "every committed event numbered")
    finally:
        await conn.close()


async def test_a_filtered_consumer_gets_every_event_of_its_type_while_writers_commit(client, database):
    await sequenced(database)
    async with client.server.app[keys.POOL].acquire() as conn:
        _, top = await read_feed(conn, 0, 1000, [CONVERSION_CREATED])
    written: set[str] = set()
    writing = True

    async def writer(n: int) -> None:
        """Each transaction: a conversion and an orphan, as a busy network's postbacks write them."""
        conn = await connect(database)
        try:
            for i in range(ROUNDS):
                mark = f"w{n}-{i}"
                async with conn.transaction():
                    await emit(conn, CONVERSION_CREATED, {"conversion": {"order_id": mark}}, mark)
                    await emit(conn, POSTBACK_ORPHANED, {"order_id": mark})
                written.add(mark)
                await asyncio.sleep(0)
        finally:
            await conn.close()

    async def orphans_over_http() -> None:
        """Real postbacks through the app too: orphans, the type the consumer skips."""
        for i in range(ROUNDS):
            resp = await client.get("/postback/admitad", params=admitad(new_click_id()[0], f"FF-ORPHAN-{i}"))
            assert resp.status == 200

    async def sequencer() -> None:
        """Numbers in small batches, as often as it can: many commits of the feed's order."""
        conn = await connect(database)
        try:
            while writing:
                await sequence(conn, batch=3)
                await asyncio.sleep(0)
        finally:
            await conn.close()

    seen: list[str] = []

    async def consume(after: int, until_caught_up: bool) -> int:
        cursor = encode_cursor(after)
        while True:
            resp = await client.get("/v1/events", params={"after": cursor, "types": CONVERSION_CREATED,
                                                          "limit": "1000"}, headers=ADMIN)
            assert resp.status == 200, await resp.text()
            page = await resp.json()
            assert all(e["type"] == CONVERSION_CREATED for e in page["events"])
            seen.extend(e["data"]["conversion"]["order_id"] for e in page["events"])
            if not page["events"] and (until_caught_up or not writing):
                return decode_cursor(page["next"])
            cursor = page["next"]

    numbering = asyncio.create_task(sequencer())
    reading = asyncio.create_task(consume(top, until_caught_up=False))
    await asyncio.gather(*(writer(n) for n in range(WRITERS)), orphans_over_http())
    writing = False
    await numbering
    position = await asyncio.wait_for(reading, 60)
    await sequenced(database)
    await consume(position, until_caught_up=True)
    assert len(written) == WRITERS * ROUNDS
    assert len(seen) == len(set(seen)), "an event was handed out twice"
    missing = written - set(seen)
    assert not missing, f"{len(missing)} of {len(written)} conversion.created events never handed out"


async def test_a_short_filtered_page_moves_next_only_past_what_it_covered(database, client):
    """The position of a short filtered page is the newest number of the page's own snapshot: later
    events of the filtered type come after it."""
    await sequenced(database)
    pool = client.server.app[keys.POOL]
    _, before = await read_feed(pool, 0, 1000, [CONVERSION_CREATED])
    async with pool.acquire() as conn:
        async with conn.transaction():
            await emit(conn, POSTBACK_ORPHANED, {"order_id": "FF-SHORT-1"})
    await sequenced(database)
    events, moved = await read_feed(pool, before, 1000, [CONVERSION_CREATED])
    assert events == [] and moved > before  # moved past the orphan it skipped
    async with pool.acquire() as conn:
        async with conn.transaction():
            await emit(conn, CONVERSION_CREATED, {"conversion": {"order_id": "FF-SHORT-2"}}, "FF-SHORT-2")
    await sequenced(database)
    events, _ = await read_feed(pool, moved, 1000, [CONVERSION_CREATED])
    assert [e["data"]["conversion"]["order_id"] for e in events] == ["FF-SHORT-2"]
