"""DELETE /v1/users/{user_id} (scope users:erase): erase a user's personal data everywhere
tracker keeps it (store/erasure.py), audited. Idempotent: a repeat answers zeros. The console's
erase button (web/console.py) runs the same erasure."""
from __future__ import annotations

import structlog
from aiohttp import web

from .. import keys
from ..domain.access import USERS_ERASE, Actor
from ..domain.tokens import USER_ID
from ..errors import NotFound, Unavailable
from ..store.erasure import Erased, announce, erase
from ..store.unreachable import REDIS_DOWN
from .access import authorize
from .audit import audited
from .common import json_response

log = structlog.get_logger("tracker.erasure")


async def erase_everywhere(request: web.Request, actor: Actor, user_id: str) -> Erased:
    """Audit, then erase the user in PostgreSQL, sweep what this worker held, tell the others.
    Redis unreachable: PostgreSQL's part is done and every worker told all the same, then 503 with
    Retry-After (the user's sessions are still in Redis); a repeat once Redis is back deletes them."""
    app = request.app
    await audited(request, actor, "user.erase", [(user_id, None, None)])
    async with app[keys.POOL].acquire() as conn:
        done = await erase(conn, user_id)
    # What this worker still held of the user (a batch being written, a session not yet sent) is
    # swept now, and the sessions of every click of theirs deleted from Redis; then the other
    # workers are told to sweep what they held.
    watch = app[keys.ERASURES]
    assert done.before is not None
    try:
        done.add(await watch.sweep(user_id, done.before))
    except REDIS_DOWN as exc:
        # The sweep's PostgreSQL part ran before its Redis part: the other workers still sweep theirs.
        await announce(app[keys.POOL], user_id, done.before, watch.name)
        log.warning("erasure_sessions_left", clicks=done.clicks, error=repr(exc)[:200])  # never the user id
        raise Unavailable("the user's data in PostgreSQL is erased, but Redis is unavailable and still holds "
                          "their sessions: repeat the request to delete them") from None
    await announce(app[keys.POOL], user_id, done.before, watch.name)
    return done


async def erase_user(request: web.Request) -> web.Response:
    actor = await authorize(request, USERS_ERASE)
    user_id = request.match_info["user_id"]
    if not USER_ID.fullmatch(user_id):
        raise NotFound("no such user")
    done = await erase_everywhere(request, actor, user_id)
    return json_response({"user_id": user_id, "erased": done.counts()})
