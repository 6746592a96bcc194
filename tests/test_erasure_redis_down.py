"""An erasure while Redis is unreachable: PostgreSQL is erased and every worker told to sweep, and
the caller learns that the user's sessions in Redis are still there (503 with Retry-After, the
NOTIFY sent all the same; the command line says so and exits 1), instead of a 500 or a traceback; a repeat once Redis is back finishes."""
from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tracker import embedded
from tracker.app import create_app
from tracker.store.erasure import CHANNEL
from tracker.store.redis_keys import session_key

from .conftest import ADMIN, cli, free_port, redis_value
from .test_erasure import ZEROS, traces
from .test_observe import activate
from .waiting import until

pytestmark = pytest.mark.fault


async def test_an_erasure_with_redis_down_erases_postgresql_and_answers_503(aiohttp_client, settings, tokens, db,
                                                                          tmp_path: Path):
    root = tmp_path / "own-redis"
    port = free_port()
    url = embedded.start_redis(root, port)
    try:
        own = replace(settings, redis_url=url)
        client = await aiohttp_client(create_app(own))
        cid, _ = await activate(client, tokens, "erased-redis-down")
        redis = aioredis.Redis.from_url(url)
        try:
            await redis_value(redis, session_key(own.redis_prefix, cid))  # the session, once its batch is sent
        finally:
            await redis.aclose()
        notices: list[dict[str, str]] = []
        await db.add_listener(CHANNEL, lambda _c, _p, _ch, payload: notices.append(json.loads(payload)))
        embedded.stop_redis(root)
        resp = await client.delete("/v1/users/erased-redis-down", headers=ADMIN)
        assert resp.status == 503, await resp.text()
        assert resp.headers["Retry-After"].isdigit()
        body = await resp.json()
        assert set(body) == {"error", "message"} and body["error"] == "unavailable"
        assert "PostgreSQL is erased" in body["message"] and "sessions" in body["message"]
        assert await traces(db, own, "erased-redis-down") == []  # PostgreSQL's part is done
        # ... and every other worker is told to sweep what it held of the user
        await until(lambda: [n for n in notices if n["user_id"] == "erased-redis-down"], "the erasure's NOTIFY")
        embedded.start_redis(root, port)
        again = await client.delete("/v1/users/erased-redis-down", headers=ADMIN)
        assert again.status == 200, await again.text()
        assert (await again.json())["erased"]["clicks"] == 0
    finally:
        embedded.stop_redis(root)


async def test_the_command_line_with_redis_down_says_so_and_exits_1(client, settings, tokens, db):
    cid, _ = await activate(client, tokens, "cli-redis-down")
    closed = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    out = await asyncio.to_thread(cli, settings, "users", "erase", "cli-redis-down", TRACKER_REDIS_URL=closed,
                                  TRACKER_REDIS_PREFIX=settings.redis_prefix)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and "Redis" in out.stderr
    assert json.loads(out.stdout) == {"user_id": "cli-redis-down", "erased": {**ZEROS, "clicks": 1}}
    assert await traces(db, settings, "cli-redis-down") == []
    again = await asyncio.to_thread(cli, settings, "users", "erase", "cli-redis-down",
                                    TRACKER_REDIS_PREFIX=settings.redis_prefix)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["erased"]["clicks"] == 0
