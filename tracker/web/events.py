"""GET /v1/clicks/{click_id}/events: the click's state changes as server-sent events.

Changes are published on Redis (pub/sub), so the stream gets them from whichever worker or pod
handled the observe or the postback. A stream holds no Redis connection: it listens on the worker's
state feed (store/feed.py), one pub/sub connection for all of them. A comment line every `heartbeat`
seconds keeps proxies from closing an idle stream. Until the feed has the click's channel
subscribed, and while it has lost Redis, the stream polls the state instead. The framing and the
heartbeats are aiohttp-sse's.
"""
from __future__ import annotations

import math
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp_sse import EventSourceResponse

from .. import keys, metrics
from ..domain.clickid import is_click_id
from ..domain.states import ClickState, StoredState, action
from ..errors import BadRequest, NotFound, RateLimited, Unauthorized
from ..store.feed import Link
from ..store.support import load_click
from ..store.unreachable import DEPENDENCY_DOWN
from .common import bearer, client_ip, one

log = structlog.get_logger("tracker.events")
# Each open stream holds a task, a socket and, while Redis is away, a poll every 2 s, so a worker
# bounds them: per user (the extension opens one per active click) and in all.
MAX_STREAMS_PER_USER = 10
MAX_STREAMS = 2_000


def _public(click_id: str, state: StoredState | None) -> dict[str, Any]:
    name = (state or {}).get("state", ClickState.ACTIVE)
    return {"click_id": click_id, "state": name, "action": action(name)}


async def events(request: web.Request) -> web.StreamResponse:
    app = request.app
    query_token, heartbeat = one(request, "u"), _heartbeat(one(request, "heartbeat"))
    user_id = app[keys.TOKENS].verify(bearer(request) or query_token)
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
    session, state = await load_click(app[keys.SESSIONS], app[keys.POOL], click_id)
    # A bot's or a HEAD's click has no shopping tab to watch and never changes: as if unknown (observe too).
    if session is None or session.get("u") != user_id or session.get("bot"):
        raise NotFound("no such click")
    streams = app[keys.STREAMS]
    if streams.per_user.get(user_id, 0) >= MAX_STREAMS_PER_USER or streams.total >= MAX_STREAMS:
        raise RateLimited("too many open event streams, retry later", 5)
    streams.per_user[user_id] = streams.per_user.get(user_id, 0) + 1
    streams.total += 1
    try:
        return await _stream(request, app, click_id, state, heartbeat)
    finally:
        streams.total -= 1
        if streams.per_user[user_id] <= 1:
            del streams.per_user[user_id]
        else:
            streams.per_user[user_id] -= 1


async def _read_state(app: web.Application, click_id: str) -> StoredState | None:
    """The click's state, or None when neither Redis nor PostgreSQL can tell now: the stream is
    already open, so an outage means no news (a heartbeat), not the end of the stream."""
    try:
        async with app[keys.FEED].reads:  # a few streams at a time, whatever the number open
            _, state = await load_click(app[keys.SESSIONS], app[keys.POOL], click_id)
    except DEPENDENCY_DOWN:
        return None
    return state


def _heartbeat(given: str | None) -> float:
    """Seconds between heartbeats: 15 by default, a number brought within 0.2-60, anything else a 400."""
    if given is None:
        return 15.0
    try:
        seconds = float(given)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds):
        raise BadRequest("heartbeat must be a number of seconds", code="malformed")
    return min(max(seconds, 0.2), 60.0)


async def _stream(request: web.Request, app: web.Application, click_id: str,
                  state: StoredState | None, heartbeat: float) -> web.StreamResponse:
    # aiohttp-sse frames the events and sends the heartbeat (a `: ping` comment line) every
    # `heartbeat` seconds from its own task; a client gone or stalled past 120 s ends that task.
    resp = EventSourceResponse(sep="\n", ping_interval=heartbeat)
    resp.headers["Cache-Control"] = "no-store"
    await resp.prepare(request)
    closing = app[keys.CLOSING]
    metrics.SSE_CLIENTS.inc()
    last = _public(click_id, state)
    try:
        async with resp:  # on the way out: the heartbeats stop, a cancellation goes on up to aiohttp
            await resp.send(orjson.dumps(last).decode(), event="state")
            with app[keys.FEED].listen(app[keys.SESSIONS].channel(click_id)) as changes:
                live = False  # polls until the feed has the channel subscribed
                while not closing.is_set() and resp.is_connected():
                    item = await changes.next(heartbeat if live else min(heartbeat, 2.0))
                    if item is Link.LIVE:  # read once what may have been published before the subscription
                        live = True
                        data = await _read_state(app, click_id)
                    elif item is Link.LOST:
                        live, data = False, None
                    elif item is None:
                        data = None if live else await _read_state(app, click_id)
                    else:  # a message: the whole new state
                        live, data = True, orjson.loads(item)
                    current = _public(click_id, data) if data is not None else last
                    if current != last:
                        last = current
                        await resp.send(orjson.dumps(current).decode(), event="state")
    except (ConnectionResetError, TimeoutError):  # the client went away, or stopped reading
        pass
    finally:
        metrics.SSE_CLIENTS.dec()
    return resp
