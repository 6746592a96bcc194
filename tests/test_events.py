"""The outbox and the pull feed against real PostgreSQL: events are written in the transaction of the
change (a rollback or a duplicate writes none), a click is announced overwritten once however many
workers flush it, and a reader paging GET /v1/events sees every event exactly once while many
writers hold transactions open and commit out of order."""
from __future__ import annotations

import asyncio
import random
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pytest

from tracker import keys
from tracker.domain.clickid import new_click_id
from tracker.domain.conversions import Postback
from tracker.domain.events import START, decode_cursor, encode_cursor
from tracker.domain.signals import Signal
from tracker.domain.states import StoredState
from tracker.store.conversions import record_postback
from tracker.store.db import connect, create_pool
from tracker.store.events import emit, read_feed, sequence
from tracker.store.merchants import load
from tracker.store.retention import RETAINED, cutoff, prune_table
from tracker.store.signals import SignalWriter

from .conftest import ADMIN
from .test_postbacks import activate, admitad
from .waiting import until

# Also behind PgBouncer in transaction mode (conftest.py)
pytestmark = [pytest.mark.pooled, pytest.mark.clustered]


async def settle(client) -> None:  # noqa: ANN001
    """Run the sequencer once here, so that every event committed so far is in the feed (the app's
    own sequencer does it within ~0.1 s; None means it was running: then try again)."""
    async with client.server.app[keys.POOL].acquire() as conn:
        async def ran() -> bool:
            return await sequence(conn) is not None
        await until(ran, "a run of the sequencer here")


async def feed(client, after=None, limit=1000, types=None):  # noqa: ANN001, ANN201
    await settle(client)
    params = {"limit": str(limit)}
    if after is not None:
        params["after"] = after
    if types:
        params["types"] = types
    resp = await client.get("/v1/events", params=params, headers=ADMIN)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def head(client) -> str:  # noqa: ANN001
    """The cursor after every event so far."""
    after = None
    while True:
        page = await feed(client, after)
        if not page["events"] and page["next"] == after:
            return after or START
        after = page["next"]


async def new_events(client, after: str) -> list[dict[str, Any]]:  # noqa: ANN001
    page = await feed(client, after)
    return page["events"]


async def test_postbacks_write_their_events_and_duplicates_none(client, tokens, db):
    cid = await activate(client, tokens, "ev-user-1")
    start = await head(client)
    assert (await client.get("/postback/admitad", params=admitad(cid, "EV-1", payment="10.00"))).status == 200
    [created] = await new_events(client, start)
    assert created["id"].startswith("evt_") and created["type"] == "conversion.created"
    assert created["created_at"].endswith("Z") and decode_cursor(created["cursor"]) > 0
    assert created["data"] == {"conversion": {
        "network": "admitad", "order_id": "EV-1", "click_id": cid, "user_id": "ev-user-1", "merchant": "aliexpress",
        "status": "pending", "amount": "100.00", "commission": "10.00", "currency": "RUB", "cashback": "5.00",
        "order_time": "2026-11-26T02:40:00Z"}}
    mark = created["cursor"]
    await client.get("/postback/admitad", params=admitad(cid, "EV-1", payment="10.00"))  # a network retrying
    assert await new_events(client, mark) == []
    await client.get("/postback/admitad", params=admitad(cid, "EV-1", "approved", payment="12.00"))
    [moved] = await new_events(client, mark)
    assert moved["type"] == "conversion.status_changed" and moved["data"]["previous_status"] == "pending"
    assert (moved["data"]["conversion"]["status"], moved["data"]["conversion"]["cashback"]) == ("approved", "6.00")
    mark = moved["cursor"]
    await client.get("/postback/admitad", params=admitad(cid, "EV-1", "pending", payment="12.00"))  # late
    assert await new_events(client, mark) == []
    await client.get("/postback/admitad", params=admitad(cid, "EV-1", "approved", payment="9.00",
                                                         order_sum="90.00"))  # a partial return
    [lowered] = await new_events(client, mark)
    assert lowered["type"] == "conversion.amount_changed"
    assert lowered["data"]["previous"] == {"amount": "100.00", "commission": "12.00", "currency": "RUB",
                                           "cashback": "6.00"}
    assert lowered["data"]["conversion"]["cashback"] == "4.50"
    outcomes = [r["outcome"] for r in await db.fetch(
        "SELECT outcome FROM postback_history WHERE order_id = 'EV-1' ORDER BY id")]
    assert outcomes == ["accepted", "duplicate", "accepted", "duplicate", "accepted"]


