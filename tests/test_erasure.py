"""Erasure: DELETE /v1/users/{user_id} and `tracker users erase` remove a user's personal data from
PostgreSQL and Redis, keep the money under a pseudonym, answer zeros on a repeat, are audited, leave
the user's tokens working, and hold while that user's clicks are still arriving (in the writer's
batches, in the spool). They run directly and behind PgBouncer in transaction mode (`pooled`): the
workers' sweep listens on the primary itself, the command line's statements are fit for the pooler."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from typing import Any, cast

import orjson
import pytest

from tracker import keys
from tracker.app import create_app
from tracker.domain.clickid import click_time, new_click_id
from tracker.domain.detection import SessionState
from tracker.domain.signals import Signal
from tracker.domain.states import ClickState
from tracker.store.click import to_record
from tracker.store.clicks import Click, ClickWriter
from tracker.store.db import create_pool
from tracker.store.erasure import erase as erase_now
from tracker.store.redis_keys import session_key, state_key
from tracker.store.refused import quarantine
from tracker.store.spool import Spool

from .conftest import ADMIN, BROWSER, cli, redis_client, redis_value
from .test_console import sign_in
from .test_keys import bearer, create_key
from .test_observe import activate, observe
from .test_postbacks import admitad
from .waiting import stored, until

pytestmark = pytest.mark.pooled
ZEROS = {"clicks": 0, "conversions": 0, "signals": 0, "events": 0, "sessions": 0}


async def erase(client, user: str, headers: dict[str, str] = ADMIN) -> dict[str, Any]:  # noqa: B006
    resp = await client.delete(f"/v1/users/{user}", headers=headers)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def traces(db, settings, user: str) -> list[str]:  # noqa: ANN001
    """Where the user id still appears in PostgreSQL, outside the audit trail and the erasure record."""
    found = []
    for table, column in (("clicks", "user_id"), ("conversions", "user_id"), ("click_states", "user_id")):
        if await db.fetchval(f"SELECT count(*) FROM {table} WHERE {column} = $1", user):
            found.append(table)
    if await db.fetchval("SELECT count(*) FROM events WHERE strpos(data::text, $1) > 0", f'"{user}"'):
        found.append("events")
    if await db.fetchval("SELECT count(*) FROM clicks_quarantine WHERE strpos(record, $1) > 0", f'"{user}"'):
        found.append("clicks_quarantine")
    return found


@pytest.mark.clustered  # the Redis sessions deleted on a Redis Cluster too
async def test_erasure_removes_the_users_data_everywhere_and_keeps_the_money(client, tokens, db, settings):
    user, other = "erase-me", "keep-me"
    cid, location = await activate(client, tokens, user)
    cid2, _ = await activate(client, tokens, user, merchant="nike")
    kept, _ = await activate(client, tokens, other)
    chain = [{"type": "navigation", "url": location},
             {"type": "navigation", "url": "https://aliexpress.ru/item/1.html?admitad_uid=ours0000000000000001"},
             {"type": "navigation", "url": "https://aliexpress.ru/item/1.html?admitad_uid=theirs000000000000002"}]
    assert (await observe(client, tokens, user, cid, chain)).status == 200
    assert (await observe(client, tokens, other, kept, chain[:2])).status == 200
    assert (await client.get("/postback/admitad", params=admitad(cid, "ERASE-1", payment="40.00"))).status == 200
    await stored(db, "SELECT 1 FROM signals WHERE click_id = $1", cid)
    await stored(db, "SELECT 1 FROM click_states WHERE click_id = $1 AND detector IS NOT NULL", cid)
    await db.execute("INSERT INTO clicks_quarantine (click_id, record, reason) VALUES ($1, $2, 'test')",
                     "bad", orjson.dumps(["bad", "2026-12-01T00:00:00Z", user, "nike"]).decode())
    money = await db.fetchrow("SELECT commission, cashback, amount FROM conversions WHERE order_id = 'ERASE-1'")
    assert await traces(db, settings, user) == ["clicks", "conversions", "click_states", "events",
                                                "clicks_quarantine"]

    answer = await erase(client, user)
    assert answer["user_id"] == user
    assert answer["erased"]["clicks"] == 2 and answer["erased"]["conversions"] == 1
    assert answer["erased"]["signals"] >= 1 and answer["erased"]["events"] >= 1
    assert answer["erased"]["sessions"] == 2

    assert await traces(db, settings, user) == []
    rows = await db.fetch("SELECT user_id, client_ip, user_agent, device FROM clicks WHERE click_id = ANY($1)",
                          [cid, cid2])
    assert len(rows) == 2 and all(r["user_id"].startswith("erased~") for r in rows)
    assert all(r["client_ip"] is None and r["user_agent"] is None and r["device"] is None for r in rows)
    assert await db.fetchval("SELECT count(*) FROM signals WHERE click_id = ANY($1)", [cid, cid2]) == 0
    assert await db.fetchval("SELECT detector FROM click_states WHERE click_id = $1", cid) is None
    assert await db.fetchrow("SELECT commission, cashback, amount FROM conversions "
                             "WHERE order_id = 'ERASE-1'") == money  # the books keep the money
    redis = redis_client(settings)
    try:
        for c in (cid, cid2):
            assert not await redis.exists(session_key(settings.redis_prefix, c), state_key(settings.redis_prefix, c))
        assert await redis.exists(session_key(settings.redis_prefix, kept))  # another user's stays
    finally:
        await redis.aclose()

    # No lookup, console page or feed shows anything of the user.
    assert await (await client.get(f"/v1/users/{user}/clicks", headers=ADMIN)).json() == {"clicks": [], "next": None}
    view = await (await client.get(f"/v1/clicks/{cid}", headers=ADMIN)).json()
    assert view["click"]["user_id"].startswith("erased~") and view["click"]["client_ip"] is None
    assert view["signals"] == [] and user not in json.dumps(view)
    order = await (await client.get("/v1/conversions", params={"order_id": "ERASE-1"}, headers=ADMIN)).json()
    assert order["conversions"][0]["user_id"].startswith("erased~")
    assert order["conversions"][0]["commission"] == "40.00"
    async def feed() -> str | None:
        text = await (await client.get("/v1/events", params={"limit": "1000"}, headers=ADMIN)).text()
        return text if "ERASE-1" in text else None  # once the sequencer has numbered the event

    assert f'"{user}"' not in await until(feed, "the order's event in the feed")
    assert (await sign_in(client)).status == 303
    page = await (await client.get(f"/support/users/{user}")).text()
    assert f'href="/support/clicks/{cid}"' not in page and f'href="/support/clicks/{cid2}"' not in page
    click_page = await (await client.get(f"/support/clicks/{cid}")).text()
    assert "admitad_uid=theirs" not in click_page
    # Another user is untouched.
    assert await db.fetchval("SELECT user_id FROM clicks WHERE click_id = $1", kept) == other
    assert await db.fetchval("SELECT count(*) FROM signals WHERE click_id = $1", kept) >= 0

    # A repeat changes nothing and says so; the audit trail keeps the real user id.
    assert await erase(client, user) == {"user_id": user, "erased": ZEROS}
    trail = await (await client.get("/v1/audit", params={"user_id": user, "actor": "admin"}, headers=ADMIN)).json()
    assert [e["action"] for e in trail["entries"] if e["action"] == "user.erase"] == ["user.erase", "user.erase"]

    # Erasure is not a ban: the user's token still activates, and the new click is theirs.
    new, _ = await activate(client, tokens, user)
    assert await db.fetchval("SELECT user_id FROM clicks WHERE click_id = $1", new) == user
    listed = await (await client.get(f"/v1/users/{user}/clicks", headers=ADMIN)).json()
    assert [c["click_id"] for c in listed["clicks"]] == [new]
    assert (await observe(client, tokens, user, cid, [{"type": "navigation", "url": location}])).status == 404


async def test_erasure_needs_users_erase_and_refuses_bad_ids(client, settings, tokens, db):
    lookups = create_key(settings, "no-erase", "lookups:read", "audit:read", "orphans:write", "events:read")
    resp = await client.delete("/v1/users/someone", headers=bearer(lookups))
    assert resp.status == 403 and (await resp.json())["error"] == "forbidden"
    assert (await client.delete("/v1/users/someone")).status == 401
    eraser = create_key(settings, "eraser", "users:erase")
    for bad in ("bad%20id", "x" * 65, "erased~0123", "a%00b"):
        resp = await client.delete(f"/v1/users/{bad}", headers=bearer(eraser))
        assert resp.status == 404, bad
        assert (await resp.json())["error"] == "not_found"
    assert await erase(client, "never-seen", bearer(eraser)) == {"user_id": "never-seen", "erased": ZEROS}
    trail = await (await client.get("/v1/audit", params={"actor": "eraser"}, headers=ADMIN)).json()
    assert [(e["action"], e["user_id"]) for e in trail["entries"]] == [("user.erase", "never-seen")]


@pytest.mark.clustered  # the Redis sessions deleted on a Redis Cluster too
async def test_the_command_line_erases_the_same_way(client, settings, tokens, db):
    cid, _ = await activate(client, tokens, "cli-erased")
    redis = redis_client(settings)
    try:
        await redis_value(redis, session_key(settings.redis_prefix, cid))  # the session, once its batch is sent
    finally:
        await redis.aclose()
    # In a thread: this test's own app sweeps on the erasure's NOTIFY meanwhile (its loop must run).
    out = await asyncio.to_thread(cli, settings, "users", "erase", "cli-erased",
                                  TRACKER_REDIS_PREFIX=settings.redis_prefix)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"user_id": "cli-erased", "erased": {**ZEROS, "clicks": 1, "sessions": 1}}
    assert await traces(db, settings, "cli-erased") == []
    again = await asyncio.to_thread(cli, settings, "users", "erase", "cli-erased",
                                    TRACKER_REDIS_PREFIX=settings.redis_prefix)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["erased"] == ZEROS
    assert cli(settings, "users", "erase", "bad id").returncode == 2
    actors = await db.fetch("SELECT actor FROM audit_log WHERE user_id = 'cli-erased' AND action = 'user.erase'")
    assert len(actors) == 2 and all(a["actor"].startswith("cli") for a in actors)


@pytest.mark.parametrize("durability", ["commit", "async"])
async def test_erasure_is_safe_while_the_users_clicks_are_still_arriving(aiohttp_client, settings, tokens, db,
                                                                         durability):
    user = f"arriving-{durability}"
    client = await aiohttp_client(create_app(replace(settings, durability=durability)))
    token = tokens.mint(user)

    async def click() -> str:
        resp = await client.get("/go/aliexpress", params={"u": token, "device": "d1"}, allow_redirects=False,
                                headers=BROWSER)
        assert resp.status == 302
        return resp.headers["X-Click-Id"]

    async def erase_midway() -> dict[str, Any]:
        await asyncio.sleep(0)  # let the first clicks reach the writer
        return await erase(client, user)

    results = await asyncio.gather(*(click() for _ in range(20)), erase_midway(), *(click() for _ in range(20)))
    ids, answer = [r for r in results if isinstance(r, str)], cast(dict[str, Any], results[20])
    erased_at = await db.fetchval("SELECT erased_at FROM erasures WHERE user_id = $1", user)
    if durability == "async":
        await stored(db, "SELECT CASE WHEN count(*) = $2 THEN 1 END FROM clicks WHERE click_id = ANY($1)",
                     ids, len(ids))
    rows = await db.fetch("SELECT click_id, created_at, user_id, client_ip, device FROM clicks "
                          "WHERE click_id = ANY($1)", ids)
    assert len(rows) == 40
    before = [r for r in rows if r["created_at"] <= erased_at]
    after = [r for r in rows if r["created_at"] > erased_at]
    assert before, "some clicks were made before the erasure"
    # Every click made before the erasure is erased, whether it was committed before the erasure's
    # transaction or still in the writer's batch; those made after are the user's new activity.
    assert all(r["user_id"].startswith("erased~") and r["client_ip"] is None and r["device"] is None
               for r in before), [r["click_id"] for r in before if not r["user_id"].startswith("erased~")]
    assert all(r["user_id"] == user for r in after)
    assert answer["erased"]["clicks"] == len(before)
    redis = redis_client(settings)
    try:
        for r in before:
            assert not await redis.exists(session_key(settings.redis_prefix, r["click_id"])), r["click_id"]
    finally:
        await redis.aclose()


async def test_what_an_observe_in_flight_queues_after_the_erasure_stores_nothing_of_the_user(client, tokens, db,
                                                                                                settings):
    """An observe that read its click before the erasure and queued what it found only after the
    erasure and every worker's sweep were done (seen under load: signals, detector trails and the
    real user id in click_states, left until `tracker maintain`): the writer stores none of it, and
    no click.overwritten names the user."""
    user = "in-flight"
    cid, location = await activate(client, tokens, user)
    landing = "https://aliexpress.ru/item/1.html?admitad_uid=ours0000000000000001"
    assert (await observe(client, tokens, user, cid, [{"type": "navigation", "url": location},
                                                      {"type": "navigation", "url": landing}])).status == 200
    await stored(db, "SELECT 1 FROM click_states WHERE click_id = $1 AND detector IS NOT NULL", cid)
    assert (await erase(client, user))["erased"]["clicks"] == 1
    # What that observe queues now, as observe queues it: its signal, and the overwritten state under
    # the user id its token carries.
    now = time.time_ns() // 1_000_000
    theirs = "https://aliexpress.ru/item/1.html?admitad_uid=theirs000000000000002"
    signal = Signal("foreign_affiliate_param", "admitad", {"url": theirs, "param": "admitad_uid", "same_network": True},
                    now, False)
    state = SessionState(state=ClickState.OVERWRITTEN, landed=True, overwritten_at=now,
                         trail=[], seen=["x"]).dump()
    sessions, writer = client.app[keys.SESSIONS], client.app[keys.SIGNALS]
    assert await sessions.save_state(cid, state, 3600)
    writer.add(cid, "aliexpress", user, [signal], state)
    await writer.flush()
    assert await traces(db, settings, user) == []
    redis = redis_client(settings)
    try:  # the state that observe wrote back to Redis goes too
        assert not await redis.exists(sessions.state_key(cid))
    finally:
        await redis.aclose()
    assert await db.fetchval("SELECT count(*) FROM signals WHERE click_id = $1", cid) == 0
    assert await db.fetchval("SELECT count(*) FROM click_states WHERE click_id = $1 AND detector IS NOT NULL", cid) == 0
    # Another user's report in the same flush is stored as ever.
    other, other_location = await activate(client, tokens, "not-erased")
    writer.add(other, "aliexpress", "not-erased", [replace(signal, at=now)], state)
    await writer.flush()
    assert await db.fetchval("SELECT count(*) FROM signals WHERE click_id = $1", other) == 1
    assert await db.fetchval("SELECT user_id FROM click_states WHERE click_id = $1", other) == "not-erased"


async def test_a_click_still_in_the_spool_is_erased_as_it_is_replayed(client, settings, db, tmp_path):
    user = "spooled-user"
    pool = await create_pool(settings.database_url or "", pooler=settings.database_pooler)
    writer = ClickWriter(pool, Spool(tmp_path / "spool"), durability="async")
    try:
        cid, ms = new_click_id()
        await writer.spool.spill([Click(cid, ms, user, "nike", "web", "https://www.nike.com/", "dev", "192.0.2.7",
                                        "ua", False, "GET")])
        assert await erase(client, user) == {"user_id": user, "erased": ZEROS}  # not in PostgreSQL yet
        assert await writer.replay() == 1
        row = await db.fetchrow("SELECT user_id, client_ip, user_agent, device, merchant FROM clicks "
                                "WHERE click_id = $1", cid)
        assert row["user_id"].startswith("erased~") and row["merchant"] == "nike"
        assert (row["client_ip"], row["user_agent"], row["device"]) == (None, None, None)
        # A click of the user made after the erasure is new activity: replayed as it was.
        later, later_ms = new_click_id()
        await writer.spool.spill([Click(later, later_ms, user, "nike", "web", "https://www.nike.com/", None,
                                        "192.0.2.7", "ua", False, "GET")])
        assert await writer.replay() == 1
        assert await db.fetchval("SELECT user_id FROM clicks WHERE click_id = $1", later) == user
    finally:
        writer.spool.close()
        await pool.close()


async def test_an_erased_users_console_page_names_none_of_their_clicks_or_orders(client, tokens, db, settings):
    """The user page's 'who looked at this user' listed the click ids and order ids of an erased
    user's reads: each led to the click's page (merchant, times, money) under the pseudonym, so the
    page undid the pseudonym. After an erasure the table still says who looked and when, without
    what; GET /v1/audit (audit:read) keeps the whole record."""
    user = "looked-then-erased"
    cid, _ = await activate(client, tokens, user)
    assert (await client.get("/postback/admitad", params=admitad(cid, "LOOKED-ORDER-1", "pending", "10.00"))).status == 200
    assert (await sign_in(client)).status == 303
    assert (await client.get(f"/support/clicks/{cid}")).status == 200
    assert (await client.get("/support/orders", params={"order_id": "LOOKED-ORDER-1"})).status == 200
    text = await (await client.get(f"/support/users/{user}")).text()
    assert cid in text and "LOOKED-ORDER-1" in text  # before the erasure: what was read
    await erase(client, user)
    text = await (await client.get(f"/support/users/{user}")).text()
    assert "Who looked at this user" in text and "click.read" in text and "user.erase" in text
    assert cid not in text and "LOOKED-ORDER-1" not in text
    entries = (await (await client.get("/v1/audit", params={"user_id": user}, headers=ADMIN)).json())["entries"]
    assert {e["click_id"] for e in entries} >= {cid} and {e["order_id"] for e in entries} >= {"LOOKED-ORDER-1"}


async def test_erasing_a_user_takes_only_their_own_quarantined_clicks(client, db, settings):
    """A quarantined click is its refused row as JSON text, and the erasure took every row holding
    the user id as any quoted value: erasing a user called `shop` took every quarantined click of the
    merchant `shop` (or, for `web`, of every web activation). Only the row's user id counts now."""
    pool = await create_pool(settings.database_url or "")
    try:
        theirs, _ = new_click_id()
        others, _ = new_click_id()
        for cid, user in ((theirs, "shop"), (others, "someone-else")):
            click = Click(cid, int(time.time() * 1000), user, "shop", "web", "https://shop.example.com/", None,
                          "192.0.2.9", "ua", False, "GET")
            await quarantine(pool, to_record(click), ValueError("refused"))
        await erase(client, "shop")
        left = {r["click_id"] for r in await db.fetch("SELECT click_id FROM clicks_quarantine "
                                                      "WHERE click_id = ANY($1)", [theirs, others])}
        assert left == {others}
    finally:
        await pool.close()


