"""Postback click lookups at scale: 20 million clicks over 60 daily partitions; the lookup by click id
(with the time the id carries) reads one partition. Prints the plan and the latency percentiles.
Run: .venv/bin/python benchmarks/scale.py ADMIN_DSN [ROWS] (creates and, unless KEEP=1, drops trk_scale)."""
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
from tracker.store.db import ensure_partitions, migrate  # noqa: E402

DAYS = 60
STEP_MS = 259  # rows of one day are spread over the day, 259 ms apart


async def main(admin: str, rows: int) -> None:
    conn = await asyncpg.connect(admin)
    await conn.execute("DROP DATABASE IF EXISTS trk_scale WITH (FORCE)")
    await conn.execute("CREATE DATABASE trk_scale")
    await conn.close()
    dsn = re.sub(r"/[^/]*$", "/trk_scale", admin)
    conn = await asyncpg.connect(dsn)
    await migrate(conn)
    today = datetime.now(timezone.utc).date()
    first = today - timedelta(days=DAYS - 1)
    await ensure_partitions(conn, first, DAYS)
    per_day = rows // DAYS
    started = time.perf_counter()
    for d in range(DAYS):
        day = datetime.combine(first + timedelta(days=d), datetime.min.time(), tzinfo=timezone.utc)
        await conn.execute(
            "INSERT INTO clicks (click_id, created_at, user_id, merchant, source, target, client_ip, bot, method) "
            "SELECT 'c' || $1::int || '-' || g, $2::timestamptz + (g * $3::int) * interval '1 millisecond', "
            "'u' || (g % 100000), 'aliexpress', 'web', 'https://aliexpress.ru/item/' || g || '.html', "
            "'203.0.113.7', false, 'GET' FROM generate_series(1, $4::int) g", d, day, STEP_MS, per_day)
        print(f"day {d + 1}/{DAYS}: {per_day * (d + 1):,} rows, {time.perf_counter() - started:.0f}s", flush=True)
    await conn.execute("ANALYZE clicks")
    total = await conn.fetchval("SELECT count(*) FROM clicks")
    parts = await conn.fetchval("SELECT count(*) FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent "
                                "WHERE p.relname = 'clicks'")
    print(f"\n{total:,} clicks in {parts} partitions, loaded in {time.perf_counter() - started:.0f}s")

    def sample() -> tuple[str, datetime]:
        d, g = random.randrange(DAYS), random.randint(1, per_day)
        day = datetime.combine(first + timedelta(days=d), datetime.min.time(), tzinfo=timezone.utc)
        return f"c{d}-{g}", day + timedelta(milliseconds=g * STEP_MS)

    query = ("SELECT click_id, created_at, user_id, merchant, bot FROM clicks "
             "WHERE click_id = $1 AND created_at = $2")  # the postback's lookup (store/conversions.py)
    cid, ts = sample()
    plan = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + query.replace("$1", f"'{cid}'")
                            .replace("$2", f"'{ts.isoformat()}'"))
    print("\nPlan:\n" + "\n".join("    " + r[0] for r in plan))
    stmt = await conn.prepare(query)
    for _ in range(200):  # warm the statement cache and the plan
        await stmt.fetchrow(*sample())
    timings = []
    found = 0
    for _ in range(10_000):
        args = sample()
        t0 = time.perf_counter()
        row = await stmt.fetchrow(*args)
        timings.append(time.perf_counter() - t0)
        found += row is not None
    timings.sort()
    pct = lambda p: timings[int(p * (len(timings) - 1))] * 1000  # noqa: E731
    print(f"\n10,000 random lookups (all found: {found == 10_000}): p50 {pct(0.5):.3f} ms, "
          f"p99 {pct(0.99):.3f} ms, max {timings[-1] * 1000:.3f} ms")
    await conn.close()
    if os.environ.get("KEEP") != "1":
        conn = await asyncpg.connect(admin)
        await conn.execute("DROP DATABASE trk_scale WITH (FORCE)")
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20_000_000))
