"""tracker on a Redis Cluster of Debian's redis-server (3 masters, 3 replicas: tests/stack.py), found
from the seed node in TRACKER_REDIS_URL: a master killed under /go load fails no redirect and loses no
click, and detection works again on its slots once the replica has taken them over. The core suites
run on a cluster too (`clustered` in conftest.py)."""
from __future__ import annotations

import asyncio
import dataclasses

import aiohttp
import orjson
import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from tracker.domain.tokens import UserTokens
from tracker.store.redis_client import is_cluster, open_client
from tracker.store.redis_keys import channel, limits_prefix, session_key, state_key

from .conftest import BROWSER, SECRET, free_port, redis_value, serve_process
from .stack import RedisClusterNodes
from .test_faults import Load, readyz_until, wait_rows
from .waiting import until


async def test_the_server_says_whether_it_is_a_cluster(redis_cluster: RedisClusterNodes, servers):
    """Any one node is a seed; a standalone server is not taken for a cluster; nobody there is unknown."""
    assert await is_cluster(redis_cluster.url()) is True
    assert await is_cluster(f"redis://127.0.0.1:{redis_cluster.ports[-1]}/0") is True  # a replica too
    assert await is_cluster(servers[1]) is False
    assert await is_cluster(f"redis://127.0.0.1:{free_port()}/0") is None
    client, cluster = await open_client(redis_cluster.url())
    try:
        assert cluster is True and isinstance(client, RedisCluster)
    finally:
        await client.aclose()


def test_a_clicks_keys_share_a_slot_and_clicks_spread_over_the_slots():
    prefix = "trk:"
    for click_id in ("0Abc", "zzzzzzzzzzzzzzzzzzzzzz", "1"):
        slots = {key_slot(k.encode()) for k in (session_key(prefix, click_id), state_key(prefix, click_id),
                                                 channel(prefix, click_id))}
        assert len(slots) == 1
    assert len({key_slot(session_key(prefix, f"click-{i}").encode()) for i in range(1000)}) > 900
    limits = {key_slot(f"{limits_prefix(prefix)}{rest}".encode())
              for rest in ("rl-workers", "rl:ip:192.0.2.1:1", "rr:user:u-1:2")}
    assert len(limits) == 1


async def click_in(http: aiohttp.ClientSession, base: str, token: str, slots: set[int],
                   prefix: str) -> tuple[str, str]:
    """(click id, redirect location) of a new click whose keys are in one of `slots`."""
    for _ in range(300):
        async with http.get(f"{base}/go/aliexpress", params={"u": token}, allow_redirects=False,
                            headers=BROWSER) as r:
            assert r.status == 302
            cid, location = r.headers["X-Click-Id"], r.headers["Location"]
        if key_slot(session_key(prefix, cid).encode()) in slots:
            return cid, location
    raise AssertionError("no click's keys in those slots in 300")


async def next_state(stream: aiohttp.ClientResponse) -> str:
    """The state of the stream's next `state` event."""
    async with asyncio.timeout(60):  # a guard against hanging, not a timed assertion
        event = None
        while True:
            line = (await stream.content.readline()).rstrip(b"\n")
            if line.startswith(b"event: "):
                event = line[7:]
            elif line.startswith(b"data: ") and event == b"state":
                return str(orjson.loads(line[6:])["state"])


@pytest.mark.fault
async def test_a_master_killed_under_load_fails_no_redirect_and_loses_no_click(settings, tmp_path):
    """kill -9 of the seed node, a master, while two workers take /go: every request is answered 302
    (the sessions of its slots are dropped meanwhile: fail-open), every 302's click is in PostgreSQL
    once; once its replica serves the slots, a click there opened before has its overwrite detected
    with the state in Redis and told to the event stream that stayed open through the failover, and a
    new click there has its session in Redis."""
    nodes = RedisClusterNodes([free_port(bus=True) for _ in range(6)])
    nodes.start()
    try:
        clustered = dataclasses.replace(settings, redis_url=nodes.url())
        prefix, log = settings.redis_prefix, tmp_path / "serve.log"
        victim = nodes.ports[0]  # the seed node in TRACKER_REDIS_URL, a master
        assert victim in nodes.masters()
        victim_slots = {slot for low, high, owner in nodes.slots(victim) if owner == victim
                        for slot in range(low, high + 1)}
        token = UserTokens(SECRET).mint("through-failover")
        admin = RedisCluster.from_url(f"redis://127.0.0.1:{nodes.ports[1]}/0")  # a node that stays
        async with serve_process(clustered, workers=2, output=log) as (_, base), aiohttp.ClientSession() as http:
            port = int(base.rsplit(":", 1)[1])
            # Both workers found the cluster from the seed (a worker starting while its seed is down
            # runs without Redis until the seed answers: docs/operations.md).
            await until(lambda: log.read_text().count('"redis_cluster"') == 2, "both workers on the cluster")
            cid, location = await click_in(http, base, token, victim_slots, prefix)
            stream = await http.get(f"{base}/v1/clicks/{cid}/events", params={"u": token, "heartbeat": "60"})
            assert stream.status == 200 and await next_state(stream) == "active"
            load = Load(port, "fault-cluster")

            async def kill() -> None:
                await asyncio.sleep(1.0)  # load before the failure (the behaviour under test)
                await asyncio.to_thread(nodes.kill, victim)
                await until(nodes.healthy, "the replica serving the dead master's slots", 30)
                await asyncio.sleep(1.0)  # the load goes on across the recovery

            await load.run_for(0, during=kill)
            assert load.other == [] and load.errors == 0
            assert len(load.ids) > 100
            total, distinct = await wait_rows(clustered.database_url or "", "fault-cluster", len(load.ids))
            assert total == distinct == len(load.ids)
            await readyz_until(port, lambda status, body: body["redis"] == "up", "with Redis up again")

            async def every_worker_has_redis() -> bool:  # the gauge is the least of the workers'
                async with http.get(f"{base}/metrics") as r:
                    return 'tracker_dependency_up{dependency="redis"} 1.0' in await r.text()
            await until(every_worker_has_redis, "every worker using Redis again")

            async def observe(url: str) -> str:
                async with http.post(f"{base}/v1/observe", headers={"Authorization": f"Bearer {token}"},
                                     json={"click_id": cid, "events": [{"type": "navigation", "url": url}]}) as r:
                    assert r.status == 200, await r.text()
                    return str((await r.json())["state"])
            await observe(location)
            assert await observe("https://aliexpress.ru/item/1.html?admitad_uid=ours0000000000000011") == "active"
            assert await observe("https://aliexpress.ru/item/1.html?admitad_uid=theirs000000000000012") == "overwritten"
            assert orjson.loads(await admin.get(state_key(prefix, cid)) or b"{}")["state"] == "overwritten"
            assert await next_state(stream) == "overwritten"
            stream.close()
            later, _ = await click_in(http, base, token, victim_slots, prefix)
            assert await redis_value(admin, session_key(prefix, later))
        await admin.aclose()
        text = log.read_text()
        assert "Traceback" not in text, text[-3000:]
    finally:
        nodes.close()
