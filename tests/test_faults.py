"""Real faults: the tests run their own PostgreSQL and Redis (the embedded ones) so that they can
stop and kill them, and they kill the service itself. Every 302 must end up as exactly one row."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import asyncpg
import psutil
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from tracker import embedded
from tracker.domain.clickid import click_time, new_click_id
from tracker.domain.tokens import UserTokens
from tracker.store.click import Click
from tracker.store.clicks import ClickWriter
from tracker.store.db import create_pool, ensure_near_partitions
from tracker.store.sessions import SessionStore
from tracker.store.spool import Spool

from .conftest import BROWSER, SECRET, free_port, prepare_database, redis_value
from .waiting import answers, until

pytestmark = pytest.mark.fault


class Stack:
    """A private PostgreSQL and Redis, and `tracker serve` against them."""

    def __init__(self, root: Path) -> None:
        self.root = root / "servers"
        self.data = root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.pg_port, self.redis_port = free_port(), free_port()
        (self.root).mkdir(parents=True, exist_ok=True)
        (self.root / "pg.port").write_text(str(self.pg_port))
        (self.root / "redis.port").write_text(str(self.redis_port))
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = free_port()

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.pg_port}/postgres"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def start_pg(self) -> None:
        embedded.start_postgres(self.root)

    def stop_pg(self) -> None:
        embedded.stop_postgres(self.root, mode="immediate")

    def start_redis(self) -> None:
        embedded.start_redis(self.root)

    def kill_redis(self) -> None:
        pid = int((self.root / "redis" / "redis.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        psutil.Process(pid).wait(5) if psutil.pid_exists(pid) else None
        (self.root / "redis" / "redis.pid").unlink(missing_ok=True)

    def serve(self, workers: int = 2, **env: str) -> None:
        self.stop()  # one left running by a test that failed before its own stop()
        full = {**os.environ, "TRACKER_DATABASE_URL": self.dsn, "TRACKER_REDIS_URL": self.redis_url,
                "TRACKER_DATA_DIR": str(self.data), "TRACKER_SECRET": SECRET, "TRACKER_ADMIN_KEY": "k" * 32,
                "TRACKER_RATE_LIMIT_IP": "0", "TRACKER_RATE_LIMIT_USER": "0", **env}
        log = (self.data / "serve.log").open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "tracker.cli", "serve", "--port", str(self.port),
                                      "--workers", str(workers)], env=full, stdout=log, stderr=log,
                                     start_new_session=True)
        log.close()

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill9()

    async def wait_ready(self) -> None:
        await answers(f"http://127.0.0.1:{self.port}/healthz", self.proc, self.data / "serve.log")

    def healthy(self) -> Stack:
        """No `tracker serve` left running, PostgreSQL and Redis up (each start does nothing for a
        server that answers): what every test starts from. A test that failed while it had
        PostgreSQL stopped left it down, and the next test's serve then failed too, its workers
        refusing to boot after START_WAIT without PostgreSQL."""
        self.stop()
        self.start_pg()
        self.start_redis()
        return self


@pytest.fixture(scope="module")
def stack_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    st = Stack(tmp_path_factory.mktemp("faults"))
    st.start_pg()
    st.start_redis()
    asyncio.run(prepare_database(st.dsn))
    yield st
    st.stop()
    embedded.stop_postgres(st.root, mode="immediate")
    embedded.stop_redis(st.root)


@pytest.fixture
def stack(stack_servers: Stack) -> Stack:
    """The module's stack, healthy whatever the test before it left behind."""
    return stack_servers.healthy()


class Load:
    """Continuous activations from `n` clients, recording every click id that got a 302."""

    def __init__(self, port: int, user: str, n: int = 8) -> None:
        self.url = f"http://127.0.0.1:{port}/go/nike"
        self.token = UserTokens(SECRET).mint(user)
        self.ids: list[str] = []
        self.other: list[int] = []
        self.errors = 0
        self.n = n
        self._stop = asyncio.Event()

    async def _client(self) -> None:
        async with aiohttp.ClientSession() as session:
            while not self._stop.is_set():
                try:
                    async with session.get(self.url, params={"u": self.token}, allow_redirects=False,
                                           headers=BROWSER, timeout=aiohttp.ClientTimeout(total=10)) as r:
                        if r.status == 302:
                            self.ids.append(r.headers["X-Click-Id"])
                        else:
                            self.other.append(r.status)
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    self.errors += 1
                    await asyncio.sleep(0.05)  # a client's pause after an error, not a wait for anything

    async def run_for(self, seconds: float, during=None) -> None:  # noqa: ANN001
        tasks = [asyncio.create_task(self._client()) for _ in range(self.n)]
        if during is not None:
            await during()
        else:
            await asyncio.sleep(seconds)  # the load's duration is the behaviour under test
        self._stop.set()
        await asyncio.gather(*tasks)


