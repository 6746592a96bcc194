"""Deliveries survive `kill -9`: their state is in PostgreSQL. The real `tracker serve` (two workers)
is killed, every process of it at once, while its deliveries are in flight (the subscriber holds
them) or waiting; after a restart every event reaches the subscriber, signed, under its own id."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import aiohttp
import pytest

from tracker.domain.tokens import UserTokens

from .conftest import BROWSER, SECRET, free_port, serve_env
from .receiver import Receiver, new_secret
from .test_postbacks import admitad
from .test_webhooks import deliveries, deliveries_once, subscribe
from .waiting import answers

pytestmark = pytest.mark.fault
EVENTS = 30
CONCURRENCY = 4


def serve(settings, port: int, log) -> subprocess.Popen[bytes]:  # noqa: ANN001
    env = serve_env(settings, {"TRACKER_WEBHOOK_TIMEOUT": "2", "TRACKER_WEBHOOK_LEASE": "3",
                               "TRACKER_WEBHOOK_RETRY_BASE_MS": "100", "TRACKER_WEBHOOK_POLL_MS": "20",
                               "TRACKER_WEBHOOK_CONCURRENCY": str(CONCURRENCY)})
    return subprocess.Popen([sys.executable, "-m", "tracker.cli", "serve", "--port", str(port), "--workers", "2"],
                            env=env, stdout=log, stderr=log, start_new_session=True)


async def test_kill9_with_deliveries_in_flight_and_waiting_loses_none(settings, db):
    holding = {"on": True}
    answered: set[str] = set()

    def answer(hit):  # noqa: ANN001, ANN202
        if holding["on"]:
            return "hang"
        answered.add(hit.webhook_id)
        return 204

    receiver = Receiver(new_secret(), answer)
    await receiver.start()
    await subscribe(db, {"name": "survivor", "url": receiver.url, "secret": receiver.secret})
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (settings.data_dir / "serve.log").open("ab")
    proc = serve(settings, port, log)
    try:
        await answers(base + "/readyz", proc, log.name)
        token = UserTokens(SECRET).mint("fault-webhooks")
        async with aiohttp.ClientSession() as s:
            for i in range(EVENTS):
                async with s.get(f"{base}/go/aliexpress", params={"u": token}, headers=BROWSER,
                                 allow_redirects=False) as r:
                    cid = r.headers["X-Click-Id"]
                async with s.get(f"{base}/postback/admitad", params=admitad(cid, f"KILL-{i}")) as r:
                    assert r.status == 200
        # Both workers fill their slots with requests the subscriber holds; the rest wait.
        await receiver.wait(lambda: len(receiver.hits) >= 2 * CONCURRENCY)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        expected = {r["public_id"] for r in await db.fetch(
            "SELECT public_id FROM events WHERE data->'conversion'->>'order_id' LIKE 'KILL-%'")}
        assert len(expected) == EVENTS  # committed with their postbacks, whatever the sequencer had done
        rows = await deliveries(db, "survivor")
        assert all(r["state"] == "pending" for r in rows)
        assert sum(r["attempts"] > 0 for r in rows) >= 2 * CONCURRENCY  # leased by the dead workers
        holding["on"] = False
        # The killed sends are taken again when their leases end (3 s here); the rest go at once.
        proc = serve(settings, port, log)
        await answers(base + "/readyz", proc, log.name)
        await receiver.wait(lambda: expected <= answered, 30)
        rows = await deliveries_once(db, "survivor", lambda rows: all(r["state"] == "delivered" for r in rows),
                                     "all delivered")
        assert len(rows) == EVENTS
        assert all(h.verified for h in receiver.hits)
        log.flush()
        output = (settings.data_dir / "serve.log").read_text()
        assert receiver.secret.removeprefix("whsec_") not in output  # the signing secret never in a log line
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
        await receiver.stop()
        await subscribe(db)
