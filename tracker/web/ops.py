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
    app = request.app

    async def postgres() -> bool:
        try:
            async with app[keys.POOL].acquire(timeout=1.0) as conn:
                await asyncio.wait_for(conn.fetchval("SELECT 1"), 1.0)
            return True
        except Exception:  # noqa: BLE001 - any failure means not ready
            return False

    pg_ok, redis_ok = await asyncio.gather(postgres(), app[keys.SESSIONS].ping())
    metrics.DEPENDENCY_UP.labels("postgres").set(int(pg_ok))
    metrics.DEPENDENCY_UP.labels("redis").set(int(redis_ok))
    down = [name for name, ok in (("postgres", pg_ok), ("redis", redis_ok)) if not ok]
    body = {"status": "ready" if not down else "unavailable",
            "postgres": "up" if pg_ok else "down", "redis": "up" if redis_ok else "down",
            "spool_pending_clicks": app[keys.WRITER].pending_spool}
    if down:
        body["message"] = f"not ready: {', '.join(down)} unreachable"
    return json_response(body, 200 if not down else 503)


@functools.cache
def openapi_json() -> bytes:
    """The packaged OpenAPI document (tracker/data/openapi.yaml) as JSON, read once."""
    text = resources.files("tracker.data").joinpath("openapi.yaml").read_text()
    return orjson.dumps(yaml.safe_load(text))


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=openapi_json(), content_type="application/json")


async def metrics_view(request: web.Request) -> web.Response:
    metrics.tally.flush()  # here, on the loop's thread; rendering then runs in a worker thread
    body = await asyncio.to_thread(metrics.render)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