def batch_sizes(writer: ClickWriter) -> list[int]:
    """A spy on the writer's real batch write: the size of each batch it writes, in order."""
    sizes: list[int] = []
    real = writer.flushers.write_rows

    async def counting(rows, slot=None):  # noqa: ANN001, ANN202 - the spy, same signature
        sizes.append(len(rows))
        await real(rows, slot)

    writer.flushers.write_rows = counting  # type: ignore[method-assign]
    return sizes


async def rows_of(dsn: str, user: str) -> tuple[int, int]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow("SELECT count(*) AS n, count(DISTINCT click_id) AS d FROM clicks "
                                  "WHERE user_id = $1", user)
        assert row is not None  # an aggregate: one row
        return row["n"], row["d"]
    finally:
        await conn.close()


async def wait_rows(dsn: str, user: str, expected: int, timeout: float = 40) -> tuple[int, int]:
    """(rows, distinct click ids) of `user` once there are at least `expected` rows."""
    async def enough() -> tuple[int, int] | None:
        counts = await rows_of(dsn, user)
        return counts if counts[0] >= expected else None
    return await until(enough, f"{expected} rows of {user} in PostgreSQL", timeout,
                       ignoring=(OSError, asyncpg.PostgresError))


async def readyz(port: int) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/readyz") as r:
            return r.status, await r.json()


async def readyz_until(port: int, holds, what: str) -> tuple[int, dict[str, Any]]:  # noqa: ANN001
    """/readyz's (status, body) once `holds(status, body)`."""
    async def check() -> tuple[int, dict[str, Any]] | None:
        answer = await readyz(port)
        return answer if holds(*answer) else None
    return await until(check, f"/readyz {what}")


async def test_postgres_down_under_load_loses_no_click(stack: Stack) -> None:
    stack.serve(workers=2)
    await stack.wait_ready()
    load = Load(stack.port, "fault-pg")
    seen_ready: list[tuple[int, dict[str, Any]]] = []
    postback_during_outage: list[tuple[int, dict[str, Any], str | None]] = []

    async def outage() -> None:
        await asyncio.sleep(1.0)  # load before the outage (the behaviour under test)
        await asyncio.to_thread(stack.stop_pg)
        seen_ready.append(await readyz_until(stack.port, lambda status, body: body["postgres"] == "down",
                                             "reporting PostgreSQL down"))
        async with aiohttp.ClientSession() as s:  # a postback now: 503 so that the network retries
            async with s.get(f"http://127.0.0.1:{stack.port}/postback/admitad", params={
                    "token": "test-admitad-token", "subid": load.ids[0], "order_id": "PGDOWN-1",
                    "status": "pending", "payment_sum": "1"}) as r:
                postback_during_outage.append((r.status, await r.json(), r.headers.get("Retry-After")))
        await asyncio.sleep(1.5)  # the outage goes on under load: clicks go to the spool
        await asyncio.to_thread(stack.start_pg)
        await asyncio.sleep(1.0)  # the load goes on across the recovery

    await load.run_for(0, during=outage)
    assert load.other == [] and load.errors == 0
    assert len(load.ids) > 100
    status, body = seen_ready[0]
    # Fail-open: still ready to take redirects (into the spool), so the Service keeps the pod.
    assert status == 200 and body == {"status": "degraded", "postgres": "down", "redis": "up", "spool": "ok",
                                      "writer": "up"}
    status, body, retry = postback_during_outage[0]
    assert status == 503 and body["error"] == "unavailable" and retry == "5"
    total, distinct = await wait_rows(stack.dsn, "fault-pg", len(load.ids))
    assert total == distinct == len(load.ids)
    await readyz_until(stack.port, lambda status, body: body["status"] == "ready", "ready with PostgreSQL back")
    await until(lambda: not list((stack.data / "spool").glob("*.spool")), "the spool replayed")
    stack.stop()
    assert list((stack.data / "spool").glob("*.spool")) == []


async def test_kill9_during_replay_then_restart_replays_exactly_once(stack: Stack) -> None:
    n = 150_000
    spool = Spool(stack.data / "spool")
    user = "fault-replay"
    for start in range(0, n, 5000):
        rows = []
        for _ in range(min(5000, n - start)):
            cid, ms = new_click_id()
            rows.append([cid, ms, user, "nike", "web", "https://www.nike.com/", None, "127.0.0.1", "x", False, "GET"])
        spool.append(rows, sync=False)
    spool.close()
    stack.serve(workers=1)
    async def replaying() -> int:
        return (await rows_of(stack.dsn, user))[0]
    at_kill = await until(replaying, "the replay's first rows in PostgreSQL", 30)
    stack.kill9()
    assert 0 < at_kill < n, at_kill  # killed in the middle of the replay
    stack.serve(workers=1)
    total, distinct = await wait_rows(stack.dsn, user, n, timeout=60)
    assert total == distinct == n
    stack.stop()
    assert list((stack.data / "spool").glob("*.spool")) == []


