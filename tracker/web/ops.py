"""Operations endpoints: /healthz, /readyz, /metrics, /openapi.json."""
from __future__ import annotations

import asyncio
import functools
from importlib import resources

import orjson
import yaml
from aiohttp import web

from .. import keys, metrics
from .common import json_response


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 while this worker can take redirects, even with PostgreSQL or Redis down (fail-open:
    "degraded"); 503 only when it cannot: its click writer is not running, it has no merchants, or
    PostgreSQL is down and the spool refuses (full or failing)."""
    app = request.app

    async def postgres() -> bool:
        try:
            async with app[keys.POOL].acquire(timeout=1.0) as conn:
                await asyncio.wait_for(conn.fetchval("SELECT 1"), 1.0)
            return True
        except Exception:  # noqa: BLE001 - any failure means down
            return False

    pg_ok, redis_ok = await asyncio.gather(postgres(), app[keys.SESSIONS].ping())
    metrics.DEPENDENCY_UP.labels("postgres").set(int(pg_ok))
    metrics.DEPENDENCY_UP.labels("redis").set(int(redis_ok))
    writer = app[keys.WRITER]
    writer_up = writer.alive
    if pg_ok:
        writer.health.up()  # back before the writer's own probe noticed: no need to wait for it
    spool = await writer.spool_state(probe=not pg_ok)
    if not writer_up or not app[keys.MERCHANTS].merchants or (not pg_ok and spool != "ok"):
        status = "unavailable"
    elif pg_ok and redis_ok and spool == "ok":
        status = "ready"
    else:
        status = "degraded"
    for each in READINESS:
        metrics.READINESS.labels(each).set(int(each == status))
    body = {"status": status, "postgres": "up" if pg_ok else "down", "redis": "up" if redis_ok else "down",
            "spool": spool, "writer": "up" if writer_up else "down"}
    if status == "unavailable":
        return json_response(body, 503, {"Retry-After": "5"})
    return json_response(body)


READINESS = ("ready", "degraded", "unavailable")


@functools.cache
def openapi_json() -> bytes:
    """The packaged OpenAPI document (tracker/data/openapi.yaml) as JSON, read once."""
    text = resources.files("tracker.data").joinpath("openapi.yaml").read_text()
    return orjson.dumps(yaml.safe_load(text))


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=openapi_json(), content_type="application/json")


async def metrics_view(request: web.Request) -> web.Response:
    await request.app[keys.WRITER].spool.count()  # the spool as it is now, not at this worker's last replay
    # Every worker's tally flushed (here, on the loop's thread; rendering then runs in a worker thread).
    peers = request.app.get(keys.TALLY_PEERS)
    if peers is not None:
        await peers.flush()
    else:
        metrics.tally.flush()
    body = await asyncio.to_thread(metrics.render)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
