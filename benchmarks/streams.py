"""How many Redis connections does one worker hold with N live event streams open, and do the
redirects made meanwhile keep their Redis sessions? (Each stream used to hold a connection of
redis-py's 100-connection pool.)

Usage: .venv/bin/python benchmarks/streams.py [N] [--tree DIR]
`--tree DIR` serves another checkout (e.g. `git archive REV | tar -x -C DIR`) to compare. Servers as
for benchmarks/run (the variables' or the embedded ones); the worker uses Redis database 15 alone,
so its connections are those CLIENT LIST shows on db=15."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import aiohttp
import redis
from bench import OUT, SECRET, TRACKER, free_port, setup, stop, wait_http

sys.path.insert(0, str(OUT.parent.parent))
from tracker.domain.tokens import UserTokens  # noqa: E402
from tracker.store.redis_keys import session_key  # noqa: E402

BROWSER = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/130.0 Safari/537.36"}


def worker_connections(admin: redis.Redis) -> tuple[int, int]:
    """(connections on db 15, channels they subscribe)."""
    mine = [c for c in admin.client_list() if c.get("db") == "15" and c.get("name") != "streams-bench"]
    return len(mine), sum(int(c.get("sub", 0)) for c in mine)


async def drive(base: str, n: int, admin: redis.Redis) -> dict[str, object]:
    signer = UserTokens(SECRET)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        async def go(user: str) -> str:
            async with http.get(f"{base}/go/nike", params={"u": signer.mint(user)}, allow_redirects=False,
                                headers=BROWSER) as r:
                return r.headers["X-Click-Id"]

        async def stream(i: int, cid: str) -> aiohttp.ClientResponse:
            resp = await http.get(f"{base}/v1/clicks/{cid}/events",
                                  params={"u": signer.mint(f"s-{i}"), "heartbeat": "60"})
            await resp.content.readuntil(b"\n\n")  # its first event
            return resp

        cids = await asyncio.gather(*(go(f"s-{i}") for i in range(n)))
        before = worker_connections(admin)
        streams = await asyncio.gather(*(stream(i, cid) for i, cid in enumerate(cids)))
        await asyncio.sleep(1.0)  # let subscriptions settle
        during = worker_connections(admin)
        walkers = await asyncio.gather(*(go(f"w-{i}") for i in range(200)))
        await asyncio.sleep(1.0)  # the batcher's next rounds
        sessions = sum(1 for v in admin.mget([session_key("trkbench:", c) for c in walkers]) if v)
        async with http.get(f"{base}/metrics") as r:
            dropped = sum(float(line.rsplit(" ", 1)[1]) for line in (await r.text()).splitlines()
                          if line.startswith("tracker_redis_fail_open_total{"))
        for s in streams:
            s.close()
    return {"streams": n, "connections before streams": before[0], "with streams": during[0],
            "subscribed channels": during[1], "redirects": len(walkers), "sessions in Redis": sessions,
            "tracker_redis_fail_open_total": dropped}


def main() -> int:
    args = sys.argv[1:]
    tree = args[args.index("--tree") + 1] if "--tree" in args else None
    n = int(next((a for a in args if a.isdigit()), "150"))
    tenv, _, _ = setup(OUT / "streams")
    if tree:
        tenv["PYTHONPATH"] = tree
    admin = redis.Redis.from_url(tenv["TRACKER_REDIS_URL"], client_name="streams-bench")
    admin.flushdb()
    port = free_port()
    log_path = OUT / "streams" / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([*TRACKER, "serve", "--workers", "1", "--port", str(port)], env=tenv,
                                stdout=log, stderr=log)
    try:
        wait_http(port)
        time.sleep(0.5)
        result = asyncio.run(drive(f"http://127.0.0.1:{port}", n, admin))
    finally:
        stop(proc)
    text = log_path.read_text()
    result["redis_unreachable lines"] = text.count('"redis_unreachable"')
    result["Too many connections lines"] = text.count("Too many connections")
    print(f"tree: {tree or 'the working tree'}")
    for key, value in result.items():
        print(f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