async def test_redis_killed_under_load(stack: Stack) -> None:
    stack.serve(workers=2, TRACKER_RATE_LIMIT_USER="100000")
    await stack.wait_ready()
    load = Load(stack.port, "fault-redis")
    seen: list[tuple[int, dict[str, Any]]] = []

    observed: list[tuple[int, dict[str, Any]]] = []

    async def outage() -> None:
        await asyncio.sleep(0.7)  # load before the outage (the behaviour under test)
        await asyncio.to_thread(stack.kill_redis)
        seen.append(await readyz_until(stack.port, lambda status, body: body["redis"] == "down",
                                       "reporting Redis down"))
        # The detector reads the session from PostgreSQL while Redis is away.
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{stack.port}/v1/observe",
                              headers={"Authorization": f"Bearer {load.token}"},
                              json={"click_id": load.ids[0], "events": [
                                  {"type": "navigation", "url": "https://www.nike.com/"},
                                  {"type": "navigation", "url": "https://www.nike.com/?cjevent=abc1234567890"}]}) as r:
                observed.append((r.status, await r.json()))
        await asyncio.to_thread(stack.start_redis)
        await readyz_until(stack.port, lambda status, body: body["status"] == "ready", "ready again with Redis back")
        await asyncio.sleep(0.5)  # the load goes on past the recovery

    await load.run_for(0, during=outage)
    assert load.other == [] and load.errors == 0 and len(load.ids) > 100
    status, body = seen[0]
    assert status == 200 and body["status"] == "degraded" and body["redis"] == "down" and body["postgres"] == "up"
    status, body = observed[0]
    # (A 503 here was seen once in a full run and never reproduced: the message carries what the
    # server logged about the dependency it found down.)
    down = [line for line in (stack.data / "serve.log").read_text().splitlines() if "dependency_unavailable" in line]
    assert status == 200 and body["state"] == "overwritten" and body["signals"][0]["network"] == "cj", (body, down)
    total, distinct = await wait_rows(stack.dsn, "fault-redis", len(load.ids))
    assert total == distinct == len(load.ids)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{stack.port}/metrics") as r:
            text = await r.text()
    assert "tracker_redis_fail_open_total" in text
    assert (await readyz(stack.port))[0] == 200
    log = (stack.data / "serve.log").read_text()
    assert 1 <= log.count('"redis_unreachable"') <= 2  # once per outage per worker, not per request
    stack.stop()


async def test_a_dead_worker_is_replaced(stack: Stack) -> None:
    stack.serve(workers=2)
    await stack.wait_ready()
    assert stack.proc is not None
    parent = psutil.Process(stack.proc.pid)
    children = await until(lambda: len(found := parent.children()) == 2 and found, "two workers")
    victim = children[0].pid
    os.kill(victim, signal.SIGKILL)

    def replaced() -> set[int] | None:
        pids = {c.pid for c in parent.children()}
        return pids if len(pids) == 2 and victim not in pids else None

    def listening() -> bool:  # a worker listens once its app has started
        return all(any(c.status == psutil.CONN_LISTEN and c.laddr.port == stack.port
                       for c in psutil.Process(pid).net_connections("tcp")) for pid in workers)

    workers = await until(replaced, "a new worker in place of the killed one")
    # The load below meets two serving workers, not one sharing the CPU with another's start.
    await until(listening, "both workers listening")
    load = Load(stack.port, "fault-worker", n=4)
    await load.run_for(0.5)
    assert load.other == [] and len(load.ids) > 10, (load.errors, len(load.ids))
    stack.stop()


