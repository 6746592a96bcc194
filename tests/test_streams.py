"""Live event streams share the worker's one pub/sub connection (store/feed.py) and take nothing from
the Redis connections that redirects, observe and the session batcher use (before, 200 streams, each
holding a connection of redis-py's 100-connection pool, dropped sessions and made Redis flap). On a
standalone Redis (classic pub/sub) and on a Redis Cluster (sharded pub/sub: a connection per master)."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from pathlib import Path
from typing import Any, cast

import aiohttp
import orjson
import psutil
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from tracker import embedded
from tracker.app import REDIS_MAX_CONNECTIONS
from tracker.domain.trail import TrailEntry
from tracker.store.feed import QUEUE_SIZE, Link, StateFeed
from tracker.store.redis_keys import channel as channel_of
from tracker.store.redis_keys import session_key
from tracker.store.sessions import SessionStore

from .conftest import BROWSER, free_port, redis_client, serve_process
from .conftest import subscribers as numsub
from .waiting import until

STREAMS = 150  # more than redis-py's default pool, which the streams used to empty


async def activate(http: aiohttp.ClientSession, base: str, token: str) -> str:
    async with http.get(f"{base}/go/nike", params={"u": token}, allow_redirects=False, headers=BROWSER) as r:
        assert r.status == 302
        return r.headers["X-Click-Id"]


async def open_stream(http: aiohttp.ClientSession, base: str, token: str, cid: str) -> aiohttp.ClientResponse:
    resp = await http.get(f"{base}/v1/clicks/{cid}/events", params={"u": token, "heartbeat": "60"})
    assert resp.status == 200
    return resp


async def next_state(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    """The data of the stream's next `state` event (heartbeat comments skipped)."""
    async with asyncio.timeout(30):  # a guard against hanging, not a timed assertion
        event = None
        while True:
            line = (await resp.content.readline()).rstrip(b"\n")
            if line.startswith(b"event: "):
                event = line[7:]
            elif line.startswith(b"data: ") and event == b"state":
                return orjson.loads(line[6:])


async def subscribers(admin: aioredis.Redis | RedisCluster, channels: list[str]) -> list[int]:
    return await numsub(admin, *channels)


async def publish(admin: aioredis.Redis | RedisCluster, channel: str, message: bytes | str) -> None:
    """As the service publishes: SPUBLISH on a cluster."""
    if isinstance(admin, RedisCluster):
        await admin.spublish(channel, message)
    else:
        await admin.publish(channel, message)


async def client_lists(admin: aioredis.Redis | RedisCluster) -> list[list[dict[str, Any]]]:
    """CLIENT LIST of the Redis, or of each master of a cluster."""
    if not isinstance(admin, RedisCluster):
        return [await admin.client_list()]
    await admin.initialize()
    return [await admin.client_list(target_nodes=node) for node in admin.get_primaries()]


