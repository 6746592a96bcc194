"""Events out, measured in one run:

1. Postbacks per second without and with the outbox's INSERT: `tracker serve --workers 1` of HEAD
   and of HEAD with the postback path (store/conversions.py, web/postbacks.py) as it was before events
   existed (BEFORE), so that nothing else differs (the sequencer and dispatcher run in both),
   alternately, wrk with benchmarks/postback.lua (a new order per request: every postback writes a
   conversion and, with the outbox, an event); the worker's CPU per postback from /proc.
2. The same on the store level, without HTTP: record_postback on one connection, blocks of 500 new
   orders alternating with and without the event INSERT (`emit` replaced by a no-op), wall time
   and this process's CPU per postback: the INSERT's own cost, less at the mercy of other load.
3. Webhook deliveries per second to one fast subscriber: a local aiohttp receiver (its own process,
   answers 204), `tracker serve --workers 2`, N events inserted at once; the time from their commit
   until every delivery is recorded delivered.

    .venv/bin/python benchmarks/events.py [--before REV] [--rounds 3] [--seconds 8] [--events 20000]

Uses the servers of TRACKER_DATABASE_URL / TRACKER_REDIS_URL, else the embedded ones."""
from __future__ import annotations

import argparse
import asyncio
import base64
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import ab  # noqa: E402
import bench  # noqa: E402

from tracker.domain.tokens import UserTokens  # noqa: E402

BEFORE = "2d8fa3a"  # the last commit before the outbox
POSTBACK_PATH = ["tracker/store/conversions.py", "tracker/web/postbacks.py"]
bench.BENCH_DB = "trk_bench_events"  # its own database: benchmarks/run may be using trk_bench


def receiver(port: int) -> None:
    import uvloop
    from aiohttp import web

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hooks", hook)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def postback_round(tree: Path, env: dict[str, str], seconds: int, clicks: Path) -> dict[str, float]:
    port = bench.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tracker.cli", "serve", "--port", str(port), "--workers", "1"],
                            env={**env, "PYTHONPATH": str(tree)}, cwd=tree, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        bench.wait_http(port, "/readyz")
        script = str(ROOT / "benchmarks/postback.lua")
        bench.wrk(port, script, {"CLICKS_FILE": str(clicks)}, 2, connections=16)
        time.sleep(0.5)
        before = ab.cpu_seconds([proc.pid])
        result = bench.wrk(port, script, {"CLICKS_FILE": str(clicks)}, seconds, connections=16)
        result["cpu_us"] = (ab.cpu_seconds([proc.pid]) - before) / result["requests"] * 1e6
        return result
    finally:
        bench.stop(proc)