async def test_a_worker_replaced_while_postgresql_is_down_waits_for_it_and_the_others_serve_on(stack: Stack) -> None:
    """One worker killed during an outage: its replacement waits for PostgreSQL as long as it takes
    (past the 15 s after which a server's first start gives up), the other worker serves (spooling)
    all along, and tracker serve goes on; once PostgreSQL is back the replacement starts, and every
    click answered 302 has its row. (A replacement that gave up stopped the whole server, exit 3.)"""
    stack.serve(workers=2)
    await stack.wait_ready()
    assert stack.proc is not None
    parent = psutil.Process(stack.proc.pid)
    children = await until(lambda: len(found := parent.children()) == 2 and found, "two workers")

    def listening() -> bool:  # a worker listens once its app has started
        return all(any(c.status == psutil.CONN_LISTEN and c.laddr.port == stack.port
                       for c in psutil.Process(w.pid).net_connections("tcp")) for w in children)

    await until(listening, "both workers listening")
    load = Load(stack.port, "fault-replaced-pgdown", n=4)
    log = stack.data / "serve.log"

    def attempts_of(pid: int) -> int:
        lines = [json.loads(line) for line in log.read_text(errors="replace").splitlines() if
                 '"postgres_unreachable_at_start"' in line and f'"pid":{pid}' in line.replace(" ", "")]
        return max((line["attempt"] for line in lines), default=0)

    async def outage_and_a_replacement() -> None:
        await asyncio.to_thread(stack.stop_pg)
        await readyz_until(stack.port, lambda status, body: body["postgres"] == "down", "reporting PostgreSQL down")
        os.kill(children[0].pid, signal.SIGKILL)
        [new] = await until(lambda: [c.pid for c in parent.children() if c.pid not in {w.pid for w in children}],
                            "a replacement worker")
        # Its 8th attempt comes after 0.5 + 1 + 2 + 4 + 4 + 4 + 4 s of backoff: past the 15 s a first
        # start waits, in a worker that is still there.
        await until(lambda: attempts_of(new) >= 8, "the replacement still waiting after 15 s", 90)
        assert stack.proc is not None and stack.proc.poll() is None
        before = len(load.ids)
        await until(lambda: len(load.ids) >= before + 50, "redirects from the other worker meanwhile")

    try:
        await load.run_for(0, during=outage_and_a_replacement)
    finally:
        await asyncio.to_thread(stack.start_pg)
    assert set(load.other) <= {503}
    total, distinct = await wait_rows(stack.dsn, "fault-replaced-pgdown", len(load.ids))
    assert total == distinct  # each click once
    conn = await asyncpg.connect(stack.dsn)
    try:
        stored = {r["click_id"] for r in await conn.fetch(
            "SELECT click_id FROM clicks WHERE user_id = 'fault-replaced-pgdown'")}
    finally:
        await conn.close()
    assert set(load.ids) <= stored
    # Beyond them, only clicks whose clients never saw their 302: a request the killed worker had
    # taken (spooled, its answer lost with the connection; at most one per client, which aiohttp
    # may have sent again by itself, a GET on a reused connection) or a batch whose commit
    # PostgreSQL's stop cut off and which committed after all (answered 503: told to retry).
    assert len(stored - set(load.ids)) <= load.n + len(load.other)
    await readyz_until(stack.port, lambda status, body: status == 200 and body["postgres"] == "up", "ready again")
    assert stack.proc.poll() is None and len(parent.children()) == 2
    stack.stop()


async def test_sigterm_while_postgres_is_down_spools_every_redirected_click(stack: Stack) -> None:
    """tracker serve's graceful stop during an outage: each worker appends what it holds to the spool
    and exits; the next start replays it, and every click answered 302 has its row."""
    stack.serve(workers=2)
    await stack.wait_ready()
    load = Load(stack.port, "fault-term-pgdown")
    codes: list[int] = []

    async def outage_then_stop() -> None:
        await asyncio.to_thread(stack.stop_pg)
        await readyz_until(stack.port, lambda status, body: body["postgres"] == "down", "reporting PostgreSQL down")
        before = len(load.ids)
        await until(lambda: len(load.ids) >= before + 50, "redirects going to the spool")
        assert stack.proc is not None
        stack.proc.send_signal(signal.SIGTERM)
        codes.append(await asyncio.to_thread(stack.proc.wait, 60))

    try:
        await load.run_for(0, during=outage_then_stop)
    finally:
        await asyncio.to_thread(stack.start_pg)
    assert codes == [0]
    assert set(load.other) <= {503}  # a stopping worker may refuse; it never answers 302 and loses
    assert list((stack.data / "spool").glob("*.spool"))  # what the workers held, spooled at the stop
    stack.serve(workers=2)
    await stack.wait_ready()
    total, distinct = await wait_rows(stack.dsn, "fault-term-pgdown", len(load.ids))
    assert total == distinct == len(load.ids)
    stack.stop()


@pytest.mark.parametrize("size", [50, 20], ids=["copy", "insert-of-arrays"])
async def test_a_poisoned_row_does_not_poison_the_batch(stack: Stack, tmp_path: Path, size: int) -> None:
    # 50 rows go as one COPY, 20 (under flushers.SMALL_BATCH) as one INSERT of arrays.
    pool = await create_pool(stack.dsn)
    writer = ClickWriter(pool, Spool(tmp_path / "spool"), batch_limit=1000, dsn=stack.dsn)
    copies = batch_sizes(writer)
    user = f"fault-poison-{size}"
    rows = []
    for i in range(size):
        cid, ms = new_click_id()
        target = "https://www.nike.com/\x00bad" if i in (7, 13) else f"https://www.nike.com/{i}"
        rows.append((cid, ms, user, "nike", "web", target, None, "127.0.0.1", "ua", False, "GET"))
    waiting = [asyncio.ensure_future(writer.write(Click(*r))) for r in rows]  # queued before the flushers run
    await writer.start()
    try:
        await asyncio.wait_for(asyncio.gather(*waiting), 10)
        assert copies[0] == size
        stored = {r["click_id"] for r in await pool.fetch("SELECT click_id FROM clicks WHERE user_id = $1", user)}
        assert stored == {r[0] for i, r in enumerate(rows) if i not in (7, 13)}
        quarantined = await pool.fetch("SELECT click_id, reason FROM clicks_quarantine ORDER BY id")
        assert {q["click_id"] for q in quarantined} >= {rows[7][0], rows[13][0]}
        assert all(q["reason"] for q in quarantined)
    finally:
        await writer.close()
        await pool.close()


