"""The console's erase button: an agent whose roles hold users:erase (`admin`, or the admin key)
erases a user from their page, typing the user id again to confirm; the same erasure as
DELETE /v1/users/{user_id}, audited under the agent's name."""
from __future__ import annotations

from aiohttp import web

from ..domain.console_session import Session
from ..domain.tokens import USER_ID
from ..errors import BadRequest, NotFound
from .console_guard import form, render, single
from .erasure import erase_everywhere


async def erase_page(request: web.Request, session: Session) -> web.StreamResponse:
    user_id = request.match_info["user_id"]
    if not USER_ID.fullmatch(user_id):
        raise NotFound("no such user")
    if single(await form(request), "confirm") != user_id:
        raise BadRequest("type the user id into the confirmation box to erase this user's data",
                         code="not_confirmed")
    done = await erase_everywhere(request, session.actor(), user_id)
    return render(request, session, "erased.html", user_id=user_id, erased=done.counts())
