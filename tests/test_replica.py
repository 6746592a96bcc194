"""A streaming replica for support reads (TRACKER_DATABASE_REPLICA_URL): lookups, the support view and
the console read there, and say so; when the replica stops, they read the primary. A real primary and
replica (tests/stack.py): the replica's replay is paused to tell its data from the primary's."""
from __future__ import annotations

import asyncio
import dataclasses
import secrets
from typing import Iterator

import asyncpg
import pytest

from tracker.app import create_app
from tracker.settings import Settings

from .conftest import ADMIN, prepare_database
from .stack import Replicated, postgres_bin
from .test_console import sign_in
from .test_postbacks import activate, admitad
from .waiting import until

pytestmark = pytest.mark.fault


async def _major(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SHOW server_version_num")) // 10000
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def pair(servers: tuple[str, str]) -> Iterator[tuple[Replicated, str]]:
    """A primary and its replica from the binaries of the suite's PostgreSQL's version, and a migrated
    database on the primary (streamed to the replica)."""
    replicated = Replicated(postgres_bin(asyncio.run(_major(servers[0]))))
    replicated.start()
    name = f"trk_replica_{secrets.token_hex(4)}"

    async def create() -> None:
        conn = await asyncpg.connect(replicated.primary_url())
        try:
            await conn.execute(f"CREATE DATABASE {name}")
        finally:
            await conn.close()
        await prepare_database(replicated.primary_url(name))
        # The tests read the replica from their first step: wait until it has replayed the database
        # and its migrations (on a loaded machine it had not yet: "database ... does not exist").
        conn = await asyncpg.connect(replicated.primary_url())
        try:
            lsn = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
        finally:
            await conn.close()
        replica = await asyncpg.connect(replicated.replica_url())
        try:
            await until(lambda: replica.fetchval("SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", lsn),
                        "the replica replaying the new database", 60)
        finally:
            await replica.close()

    asyncio.run(create())
    yield replicated, name
    replicated.close()


@pytest.fixture
def replica_settings(settings: Settings, pair: tuple[Replicated, str]) -> Settings:
    replicated, name = pair
    return dataclasses.replace(settings, database_url=replicated.primary_url(name),
                               database_replica_url=replicated.replica_url(name))


async def _replay(url: str, paused: bool) -> None:
    """Pause or resume the replica's replay, and wait until it has."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SELECT pg_wal_replay_pause()" if paused else "SELECT pg_wal_replay_resume()")
        want = "paused" if paused else "not paused"
        await until(lambda: conn.fetchval("SELECT pg_get_wal_replay_pause_state() = $1", want),
                    f"the replica's replay {want}")
    finally:
        await conn.close()


async def _user_clicks(client, user: str) -> list[str]:  # noqa: ANN001
    resp = await client.get(f"/v1/users/{user}/clicks", headers=ADMIN)
    assert resp.status == 200
    return [c["click_id"] for c in (await resp.json())["clicks"]]


async def test_support_reads_come_from_the_replica_and_the_console_says_so(aiohttp_client, replica_settings,
                                                                          tokens, pair):
    replicated, name = pair
    client = await aiohttp_client(create_app(replica_settings))
    first = await activate(client, tokens, "replica-reader", "nike")
    await until(lambda: _user_clicks(client, "replica-reader"), "the first click on the replica")
    await _replay(replicated.replica_url(name), paused=True)
    try:
        second = await activate(client, tokens, "replica-reader", "nike")  # committed on the primary
        # A postback is a write, and its key check reads the primary: the replica's pause is no matter.
        assert (await client.get("/postback/admitad", params=admitad(second, "REPL-1"))).status == 200
        assert await _user_clicks(client, "replica-reader") == [first]
        assert (await client.get(f"/v1/clicks/{second}", headers=ADMIN)).status == 404
        orders = await (await client.get("/v1/conversions", params={"order_id": "REPL-1"}, headers=ADMIN)).json()
        assert orders == {"conversions": []}
        await sign_in(client)
        page = await (await client.get("/support/users/replica-reader")).text()
        assert "Read from the replica" in page and "s behind the primary" in page
        assert first in page and second not in page
    finally:
        await _replay(replicated.replica_url(name), paused=False)
    await until(lambda: _has_both(client, first, second), "the second click replayed on the replica")
    page = await (await client.get(f"/support/clicks/{second}")).text()
    assert "Read from the replica, up to date with the primary" in page


async def _has_both(client, first: str, second: str) -> bool:  # noqa: ANN001
    return set(await _user_clicks(client, "replica-reader")) == {first, second}


async def test_a_stopped_replica_sends_support_reads_to_the_primary(aiohttp_client, replica_settings, tokens,
                                                                     pair):
    replicated, name = pair
    client = await aiohttp_client(create_app(replica_settings))
    await sign_in(client)
    await asyncio.to_thread(replicated.stop_replica)
    try:
        click = await activate(client, tokens, "replica-down", "nike")
        assert await _user_clicks(client, "replica-down") == [click]
        assert (await client.get(f"/v1/clicks/{click}", headers=ADMIN)).status == 200
        page = await (await client.get("/support/users/replica-down")).text()
        assert click in page and "Read from the replica" not in page
    finally:
        await asyncio.to_thread(replicated.start_replica)
    # Back: within the retry interval the replica serves again (its paused replay shows it is the one).
    await _replay(replicated.replica_url(name), paused=True)
    try:
        later = await activate(client, tokens, "replica-down", "nike")
        await until(lambda: _user_clicks_without(client, later), "support reads back on the replica")
    finally:
        await _replay(replicated.replica_url(name), paused=False)


async def _user_clicks_without(client, click: str) -> bool:  # noqa: ANN001
    return click not in await _user_clicks(client, "replica-down")


async def test_an_erasure_the_replica_has_not_replayed_is_never_shown_from_it(aiohttp_client, replica_settings,
                                                                              tokens, pair):
    replicated, name = pair
    client = await aiohttp_client(create_app(replica_settings))
    cid = await activate(client, tokens, "replica-erased", "aliexpress")
    assert (await client.get("/postback/admitad", params=admitad(cid, "REPL-ERASE"))).status == 200
    async def order_replayed() -> bool:
        found = await (await client.get("/v1/conversions", params={"order_id": "REPL-ERASE"}, headers=ADMIN)).json()
        return bool(found["conversions"])

    await until(lambda: _user_clicks(client, "replica-erased"), "the click on the replica")
    await until(order_replayed, "the order on the replica")
    await _replay(replicated.replica_url(name), paused=True)
    try:
        resp = await client.delete("/v1/users/replica-erased", headers=ADMIN)  # on the primary
        assert resp.status == 200 and (await resp.json())["erased"]["clicks"] == 1
        # The replica still has the user's click; every read of it goes to the primary instead.
        assert await _user_clicks(client, "replica-erased") == []
        view = await (await client.get(f"/v1/clicks/{cid}", headers=ADMIN)).json()
        assert view["click"]["user_id"].startswith("erased~") and view["click"]["client_ip"] is None
        orders = await (await client.get("/v1/conversions", params={"order_id": "REPL-ERASE"}, headers=ADMIN)).json()
        assert [c["user_id"].startswith("erased~") for c in orders["conversions"]] == [True]
        await sign_in(client)
        # No activation listed (the audit trail at the bottom still names who read the click, by design).
        assert f'href="/support/clicks/{cid}"' not in await (await client.get("/support/users/replica-erased")).text()
        assert "replica-erased" not in await (await client.get(f"/support/clicks/{cid}")).text()
    finally:
        await _replay(replicated.replica_url(name), paused=False)