@pytest.mark.parametrize("size", [40, 6], ids=["copy", "insert-of-arrays"])
async def test_a_bad_row_in_a_batch_for_a_day_without_its_partition(stack: Stack, tmp_path: Path, size: int) -> None:
    """The bad row may be found before the missing partition (a lone surrogate fails in the client,
    before PostgreSQL routes any row): the good rows still get their day's partition and are stored,
    and only the bad row is quarantined, with its own reason."""
    pool = await create_pool(stack.dsn)
    writer = ClickWriter(pool, Spool(tmp_path / "spool"), batch_limit=1000, dsn=stack.dsn)
    user = f"fault-far-day-{size}"
    far = int(datetime(2031, 3, 1 + size % 20, 12, tzinfo=timezone.utc).timestamp() * 1000)  # no partition yet
    rows = []
    for i in range(size):
        cid, ms = new_click_id(far + i)
        target = "https://www.nike.com/\udcffbad" if i == 2 else f"https://www.nike.com/{i}"
        rows.append((cid, ms, user, "nike", "web", target, None, "127.0.0.1", "ua", False, "GET"))
    waiting = [asyncio.ensure_future(writer.write(Click(*r))) for r in rows]
    await writer.start()
    try:
        await asyncio.wait_for(asyncio.gather(*waiting), 10)
        stored = {r["click_id"] for r in await pool.fetch("SELECT click_id FROM clicks WHERE user_id = $1", user)}
        assert stored == {r[0] for i, r in enumerate(rows) if i != 2}
        quarantined = await pool.fetch("SELECT click_id, reason FROM clicks_quarantine WHERE click_id = ANY($1)",
                                       [r[0] for r in rows])
        assert [q["click_id"] for q in quarantined] == [rows[2][0]]
        assert "partition" not in quarantined[0]["reason"]
    finally:
        await writer.close()
        await pool.close()


@pytest.mark.parametrize("size", [40, 5], ids=["copy", "insert-of-arrays"])
async def test_a_batch_stores_each_click_at_the_time_its_id_carries(stack: Stack, tmp_path: Path, size: int) -> None:
    """created_at is exactly the id's millisecond, whether the batch went as COPY (a datetime made by
    the writer) or as an INSERT of arrays (computed by PostgreSQL from the milliseconds): lookups by
    id name the partition and the row by it."""
    pool = await create_pool(stack.dsn)
    writer = ClickWriter(pool, Spool(tmp_path / "spool"), batch_limit=1000, dsn=stack.dsn)
    user = f"fault-time-{size}"
    clicks = [new_click_id() for _ in range(size)]
    waiting = [asyncio.ensure_future(writer.write(Click(cid, ms, user, "nike", "web", "https://www.nike.com/", "dev",
                                                   "127.0.0.1", "ua", i % 2 == 0, "GET")))
               for i, (cid, ms) in enumerate(clicks)]
    await writer.start()
    try:
        await asyncio.wait_for(asyncio.gather(*waiting), 10)
        rows = await pool.fetch("SELECT click_id, created_at, device, bot FROM clicks WHERE user_id = $1", user)
        assert {(r["click_id"], r["created_at"], r["device"], r["bot"]) for r in rows} == {
            (cid, click_time(cid), "dev", i % 2 == 0) for i, (cid, _) in enumerate(clicks)}
    finally:
        await writer.close()
        await pool.close()


async def test_async_mode_spills_to_the_spool_when_the_queue_is_full(stack: Stack, tmp_path: Path) -> None:
    pool = await create_pool(stack.dsn)
    writer = ClickWriter(pool, Spool(tmp_path / "spool"), durability="async", queue_limit=10)
    try:
        rows = []
        for _ in range(25):
            cid, ms = new_click_id()
            rows.append((cid, ms, "fault-spill", "nike", "web", "https://www.nike.com/", None, None, "ua", False, "GET"))
        for row in rows:  # no flusher running yet: the writer has fallen behind
            await writer.write(Click(*row))
        assert writer.queued == 10 and writer.pending_spool == 15
        await writer.start()
        await writer.replay()
        await until(lambda: writer.queued == 0, "the writer's queue written")
        stored = {r["click_id"] for r in await pool.fetch("SELECT click_id FROM clicks WHERE user_id = 'fault-spill'")}
        assert stored == {r[0] for r in rows}
    finally:
        await writer.close()
        await pool.close()


