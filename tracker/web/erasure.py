"""DELETE /v1/users/{user_id} (scope users:erase): erase a user's personal data everywhere
tracker keeps it (store/erasure.py), audited. Idempotent: a repeat answers zeros. The console's
erase button (web/console.py) runs the same erasure."""
from __future__ import annotations

from aiohttp import web

from .. import keys
from ..domain.access import USERS_ERASE, Actor
from ..domain.tokens import USER_ID
from ..errors import NotFound
from ..store.erasure import Erased, announce, erase
from .access import authorize
from .audit import audited
from .common import json_response


async def erase_everywhere(request: web.Request, actor: Actor, user_id: str) -> Erased:
    """Audit, then erase the user in PostgreSQL, sweep what this worker held, tell the others."""
    app = request.app
    await audited(request, actor, "user.erase", [(user_id, None, None)])
    async with app[keys.POOL].acquire() as conn:
        done = await erase(conn, user_id)
    # What this worker still held of the user (a batch being written, a session not yet sent) is
    # swept now, and the sessions of every click of theirs deleted from Redis; then the other
    # workers are told to sweep what they held.
    watch = app[keys.ERASURES]
    done.add(await watch.sweep(user_id, done.before))
    assert done.before is not None
    await announce(app[keys.POOL], user_id, done.before, watch.name)
    return done


async def erase_user(request: web.Request) -> web.Response:
    actor = await authorize(request, USERS_ERASE)
    user_id = request.match_info["user_id"]
    if not USER_ID.fullmatch(user_id):
        raise NotFound("no such user")
    done = await erase_everywhere(request, actor, user_id)
    return json_response({"user_id": user_id, "erased": done.counts()})
