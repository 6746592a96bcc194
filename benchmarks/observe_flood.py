"""Does one account flooding POST /v1/observe slow another account's observe, or grow PostgreSQL
without bound? Usage: .venv/bin/python benchmarks/observe_flood.py (BENCH_SECONDS, BENCH_WORKERS as
for benchmarks/run).

The service runs with the production observe limit per user (TRACKER_RATE_LIMIT_OBSERVE_USER's
default); all load comes from 127.0.0.1, so the per-IP limit is lifted. Normal users (2,000 clicks of
2,000 users, 16 connections, the 5-event body of benchmarks/observe.lua) are measured alone, then
beside one account's flood on 4 connections (benchmarks/observe_flood.lua: 100 navigation events of
~41 KB per request, every URL full of other networks' parameters with values new to each request,
spread over 50 clicks of that account). The table gives the normal users' p50/p99 in both runs and
their ratio (the aim: p99 within 2x of its unloaded value), what the flood got, and the signal rows
and database growth it caused."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import asyncpg
import bench
import redis
from bench import ROOT, SECONDS, WORKERS, free_port, stop, wait_http, wrk

sys.path.insert(0, str(ROOT))
from tracker.domain.tokens import UserTokens  # noqa: E402

FLOOD_CLICKS = 50
FLOOD_CONNECTIONS = 4


async def _flood_clicks(port: int, token: str) -> list[str]:
    import aiohttp

    out = []
    async with aiohttp.ClientSession() as session:
        for _ in range(FLOOD_CLICKS):
            async with session.get(f"http://127.0.0.1:{port}/go/aliexpress", params={"u": token},
                                   allow_redirects=False, headers={"User-Agent": "Mozilla/5.0 bench"}) as r:
                out.append(r.headers["X-Click-Id"])
    return out


async def _stored(dsn: str, flood_user: str) -> tuple[int, int]:
    """(the flooding account's signal rows, the database's size in bytes)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetchval("SELECT count(*) FROM signals s JOIN clicks c USING (click_id) "
                                   "WHERE c.user_id = $1", flood_user)
        size = await conn.fetchval("SELECT pg_database_size(current_database())")
        return int(rows), int(size)
    finally:
        await conn.close()


def main() -> int:
    scratch = Path(tempfile.mkdtemp(prefix="tracker-observe-flood-"))
    tenv, _, _ = bench.setup(scratch)
    redis.Redis.from_url(tenv["TRACKER_REDIS_URL"]).flushdb()  # the benchmark's own database: no count of an earlier run
    tenv.pop("TRACKER_RATE_LIMIT_OBSERVE_USER", None)  # the production default
    tenv["TRACKER_DURABILITY"] = "commit"
    signer = UserTokens(bench.SECRET)
    port = free_port()
    log = (scratch / "tracker.log").open("wb")
    proc = subprocess.Popen([*bench.TRACKER, "serve", "--port", str(port), "--workers", str(WORKERS)],
                            env=tenv, stdout=log, stderr=log)
    observe = str(ROOT / "benchmarks/observe.lua")
    flood = str(ROOT / "benchmarks/observe_flood.lua")
    try:
        wait_http(port, "/readyz")
        clicks = scratch / "clicks.txt"
        clicks.write_text(asyncio.run(bench.make_clicks(port, signer, 2000)))
        flood_token = signer.mint("flooder")
        flood_clicks = scratch / "flood-clicks.txt"
        flood_clicks.write_text("\n".join(asyncio.run(_flood_clicks(port, flood_token))) + "\n")
        normal_env = {"CLICKS_FILE": str(clicks)}
        wrk(port, observe, normal_env, 2, 16)  # warm-up
        alone = wrk(port, observe, normal_env, SECONDS, 16)
        rows_before, size_before = asyncio.run(_stored(tenv["TRACKER_DATABASE_URL"], "flooder"))
        flooded: dict[str, dict[str, float]] = {}
        thread = threading.Thread(target=lambda: flooded.update(r=wrk(
            port, flood, {"FLOOD_TOKEN": flood_token, "FLOOD_CLICKS_FILE": str(flood_clicks)},
            SECONDS + 2, FLOOD_CONNECTIONS)))
        thread.start()
        time.sleep(1)
        beside = wrk(port, observe, normal_env, SECONDS, 16)
        thread.join()
        time.sleep(1)  # the signal writer's last batch
        rows_after, size_after = asyncio.run(_stored(tenv["TRACKER_DATABASE_URL"], "flooder"))
    finally:
        stop(proc)
        log.close()
    f = flooded["r"]
    load = os.getloadavg()
    print(f"\nwrk {SECONDS}s, {WORKERS} server processes, durability commit, load average {load[0]:.2f}\n")
    print("| normal users' observe | req/s | p50 ms | p99 ms | refused |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in (("alone (16 connections)", alone),
                    (f"beside one account's flood ({FLOOD_CONNECTIONS} connections)", beside)):
        print(f"| {name} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['non_3xx']} |")
    print(f"\np99 beside the flood / alone: {beside['p99_ms'] / alone['p99_ms']:.2f}")
    print(f"flood: {f['requests']:,} requests ({f['rps']:,.0f}/s), {f['non_3xx']:,} refused (429), "
          f"signal rows of the flooding account {rows_before:,} -> {rows_after:,} "
          f"(cap {FLOOD_CLICKS} clicks x 100 = {FLOOD_CLICKS * 100:,}), "
          f"database {size_before / 2**20:.1f} -> {size_after / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