async def test_rows_with_lone_surrogates_are_quarantined_too(stack: Stack, tmp_path: Path) -> None:
    pool = await create_pool(stack.dsn)
    writer = ClickWriter(pool, Spool(tmp_path / "spool"))
    await writer.start()
    try:
        good_id, ms = new_click_id()
        bad_id, _ = new_click_id()
        await asyncio.gather(
            writer.write(Click(good_id, ms, "fault-surrogate", "nike", "web", "https://www.nike.com/", None, None, "ua", False, "GET")),
            writer.write(Click(bad_id, ms, "fault-surrogate", "nike", "web", "https://www.nike.com/\\ud800", None, None,
                          "ua\ud800", False, "GET")))
        stored = {r["click_id"] for r in await pool.fetch("SELECT click_id FROM clicks WHERE user_id = 'fault-surrogate'")}
        assert stored == {good_id}
        record = await pool.fetchval("SELECT record FROM clicks_quarantine WHERE click_id = $1", bad_id)
        assert "\\\\ud800" in record
    finally:
        await writer.close()
        await pool.close()


async def test_a_backlog_is_written_in_merged_batches_and_every_waiter_is_released(settings, db):
    """Sealed batches waiting behind a busy writer go out as one COPY (up to merge_limit rows), and
    each request waiting on any of them is released once that COPY commits."""
    pool = await create_pool(settings.database_url)
    async with pool.acquire() as conn:
        await ensure_near_partitions(conn)  # as the app does at start: no COPY is retried here
    writer = ClickWriter(pool, Spool(settings.data_dir / "merge-spool"), durability="commit",
                         batch_limit=10, merge_limit=35, dsn=settings.database_url)
    copies = batch_sizes(writer)
    try:
        # 100 clicks queued before the flushers run: ten sealed batches of ten.
        ids = [new_click_id() for _ in range(100)]
        waiters = [asyncio.ensure_future(writer.write(Click(cid, ms, "merge-user", "nike", "web", "https://www.nike.com/",
                                                        None, "127.0.0.1", "ua", False, "GET")))
                   for cid, ms in ids]
        await writer.start()
        await asyncio.wait_for(asyncio.gather(*waiters), 10)
        assert sum(copies) == 100 and max(copies) <= 35 and max(copies) > 10
        assert await db.fetchval("SELECT count(*) FROM clicks WHERE user_id = 'merge-user'") == 100
    finally:
        await writer.close()
        await pool.close()


async def test_a_cancelled_request_does_not_cancel_the_others_waiting_on_its_batch(settings, db):
    """In commit mode every request waits for its batch's commit; one of them going away (a client
    that hangs up) must neither cancel the others' wait nor lose its own click."""
    pool = await create_pool(settings.database_url)
    async with pool.acquire() as conn:
        await ensure_near_partitions(conn)
    writer = ClickWriter(pool, Spool(settings.data_dir / "cancel-spool"), durability="commit",
                         dsn=settings.database_url)
    try:
        ids = [new_click_id() for _ in range(5)]
        waiters = [asyncio.ensure_future(writer.write(Click(cid, ms, "cancel-user", "nike", "web", "https://www.nike.com/",
                                                        None, "127.0.0.1", "ua", False, "GET")))
                   for cid, ms in ids]
        await asyncio.sleep(0)  # all five are queued in one batch and waiting
        waiters[2].cancel()
        await writer.start()
        results = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 10)
        assert [isinstance(r, asyncio.CancelledError) for r in results] == [False, False, True, False, False]
        assert await db.fetchval("SELECT count(*) FROM clicks WHERE user_id = 'cancel-user'") == 5
    finally:
        await writer.close()
        await pool.close()


async def test_rows_that_arrive_within_the_linger_share_one_copy(settings, db):
    """A batch that is not full waits `linger` after the previous COPY's start (async mode), so
    clicks arriving one by one go out together; commit mode starts at once when no COPY runs."""
    pool = await create_pool(settings.database_url)
    async with pool.acquire() as conn:
        await ensure_near_partitions(conn)
    writers = [ClickWriter(pool, Spool(settings.data_dir / f"linger-spool-{mode}"), durability=mode,
                           linger=linger, dsn=settings.database_url)
               for mode, linger in (("async", 2.0), ("async", 0.0), ("commit", 60.0))]
    copies = {i: batch_sizes(writer) for i, writer in enumerate(writers)}
    for writer in writers:
        await writer.start()

    async def click(i: int) -> None:
        cid, ms = new_click_id()
        await writers[i].write(Click(cid, ms, f"linger-user-{i}", "nike", "web", "https://www.nike.com/", None,
                                "127.0.0.1", "ua", False, "GET"))
    try:
        # A 2 s linger: the first click goes at once (nothing ran before); the next 19, one by one
        # (each queued after the last, a yield apart: milliseconds in all), wait out the linger
        # and go in one COPY.
        await click(0)
        await until(lambda: copies[0] == [1], "the first click written at once")
        for _ in range(19):
            await click(0)
            await asyncio.sleep(0)
        # No linger: the flushers take each click as it comes (each here queued once the last was taken).
        for n in range(20):
            await click(1)
            await until(lambda: len(copies[1]) == n + 1, "the click taken by a flusher")  # noqa: B023 - awaited here
        for i in (0, 1):
            await until(lambda: writers[i].queued == 0, "the writer's queue written")  # noqa: B023 - awaited here
            assert await db.fetchval("SELECT count(*) FROM clicks WHERE user_id = $1", f"linger-user-{i}") == 20
        assert copies[0] == [1, 19]
        assert copies[1] == [1] * 20
        # Commit mode with nothing in flight does not wait out its (here: one minute) linger.
        cid, ms = new_click_id()
        await asyncio.wait_for(writers[2].write(Click(cid, ms, "linger-commit", "nike", "web", "https://www.nike.com/",
                                                 None, "127.0.0.1", "ua", False, "GET")), 10)
        assert await db.fetchval("SELECT count(*) FROM clicks WHERE user_id = 'linger-commit'") == 1
    finally:
        for writer in writers:
            await writer.close()
        await pool.close()