async def test_a_refused_adjustment_writes_no_event(client, tokens, db):
    """Through ePN, whose counters no other test module counts exactly."""
    cid = await activate(client, tokens, "ev-user-1b", "aliexpress-epn")

    def epn(status: str, commission: str) -> dict[str, str]:
        return {"token": "test-epn-token", "click_id": cid, "order_number": "EV-EPN-1", "order_status": status,
                "revenue": "100.00", "commission_fee": commission, "currency": "USD"}

    await client.get("/postback/epn", params=epn("completed", "10.00"))
    mark = await head(client)
    resp = await client.get("/postback/epn", params=epn("completed", "15.00"))  # more after approval: refused
    assert resp.status == 200 and await new_events(client, mark) == []
    assert [r["outcome"] for r in await db.fetch(
        "SELECT outcome FROM postback_history WHERE order_id = 'EV-EPN-1' ORDER BY id")] == [
        "accepted", "adjustment_refused"]


async def test_orphans_are_announced_once_per_order_and_reason(client, tokens):
    start = await head(client)
    unknown = new_click_id()[0]
    for _ in range(3):  # the network retries
        await client.get("/postback/admitad", params=admitad(unknown, "EV-ORPHAN"))
    await client.get("/postback/admitad", params=admitad("not-a-click-id", "EV-ORPHAN-2"))
    events = await new_events(client, start)
    assert [(e["type"], e["data"]) for e in events] == [
        ("postback.orphaned", {"network": "admitad", "order_id": "EV-ORPHAN", "click_id": unknown,
                               "reason": "unknown_click"}),
        ("postback.orphaned", {"network": "admitad", "order_id": "EV-ORPHAN-2", "click_id": "not-a-click-id",
                               "reason": "malformed_click_id"})]


async def test_a_rolled_back_postback_writes_no_event(client, tokens, database, db):
    cid = await activate(client, tokens, "ev-user-2")
    start = await head(client)
    merchants, _ = await load(db)
    pb = Postback(click_id=cid, order_id="EV-ROLLBACK", status="pending", status_word="pending",
                  amount=Decimal("10"), commission=Decimal("1"), currency="RUB", order_time=None)
    conn = await connect(database)
    try:
        with pytest.raises(RuntimeError):
            async with conn.transaction():  # the change fails after the postback's own statements
                result = await record_postback(conn, "admitad", pb, {"order_id": "EV-ROLLBACK"}, merchants.get)
                assert result.event == "conversion.created"
                raise RuntimeError("rolled back")
    finally:
        await conn.close()
    assert await db.fetchval("SELECT count(*) FROM conversions WHERE order_id = 'EV-ROLLBACK'") == 0
    assert await new_events(client, start) == []


async def test_an_overwritten_click_yields_one_event_however_many_workers_flush_it(client, tokens, database):
    cid = await activate(client, tokens, "ev-user-3")
    start = await head(client)
    pool = await create_pool(database, min_size=4, max_size=8)
    writers = [SignalWriter(pool) for _ in range(4)]  # four workers' writers
    overwritten: StoredState = {"state": "overwritten", "overwritten_at": 1_795_660_900_000}
    signal = Signal("foreign_affiliate_param", "cj", {"param": "cjevent"}, 1_795_660_900_000, False)
    risk = Signal("cross_device", None, {"param": "cjevent"}, 1_795_660_900_000, False)
    try:
        for round_ in range(3):  # each round all four flush the same click at once
            for writer in writers:
                writer.add(cid, "aliexpress", "ev-user-3", [signal, risk] if round_ == 0 else [signal], overwritten)
            await asyncio.gather(*(w.flush() for w in writers))
    finally:
        await pool.close()
    events = await new_events(client, start)
    assert [(e["type"], e["data"]) for e in events] == [("click.overwritten", {
        "click_id": cid, "user_id": "ev-user-3", "merchant": "aliexpress", "action": "reactivate",
        "signals": [{"kind": "foreign_affiliate_param", "network": "cj"}]})]


async def test_an_overwrite_flushed_after_a_postback_converted_the_click_is_still_announced(client, tokens, database):
    """Observe found the click overwritten (and told the shopper to re-activate), but a postback
    converted it before the signal writer stored that state: the row stays converted, and the
    overwrite is announced all the same, once."""
    cid = await activate(client, tokens, "ev-user-5")
    start = await head(client)
    assert (await client.get("/postback/admitad", params=admitad(cid, "EV-LATE-FLUSH"))).status == 200
    pool = await create_pool(database, min_size=1, max_size=2)
    overwritten: StoredState = {"state": "overwritten", "overwritten_at": 1_795_660_900_000}
    signal = Signal("foreign_affiliate_param", "cj", {"param": "cjevent"}, 1_795_660_900_000, False)
    try:
        for _ in range(2):  # a second flush of the same state announces nothing more
            writer = SignalWriter(pool)
            writer.add(cid, "aliexpress", "ev-user-5", [signal], overwritten)
            await writer.flush()
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT state FROM click_states WHERE click_id = $1", cid) == "converted"
    finally:
        await pool.close()
    events = await new_events(client, start)
    assert [(e["type"], e["data"].get("click_id") or e["data"]["conversion"]["click_id"]) for e in events] == [
        ("conversion.created", cid), ("click.overwritten", cid)]
    assert events[1]["data"]["signals"] == [{"kind": "foreign_affiliate_param", "network": "cj"}]


