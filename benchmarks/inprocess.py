"""/go through the whole app in one process, without sockets: `create_app` with its real cleanup
contexts (PostgreSQL, Redis, the click writer, the session batch, the rate limits' syncs, every
background task), and aiohttp's real server protocol fed raw HTTP requests over in-memory
transports (C keep-alive connections, each sending its next request when its answer is written, as
wrk does). Everything tracker's worker does for a redirect runs, from parsing the request to the
commit each request waits on in commit mode; only the kernel's side of the sockets is left out.

A fixed number of requests after a warm-up, so that callgrind (`--valgrind`) counts the instructions
of exactly that work: repeatable on a busy machine, unlike wrk. Without --valgrind, the process's
own CPU time. Either way, the CPU PostgreSQL and Redis spent meanwhile (from /proc) and the writer's
rows per batch. `--off PART` switches one part off in the running app (never on main) to price it:

    writer    the click is not handed to the writer (no row, no commit wait)
    session   no Redis session is queued
    limits    the rate limits decide nothing (no counts kept or synced)
    handler   /go answers a fixed 302 at once (tracker's bare direct path)

    .venv/bin/python benchmarks/inprocess.py REV [REV ...] [--durability commit] [--requests 3000]
        [--connections 32] [--users 5000] [--off writer] [--valgrind] [--rounds 1] [--idle SECONDS]

A revision is a commit (built as a git worktree) or a checkout's directory. Uses the servers of
TRACKER_DATABASE_URL / TRACKER_REDIS_URL, else the embedded ones."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
IDLE_AFTER = 10.0  # seconds at rest measured after the requests under valgrind
UA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/130.0 Safari/537.36"
CALLGRIND_C = r"""
#include <valgrind/callgrind.h>
void cg_start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void cg_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; CALLGRIND_DUMP_STATS_AT("measured"); }
"""


def callgrind_lib(scratch: Path) -> Path:
    """A tiny library whose two functions start and stop callgrind's counting from Python."""
    source, lib = scratch / "cg.c", scratch / "libcg.so"
    source.write_text(CALLGRIND_C)
    subprocess.run(["cc", "-O1", "-shared", "-fPIC", "-o", str(lib), str(source)], check=True)
    return lib


class Connection:
    """One client connection: an in-memory transport under aiohttp's server protocol."""

    def __init__(self, harness: "Harness", number: int) -> None:
        self.harness, self.number = harness, number
        self.closing = False
        self.protocol: Any = None

    # the asyncio.Transport methods aiohttp's server and StreamWriter use
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000 + self.number), "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: bytes) -> None:
        if data.startswith(b"HTTP/1.1 "):
            self.harness.answered(self, data)

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))


class Harness:
    def __init__(self, requests: list[bytes], connections: int) -> None:
        self.requests = requests
        self.sent = 0
        self.done = 0
        self.statuses: dict[bytes, int] = {}
        self.finished = asyncio.get_running_loop().create_future()
        self.connections = connections
        self.loop = asyncio.get_running_loop()

    def start(self, server: Any) -> None:
        for i in range(self.connections):
            conn = Connection(self, i)
            conn.protocol = server()
            conn.protocol.connection_made(conn)
            self.send(conn)

    def send(self, conn: Connection) -> None:
        if self.sent < len(self.requests):
            data = self.requests[self.sent]
            self.sent += 1
            self.loop.call_soon(conn.protocol.data_received, data)

    def answered(self, conn: Connection, data: bytes) -> None:
        status = data[9:12]
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.done += 1
        if self.done == len(self.requests):
            if not self.finished.done():
                self.finished.set_result(None)
        else:
            self.send(conn)


def go_requests(tokens: list[str], start: int, n: int) -> list[bytes]:
    return [(f"GET /go/aliexpress?u={tokens[i % len(tokens)]}&to=https%3A%2F%2Faliexpress.ru%2Fitem%2F{i}.html "
             f"HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: {UA}\r\n\r\n").encode()
            for i in range(start, start + n)]


def switch_off(app: Any, keys: Any, part: str) -> None:
    if part == "writer":
        async def write(click: Any) -> None:
            return None
        app[keys.WRITER].write = write
    elif part == "session":
        app[keys.SESSIONS].put_session = lambda *args, **kwargs: None
    elif part == "limits":
        sessions = app[keys.SESSIONS]
        if hasattr(sessions, "limits"):
            sessions.limits.check = lambda *args, **kwargs: None
        else:  # builds before the reservations (a25c7d9)
            sessions.over_limit = lambda *args, **kwargs: None
    elif part not in ("", "handler"):
        raise SystemExit(f"unknown part {part}")