async def test_a_slow_redis_delays_session_writes_but_does_not_drop_them(stack: Stack, settings):
    """A batch call slower than the request-path timeout (here Redis pauses writes for 1.2 s, as a
    CPU-starved Redis did for up to 1.6 s in the benchmark) is waited for: the sessions land and the
    store does not go into fail-open. Past its own timeout it does fail open, and counts the drop."""
    # CLIENT PAUSE stops every client of a Redis: the stack's own, never the one other tests share.
    client = aioredis.Redis.from_url(stack.redis_url, socket_timeout=5)
    admin = aioredis.Redis.from_url(stack.redis_url)
    store = SessionStore(client, settings.redis_prefix, timeout=0.5, sync_timeout=5.0)
    hurried = SessionStore(client, settings.redis_prefix, timeout=0.5, sync_timeout=0.3)
    await store.start()
    await hurried.start()
    dropped_before = REGISTRY.get_sample_value("tracker_redis_fail_open_total", {"operation": "session"}) or 0
    try:
        await admin.execute_command("CLIENT", "PAUSE", "1200", "WRITE")
        ids = [new_click_id()[0] for _ in range(20)]
        for click_id in ids:
            store.put_session(click_id, {"u": "slow-redis", "m": "nike", "t": 0}, 600)
        hurried.put_session("hurried-click", {"u": "slow-redis", "m": "nike", "t": 0}, 600)
        async def all_stored() -> bool:  # reads go on during a WRITE pause; the writes land after 1.2 s
            return all(await client.mget([store.session_key(i) for i in ids]))
        await until(all_stored, "the 20 sessions written after the pause")
        assert store.ok
        # (The counter is the process's: >=, since any other store of this process may count too.)
        await until(lambda: (REGISTRY.get_sample_value("tracker_redis_fail_open_total", {"operation": "session"})
                             or 0) >= dropped_before + 1, "the hurried store's drop counted")
        assert await client.get(hurried.session_key("hurried-click")) is None
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        await store.stop()
        await hurried.stop()
        await client.aclose()
        await admin.aclose()


async def test_stopping_during_a_slow_batch_still_writes_its_sessions(stack: Stack, settings):
    """A worker that stops (SIGTERM) while a batch call is waiting on Redis puts that batch's
    sessions back and writes them in its last call, rather than losing them with the cancelled one."""
    # CLIENT PAUSE stops every client of a Redis: the stack's own, never the one other tests share.
    client = aioredis.Redis.from_url(stack.redis_url, socket_timeout=5)
    admin = aioredis.Redis.from_url(stack.redis_url)
    store = SessionStore(client, settings.redis_prefix, timeout=2.0)
    await store.start()
    try:
        # The batcher's first calls (this worker's heartbeat, a first session) are done before the
        # pause, so that the next call in flight is the one carrying the batch below.
        store.put_session("warm-up", {"u": "stopping", "m": "nike", "t": 0}, 600)
        assert await redis_value(client, store.session_key("warm-up")) is not None
        await admin.execute_command("CLIENT", "PAUSE", "500", "WRITE")
        ids = [new_click_id()[0] for _ in range(5)]
        for click_id in ids:
            store.put_session(click_id, {"u": "stopping", "m": "nike", "t": 0}, 600)
        await until(lambda: not store._ops, "the batch taken by the call in flight (waiting for the pause to end)")
        await store.stop()  # cancels it; the last call waits out the pause and writes them
        assert all(await client.mget([store.session_key(i) for i in ids]))
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        await client.aclose()
        await admin.aclose()