async def test_observe_to_overwritten_to_event(client, tokens):
    """The whole way: the extension reports a foreign affiliate parameter, the signal writer flushes,
    the feed has the event."""
    token = tokens.mint("ev-user-4")
    cid = await activate(client, tokens, "ev-user-4")
    start = await head(client)
    resp = await client.post("/v1/observe", headers={"Authorization": f"Bearer {token}"}, json={
        "click_id": cid, "events": [{"type": "navigation", "url": "https://aliexpress.ru/"},
                                    {"type": "navigation", "url": "https://aliexpress.ru/?cjevent=abc1234567890"}]})
    assert (await resp.json())["state"] == "overwritten"
    events = await until(lambda: new_events(client, start), "the overwrite's event in the feed")
    assert [(e["type"], e["data"]["click_id"], e["data"]["signals"]) for e in events] == [
        ("click.overwritten", cid, [{"kind": "foreign_affiliate_param", "network": "cj"}])]


@pytest.mark.parametrize("query,code", [
    ({"after": "nonsense"}, "bad_cursor"), ({"after": ""}, "bad_cursor"),
    ({"after": encode_cursor(1) + "="}, "bad_cursor"), ({"after": "A" * 5000}, "bad_cursor"),
    ({"after": "AgAAAAAAAAAB"}, "bad_cursor"), ({"after": "AQAAAAAAAA.B"}, "bad_cursor"),
    ({"limit": "0"}, "bad_limit"), ({"limit": "1001"}, "bad_limit"), ({"limit": "abc"}, "bad_limit"),
    ({"limit": "1.5"}, "bad_limit"), ({"limit": "-1"}, "bad_limit"), ({"limit": "\u0661"}, "bad_limit"),
    ({"types": "conversion.created,nope"}, "bad_types"), ({"types": ""}, "bad_types"),
    ({"types": "conversion.created,"}, "bad_types"),
])
async def test_bad_feed_input_is_a_400(client, query, code):
    resp = await client.get("/v1/events", params=query, headers=ADMIN)
    assert resp.status == 400 and (await resp.json())["error"] == code


async def test_the_feed_needs_the_admin_key_and_one_of_each_parameter(client, tokens):
    assert (await client.get("/v1/events")).status == 401
    resp = await client.get("/v1/events", headers={"Authorization": f"Bearer {tokens.mint('someone')}"})
    assert resp.status == 401 and (await resp.json())["error"] == "unauthorized"
    resp = await client.get(f"/v1/events?after={START}&after={START}", headers=ADMIN)
    assert resp.status == 400 and (await resp.json())["error"] == "duplicate_parameter"


async def test_caught_up_means_no_events_and_next_is_after(client, tokens):
    cursor = await head(client)
    page = await feed(client, cursor)
    assert page == {"events": [], "next": cursor}
    cid = await activate(client, tokens, "ev-user-5")
    await client.get("/postback/admitad", params=admitad(cid, "EV-TYPES"))
    await client.get("/postback/admitad", params=admitad(unknown := new_click_id()[0], "EV-TYPES-ORPHAN"))
    # A filter skips the other types, and the position moves past them too.
    page = await feed(client, cursor, types="postback.orphaned")
    assert [e["data"]["click_id"] for e in page["events"]] == [unknown]
    assert (await feed(client, page["next"], types="conversion.created")) == {"events": [], "next": page["next"]}


async def events_after(client, after: str, n: int) -> list[dict[str, Any]]:  # noqa: ANN001
    """The events after `after` once there are `n` (the sequencer numbers them within ~0.1 s)."""
    async def enough() -> list[dict[str, Any]] | None:
        events = await new_events(client, after)
        return events if len(events) >= n else None
    return await until(enough, f"{n} events after {after}")