async def count(dsn: str, sql: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def insert_events(dsn: str, n: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO events (type, ordering_key, data) SELECT 'conversion.created', 'conversion:bench-' || g, "
            "jsonb_build_object('conversion', jsonb_build_object('network', 'admitad', 'order_id', 'BENCH-' || g, "
            "'click_id', 'FP7bench', 'user_id', 'bench', 'merchant', 'aliexpress', 'status', 'pending', "
            "'amount', '100.00', 'commission', '10.00', 'currency', 'RUB', 'cashback', '5.00', "
            "'order_time', NULL)) FROM generate_series(1, $1) g", n)
    finally:
        await conn.close()


async def store_level(dsn: str, clicks: Path, rounds: int = 6, block: int = 500) -> dict[str, list[float]]:
    from decimal import Decimal

    import tracker.store.conversions as conversions
    from tracker.domain.conversions import Postback
    from tracker.store.db import connect
    from tracker.store.merchants import load

    real_emit = conversions.emit

    async def no_emit(*_: object, **__: object) -> None:
        return None

    cids = [line.split()[1] for line in clicks.read_text().splitlines() if line.strip()]
    conn = await connect(dsn)  # as tracker's own: json decoded, jsonb written from objects
    merchants, _ = await load(conn)
    out: dict[str, list[float]] = {"before": [], "outbox": [], "before_cpu": [], "outbox_cpu": []}
    n = 0
    try:
        for i in range(rounds * 2):
            name = ("before", "outbox")[(i + i // 2) % 2]  # ABBA order
            conversions.emit = real_emit if name == "outbox" else no_emit  # type: ignore[assignment]
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(block):
                n += 1
                pb = Postback(click_id=cids[n % len(cids)], order_id=f"STORE-{os.getpid()}-{n}", status="pending",
                              status_word="pending", amount=Decimal("250"), commission=Decimal("12.5"), currency="RUB",
                              order_time=None)
                await conversions.record_postback(conn, "admitad", pb, {"order_id": pb.order_id}, merchants.get)
            out[name].append((time.perf_counter() - wall) / block * 1e6)
            out[name + "_cpu"].append((time.process_time() - cpu) / block * 1e6)
    finally:
        conversions.emit = real_emit  # type: ignore[assignment]
        await conn.close()
    return out


def report_store(store: dict[str, list[float]]) -> None:
    for name in ("before", "outbox"):
        print(f"record_postback {name}: median {statistics.median(store[name]):.0f} us wall, "
              f"{statistics.median(store[name + '_cpu']):.0f} us client CPU per postback "
              f"(blocks: {', '.join(f'{v:.0f}' for v in store[name])})", flush=True)


def delivery_rate(env: dict[str, str], scratch: Path, n: int) -> tuple[float, int, float, float]:
    port, hook_port = bench.free_port(), bench.free_port()
    hook = subprocess.Popen([sys.executable, __file__, "--receiver", str(hook_port)])
    doc = yaml.safe_load((ROOT / "deploy/merchants.example.yaml").read_text())
    doc["webhooks"] = [{"name": "bench", "url": f"http://127.0.0.1:{hook_port}/hooks",
                        "secret": "whsec_" + base64.b64encode(os.urandom(32)).decode()}]
    merchants = scratch / "merchants-webhooks.yaml"
    merchants.write_text(yaml.safe_dump(doc))
    subprocess.run([sys.executable, "-m", "tracker.cli", "merchants", "sync", str(merchants)], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    log = (scratch / "serve-webhooks.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "tracker.cli", "serve", "--port", str(port), "--workers", "2"],
                            env=env, stdout=log, stderr=log)
    dsn = env["TRACKER_DATABASE_URL"]
    try:
        bench.wait_http(port, "/readyz")
        bench.wait_http(hook_port, "/")
        time.sleep(6)  # the dispatchers load the new subscriber within 5 s
        done_sql = "SELECT count(*) FROM webhook_deliveries WHERE webhook = 'bench' AND state = 'delivered'"
        already = asyncio.run(count(dsn, done_sql))
        workers = ab.children(proc.pid)
        cpu_before, hook_before = ab.cpu_seconds(workers), ab.cpu_seconds([hook.pid])
        started = time.monotonic()
        asyncio.run(insert_events(dsn, n))
        while asyncio.run(count(dsn, done_sql)) < already + n:
            time.sleep(0.2)
            if time.monotonic() - started > 600:
                raise RuntimeError("deliveries did not finish in 10 minutes")
        elapsed = time.monotonic() - started
        cpu_us = (ab.cpu_seconds(workers) - cpu_before) / n * 1e6
        hook_us = (ab.cpu_seconds([hook.pid]) - hook_before) / n * 1e6
        retried = asyncio.run(count(dsn, "SELECT count(*) FROM webhook_deliveries WHERE webhook = 'bench' "
                                         "AND attempts > 1"))
        return n / elapsed, retried, cpu_us, hook_us
    finally:
        bench.stop(proc)
        log.close()
        bench.stop(hook)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", default=BEFORE)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--skip-postbacks", action="store_true", help="only the delivery rate")
    parser.add_argument("--store-only", action="store_true", help="only the store-level postback A/B")
    parser.add_argument("--receiver", type=int)
    args = parser.parse_args()
    if args.receiver:
        receiver(args.receiver)
        return 0
    scratch = Path(tempfile.mkdtemp(prefix="tracker-events-"))
    env, _, _ = bench.setup(scratch)
    env["TRACKER_DURABILITY"] = "commit"
    # Clicks to convert, made by this tree's server.
    port = bench.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tracker.cli", "serve", "--port", str(port), "--workers", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        bench.wait_http(port, "/readyz")
        clicks = scratch / "clicks.txt"
        clicks.write_text(asyncio.run(bench.make_clicks(port, UserTokens(bench.SECRET), 2000)))
    finally:
        bench.stop(proc)
    # Two worktrees of HEAD; in one, the postback path goes back to BEFORE's (no event written).
    if args.store_only:
        report_store(asyncio.run(store_level(env["TRACKER_DATABASE_URL"], clicks)))
        return 0
    trees = {"before": ab.tree_of("HEAD", scratch), "outbox": scratch / "outbox"}
    subprocess.run(["git", "-C", str(trees["before"]), "checkout", args.before, "--", *POSTBACK_PATH], check=True)
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(trees["outbox"]), "HEAD"],
                   check=True, capture_output=True)
    results: dict[str, list[dict[str, float]]] = {"before": [], "outbox": []}
    try:
        for i in range(0 if args.skip_postbacks else args.rounds):
            for name in (("before", "outbox") if i % 2 == 0 else ("outbox", "before")):
                r = postback_round(trees[name], env, args.seconds, clicks)
                results[name].append(r)
                print(f"round {i + 1} {name}: {r['rps']:,.0f} postbacks/s, {r['cpu_us']:.0f} us worker CPU each, "
                      f"p99 {r['p99_ms']:.2f} ms, non-2xx {r['non_3xx']}", flush=True)
    finally:
        for tree in trees.values():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
    for name, rev in () if args.skip_postbacks else (("before", f"HEAD, postback path of {args.before}"), ("outbox", "HEAD")):
        rs = results[name]
        print(f"{name} ({rev}): median {statistics.median(r['rps'] for r in rs):,.0f} postbacks/s, "
              f"{statistics.median(r['cpu_us'] for r in rs):.0f} us worker CPU per postback, "
              f"p99 {statistics.median(r['p99_ms'] for r in rs):.2f} ms")
    events = asyncio.run(count(env["TRACKER_DATABASE_URL"], "SELECT count(*) FROM events"))
    print(f"events written by the outbox rounds: {events:,}")
    if not args.skip_postbacks:
        report_store(asyncio.run(store_level(env["TRACKER_DATABASE_URL"], clicks)))
    rate, retried, cpu_us, hook_us = delivery_rate(env, scratch, args.events)
    print(f"webhook deliveries to one fast subscriber (2 workers, concurrency 8 each): {args.events:,} events "
          f"in {args.events / rate:.1f} s = {rate:,.0f} events/s ({retried} retried); workers' CPU "
          f"{cpu_us:.0f} us per delivery, the receiver's {hook_us:.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
