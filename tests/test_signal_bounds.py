"""Signals are bounded: one per click, kind, network and evidence key (seen again it gains `count` and
`last_at`, not a row), at most 100 per click, and an observe answers only the signals it added. A
report of 100 events, each a landing URL full of other networks' parameters, used to store ~1,900
rows and answer 1.2 MB, and the same report again stored 1,900 more."""
from __future__ import annotations

import asyncio
import secrets
from typing import Any

import asyncpg
import orjson

from tracker.domain.clickid import new_click_id
from tracker.domain.signals import MAX_PER_CLICK, Signal
from tracker.store.db import create_pool, migrations
from tracker.store.signals import SignalWriter

from .conftest import ADMIN, _admin, with_database
from .test_observe import activate, observe
from .waiting import until

# One value for each of 18 networks' landing parameters (six of them ad platforms' click ids).
PARAMS = ["cjevent", "irclickid", "ranmid", "awc", "sscid", "clickref", "campid", "cuid", "tduid", "wgu",
          "avad", "a8", "gclid", "fbclid", "msclkid", "ttclid", "yclid", "twclid"]


def flood_events(n: int = 100) -> list[dict[str, Any]]:
    query = "&".join(f"{p}={p}0123456789abcdef" for p in PARAMS)
    return [{"type": "navigation", "url": f"https://aliexpress.ru/item/{i}.html?{query}"} for i in range(n)]


async def rows_and_sightings(db: asyncpg.Connection, cid: str) -> tuple[int, int]:
    row = await db.fetchrow("SELECT count(*) AS n, coalesce(sum(count), 0) AS total FROM signals "
                            "WHERE click_id = $1", cid)
    assert row is not None  # an aggregate: one row
    return row["n"], row["total"]


async def test_the_same_report_twice_stores_no_new_rows(client, tokens, db):
    cid, location = await activate(client, tokens, "bound-1")
    # The chain first (a time before everything: the click's creation), then the shop's pages.
    events = [{"type": "navigation", "url": location, "at": 0},
              {"type": "navigation", "url": "https://aliexpress.ru/", "at": 0}, *flood_events(98)]
    assert len(orjson.dumps({"click_id": cid, "events": events})) > 40_000
    first = await observe(client, tokens, "bound-1", cid, events)
    assert first.status == 200
    body = await first.json()
    added = body["signals"]
    # One signal per network and parameter value, however many of the 99 pages showed it.
    assert len(added) == len({(s["kind"], s["network"]) for s in added}) == len(PARAMS)
    assert all(s["count"] == 98 and s["last_at"] >= s["at"] for s in added)
    assert body["state"] == "overwritten"
    per_request = sum(s["count"] for s in added)
    assert await until(lambda: _stored(db, cid, (len(PARAMS), per_request)), "the first report stored")
    again = await observe(client, tokens, "bound-1", cid, events)
    assert again.status == 200
    assert (await again.json())["signals"] == []  # nothing new: the answer lists what this request added
    assert len(await again.read()) < 200
    assert await until(lambda: _stored(db, cid, (len(PARAMS), 2 * per_request)), "the second report counted")
    view = await (await client.get(f"/v1/clicks/{cid}", headers=ADMIN)).json()
    assert {s["count"] for s in view["signals"]} == {2 * 98}


async def _stored(db: asyncpg.Connection, cid: str, expected: tuple[int, int]) -> bool:
    return await rows_and_sightings(db, cid) == expected


async def test_a_click_holds_at_most_100_signals(client, tokens, db):
    cid, _ = await activate(client, tokens, "bound-2")

    def codes(start: int, n: int) -> list[dict[str, Any]]:
        return [{"type": "promo_code", "code": f"CODE{i}"} for i in range(start, start + n)]

    first = await (await observe(client, tokens, "bound-2", cid, codes(0, 60))).json()
    assert len(first["signals"]) == 60
    # 20 it has, 60 new of which 40 fit: the answer lists only the 40.
    second = await (await observe(client, tokens, "bound-2", cid, codes(40, 80))).json()
    assert [s["evidence"]["code"] for s in second["signals"]] == [f"CODE{i}" for i in range(60, 100)]
    third = await (await observe(client, tokens, "bound-2", cid, codes(100, 50) + codes(0, 10))).json()
    assert third["signals"] == []
    assert await until(lambda: _stored(db, cid, (MAX_PER_CLICK, 60 + 60 + 10)), "the click's signals stored")
    codes_stored = {r["c"] for r in await db.fetch("SELECT evidence->>'code' AS c FROM signals WHERE click_id = $1", cid)}
    assert codes_stored == {f"CODE{i}" for i in range(100)}