def worker_clients(clients: list[dict[str, Any]], pid: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(every connection of the worker, its state-feed connections), by the names it gives them."""
    mine = [c for c in clients if c["name"] in (f"tracker-{pid}", f"tracker-feed-{pid}")]
    return mine, [c for c in mine if c["name"].startswith("tracker-feed-")]


@pytest.mark.clustered
@pytest.mark.fault
async def test_many_streams_leave_the_redirects_their_redis_connections(settings, tokens, tmp_path: Path):
    log = tmp_path / "serve.log"
    admin = redis_client(settings)
    prefix = settings.redis_prefix
    users = [tokens.mint(f"streamer-{i}") for i in range(STREAMS)]
    async with serve_process(settings, output=log) as (proc, base), \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        cids = await asyncio.gather(*(activate(http, base, token) for token in users))
        streams = await asyncio.gather(*(open_stream(http, base, t, c) for t, c in zip(users, cids)))
        firsts = await asyncio.gather(*(next_state(s) for s in streams))
        assert {f["state"] for f in firsts} == {"active"}
        channels = [channel_of(prefix, cid) for cid in cids]

        async def all_subscribed() -> bool:
            return min(await subscribers(admin, channels)) == 1
        await until(all_subscribed, "every stream's channel subscribed")

        # Redirects while the streams are open: each one's session reaches Redis.
        walkers = [tokens.mint(f"walker-{i}") for i in range(60)]
        more = await asyncio.gather(*(activate(http, base, token) for token in walkers))

        async def sessions_written() -> bool:
            keys = [session_key(prefix, cid) for cid in more]  # one slot each: mget_nonatomic on a cluster
            found = await (admin.mget_nonatomic(keys) if isinstance(admin, RedisCluster) else admin.mget(keys))
            return all(found)
        await until(sessions_written, "the redirects' sessions in Redis")

        # Redis's own view: one pub/sub connection carries every stream (on a cluster one per
        # master, each with its slots' channels: SSUBSCRIBE); the rest stays bounded.
        [worker] = psutil.Process(proc.pid).children()  # the one worker under `tracker serve`'s arbiter
        carried = 0
        for clients in await client_lists(admin):
            mine, feed = worker_clients(clients, worker.pid)
            assert len(feed) <= 1, feed
            carried += sum(int(c["ssub"] if isinstance(admin, RedisCluster) else c["sub"]) for c in feed)
            assert len(mine) <= REDIS_MAX_CONNECTIONS + 1, len(mine)
        assert carried == STREAMS

        # A change of one click reaches that click's stream, and no other: each other stream's next
        # state is the one published for its own click afterwards.
        store = SessionStore(admin, prefix)
        assert await store.save_state(cids[0], {"state": "overwritten"}, 600)
        assert (await next_state(streams[0]))["state"] == "overwritten"
        for cid in cids[1:]:
            assert await store.save_state(cid, {"state": "converted"}, 600)
        nexts = await asyncio.gather(*(next_state(s) for s in streams[1:]))
        assert [n["click_id"] for n in nexts] == cids[1:]
        assert {n["state"] for n in nexts} == {"converted"}

        async with http.get(f"{base}/metrics") as r:
            metrics = await r.text()
        for stream in streams:
            stream.close()
    # No session or rate-limit count went without Redis. (A state read that outlived its deadline
    # while 150 streams opened at once on a busy machine fell back to PostgreSQL for that request
    # alone: counted under operation="state", and allowed here.)
    dropped = [line for line in metrics.splitlines() if line.startswith("tracker_redis_fail_open_total{")
               and 'operation="state"' not in line]
    assert dropped and all(float(line.rsplit(" ", 1)[1]) == 0 for line in dropped), dropped
    text = log.read_text()
    assert "redis_unreachable" not in text and "Too many connections" not in text
    await admin.aclose()


@pytest.mark.clustered
async def test_two_streams_of_one_click_share_one_subscription(client, settings, tokens):
    token = tokens.mint("twice")
    resp = await client.get("/go/nike", params={"u": token}, allow_redirects=False, headers=BROWSER)
    cid = resp.headers["X-Click-Id"]
    admin = redis_client(settings)
    channel = channel_of(settings.redis_prefix, cid)
    store = SessionStore(admin, settings.redis_prefix)
    first, second = [await client.get(f"/v1/clicks/{cid}/events", params={"u": token, "heartbeat": "60"})
                     for _ in range(2)]
    assert [(await next_state(s))["state"] for s in (first, second)] == ["active", "active"]

    async def subscribed() -> bool:
        return await subscribers(admin, [channel]) == [1]
    await until(subscribed, "the click's channel subscribed")
    assert await store.save_state(cid, {"state": "overwritten"}, 600)
    assert [(await next_state(s))["state"] for s in (first, second)] == ["overwritten", "overwritten"]

    first.close()  # the other one keeps the subscription
    assert await store.save_state(cid, {"state": "converted"}, 600, force=True)
    assert (await next_state(second))["state"] == "converted"
    assert await subscribers(admin, [channel]) == [1]
    second.close()

    async def unsubscribed() -> bool:
        return await subscribers(admin, [channel]) == [0]
    await until(unsubscribed, "the channel unsubscribed after its last stream left")
    await admin.aclose()


@pytest.mark.clustered
async def test_a_listener_that_does_not_read_keeps_only_the_newest(settings):
    feed = StateFeed(settings.redis_url, name="tracker-feed-test")
    admin = redis_client(settings)
    slow, fence = channel_of(settings.redis_prefix, "slow"), channel_of(settings.redis_prefix, "fence")
    await feed.start()
    try:
        with feed.listen(slow) as idle, feed.listen(fence) as reader:
            assert await idle.next(10) is Link.LIVE and await reader.next(10) is Link.LIVE
            for i in range(50):
                await publish(admin, slow, str(i))
            await publish(admin, fence, "after")
            assert await reader.next(10) == b"after"  # so every message of `slow` was handed out
            kept = []
            while (item := await idle.next(0)) is not None:
                kept.append(item)
            assert kept == [str(i).encode() for i in range(50 - QUEUE_SIZE, 50)]
    finally:
        await feed.stop()
        await admin.aclose()


def kill_redis(root: Path) -> None:
    pid = int((root / "redis" / "redis.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    if psutil.pid_exists(pid):
        psutil.Process(pid).wait(10)
    (root / "redis" / "redis.pid").unlink(missing_ok=True)


@pytest.mark.fault
async def test_a_stream_gets_its_change_again_after_redis_comes_back(settings, tokens, tmp_path: Path):
    """The feed reconnects and subscribes again by itself: a change that is only published (no state
    key to poll) reaches the stream that was open through the outage."""
    root = tmp_path / "private"
    # A port locked against other test runs (free_port): with a fixed one, another run's Redis could
    # take it while this one's was killed, and the restart below found it answering and started none.
    url = embedded.start_redis(root, preferred_port=free_port())
    log = tmp_path / "serve.log"
    token = tokens.mint("survivor")
    try:
        async with serve_process(dataclasses.replace(settings, redis_url=url), output=log) as (_, base), \
                aiohttp.ClientSession() as http:
            cid = await activate(http, base, token)
            stream = await open_stream(http, base, token, cid)
            assert (await next_state(stream))["state"] == "active"
            channel = channel_of(settings.redis_prefix, cid)
            admin = aioredis.Redis.from_url(url)

            async def subscribed() -> bool:
                try:
                    return await subscribers(admin, [channel]) == [1]
                except aioredis.ConnectionError:
                    return False
            await until(subscribed, "the channel subscribed")
            await asyncio.to_thread(kill_redis, root)
            await until(lambda: "state_feed_lost" in log.read_text(), "the feed saw the loss")
            await asyncio.to_thread(embedded.start_redis, root)
            await until(subscribed, "the channel subscribed again")
            await admin.publish(channel, orjson.dumps({"state": "overwritten"}))
            assert (await next_state(stream))["state"] == "overwritten"
            stream.close()
            await admin.aclose()
    finally:
        embedded.stop_redis(root)


async def test_shutdown_ends_open_streams_without_waiting_for_them(aiohttp_server, settings, tokens):
    """A stopping worker ends its open streams (CLOSING, then the feed wakes them) rather than waiting
    out aiohttp's shutdown timeout; the stream's body simply ends."""
    from tracker.app import create_app

    server = await aiohttp_server(create_app(settings))
    base = str(server.make_url("")).rstrip("/")
    token = tokens.mint("leaving")
    async with aiohttp.ClientSession() as http:
        resp = await open_stream(http, base, token, await activate(http, base, token))
        assert (await next_state(resp))["state"] == "active"
        async with asyncio.timeout(20):  # a guard: aiohttp would wait 60 s for a stream that stays
            await server.close()
            assert b"event:" not in await resp.content.read()  # read to the end: the body ended
        resp.close()


@pytest.mark.clustered
async def test_a_converted_state_is_replaced_only_when_forced(settings):
    """The guard in save_state reads the stored state's `state` field: converted stays unless forced,
    and a state that merely carries the same key deeper down (a trail entry) is not taken for it."""
    admin = redis_client(settings)
    store = SessionStore(admin, settings.redis_prefix)

    async def stored_status(cid: str) -> Any:
        raw = await admin.get(store.state_key(cid))
        assert raw is not None
        return orjson.loads(raw)["status"]

    async def stored(cid: str) -> Any:
        raw = await admin.get(store.state_key(cid))
        assert raw is not None
        return orjson.loads(raw)["state"]

    assert await store.save_state("guard-1", {"state": "converted", "status": "pending"}, 600, force=True)
    assert await store.save_state("guard-1", {"state": "overwritten"}, 600)
    assert await stored("guard-1") == "converted"
    assert await store.save_state("guard-1", {"state": "converted", "status": "approved"}, 600, force=True)
    assert await stored_status("guard-1") == "approved"
    assert await store.save_state("guard-2", {"state": "active", "trail": [cast(TrailEntry, {"state": "converted"})]}, 600)
    assert await store.save_state("guard-2", {"state": "overwritten"}, 600)
    assert await stored("guard-2") == "overwritten"
    await admin.aclose()


@pytest.mark.parametrize("query", [
    [("u", "TOKEN"), ("u", "TOKEN")],
    [("u", "TOKEN"), ("heartbeat", "60"), ("heartbeat", "0.2")],
    [("u", "TOKEN"), ("heartbeat", "soon")],
    [("u", "TOKEN"), ("heartbeat", "nan")],
])
async def test_a_stream_refuses_a_malformed_or_repeated_parameter(client, tokens, query):
    """One meaning per parameter, as everywhere else: a repeated or unreadable one is a 400, never
    a guess (the first `u` of two, a heartbeat silently replaced by the default)."""
    token = tokens.mint("params")
    resp = await client.get("/go/nike", params={"u": token}, allow_redirects=False, headers=BROWSER)
    cid = resp.headers["X-Click-Id"]
    resp = await client.get(f"/v1/clicks/{cid}/events", params=[(k, token if v == "TOKEN" else v) for k, v in query])
    assert resp.status == 400, resp.headers  # (a stream, wrongly opened, would never end: no body read)
    assert (await resp.json())["error"] in {"duplicate_parameter", "malformed"}
