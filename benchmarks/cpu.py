"""CPU time spent by the processes behind a benchmark, read from /proc and split by who spent it:
the HTTP server's processes (tracker's or the plain app's), PostgreSQL's and Redis's.

PostgreSQL's share is the backends connected to the benchmark's database (the app's pool, the click
writer's connections, autovacuum on its tables) and the server processes that every write goes
through (WAL writer, checkpointer, background writer, and PostgreSQL 18's I/O workers); other databases' backends are left out, so a
test suite running beside the benchmark on the same server does not count. Redis's is the server's
whole process: keep other clients off it while measuring (the benchmarks use the embedded Redis
unless TRACKER_REDIS_URL points elsewhere). A process that starts during a run counts from zero; one
that ends during it is missed (none of these do in a benchmark run)."""
from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path
from typing import Callable

import asyncpg
import redis

TICK = os.sysconf("SC_CLK_TCK")
SHARED_BACKENDS = ["walwriter", "checkpointer", "background writer", "io worker"]
Snapshot = dict[str, dict[int, float]]


def seconds_of(pid: int) -> float | None:
    """User + system CPU seconds of one process (all its threads), None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / TICK


def tree(pid: int) -> list[int]:
    """A process and its descendants."""
    out = [pid]
    for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split():
        out.extend(tree(int(child)))
    return out


def postgres_pids(dsn: str) -> Callable[[], list[int]]:
    async def query() -> list[int]:
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE (datname = current_database() AND pid <> pg_backend_pid())"
                " OR backend_type = ANY($1::text[])", SHARED_BACKENDS)
        finally:
            await conn.close()
        return [row["pid"] for row in rows]

    return lambda: asyncio.run(query())


def redis_pids(url: str) -> Callable[[], list[int]]:
    client = redis.Redis.from_url(url)
    pid = int(client.info("server")["process_id"])
    client.close()
    return lambda: [pid] if Path(f"/proc/{pid}").exists() else []


class Meter:
    """CPU seconds of named groups of processes between two snapshots."""

    def __init__(self, **groups: Callable[[], list[int]]) -> None:
        self.groups = groups

    def snapshot(self) -> Snapshot:
        snap: Snapshot = {}
        for name, pids in self.groups.items():
            snap[name] = {pid: s for pid in pids() if (s := seconds_of(pid)) is not None}
        return snap

    def spent(self, before: Snapshot) -> dict[str, float]:
        after = self.snapshot()
        return {name: sum(s - before[name].get(pid, 0.0) for pid, s in after[name].items()) for name in after}
