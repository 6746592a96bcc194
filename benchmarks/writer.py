"""The click writer alone, saturated, and the spool replay: rows per second into `clicks`.
Run: .venv/bin/python benchmarks/writer.py DSN [ROWS]"""
from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tracker.domain.clickid import new_click_id  # noqa: E402
from tracker.store.clicks import Click, ClickWriter  # noqa: E402
from tracker.store.db import create_pool, ensure_near_partitions  # noqa: E402
from tracker.store.spool import Spool  # noqa: E402


def rows(n: int, user: str) -> list[Click]:
    out = []
    for i in range(n):
        cid, ms = new_click_id()
        out.append(Click(cid, ms, user, "aliexpress", "web", f"https://aliexpress.ru/item/{i}.html", "dev-1",
                         "203.0.113.7", "Mozilla/5.0 (X11; Linux x86_64) Chrome/130.0", False, "GET"))
    return out


async def main(dsn: str, n: int) -> None:
    pool = await create_pool(dsn, max_size=4)
    async with pool.acquire() as conn:
        await ensure_near_partitions(conn)
    with tempfile.TemporaryDirectory() as tmp:
        writer = ClickWriter(pool, Spool(Path(tmp) / "spool"), durability="async", queue_limit=10**7, dsn=dsn)
        await writer.start()
        batch = rows(n, "bench-writer")
        started = time.perf_counter()
        for r in batch:
            await writer.write(r)
        while writer.queued:
            await asyncio.sleep(0.001)
        elapsed = time.perf_counter() - started
        stored = await pool.fetchval("SELECT count(*) FROM clicks WHERE user_id = 'bench-writer'")
        assert stored == n, (stored, n)
        print(f"writer: {n} rows in {elapsed:.2f}s = {n / elapsed:,.0f} rows/s "
              f"(async mode, 2 flushers, batches of {writer.batches.batch_limit}, merged up to {writer.batches.merge_limit} under a backlog)")
        await writer.close()

        spool = Spool(Path(tmp) / "spool2")
        replay_rows = rows(n, "bench-replay")
        for start in range(0, n, 5000):
            spool.append([list(r) for r in replay_rows[start:start + 5000]], sync=False)
        spool.close()
        writer = ClickWriter(pool, spool)
        started = time.perf_counter()
        inserted = await writer.replay()
        elapsed = time.perf_counter() - started
        print(f"replay: {inserted} rows in {elapsed:.2f}s = {inserted / elapsed:,.0f} rows/s "
              "(temp table + INSERT ... ON CONFLICT DO NOTHING, 5,000 per transaction)")
    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM clicks WHERE user_id IN ('bench-writer', 'bench-replay')")
    await pool.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 200_000))
