import asyncio
import re
import secrets
from datetime import date, timedelta

import asyncpg

from tracker.store.db import drop_old_partitions, ensure_partitions, migrate, migrations, partition_name

from .conftest import _admin, with_database


async def test_migrations_apply_from_empty_once_even_concurrently(servers):
    name = f"trk_test_mig_{secrets.token_hex(4)}"
    await _admin(servers[0], f"CREATE DATABASE {name}")
    try:
        dsn = with_database(servers[0], name)
        conns = [await asyncpg.connect(dsn) for _ in range(4)]
        results = await asyncio.gather(*(migrate(c) for c in conns))
        applied = [r for r in results if r]
        assert len(applied) == 1  # one pod applied them, the others found them done
        assert applied[0] == [n for _, n, _ in migrations()]
        tables = lambda: conns[0].fetch(  # noqa: E731
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'public' ORDER BY 1, 2")
        before = await tables()
        assert await migrate(conns[0]) == []
        assert await tables() == before
        versions = await conns[0].fetch("SELECT version FROM schema_migrations ORDER BY 1")
        assert [v["version"] for v in versions] == [v for v, _, _ in migrations()]
        for c in conns:
            await c.close()
    finally:
        await _admin(servers[0], f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def test_partitions_daily_and_retention(db):
    start = date(2020, 1, 1)
    created = await ensure_partitions(db, start, 3)
    assert created == [partition_name(start + timedelta(days=i)) for i in range(3)]
    assert await ensure_partitions(db, start, 3) == []
    dropped = await drop_old_partitions(db, retention_days=400, today=date(2021, 2, 7))
    assert dropped == ["clicks_p20200101", "clicks_p20200102", "clicks_p20200103"]
    assert await drop_old_partitions(db, retention_days=400, today=date(2021, 2, 7)) == []


async def test_lookup_by_click_id_touches_one_partition(db):
    from tracker.domain.clickid import click_time, new_click_id
    from tracker.store.db import ensure_near_partitions

    await ensure_near_partitions(db)
    cid, _ = new_click_id()
    plan = await db.fetchval(
        "EXPLAIN (FORMAT TEXT) SELECT * FROM clicks WHERE click_id = $1 AND created_at = $2",
        cid, click_time(cid))
    rows = await db.fetch("EXPLAIN SELECT * FROM clicks WHERE click_id = $1 AND created_at = $2",
                          cid, click_time(cid))
    text = "\n".join(r[0] for r in rows)
    assert plan and len(set(re.findall(r" on (clicks_p\d{8})", text))) == 1, text