async def child(args: argparse.Namespace) -> dict[str, Any]:
    """Runs inside the measured process: the app from the tree on sys.path."""
    from aiohttp import web

    import tracker  # noqa: F401 - the tree's package, before anything else imports one
    from tracker import keys, metrics, settings
    from tracker.web import activation

    if args.off == "handler":
        async def bare(app: Any, request: Any, slug: str) -> Any:
            return web.Response(status=302, headers={"Location": "https://example.com/", "Cache-Control": "no-store"})
        activation.activate_in = bare  # type: ignore[assignment]
    from tracker.app import create_app
    from tracker.serve import server_options

    config = settings.load(os.environ)
    app = create_app(config)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, **server_options(config))
    await runner.setup()
    switch_off(app, keys, args.off)
    tokens = Path(os.environ["BENCH_TOKENS"]).read_text().split()[:args.users]
    server = runner.server
    assert server is not None
    # Warm-up: every token verified once (the token cache), the writer's statement prepared.
    warm = Harness(go_requests(tokens, 0, len(tokens)), args.connections)
    warm.start(server)
    await warm.finished
    await asyncio.sleep(0.3)
    cg = None
    if args.valgrind:
        import ctypes
        cg = ctypes.CDLL(os.environ["BENCH_CALLGRIND_LIB"])
    measure = Harness(go_requests(tokens, len(tokens), args.requests), args.connections)
    writer = app[keys.WRITER] if keys.WRITER in app else None
    batches_before = _writer_counts()
    servers = await _server_pids(app, keys)
    servers_before = _seconds(servers)
    started_cpu, started_wall = time.process_time(), time.monotonic()
    if cg is not None:
        cg.cg_start()
    if args.idle:  # no requests: what the worker's background tasks cost per second
        await asyncio.sleep(args.idle)
        measure.statuses[b"idle"] = 0
    else:
        measure.start(server)
        await measure.finished
    # the click writer and the session batch finish this work: wait for the queue to empty and
    # one more session batch interval
    while writer is not None and getattr(writer, "queued", 0):
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.06)
    if cg is not None:
        cg.cg_stop()
    cpu = time.process_time() - started_cpu
    wall = time.monotonic() - started_wall
    servers_after = _seconds(servers)
    per = args.idle or args.requests
    spent = {name: sum(s - servers_before[name].get(pid, s) for pid, s in servers_after[name].items()) / per * 1e6
             for name in servers_after}
    if cg is not None and not args.idle:
        # The background tasks' own work (polls, heartbeats) runs by the clock, and under
        # valgrind the requests take ~50 times longer: their count then takes in far more of that
        # work than it does at full speed. Measured here at rest, then subtracted per second.
        cg.cg_start()
        await asyncio.sleep(IDLE_AFTER)
        cg.cg_stop()
    metrics.tally.flush()
    batches_after = _writer_counts()
    await runner.cleanup()
    copies = batches_after[1] - batches_before[1]
    return {"cpu_us": cpu / args.requests * 1e6, "statuses": {k.decode(): v for k, v in measure.statuses.items()},
            "rows_per_batch": (batches_after[0] - batches_before[0]) / copies if copies else 0.0,
            "batches": copies, "wall": wall, "pg_us": spent["postgres"], "redis_us": spent["redis"], "idle_wall": IDLE_AFTER if cg is not None and not args.idle else 0}


async def _server_pids(app: Any, keys: Any) -> dict[str, list[int]]:
    """PostgreSQL's processes serving this database (and the WAL writer and co., as benchmarks/cpu.py
    counts them) and Redis's."""
    rows = await app[keys.POOL].fetch(
        "SELECT pid FROM pg_stat_activity WHERE (datname = current_database() AND pid <> pg_backend_pid())"
        " OR backend_type = ANY($1::text[])", ["walwriter", "checkpointer", "background writer", "io worker"])
    import redis

    info = redis.Redis.from_url(os.environ["TRACKER_REDIS_URL"]).info("server")
    return {"postgres": [r["pid"] for r in rows], "redis": [int(info["process_id"])]}


def _seconds(groups: dict[str, list[int]]) -> dict[str, dict[int, float]]:
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, dict[int, float]] = {}
    for name, pids in groups.items():
        out[name] = {}
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[name][pid] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _writer_counts() -> tuple[float, float]:
    from tracker import metrics
    histogram = metrics.WRITER_BATCH
    total = count = 0.0
    for family in histogram.collect():
        for sample in family.samples:
            if sample.name.endswith("_sum"):
                total += sample.value
            elif sample.name.endswith("_count"):
                count += sample.value
    return total, count


def tree_of(rev: str, scratch: Path) -> Path:
    if Path(rev, "tracker").is_dir():
        return Path(rev).resolve()
    path = scratch / rev.replace("/", "_").replace("~", "_")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(path), rev],
                   check=True, capture_output=True)
    return path


