"""Signing in to the support console with the admin key, and signing out."""
from __future__ import annotations

import time

import structlog
from aiohttp import web

from .. import keys
from ..domain.console_session import LOGIN_NONCE_TTL, Session
from ..errors import Forbidden
from ..store.signouts import sign_out
from .access import admin_key_only, authenticate
from .common import client_ip
from .console_guard import (
    COOKIE,
    NONCE_COOKIE,
    PATH,
    current_session,
    form,
    local_next,
    redirect,
    render,
    set_cookie,
    signed_in,
    single,
)

log = structlog.get_logger("tracker.console")


async def login_page(request: web.Request) -> web.StreamResponse:
    if await current_session(request) is not None:
        return redirect(local_next(request.query.get("next")))
    console = request.app[keys.CONSOLE]
    cookie, nonce = console.issue_nonce(time.time())
    response = render(request, None, "login.html", csrf=console.csrf("login:" + nonce.session_id),
                      next=local_next(request.query.get("next")), hours=console.ttl // 3600,
                      openid=keys.OPENID in request.app)
    set_cookie(request, response, NONCE_COOKIE, cookie, LOGIN_NONCE_TTL)
    return response


async def login(request: web.Request) -> web.StreamResponse:
    app = request.app
    console = app[keys.CONSOLE]
    fields = await form(request)
    nonce = console.read_nonce(request.cookies.get(NONCE_COOKIE), time.time())
    if nonce is None or not console.csrf_ok("login:" + nonce.session_id, single(fields, "csrf")):
        raise Forbidden("this form's CSRF token is missing or not valid: reload the sign-in page and try again",
                        code="csrf")
    # The admin key's one door, with its throttle: a client that guessed too often gets 429 here too.
    await authenticate(request, single(fields, "key"), admin_key_only, "enter the admin key to sign in",
                       "the admin key is not valid: go back and enter it again")
    cookie, session = console.issue(time.time())
    log.info("console_signed_in", client_ip=client_ip(request, app[keys.SETTINGS].trusted_proxies),
             session=session.session_id[:8])
    response = redirect(local_next(single(fields, "next")))
    set_cookie(request, response, COOKIE, cookie, console.ttl)
    response.del_cookie(NONCE_COOKIE, path=PATH)
    return response


async def _logout(request: web.Request, session: Session) -> web.StreamResponse:
    await sign_out(request.app[keys.POOL], session.session_id, session.expires)
    log.info("console_signed_out", client_ip=client_ip(request, request.app[keys.SETTINGS].trusted_proxies),
             session=session.session_id[:8])
    response = redirect(f"{PATH}login")
    response.del_cookie(COOKIE, path=PATH)
    return response


logout = signed_in(_logout, None)
