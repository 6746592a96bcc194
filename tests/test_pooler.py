"""tracker behind Debian's PgBouncer in transaction pooling mode (TRACKER_DATABASE_POOLER=transaction):
what needs a session goes to TRACKER_DATABASE_DIRECT_URL, nothing else relies on one, and a PgBouncer
restarted under /go load loses no click. The core suites run behind it too (`pooled` in conftest.py)."""
from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from tracker.settings import Settings
from tracker.store.db import MIGRATE_LOCK, create_pool

from .conftest import SECRET, serve_process
from .stack import PgBouncer
from .test_faults import Load, readyz_until, wait_rows
from .waiting import until

pytestmark = pytest.mark.fault


def behind(settings: Settings, bouncer: PgBouncer) -> Settings:
    """`settings` with its database reached through `bouncer`, the primary itself as the direct URL."""
    database = settings.database_url or ""
    return dataclasses.replace(settings, database_url=bouncer.url(urlsplit(database).path.lstrip("/")),
                               database_pooler="transaction", database_direct_url=database)


def test_the_pooler_without_a_direct_url_is_a_bad_setting_named_at_start(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "TRACKER_DATA_DIR": str(tmp_path), "TRACKER_SECRET": SECRET,
           "TRACKER_DATABASE_URL": "postgresql://tracker@pgbouncer:6432/tracker", "TRACKER_REDIS_URL": "redis://r:6379/0"}
    for extra, named in (({"TRACKER_DATABASE_POOLER": "transaction"}, "TRACKER_DATABASE_DIRECT_URL"),
                         ({"TRACKER_DATABASE_POOLER": "session", "TRACKER_DATABASE_DIRECT_URL": "postgresql://p/t"},
                          "TRACKER_DATABASE_POOLER='session'")):
        done = subprocess.run([sys.executable, "-m", "tracker.cli", "serve"], env={**env, **extra},
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "bad setting" in done.stderr and named in done.stderr, done.stderr


async def _operations(pool: asyncpg.Pool, count: int) -> int:
    """`count` concurrent pool operations of several statements each; how many failed."""
    async def operation(i: int) -> bool:
        try:
            async with pool.acquire() as conn:
                await conn.fetchval("SELECT $1::int + 1", i)
                await conn.fetchval("SELECT count(*) FROM merchants WHERE slug = $1", "nike")
            return True
        except asyncpg.PostgresError:
            return False

    return sum(not ok for ok in await asyncio.gather(*(operation(i) for i in range(count))))


async def test_no_statement_outlives_its_transaction(settings, pgbouncer):
    """The fixture's PgBouncer really pools by transaction: named prepared statements (asyncpg's
    default cache) fail there; the pool tracker makes for a pooler does not."""
    url = behind(settings, pgbouncer).database_url or ""
    cached = await create_pool(url, min_size=4, max_size=8)
    try:
        assert await _operations(cached, 240) > 0
    finally:
        await cached.close()
    pooled = await create_pool(url, min_size=4, max_size=8, pooler="transaction")
    try:
        assert await _operations(pooled, 240) == 0
    finally:
        await pooled.close()


async def test_migrate_takes_its_lock_on_the_primary_itself(settings, pgbouncer, database):
    """A session lock taken through PgBouncer stays with a server connection that goes back to its
    pool: a `tracker migrate` through the pooler could land on that connection and "hold" the lock
    too. Through TRACKER_DATABASE_DIRECT_URL it waits for the holder."""
    pooled = behind(settings, pgbouncer)
    holder = await asyncpg.connect(pooled.database_url, statement_cache_size=0)
    watcher = await asyncpg.connect(database)
    proc = None
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATE_LOCK)
        holder_pid = await watcher.fetchval(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database()) AND objid = $1::bigint % 4294967296",
            MIGRATE_LOCK)
        assert holder_pid is not None
        await holder.close()  # the server connection, lock and all, goes back to PgBouncer's pool
        env = {"PATH": "/usr/bin:/bin", "TRACKER_DATA_DIR": str(settings.data_dir), "TRACKER_SECRET": SECRET,
               "TRACKER_DATABASE_URL": pooled.database_url or "", "TRACKER_DATABASE_POOLER": "transaction",
               "TRACKER_DATABASE_DIRECT_URL": database, "TRACKER_REDIS_URL": settings.redis_url or ""}
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "tracker.cli", "migrate", env=env,
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        await until(lambda: watcher.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND objid = $1::bigint % 4294967296", MIGRATE_LOCK), "tracker migrate waiting for the lock")
        assert proc.returncode is None
        await watcher.execute("SELECT pg_terminate_backend($1)", holder_pid)  # the holder goes away
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err
        assert out.strip() == b'{"applied": []}'
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await watcher.close()


async def test_pgbouncer_restarted_under_load_loses_no_click(settings, servers, database):
    bouncer = PgBouncer(servers[0])
    bouncer.start()
    try:
        pooled = behind(settings, bouncer)
        async with serve_process(pooled, workers=2) as (_, base):
            port = int(base.rsplit(":", 1)[1])
            load = Load(port, "fault-pgbouncer")
            seen: list[dict[str, Any]] = []

            async def restart() -> None:
                await asyncio.sleep(1.0)  # load before the restart (the behaviour under test)
                await asyncio.to_thread(bouncer.stop)
                seen.append((await readyz_until(port, lambda status, body: body["postgres"] == "down",
                                                "reporting PostgreSQL down"))[1])
                await asyncio.sleep(1.0)  # PgBouncer stays away under load: clicks go to the spool
                await asyncio.to_thread(bouncer.start)
                await asyncio.sleep(1.0)  # the load goes on across the recovery

            await load.run_for(0, during=restart)
            assert load.other == [] and load.errors == 0
            assert len(load.ids) > 50 and seen
            total, distinct = await wait_rows(database, "fault-pgbouncer", len(load.ids))
            assert total == distinct == len(load.ids)
            await readyz_until(port, lambda status, body: status == 200 and body["status"] == "ready", "ready again")
            await until(lambda: not list(pooled.spool_dir.glob("*.spool")), "the spool replayed")
    finally:
        bouncer.close()