def measure(tree: Path, env: dict[str, str], args: argparse.Namespace, scratch: Path, off: str) -> dict[str, Any]:
    out = scratch / f"result-{time.monotonic_ns()}.json"
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", str(out), "--requests", str(args.requests),
            "--connections", str(args.connections), "--users", str(args.users), "--off", off, "--idle", str(args.idle)]
    dump = scratch / f"callgrind-{time.monotonic_ns()}"
    if args.valgrind:
        argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={dump}.%p",
                *argv, "--valgrind"]
    proc = subprocess.Popen(argv, env={**env, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}, cwd=tree)
    if proc.wait() != 0:
        raise RuntimeError(f"the measured process failed ({proc.returncode})")
    result: dict[str, Any] = json.loads(out.read_text())
    if args.valgrind:
        # one dump per measured section, in order: <file>.<pid>.1 (the requests), .2 (at rest)
        sections = {int(d.name.rsplit(".", 1)[1]): sum(int(m.group(1)) for m in re.finditer(
                        r"^totals: (\d+)", d.read_text(errors="replace"), re.M))
                    for d in scratch.glob(f"{dump.name}.*.*")}
        if args.idle:
            result["instructions"] = sections[1] / args.idle
        else:
            idle_rate = sections[2] / result["idle_wall"]
            result["idle_per_second"] = idle_rate
            result["raw_instructions"] = sections[1] / args.requests
            result["instructions"] = (sections[1] - idle_rate * result["wall"]) / args.requests
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("revs", nargs="*")
    parser.add_argument("--child")
    parser.add_argument("--durability", default="commit")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--users", type=int, default=5000, help="distinct user tokens (at most 5,000)")
    parser.add_argument("--off", default="", help="comma-separated parts, each measured separately; '' = all on")
    parser.add_argument("--valgrind", action="store_true")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--idle", type=float, default=0.0,
                        help="measure an idle worker for this many seconds instead (per second, not per request)")
    args = parser.parse_args()
    if args.child:
        import uvloop

        uvloop.install()
        result = asyncio.run(child(args))
        Path(args.child).write_text(json.dumps(result))
        return 0
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    import bench

    scratch = Path(tempfile.mkdtemp(prefix="tracker-inprocess-"))
    # A database and a Redis database of its own: benchmarks/run and ab.py may be running beside it.
    bench.BENCH_DB = f"trk_inprocess_{os.getpid()}"
    tenv, tokens, _ = bench.setup(scratch)
    tenv["TRACKER_REDIS_URL"] = re.sub(r"/15$", "/13", tenv["TRACKER_REDIS_URL"])
    tenv["TRACKER_REDIS_PREFIX"] = prefix = f"trkinproc{os.getpid()}:"
    tenv["TRACKER_DURABILITY"] = args.durability
    tenv["BENCH_TOKENS"] = str(tokens)
    tenv["TRACKER_LOG_LEVEL"] = "warning"
    if args.valgrind:
        tenv["BENCH_CALLGRIND_LIB"] = str(callgrind_lib(scratch))
    trees = {rev: tree_of(rev, scratch) for rev in args.revs}
    offs = args.off.split(",") if args.off else [""]
    try:
        for i in range(args.rounds):
            for off in offs:
                for rev, tree in (trees.items() if i % 2 == 0 else reversed(trees.items())):
                    r = measure(tree, tenv, args, scratch, off)
                    unit = "second idle" if args.idle else "request"
                    what = f"instructions {r['instructions']:,.0f}/{unit}, " if args.valgrind else ""
                    if "idle_per_second" in r:
                        what += (f"(counted {r['raw_instructions']:,.0f}, less {r['idle_per_second']:,.0f}/s "
                                 f"at rest), ")
                    print(f"round {i + 1} {rev} off={off or '-'} {args.durability}: {what}process CPU "
                          f"{r['cpu_us']:.1f} us/request, {r['rows_per_batch']:.1f} rows/batch "
                          f"({r['batches']:.0f} batches), {r['wall']:.1f} s, statuses {r['statuses']}; meanwhile PostgreSQL "
                          f"{r['pg_us']:.1f}, Redis {r['redis_us']:.1f} us/{unit}", flush=True)
    finally:
        import asyncpg
        import redis

        client = redis.Redis.from_url(tenv["TRACKER_REDIS_URL"])
        for key in client.scan_iter(match=f"{prefix}*", count=10_000):
            client.delete(key)

        async def drop() -> None:
            conn = await asyncpg.connect(re.sub(r"/[^/]*$", "/postgres", tenv["TRACKER_DATABASE_URL"]))
            await conn.execute(f"DROP DATABASE IF EXISTS {bench.BENCH_DB} WITH (FORCE)")
            await conn.close()

        asyncio.run(drop())
        for rev, tree in trees.items():
            if not Path(rev, "tracker").is_dir():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                               capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