async def test_a_postback_arriving_during_the_erasure_is_stored_under_the_pseudonym(client, tokens, db, settings):
    """A postback that read its click while an erasure was under way wrote its conversion (and the
    conversion.created the webhooks send) under the real user id after the erasure had renamed the
    user's others; only a worker's sweep put it right, after a webhook may have carried it out. The
    postback reads its click under a share lock now: it waits for the erasure and takes the
    pseudonym (or the erasure waits for it, and renames its conversion with the rest)."""
    user = "paid-while-erased"
    cid, _ = await activate(client, tokens, user)
    pool = await create_pool(settings.database_url or "")
    try:
        async with pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            try:
                await erase_now(conn, user)  # under way: not committed yet
                sent = asyncio.ensure_future(client.get("/postback/admitad", params=admitad(cid, "DURING-1")))

                async def answered_or_waiting() -> bool | None:
                    if sent.done():
                        return True
                    return bool(await db.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND wait_event_type = 'Lock' AND query LIKE '%FROM clicks%'")) or None

                await until(answered_or_waiting, "the postback answered, or waiting for the erasure")
            finally:
                await tx.commit()
        assert (await sent).status == 200
    finally:
        await pool.close()
    assert (await db.fetchval("SELECT user_id FROM conversions WHERE order_id = 'DURING-1'")).startswith("erased~")
    assert await traces(db, settings, user) == []


async def test_an_erasure_removes_the_addresses_among_the_users_postback_parameters(client, tokens, db, settings):
    """Networks pass the shopper's address on as a parameter (Admitad's action_ip), kept with the rest
    of the postback as sent: an erasure left it in the order history and the orphans, and the support
    view showed it afterwards. Every parameter whose value is an address goes now (the rest stays, so
    an orphan still reconciles), an address that reaches us after the erasure is not kept, and another
    user's stay whole."""
    user = "erase-my-address"
    cid, _ = await activate(client, tokens, user)
    kept, _ = await activate(client, tokens, "keep-my-address")
    late, _ = new_click_id()  # a click of the user's that PostgreSQL gets after its postback (a spool)
    sent = [admitad(cid, "ADDR-1", action_ip="198.51.100.123"),
            admitad(cid, "ADDR-1", "approved", action_ip="::ffff:198.51.100.123"),
            admitad(kept, "ADDR-2", action_ip="203.0.113.7"),
            admitad(late, "ADDR-3", action_ip="2001:db8:1234:5678::9")]
    for params in sent:
        assert (await client.get("/postback/admitad", params=params)).status == 200
    # The user's click reported by another network: an orphan (wrong_network) naming it.
    wrong = {"token": "test-generic-token", "subid": cid, "order_id": "ADDR-4", "status": "pending",
             "commission": "1.00", "currency": "RUB", "ip": "198.51.100.123"}
    assert (await client.get("/postback/generic", params=wrong)).status == 200
    await db.execute("INSERT INTO clicks (click_id, created_at, user_id, merchant, source, target, bot) "
                     "VALUES ($1, $2, $3, 'aliexpress', 'web', 'https://aliexpress.ru/', false)",
                     late, click_time(late), user)
    answer = await erase(client, user)
    assert (answer["erased"]["clicks"], answer["erased"]["conversions"]) == (2, 1)
    assert set(answer["erased"]) == set(ZEROS)  # no new count

    history = await db.fetch("SELECT raw FROM postback_history WHERE order_id = 'ADDR-1' ORDER BY id")
    assert [r["raw"].get("action_ip") for r in history] == [None, None] and history[0]["raw"]["order_id"] == "ADDR-1"
    orphaned = {r["order_id"]: r["raw"] for r in await db.fetch(
        "SELECT order_id, raw FROM orphan_postbacks WHERE order_id IN ('ADDR-3', 'ADDR-4')")}
    assert "action_ip" not in orphaned["ADDR-3"] and "ip" not in orphaned["ADDR-4"]
    assert orphaned["ADDR-4"]["subid"] == cid
    view = await (await client.get(f"/v1/clicks/{cid}", headers=ADMIN)).json()
    assert view["conversions"][0]["history"] and "198.51.100.123" not in json.dumps(view)
    other = await db.fetchval("SELECT raw FROM postback_history WHERE order_id = 'ADDR-2'")
    assert other["action_ip"] == "203.0.113.7"

    # After the erasure: the address a network sends for the erased user's click is not kept.
    assert (await client.get("/postback/admitad", params=admitad(cid, "ADDR-5", action_ip="198.51.100.124"))).status == 200
    assert (await client.get("/postback/generic", params={**wrong, "order_id": "ADDR-6"})).status == 200
    assert "action_ip" not in await db.fetchval("SELECT raw FROM postback_history WHERE order_id = 'ADDR-5'")
    assert "ip" not in await db.fetchval("SELECT raw FROM orphan_postbacks WHERE order_id = 'ADDR-6'")
    # The scrubbed orphan still reconciles: what it is read from is all there.
    done = await asyncio.to_thread(cli, settings, "postbacks", "reconcile")
    assert done.returncode == 0, done.stderr
    assert await db.fetchval("SELECT reconciled_at IS NOT NULL FROM orphan_postbacks WHERE order_id = 'ADDR-3'")
    conv = await db.fetchrow("SELECT user_id, click_id FROM conversions WHERE order_id = 'ADDR-3'")
    assert conv["click_id"] == late and conv["user_id"].startswith("erased~")
    assert "action_ip" not in await db.fetchval("SELECT raw FROM postback_history WHERE order_id = 'ADDR-3'")
