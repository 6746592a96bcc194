"""A replica unreachable at start: the worker starts anyway and says so (a warning naming the replica,
its password hidden), and support reads go to the primary."""
from __future__ import annotations

from dataclasses import replace

from structlog.testing import capture_logs

from tracker.app import create_app

from .conftest import ADMIN, free_port


async def test_a_replica_unreachable_at_start_is_named_and_reads_go_to_the_primary(aiohttp_client, settings, db):
    closed = f"postgresql://reader:s3cret-pass@127.0.0.1:{free_port()}/tracker"  # nothing listens there
    with capture_logs() as logs:
        client = await aiohttp_client(create_app(replace(settings, database_replica_url=closed)))
    said = [e for e in logs if e["event"] == "replica_unreachable_at_start"]
    assert said and said[0]["log_level"] == "warning", [e["event"] for e in logs]
    assert "reader:***@127.0.0.1" in said[0]["dsn"] and "s3cret-pass" not in repr(logs)
    resp = await client.get("/v1/users/replica-start/clicks", headers=ADMIN)
    assert resp.status == 200 and await resp.json() == {"clicks": [], "next": None}
