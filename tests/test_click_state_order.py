"""A click's state only moves forward, in PostgreSQL and in Redis alike: for every stored state and
every state reported after it, click_states (the signal writer's upsert) and the Redis state (the
save script) keep what domain/states.moves_forward says they keep."""
from __future__ import annotations

import itertools

import orjson
import redis.asyncio as aioredis

from tracker.domain.clickid import new_click_id
from tracker.domain.states import ClickState, StoredState, moves_forward
from tracker.settings import Settings
from tracker.store.db import create_pool
from tracker.store.sessions import SessionStore
from tracker.store.signals import SignalWriter

PAIRS = list(itertools.product(ClickState, repeat=2))


def expected(stored: ClickState, new: ClickState) -> str:
    return new.value if moves_forward(stored, new) else stored.value


async def test_click_states_in_postgresql_move_forward_only(database: str) -> None:
    pool = await create_pool(database, min_size=1, max_size=2)
    writer = SignalWriter(pool)
    try:
        ids = {pair: new_click_id()[0] for pair in PAIRS}
        for (stored, _), cid in ids.items():
            writer.add(cid, "aliexpress", "order-user", [], StoredState(state=stored))
        await writer.flush()
        for (_, new), cid in ids.items():
            writer.add(cid, "aliexpress", "order-user", [], StoredState(state=new))
        await writer.flush()
        got = {r["click_id"]: r["state"] for r in await pool.fetch(
            "SELECT click_id, state FROM click_states WHERE click_id = ANY($1)", list(ids.values()))}
        assert {pair: got[cid] for pair, cid in ids.items()} == {pair: expected(*pair) for pair in PAIRS}
    finally:
        await pool.close()


async def test_click_states_in_redis_move_forward_only(settings: Settings) -> None:
    client = aioredis.Redis.from_url(settings.redis_url or "")
    store = SessionStore(client, settings.redis_prefix, timeout=30)  # a guard, not the service's 0.5 s
    try:
        got = {}
        for stored, new in PAIRS:
            cid = new_click_id()[0]
            assert await store.save_state(cid, StoredState(state=stored), 600)
            assert await store.save_state(cid, StoredState(state=new), 600)
            raw = await client.get(store.state_key(cid))
            assert raw is not None
            got[(stored, new)] = orjson.loads(raw)["state"]
        assert got == {pair: expected(*pair) for pair in PAIRS}
    finally:
        await client.aclose()
