"""The spool's own faults, for real, with PostgreSQL down: a small tmpfs that fills up, a read-only
remount, the spool's size cap. Every 302 must end up as exactly one row once PostgreSQL is back; a
click that neither PostgreSQL nor the spool could take is answered 503 with Retry-After, and no
request is left waiting (each client gives up after CLIENT_TIMEOUT, twice the writer's flush
timeout: the bug this guards against hung requests for ever)."""
from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
from pathlib import Path
from typing import Iterator

import aiohttp
import asyncpg
import psutil
import pytest

from tracker import embedded
from tracker.domain.tokens import UserTokens
from tracker.store.flushers import FLUSH_TIMEOUT
from tracker.store.spool import PROBE_BYTES, RowCount, Spool, SpoolRefused

from .conftest import BROWSER, SECRET, prepare_database
from .test_faults import Stack, readyz_until
from .waiting import until

pytestmark = pytest.mark.fault
CLIENT_TIMEOUT = 2 * FLUSH_TIMEOUT


@pytest.fixture(scope="module")
def stack_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    st = Stack(tmp_path_factory.mktemp("spool-faults"))
    st.start_pg()
    st.start_redis()
    asyncio.run(prepare_database(st.dsn))
    yield st
    st.stop()
    embedded.stop_postgres(st.root, mode="immediate")
    embedded.stop_redis(st.root)


