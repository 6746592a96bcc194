"""The real `tracker serve` with two worker processes: metrics summed, SIGTERM drains."""
import asyncio
import re
import signal

import aiohttp
import psutil
import pytest

from tracker import serve

from .conftest import BROWSER, serve_process
from .test_boot import clicks_per_worker
from .waiting import until

pytestmark = pytest.mark.fault


@pytest.fixture
async def server(settings):
    async with serve_process(settings, workers=2) as running:
        yield running


async def _go(session, base, token):
    async with session.get(base + "/go/nike", params={"u": token}, allow_redirects=False,
                           headers=BROWSER) as resp:
        return resp.status, resp.headers.get("X-Click-Id")


def _clicks_counted(text: str) -> float:
    return sum(float(v) for v in re.findall(r"^tracker_clicks_total\{[^}]*\} (\S+)$", text, re.M))


async def test_metrics_read_right_after_the_requests_count_every_workers_requests(server, tokens, settings):
    """Each worker tallies its redirects in memory and adds them to the shared metrics files from time
    to time: one /metrics read the moment the last redirect was answered must still count every
    worker's, not only the scraped worker's (445 of 525 were counted)."""
    proc, base = server
    port = int(base.rsplit(":", 1)[1])

    def both_listening() -> bool:  # a worker listens once its app has started
        workers = psutil.Process(proc.pid).children()
        return len(workers) == 2 and all(any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                                             for c in w.net_connections("tcp")) for w in workers)
    await until(both_listening, "both workers started")
    token = tokens.mint("scrape-user")
    connector = aiohttp.TCPConnector(force_close=True)  # new connections spread over both workers
    async with aiohttp.ClientSession(connector=connector) as session:
        results = await asyncio.gather(*(_go(session, base, token) for _ in range(300)))
        assert all(status == 302 for status, _ in results)
        async with session.get(base + "/metrics") as resp:
            assert _clicks_counted(await resp.text()) == 300
    # Both workers served some (else this proved nothing): each worker's own count, once flushed.
    directory = serve.metrics_directory(proc.pid)

    def flushed() -> dict[str, float] | None:
        found = clicks_per_worker(directory)
        return found if sum(found.values()) == 300 else None
    by_worker = await until(flushed, "each worker's clicks in its metrics file")
    assert len([n for n in by_worker.values() if n > 0]) == 2, by_worker


async def test_metrics_sum_over_workers_and_sigterm_drains(server, tokens, db):
    proc, base = server
    token = tokens.mint("serve-user")
    connector = aiohttp.TCPConnector(force_close=True)  # new connections spread over both workers
    async with aiohttp.ClientSession(connector=connector) as session:
        results = await asyncio.gather(*(_go(session, base, token) for _ in range(300)))
        assert all(status == 302 for status, _ in results)

        async def all_counted() -> bool:  # each worker adds its tally to the shared metrics every second
            async with session.get(base + "/metrics") as resp:
                text = await resp.text()
            return sum(float(v) for v in re.findall(
                r'tracker_clicks_total\{bot="false",merchant="nike",source="web"\} (\S+)', text)) == 300
        await until(all_counted, "300 clicks counted in /metrics")
        assert await db.fetchval("SELECT count(*) FROM clicks WHERE user_id = $1", "serve-user") == 300

        # SIGTERM under load: every 302 that went out has its row.
        redirected: list[str] = []

        async def load() -> None:
            while True:
                try:
                    status, cid = await _go(session, base, token)
                except (aiohttp.ClientError, OSError):
                    return
                if status == 302:
                    redirected.append(cid)

        loaders = [asyncio.create_task(load()) for _ in range(16)]
        await until(lambda: len(redirected) >= 100, "the load under way")
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
        await asyncio.wait_for(asyncio.gather(*loaders, return_exceptions=True), 10)
    assert code == 0
    assert len(redirected) > 0
    stored = {r["click_id"] for r in await db.fetch(
        "SELECT click_id FROM clicks WHERE user_id = $1", "serve-user")}
    assert set(redirected) <= stored
    assert len(stored) == 300 + len(set(redirected))
