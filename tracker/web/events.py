"""GET /v1/clicks/{click_id}/events: the click's state changes as server-sent events.

Changes are published on Redis (pub/sub), so the stream gets them from whichever worker or pod
handled the observe or the postback. A comment line every `heartbeat` seconds keeps proxies from
closing an idle stream. Without Redis the stream polls the state instead.
"""
from __future__ import annotations

import asyncio
import math
from typing import Any

import orjson
import structlog
from aiohttp import web

from .. import keys, metrics
from ..domain.clickid import is_click_id
from ..errors import NotFound, RateLimited, Unauthorized
from .common import bearer, client_ip
from .observe import load_click

log = structlog.get_logger("tracker.events")
# Each open stream holds a Redis connection (its pub/sub subscription) and a task, so a worker
# bounds them: per user (the extension opens one per active click) and in all.
MAX_STREAMS_PER_USER = 10
MAX_STREAMS = 2_000
_streams: dict[str, int] = {}  # user id -> streams open on this worker
_open = 0  # all streams open on this worker


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _public(click_id: str, state: dict[str, Any] | None) -> dict[str, Any]:
    name = (state or {}).get("state", "active")
    return {"click_id": click_id, "state": name,
            "action": "reactivate" if name in ("overwritten", "expired") else "none"}


async def events(request: web.Request) -> web.StreamResponse:
    app = request.app
    user_id = app[keys.TOKENS].verify(bearer(request) or request.query.get("u"))
    if user_id is None:
        raise Unauthorized("a valid user token is required (Authorization: Bearer, or ?u= for EventSource)")
    click_id = request.match_info["click_id"]
    if not is_click_id(click_id):
        raise NotFound("no such click")
    settings = app[keys.SETTINGS]
    over = app[keys.SESSIONS].over_limit([("ip", client_ip(request, settings.trusted_proxies),
                                           settings.rate_limit_ip)])
    if over is not None:
        raise RateLimited("too many requests from this address, retry later", over[1])
    session, state = await load_click(app, click_id)
    if session is None or session.get("u") != user_id:
        raise NotFound("no such click")
    global _open
    if _streams.get(user_id, 0) >= MAX_STREAMS_PER_USER or _open >= MAX_STREAMS:
        raise RateLimited("too many open event streams, retry later", 5)
    _streams[user_id] = _streams.get(user_id, 0) + 1
    _open += 1
    try:
        return await _stream(request, app, click_id, state)
    finally:
        _open -= 1
        if _streams[user_id] <= 1:
            del _streams[user_id]
        else:
            _streams[user_id] -= 1


async def _stream(request: web.Request, app: web.Application, click_id: str,
                  state: dict[str, Any] | None) -> web.StreamResponse:
    try:
        heartbeat = float(request.query.get("heartbeat", "15"))
    except ValueError:
        heartbeat = 15.0
    heartbeat = min(max(heartbeat, 0.2), 60.0) if math.isfinite(heartbeat) else 15.0
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    closing = app[keys.CLOSING]
    metrics.SSE_CLIENTS.inc()
    last = _public(click_id, state)
    try:
        await resp.write(_event("state", last))
        pubsub = app[keys.REDIS].pubsub()
        try:
            await asyncio.wait_for(pubsub.subscribe(app[keys.SESSIONS].channel(click_id)), 1.0)
            subscribed = True
        except Exception:  # noqa: BLE001 - Redis away: poll instead
            subscribed = False
        try:
            while not closing.is_set():
                if subscribed:
                    try:
                        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=heartbeat)
                    except Exception:  # noqa: BLE001 - Redis went away mid-stream
                        subscribed, msg = False, None
                    data = orjson.loads(msg["data"]) if msg else None
                else:
                    await asyncio.sleep(min(heartbeat, 2.0))
                    _, data = await load_click(app, click_id)
                if data is not None:
                    current = _public(click_id, data)
                    if current != last:
                        last = current
                        await resp.write(_event("state", current))
                        continue
                await resp.write(b": heartbeat\n\n")
        finally:
            try:
                await asyncio.wait_for(pubsub.aclose(), 1.0)
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        metrics.SSE_CLIENTS.dec()
    return resp
