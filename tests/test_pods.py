"""Many pods: two `tracker serve` instances, each with its own data dir (its own spool), against one
stack (PostgreSQL behind PgBouncer in transaction mode, the primary direct for LISTEN, one Redis).
Every click that got a 302 from either is stored once, each webhook is delivered once, and a
merchants sync reaches both."""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import subprocess

import aiohttp
import pytest
import yaml

from tracker.domain.tokens import UserTokens

from .conftest import BROWSER, HERE, SECRET, cli, serve_process
from .receiver import Receiver, new_secret
from .test_faults import Load, wait_rows
from .test_pooler import behind
from .test_postbacks import admitad
from .test_webhooks import subscribe
from .waiting import until

pytestmark = pytest.mark.fault
POSTBACKS = 20
WEBHOOKS = {"TRACKER_WEBHOOK_POLL_MS": "20", "TRACKER_WEBHOOK_RETRY_BASE_MS": "100"}


async def _status(base: str, slug: str, token: str) -> int:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/go/{slug}", params={"u": token}, allow_redirects=False, headers=BROWSER) as r:
            return r.status


async def test_two_pods_store_each_click_once_deliver_each_webhook_once_and_both_see_a_sync(
        settings, pgbouncer, db, database, tmp_path):
    receiver = Receiver(new_secret())
    await receiver.start()
    await subscribe(db, {"name": "ledger", "url": receiver.url, "secret": receiver.secret})
    pooled = behind(settings, pgbouncer)
    pods = [dataclasses.replace(pooled, data_dir=tmp_path / f"pod-{i}") for i in (1, 2)]
    for pod in pods:
        pod.data_dir.mkdir()
    try:
        async with serve_process(pods[0], workers=2, env=WEBHOOKS) as (_, first), \
                serve_process(pods[1], workers=2, env=WEBHOOKS) as (_, second):
            # Clicks on both at once: every 302 is one row.
            loads = [Load(int(base.rsplit(":", 1)[1]), "two-pods", n=4) for base in (first, second)]

            async def enough() -> None:  # until each pod redirected as many as the postbacks below use
                await until(lambda: all(len(load.ids) >= POSTBACKS for load in loads),
                            f"{POSTBACKS} redirects from each pod", 60)
            # (Not for a fixed time: on a loaded machine 2 s gave fewer clicks than the postbacks need.)
            await asyncio.gather(*(load.run_for(0, during=enough) for load in loads))
            ids = loads[0].ids + loads[1].ids
            assert all(load.other == [] and load.errors == 0 and load.ids for load in loads)
            total, distinct = await wait_rows(database, "two-pods", len(ids))
            assert total == distinct == len(ids) == len(set(ids))

            # Postbacks on either pod: each conversion's event reaches the subscriber once, though
            # both pods' dispatchers lease from the same table.
            async with aiohttp.ClientSession() as s:
                for i in range(POSTBACKS):
                    base = (first, second)[i % 2]
                    async with s.get(f"{base}/postback/admitad", params=admitad(ids[i], f"PODS-{i}")) as r:
                        assert r.status == 200
            await receiver.wait(lambda: len(receiver.hits) >= POSTBACKS, 30)
            await until(lambda: db.fetchval("SELECT count(*) = $1 FROM webhook_deliveries WHERE webhook = 'ledger' "
                                            "AND state = 'delivered'", POSTBACKS), "every delivery recorded")
            # Each sent in one attempt, so no pod took another's lease: none can come twice.
            assert await db.fetchval("SELECT array_agg(DISTINCT attempts) FROM webhook_deliveries "
                                     "WHERE webhook = 'ledger'") == [1]
            assert len(receiver.hits) == POSTBACKS
            orders = sorted(h.payload["data"]["order_id"] for h in receiver.hits)
            assert orders == sorted(f"PODS-{i}" for i in range(POSTBACKS))
            assert all(h.verified for h in receiver.hits)

            # A merchants sync (through the pooler) reaches both pods' workers.
            token = UserTokens(SECRET).mint("two-pods-sync")
            assert [await _status(base, "newshop", token) for base in (first, second)] == [404, 404]
            doc = copy.deepcopy(yaml.safe_load((HERE / "merchants.yaml").read_text()))
            doc["merchants"].append({**doc["merchants"][3], "slug": "newshop", "name": "New Shop"})
            path = tmp_path / "merchants.yaml"
            path.write_text(yaml.safe_dump(doc, allow_unicode=True))
            done: subprocess.CompletedProcess[str] = await asyncio.to_thread(
                cli, pooled, "merchants", "sync", str(path))
            assert done.returncode == 0, done.stderr
            for base in (first, second):
                for _ in range(4):  # each request may land on either worker of the pod
                    await until(functools.partial(_is_302, base, token), f"{base} serving newshop after the sync", 10)
    finally:
        await receiver.stop()


async def _is_302(base: str, token: str) -> bool:
    return await _status(base, "newshop", token) == 302