async def test_concurrent_reports_of_one_click_keep_the_cap(client, tokens, db):
    """Five reports at once, each of 40 new codes: they race on the click's state, and the store
    still keeps 100."""
    cid, _ = await activate(client, tokens, "bound-3")
    answers = await asyncio.gather(*(
        observe(client, tokens, "bound-3", cid, [{"type": "promo_code", "code": f"R{r}-{i}"} for i in range(40)])
        for r in range(5)))
    assert all(a.status == 200 for a in answers)

    async def held() -> int | None:
        n, total = await rows_and_sightings(db, cid)
        return n if n >= MAX_PER_CLICK or total == 200 else None

    assert await until(held, "the reports flushed") == MAX_PER_CLICK


async def test_two_writers_flushing_one_click_at_once_keep_the_cap(database):
    """Two workers' writers, each with 80 new signals of one click, flush at once: 100 stored."""
    pool = await create_pool(database, min_size=2, max_size=4)
    writers = [SignalWriter(pool), SignalWriter(pool)]
    cid = new_click_id()[0]
    try:
        for w, writer in enumerate(writers):
            writer.add(cid, "aliexpress", "u-two", [Signal("foreign_promo_code", None, {"code": f"W{w}-{i}"},
                                                           1_795_660_800_000 + i, False) for i in range(80)], None)
        await asyncio.gather(*(w.flush() for w in writers))
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM signals WHERE click_id = $1", cid) == MAX_PER_CLICK
    finally:
        await pool.close()


async def test_a_writer_folds_sightings_before_postgresql(database):
    pool = await create_pool(database, min_size=1, max_size=2)
    writer = SignalWriter(pool)
    cid = new_click_id()[0]
    try:
        for i in range(50):
            writer.add(cid, "aliexpress", "u-fold", [Signal("foreign_promo_code", None, {"code": "SAME"},
                                                            1_795_660_800_000 + i, False)], None)
        assert len(writer._signals) == 1
        await writer.flush()
        async with pool.acquire() as conn:
            row = await conn.fetchrow("SELECT count, at, last_at FROM signals WHERE click_id = $1", cid)
        assert row is not None
        assert row["count"] == 50 and (row["last_at"] - row["at"]).total_seconds() == 0.049
    finally:
        await pool.close()


async def test_the_migration_folds_the_duplicates_stored_before(servers):
    """Rows stored one per sighting before the migration fold into one per signal, with the count."""
    name = f"trk_test_fold_{secrets.token_hex(4)}"
    await _admin(servers[0], f"CREATE DATABASE {name}")
    try:
        conn = await asyncpg.connect(with_database(servers[0], name))
        try:
            versions = migrations()
            [(fold_version, _, last_path)] = [m for m in versions if m[1].endswith("_bounded_signals.sql")]
            earlier = [m for m in versions if m[0] < fold_version]
            for _, _, path in earlier:
                async with conn.transaction():
                    await conn.execute(path.read_text())
            cid = new_click_id()[0]
            rows: list[tuple[str, str | None, str, dict[str, str], int]] = [(cid, "cj", "foreign_affiliate_param", {"param": "cjevent", "value": "abc123…", "url": f"u{i}"}, i)
                    for i in range(30)]
            rows += [(cid, None, "cross_device", {"activated_on": "a", "ordered_on": "b"}, i) for i in range(5)]
            rows += [(cid, None, "foreign_promo_code", {"code": c}, 1) for c in ("X", "Y")]
            await conn.executemany(
                "INSERT INTO signals (click_id, merchant, kind, network, evidence, at) VALUES "
                "($1, 'aliexpress', $2, $3, $4::jsonb, to_timestamp(1795000000 + $5))",
                [(c, k, n, orjson.dumps(e).decode(), t) for c, n, k, e, t in rows])
            async with conn.transaction():
                await conn.execute(last_path.read_text())
            got = await conn.fetch("SELECT kind, key, count, evidence->>'url' AS url, "
                                   "extract(epoch FROM last_at - at) AS span FROM signals ORDER BY kind, key")
            assert [(r["kind"], r["key"], r["count"], r["span"]) for r in got] == [
                ("cross_device", "b", 5, 4), ("foreign_affiliate_param", "cjevent|abc123…", 30, 29),
                ("foreign_promo_code", "X", 1, 0), ("foreign_promo_code", "Y", 1, 0)]
            assert got[1]["url"] == "u0"  # the first sighting's evidence stays
            # And the key the migration computed is the one the code computes: a new sighting counts there.
            assert Signal("foreign_affiliate_param", "cj", {"param": "cjevent", "value": "abc123…"}, 0, False).key \
                == "cjevent|abc123…"
        finally:
            await conn.close()
    finally:
        await _admin(servers[0], f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