@pytest.fixture
def stack(stack_servers: Stack, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The module's stack with PostgreSQL up and no serve running: each test stops PostgreSQL and
    starts it again only at its end, so one that failed in between left it down for the next. After
    a failure, the end of serve's log (its requests left out) goes to the report."""
    mark = log_size(stack_servers)
    yield stack_servers.healthy()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print_log_tail(stack_servers, mark)


def log_size(stack: Stack) -> int:
    path = stack.data / "serve.log"
    return path.stat().st_size if path.exists() else 0


def print_log_tail(stack: Stack, since: int, lines: int = 80) -> None:
    with (stack.data / "serve.log").open("rb") as fh:
        fh.seek(since)
        text = fh.read().decode(errors="replace")
    kept = [line[:400] for line in text.splitlines() if '"http_request"' not in line]
    print(f"serve.log since the test began ({len(kept)} lines, requests left out), the last {lines}:")
    print("\n".join(kept[-lines:]))


@contextlib.contextmanager
def small_disk(path: Path, size: str = "384k") -> Iterator[Path]:
    """A real tmpfs of `size` mounted at `path` (the tests run as root), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


class Clicks:
    """Activations from `n` clients until told to stop: the click id of every 302, and every other
    answer as (status, Retry-After, error code)."""

    def __init__(self, port: int, user: str, n: int = 8) -> None:
        self.url = f"http://127.0.0.1:{port}/go/nike"
        self.token = UserTokens(SECRET).mint(user)
        self.ids: list[str] = []
        self.refused: list[tuple[int, str | None, str | None]] = []
        self.hung = 0  # requests unanswered after CLIENT_TIMEOUT, or dropped connections
        self.n = n
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _client(self) -> None:
        timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not self._stop.is_set():
                try:
                    async with session.get(self.url, params={"u": self.token}, allow_redirects=False,
                                           headers=BROWSER) as r:
                        if r.status == 302:
                            self.ids.append(r.headers["X-Click-Id"])
                        else:
                            body = await r.json()
                            self.refused.append((r.status, r.headers.get("Retry-After"), body.get("error")))
                            await asyncio.sleep(0.01)  # a client's pause after a refusal
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    self.hung += 1

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.n)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def refusals_since(self, mark: int) -> int:
        return len(self.refused) - mark


async def unready(port: int, spool: str) -> None:
    """/readyz says 503, with Retry-After, that this process cannot take redirects: PostgreSQL down
    and the spool `spool` (each worker answers for itself: asked until both did)."""
    async with aiohttp.ClientSession() as session:
        for _ in range(4):
            async with session.get(f"http://127.0.0.1:{port}/readyz") as r:
                assert r.status == 503 and r.headers["Retry-After"] == "5", (r.status, await r.text())
                assert await r.json() == {"status": "unavailable", "postgres": "down", "redis": "up",
                                          "spool": spool, "writer": "up"}


async def _recover_and_check(stack: Stack, clicks: Clicks, user: str) -> None:
    """PostgreSQL back: every 302 is stored exactly once, the spool drains, redirects work again."""
    await asyncio.to_thread(stack.start_pg)
    redirected = set(clicks.ids)

    async def stored() -> set[str] | None:
        conn = await asyncpg.connect(stack.dsn)
        try:
            rows = await conn.fetch("SELECT click_id FROM clicks WHERE user_id = $1", user)
        finally:
            await conn.close()
        ids = [r["click_id"] for r in rows]
        assert len(ids) == len(set(ids)), "a click stored twice"
        return set(ids) if set(ids) >= redirected else None
    found = await until(stored, "every redirected click in PostgreSQL", 60, ignoring=(OSError, asyncpg.PostgresError))
    # Beyond them, only clicks answered 503: a batch whose commit PostgreSQL's stop cut off may
    # have committed after all (the client was told to retry; no click is redirected twice).
    assert len(found - redirected) <= len(clicks.refused)
    await readyz_until(stack.port, lambda status, body: status == 200 and body["postgres"] == "up",
                       "200 with PostgreSQL back")
    after = Clicks(stack.port, user + "-after", n=2)
    after.start()
    await until(lambda: len(after.ids) >= 20, "redirects again after the recovery")
    await after.stop()
    # (A worker that has not seen PostgreSQL back yet may still refuse for a moment.)
    assert after.hung == 0 and set(after.refused) <= {(503, "5", "unavailable")}


@pytest.mark.parametrize("durability", ["commit", "async"])
async def test_a_full_spool_disk_refuses_with_503_and_loses_no_302(stack: Stack, durability: str) -> None:
    user = f"spool-full-{durability}"
    with small_disk(stack.data / "spool"):
        stack.serve(workers=2, TRACKER_DURABILITY=durability)
        await stack.wait_ready()
        clicks = Clicks(stack.port, user)
        clicks.start()
        await until(lambda: len(clicks.ids) >= 50, "redirects before the outage")
        await asyncio.to_thread(stack.stop_pg)
        before_outage = len(clicks.ids)
        await until(lambda: len(clicks.refused) >= 200, "refusals once the spool's disk is full", 60)
        await unready(stack.port, "full")
        await clicks.stop()
        assert len(clicks.ids) > before_outage  # spooled until the disk was full
        assert clicks.hung == 0
        assert {r for r in clicks.refused} == {(503, "5", "unavailable")}
        await _recover_and_check(stack, clicks, user)
        stack.stop()


async def test_a_read_only_spool_refuses_with_503_until_it_is_writable_again(stack: Stack) -> None:
    user = "spool-read-only"
    with small_disk(stack.data / "spool", "8m") as spool:
        stack.serve(workers=2)
        await stack.wait_ready()
        clicks = Clicks(stack.port, user)
        clicks.start()
        await until(lambda: len(clicks.ids) >= 50, "redirects before the fault")
        remount(spool, "ro")  # nothing is spooled yet: no file is open for writing
        await asyncio.to_thread(stack.stop_pg)
        await until(lambda: len(clicks.refused) >= 100, "refusals while the spool is read-only", 60)
        await unready(stack.port, "failing")
        remount(spool, "rw")
        spooled_from = len(clicks.ids)
        await until(lambda: len(clicks.ids) >= spooled_from + 100, "redirects spooled once it is writable", 60)
        await clicks.stop()
        assert clicks.hung == 0
        assert {r for r in clicks.refused} == {(503, "5", "unavailable")}
        await _recover_and_check(stack, clicks, user)
        stack.stop()


def test_a_record_refused_for_a_full_volume_leaves_every_worker_reading_it_full(tmp_path: Path) -> None:
    """Two workers' spools on one small volume. One fills it until a large record is refused (and
    cut back, which frees its pages again); then neither worker's check says the spool can take
    clicks, however many pages a probe would still find free. (Before, the refused worker's next
    check and the other worker's readiness found a page free and said "ok", while the next batch
    was refused again: readiness flapped.)"""
    with small_disk(tmp_path / "spool") as directory:
        filler, other = Spool(directory), Spool(directory)
        row = ["x" * 200] * 10
        with pytest.raises(SpoolRefused) as refusal:
            for _ in range(10_000):
                filler.append([row] * 7)  # ~14 KB a record, less than the reserve
        assert refusal.value.state == "full"
        free, reserve = filler.disk_room()
        assert free >= PROBE_BYTES  # pages a probe could write: the old check said "ok" here
        for spool in (filler, other):
            with pytest.raises(SpoolRefused) as check:
                spool.probe()
            assert check.value.state == "full"
        filler.close()
        other.close()


async def test_past_the_spool_cap_clicks_are_refused(stack: Stack) -> None:
    user = "spool-cap"
    stack.serve(workers=1, TRACKER_SPOOL_MAX_BYTES="65536")
    await stack.wait_ready()
    clicks = Clicks(stack.port, user)
    clicks.start()
    await until(lambda: len(clicks.ids) >= 20, "redirects before the outage")
    await asyncio.to_thread(stack.stop_pg)
    await until(lambda: len(clicks.refused) >= 100, "refusals past the cap", 60)
    await unready(stack.port, "full")
    await clicks.stop()
    assert clicks.hung == 0
    assert {r for r in clicks.refused} == {(503, "5", "unavailable")}
    spooled = sum(p.stat().st_size for p in (stack.data / "spool").glob("seg-*.spool"))
    assert 0 < spooled <= 65536
    await _recover_and_check(stack, clicks, user)
    stack.stop()


def fill(volume: Path) -> None:
    """Write a file on `volume` until the disk is full."""
    with contextlib.suppress(OSError), (volume / "filler").open("wb") as fh:
        while True:
            fh.write(b"\0" * 4096)
            fh.flush()


def workers_of(stack: Stack) -> set[int]:
    assert stack.proc is not None
    return {p.pid for p in psutil.Process(stack.proc.pid).children()}


async def test_a_full_data_volume_leaves_every_worker_and_the_metrics_up(stack: Stack, tmp_path: Path) -> None:
    """The data directory's whole volume full (the spool's and whatever else lives there): the
    workers live on (prometheus_client's memory-mapped files are not on that volume: a worker
    touching a new page of one on a full disk died of SIGBUS, and so did its replacement, and
    /metrics answered nothing), /metrics answers, and with PostgreSQL down too the spool is full:
    503 at once, and every 302 is stored once PostgreSQL is back."""
    user = "data-volume-full"
    with small_disk(tmp_path / "volume", "512k") as volume:
        stack.serve(workers=2, TRACKER_DATA_DIR=str(volume))
        await stack.wait_ready()
        await readyz_until(stack.port, lambda status, body: status == 200, "ready")
        workers = workers_of(stack)
        assert len(workers) == 2
        fill(volume)
        clicks = Clicks(stack.port, user)
        clicks.start()
        await until(lambda: len(clicks.ids) >= 300, "redirects with the volume full")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            for _ in range(6):  # new connections: both workers answer some
                async with session.get(f"http://127.0.0.1:{stack.port}/metrics") as r:
                    assert r.status == 200 and "tracker_clicks_total" in await r.text()
        await asyncio.to_thread(stack.stop_pg)
        await until(lambda: len(clicks.refused) >= 100, "refusals once PostgreSQL is down too", 60)
        await unready(stack.port, "full")
        await clicks.stop()
        assert workers_of(stack) == workers  # none died, none replaced
        assert clicks.hung == 0
        assert {r for r in clicks.refused} == {(503, "5", "unavailable")}
        await _recover_and_check(stack, clicks, user)
        stack.stop()
        assert "SIGBUS" not in (stack.data / "serve.log").read_text(errors="replace")


async def test_the_pending_gauge_is_every_workers_spool_and_reads_0_once_replayed(stack: Stack) -> None:
    """tracker_spool_pending_clicks is the number of clicks in the pod's spool, every worker's segments
    together, and 0 once PostgreSQL took them: operators wait for 0 before removing a pod. Each worker
    used to report its own share (1608 of 2616 spooled) and kept a stale count after the replay."""
    user = "spool-gauge"
    stack.serve(workers=2)
    await stack.wait_ready()
    assert stack.proc is not None
    arbiter = psutil.Process(stack.proc.pid)

    def both_listening() -> bool:  # a worker listens once its app has started (PostgreSQL still up)
        workers = arbiter.children()
        return len(workers) == 2 and all(any(c.status == psutil.CONN_LISTEN and c.laddr.port == stack.port
                                             for c in w.net_connections("tcp")) for w in workers)
    await until(both_listening, "both workers started", 60)
    spool, base = stack.data / "spool", f"http://127.0.0.1:{stack.port}"
    before = {p.name for p in spool.glob("seg-*.spool")}
    await asyncio.to_thread(stack.stop_pg)
    token = UserTokens(SECRET).mint(user)
    redirected: list[str] = []
    connector = aiohttp.TCPConnector(force_close=True)  # new connections spread over both workers
    async with aiohttp.ClientSession(connector=connector) as session:
        async def go() -> None:
            async with session.get(base + "/go/nike", params={"u": token}, allow_redirects=False,
                                   headers=BROWSER) as r:
                if r.status == 302:
                    redirected.append(r.headers["X-Click-Id"])

        async def spooled_by_both() -> bool:
            await asyncio.gather(*(go() for _ in range(20)))
            writers = {p.stem.rsplit("-", 1)[1] for p in spool.glob("seg-*.spool") if p.name not in before}
            return len(writers) == 2 and len(redirected) >= 100
        await until(spooled_by_both, "clicks spooled by both workers", 60)

        async def gauge() -> float:
            async with session.get(base + "/metrics") as r:
                found = re.findall(r"^tracker_spool_pending_clicks (\S+)$", await r.text(), re.M)
            assert len(found) == 1, found
            return float(found[0])
        # Every request is answered: what the spool holds now is what one read of the gauge says.
        pending = await asyncio.to_thread(RowCount().count, spool)
        assert pending >= len(redirected)
        assert await gauge() == pending

        await asyncio.to_thread(stack.start_pg)
        await until(lambda: not list(spool.glob("seg-*.spool")), "the spool replayed", 60)
        assert await gauge() == 0
    conn = await asyncpg.connect(stack.dsn)
    try:
        stored = {r["click_id"] for r in await conn.fetch("SELECT click_id FROM clicks WHERE user_id = $1", user)}
    finally:
        await conn.close()
    assert stored >= set(redirected)
    stack.stop()