async def test_an_event_stream_outlives_redis_and_postgres_both_down(stack: Stack) -> None:
    """A stream polls while Redis is away; PostgreSQL going away then too must mean heartbeats (no
    news), not a broken stream or an unhandled error."""
    stack.serve(workers=1)
    await stack.wait_ready()
    token = UserTokens(SECRET).mint("fault-stream")
    base = f"http://127.0.0.1:{stack.port}"
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/go/nike", params={"u": token}, headers=BROWSER, allow_redirects=False) as r:
            cid = r.headers["X-Click-Id"]
        async with s.get(f"{base}/v1/clicks/{cid}/events", params={"u": token, "heartbeat": "0.2"}) as stream:
            assert stream.status == 200
            assert (await stream.content.readuntil(b"\n\n")).startswith(b"event: state")
            await asyncio.to_thread(stack.kill_redis)
            await asyncio.to_thread(stack.stop_pg)
            try:
                beats = 0
                for _ in range(30):  # several polls of both (each at most every 2 s, at 0.2 s here)
                    chunk = await asyncio.wait_for(stream.content.readuntil(b"\n\n"), 10)
                    beats += chunk == b": ping\n\n"
                assert beats >= 10
            finally:
                await asyncio.to_thread(stack.start_pg)
                await asyncio.to_thread(stack.start_redis)
    log = (stack.data / "serve.log").read_text()
    assert "unhandled_error" not in log and "Error handling request" not in log
    stack.stop()


async def test_a_slow_answer_on_the_request_path_does_not_mark_redis_down(stack: Stack, settings):
    """A request-path call that outlives its deadline (a busy worker, a Redis slow for a moment)
    fails open for that request alone; only a connection error takes the worker into fail-open."""
    # CLIENT PAUSE stops every client of a Redis: the stack's own, never the one other tests share.
    client = aioredis.Redis.from_url(stack.redis_url, socket_timeout=5)
    admin = aioredis.Redis.from_url(stack.redis_url)
    store = SessionStore(client, settings.redis_prefix, timeout=0.3)
    await store.start()
    try:
        await admin.execute_command("CLIENT", "PAUSE", "1000", "ALL")
        assert await store.get_session_and_state("any-click") == (None, None, False)
        assert store.ok  # still trusted: the next request asks Redis again
        await admin.ping()  # answered once the pause is over
        store.put_session("after-pause", {"u": "slow", "m": "nike", "t": 0}, 600)
        assert await redis_value(client, store.session_key("after-pause")) is not None
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        await store.stop()
        await client.aclose()
        await admin.aclose()
    broken = SessionStore(aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0"), "x:", timeout=0.3)
    assert await broken.get_session_and_state("any-click") == (None, None, False)
    assert not broken.ok  # a refused connection is Redis away
    await broken.stop()


async def test_after_a_redis_restart_stale_pooled_connections_fail_no_request(stack: Stack) -> None:
    """Connections pooled before Redis restarted are dead; each is replaced on its next use, so once
    Redis is back no request (here /readyz, a PING each) fails on one."""
    stack.serve(workers=1)
    await stack.wait_ready()
    base = f"http://127.0.0.1:{stack.port}"
    async with aiohttp.ClientSession() as s:
        # Many readiness checks at once: the worker's pool opens many connections.
        await asyncio.gather(*(s.get(f"{base}/readyz") for _ in range(40)))
        await asyncio.to_thread(stack.kill_redis)
        await asyncio.to_thread(stack.start_redis)  # answering again when this returns
        statuses = [(await readyz(stack.port))[0] for _ in range(40)]
    assert statuses == [200] * 40, statuses
    stack.stop()


async def test_postgresql_going_away_while_a_worker_starts_does_not_fail_its_start(stack: Stack) -> None:
    """What a worker's start does after its main pool connected must ride out PostgreSQL going
    away, as the worker does once started: the webhook dispatcher makes no connection at start,
    the merchants' first load and the near partitions' check wait for PostgreSQL as the start's first
    connection does. (Once,
    PostgreSQL stopped just then failed one worker's boot, and gunicorn stopped the whole server.)"""
    from tracker.store.db import near_partitions_at_start
    from tracker.store.delivery import Dispatcher
    from tracker.store.merchants import MerchantCache

    pool = await create_pool(stack.dsn)
    await asyncio.to_thread(stack.stop_pg)
    dispatcher = Dispatcher(stack.dsn)
    cache = MerchantCache(stack.dsn, pool)
    try:
        await dispatcher.start()  # no connection made: before, ConnectionRefusedError here
        loading = asyncio.ensure_future(cache.start())
        partitions = asyncio.ensure_future(near_partitions_at_start(stack.dsn, pool))
        await asyncio.sleep(0.5)  # both are waiting for PostgreSQL, not failed
        assert not loading.done(), loading
        assert not partitions.done(), partitions
        await asyncio.to_thread(stack.start_pg)
        await asyncio.wait_for(loading, 30)
        await asyncio.wait_for(partitions, 30)
        assert cache.merchants  # loaded once PostgreSQL was back
    finally:
        await cache.stop()
        await dispatcher.stop()
        await pool.close()
