"""Support lookups at scale: 20 million clicks over 60 daily partitions (the shape of scale.py: 100,000
users, about 3 clicks each per day), one conversion per 20 clicks (1 million orders) and a detector
state for one click in 10. Times what the API runs (tracker/store/lookups.py): a user's last 50
clicks with their states and conversions, and an order looked up by its id alone, and prints the
EXPLAIN (ANALYZE, BUFFERS) plans of their queries.

Run: .venv/bin/python benchmarks/lookups.py ADMIN_DSN [ROWS]
(creates trk_lookups and drops it afterwards unless KEEP=1; REUSE=1 measures a kept one again)."""
from __future__ import annotations

import asyncio
import os
import random
import re
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tracker.store import lookups  # noqa: E402
from tracker.store.db import connect, ensure_partitions, migrate  # noqa: E402

DAYS = 60
STEP_MS = 259  # as scale.py: rows of one day spread over the day, 259 ms apart
USERS = 100_000
DB = "trk_lookups"


async def load(conn: asyncpg.Connection, rows: int) -> None:
    await migrate(conn)
    first = datetime.now(timezone.utc).date() - timedelta(days=DAYS - 1)
    await ensure_partitions(conn, first, DAYS)
    per_day = rows // DAYS
    started = time.perf_counter()
    for d in range(DAYS):
        day = datetime.combine(first + timedelta(days=d), datetime.min.time(), tzinfo=timezone.utc)
        args = (d, day, STEP_MS, per_day)
        await conn.execute(
            "INSERT INTO clicks (click_id, created_at, user_id, merchant, source, target, client_ip, bot, method) "
            "SELECT 'c' || $1::int || '-' || g, $2::timestamptz + (g * $3::int) * interval '1 millisecond', "
            f"'u' || (g % {USERS}), 'aliexpress', 'web', 'https://aliexpress.ru/item/' || g || '.html', "
            "'203.0.113.7', false, 'GET' FROM generate_series(1, $4::int) g", *args)
        await conn.execute(
            "INSERT INTO conversions (network, order_id, click_id, click_created_at, user_id, merchant, status, "
            "status_word, amount, commission, currency, user_share, cashback, order_time) "
            "SELECT 'admitad', (8100000000 + $1::int * 1000000 + g)::text, 'c' || $1::int || '-' || g, "
            "$2::timestamptz + (g * $3::int) * interval '1 millisecond', "
            f"'u' || (g % {USERS}), 'aliexpress', 'approved', 'approved', 100, 10, 'RUB', 0.5, 5, "
            "$2::timestamptz + (g * $3::int) * interval '1 millisecond' + interval '20 minutes' "
            "FROM generate_series(20, $4::int, 20) g", *args)
        await conn.execute(
            "INSERT INTO click_states (click_id, created_at, state, overwritten_at) "
            "SELECT 'c' || $1::int || '-' || g, $2::timestamptz + (g * $3::int) * interval '1 millisecond', "
            "CASE WHEN g % 30 = 0 THEN 'overwritten' ELSE 'active' END, "
            "CASE WHEN g % 30 = 0 THEN now() END FROM generate_series(10, $4::int, 10) g", *args)
        print(f"day {d + 1}/{DAYS}: {per_day * (d + 1):,} clicks, {time.perf_counter() - started:.0f}s", flush=True)
    await conn.execute("VACUUM ANALYZE")


def pct(timings: list[float], p: float) -> float:
    return sorted(timings)[int(p * (len(timings) - 1))] * 1000


async def plan(conn: asyncpg.Connection, sql: str, *args: object) -> str:
    rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + sql, *args)
    return "\n".join("    " + r[0] for r in rows)


async def measure(conn: asyncpg.Connection, n: int = 10_000) -> None:
    total = await conn.fetchval("SELECT count(*) FROM clicks")
    orders = await conn.fetchval("SELECT count(*) FROM conversions")
    parts = await conn.fetchval("SELECT count(*) FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent "
                                "WHERE p.relname = 'clicks'")
    print(f"\n{total:,} clicks in {parts} partitions, {orders:,} conversions; PostgreSQL "
          f"{await conn.fetchval('SHOW server_version')}")
    user = f"u{random.randrange(USERS)}"
    page = await lookups.user_clicks(conn, user, 51)
    print(f"\nA user's last 50 clicks ({user}), with states and conversions:\n"
          + await plan(conn, lookups.PAGE.format(lookups.USER_CLICKS), user, 51))
    last = page[min(49, len(page) - 1)]
    print("\nThe next page (before=...):\n" + await plan(conn, lookups.PAGE.format(lookups.USER_CLICKS_BEFORE), user,
                                                       51, last["created_at"], last["click_id"]))
    order = str(8100000000 + random.randrange(DAYS) * 1000000 + 20 * random.randint(1, 1000))
    print(f"\nAn order by its id ({order}):\n" + await plan(conn, lookups.ORDER, order))

    def random_order() -> str:
        return str(8100000000 + random.randrange(DAYS) * 1000000 + 20 * random.randint(1, 16_000))

    for name, call in (("a user's last 50 clicks with their states and conversions (one query)",
                        lambda: lookups.user_clicks(conn, f"u{random.randrange(USERS)}", 51)),
                       ("an order by id", lambda: lookups.orders(conn, random_order()))):
        for _ in range(200):  # warm the statement cache
            await call()
        timings, found = [], 0
        for _ in range(n):
            t0 = time.perf_counter()
            result = await call()
            timings.append(time.perf_counter() - t0)
            found += bool(result)
        print(f"\n{n:,} x {name}: p50 {pct(timings, .5):.3f} ms, p99 {pct(timings, .99):.3f} ms, "
              f"max {max(timings) * 1000:.3f} ms (found: {found:,})")


async def main(admin: str, rows: int) -> None:
    dsn = re.sub(r"/[^/]*$", f"/{DB}", admin)
    if os.environ.get("REUSE") != "1":
        conn = await asyncpg.connect(admin)
        await conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {DB}")
        await conn.close()
        conn = await asyncpg.connect(dsn)
        await load(conn, rows)
        await conn.close()
    conn = await connect(dsn)  # as tracker's own: json decoded (a user's clicks' conversions)
    try:
        await measure(conn)
    finally:
        await conn.close()
    if os.environ.get("KEEP") != "1":
        conn = await asyncpg.connect(admin)
        await conn.execute(f"DROP DATABASE {DB} WITH (FORCE)")
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20_000_000))