async def test_an_event_committed_late_comes_after_the_cursor_not_behind_it(client, database):
    """T1 takes the smaller id and stays open; T2 writes and commits: T2's event is handed out, and
    T1's, committed later, comes after it. A feed by id would have handed out T2's id as a cursor and
    skipped T1's event for ever."""
    start = await head(client)
    t1, t2 = await connect(database), await connect(database)
    try:
        tx1 = t1.transaction()
        await tx1.start()
        await emit(t1, "test.order", {"n": 1})
        async with t2.transaction():
            await emit(t2, "test.order", {"n": 2})
        [second] = await events_after(client, start, 1)
        assert second["data"] == {"n": 2}
        await tx1.commit()
        [first] = await events_after(client, second["cursor"], 1)
        assert first["data"] == {"n": 1}
        ids = await db_ids(database, [first["id"], second["id"]])
        assert ids[0] < ids[1]  # T1's id is the smaller one, yet its event comes second
    finally:
        await t1.close()
        await t2.close()


async def db_ids(database: str, public_ids: list[str]) -> list[int]:
    conn = await connect(database)
    try:
        return [await conn.fetchval("SELECT id FROM events WHERE public_id = $1", p) for p in public_ids]
    finally:
        await conn.close()


async def test_concurrent_writers_and_a_paging_reader_see_every_event_exactly_once(client, database):
    """Eight writers on their own connections hold transactions open for random times (so that they
    commit in another order than they took their ids), a tenth of them roll back; a reader pages
    with limit 3 all along. It must see every committed event once and no rolled-back one."""
    start = await head(client)
    rng = random.Random(15)
    committed: set[str] = set()
    rolled_back: set[str] = set()
    writing = True

    async def writer(n: int) -> None:
        conn = await connect(database)
        try:
            for i in range(25):
                marks = [f"w{n}-{i}-{k}" for k in range(rng.randint(1, 3))]
                tx = conn.transaction()
                await tx.start()
                for mark in marks:
                    await emit(conn, "test.concurrent", {"mark": mark})
                await asyncio.sleep(rng.uniform(0, 0.02))  # the interleaving under test: a transaction held open
                if rng.random() < 0.1:
                    await tx.rollback()
                    rolled_back.update(marks)
                else:
                    await tx.commit()
                    committed.update(marks)
        finally:
            await conn.close()

    seen: list[str] = []
    cursors: list[int] = []

    async def reader() -> None:
        after = start
        while True:
            done = not writing  # decided before the call: a page after the writers ended
            page = await feed(client, after, limit=3)
            seen.extend(e["data"]["mark"] for e in page["events"] if e["type"] == "test.concurrent")
            cursors.extend(decode_cursor(e["cursor"]) for e in page["events"])
            if done and not page["events"]:
                assert page["next"] == after
                return
            after = page["next"]

    reading = asyncio.create_task(reader())
    await asyncio.gather(*(writer(n) for n in range(8)))
    writing = False
    await asyncio.wait_for(reading, 60)
    assert len(seen) == len(set(seen)), "an event was seen twice"
    assert set(seen) == committed and not set(seen) & rolled_back
    assert cursors == sorted(cursors) and len(committed) > 200


async def test_the_feed_reads_the_same_from_the_store(database, client):
    """read_feed is what the endpoint serves: pages join up, and a cursor past the end stays put."""
    pool = await create_pool(database, min_size=1, max_size=2)
    try:
        events, position = await read_feed(pool, 0, 2, None)
        if events:
            assert position == decode_cursor(events[-1]["cursor"])
        far = 2**62
        assert await read_feed(pool, far, 10, None) == ([], far)
    finally:
        await pool.close()


async def test_maintain_prunes_events_past_retention_with_their_deliveries(db, client):
    start = await head(client)
    await db.execute("INSERT INTO webhooks (name, url, secret, active) VALUES ('prune-hook', "
                     "'http://127.0.0.1:9/', 'whsec_x', false)")
    async with db.transaction():
        await emit(db, "test.prune", {"age": "old"})
    [old] = await events_after(client, start, 1)
    await db.execute("INSERT INTO webhook_deliveries (event_id, webhook) SELECT id, 'prune-hook' FROM events "
                     "WHERE public_id = $1", old["id"])
    await db.execute("UPDATE events SET created_at = now() - interval '31 days' WHERE type = 'test.prune'")
    async with db.transaction():
        await emit(db, "test.prune", {"age": "new"})
    await events_after(client, old["cursor"], 1)
    [events] = [r for r in RETAINED if r.table == "events"]
    assert await prune_table(db, events, cutoff(30, datetime.now(timezone.utc).date())) == 1
    assert [e["data"]["age"] for e in await new_events(client, start)] == ["new"]
    assert await db.fetchval("SELECT count(*) FROM webhook_deliveries WHERE webhook = 'prune-hook'") == 0
    await db.execute("DELETE FROM webhooks WHERE name = 'prune-hook'")
