"""What every page of the support console shares: security headers on every response under
/support, the session check, CSRF on every POST, and rendering with autoescaped templates.

Everything on these pages that came from outside is hostile until shown otherwise: templates
autoescape (text, never markup), and the Content-Security-Policy allows no script at all (the
console works without JavaScript), no inline style, no framing, and forms that post only to us."""
from __future__ import annotations

import ipaddress
import time
from functools import cache
from importlib import resources
from typing import Any, Awaitable, Callable
from urllib.parse import quote, unquote

import aiohttp_jinja2
from aiohttp import web
from multidict import MultiDictProxy

from .. import keys
from ..domain.access import LOOKUPS_READ
from ..domain.console_session import Session
from ..errors import BadRequest, Forbidden
from ..store.signouts import signed_out
from .common import Handler

COOKIE = "tracker_console"
NONCE_COOKIE = "tracker_console_signin"
PATH = "/support/"
CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
           "Referrer-Policy": "no-referrer", "Cross-Origin-Opener-Policy": "same-origin"}
STATIC = {"console.css": "text/css"}
MAX_NEXT = 2000  # bytes: the sign-in flow's cookie carries it, and has to stay under a browser's 4 KiB
Page = Callable[[web.Request, Session], Awaitable[web.StreamResponse]]


@web.middleware
async def console_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every response under /support (pages, errors, redirects, the style sheet) carries the headers."""
    if not request.path.startswith("/support"):
        return await handler(request)
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # a redirect or 304 raised past the error middleware
        exc.headers.update(HEADERS)
        raise
    response.headers.update(HEADERS)
    if not request.path.startswith("/support/static/"):
        response.headers["Cache-Control"] = "no-store"  # support data stays out of caches and history
    return response


def over_tls(request: web.Request) -> bool:
    """TLS to us, or a trusted proxy that says the client used it (then the cookie is Secure)."""
    if request.secure:
        return True
    trusted = request.app[keys.SETTINGS].trusted_proxies
    try:
        peer = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return False
    if not any(peer in net for net in trusted):
        return False
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[-1].strip().lower()
    return proto == "https"


def set_cookie(request: web.Request, response: web.StreamResponse, name: str, value: str, max_age: int) -> None:
    response.set_cookie(name, value, max_age=max_age, path=PATH, httponly=True, samesite="Strict",
                        secure=over_tls(request))


def redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def local_next(raw: str | None) -> str:
    """Where to go after sign-in: only a console path of ours (no open redirect, and no dot segment,
    plain or percent-encoded, that a browser would resolve out of /support/ to another of our paths)."""
    if (not raw or not raw.startswith(PATH) or raw.startswith("//") or "\\" in raw
            or len(raw.encode(errors="replace")) > MAX_NEXT or any(ord(c) < 0x21 or ord(c) == 0x7F for c in raw)):
        return PATH
    path = unquote(raw.split("?", 1)[0].split("#", 1)[0])
    if any(segment in (".", "..") for segment in path.split("/")):
        return PATH
    return raw


async def form(request: web.Request) -> MultiDictProxy[Any]:
    try:
        return await request.post()
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the form could not be read", code="malformed") from None


def single(values: MultiDictProxy[Any], name: str) -> str | None:
    found = values.getall(name, [])
    return found[0] if len(found) == 1 and isinstance(found[0], str) else None


async def current_session(request: web.Request) -> Session | None:
    app = request.app
    session = app[keys.CONSOLE].read(request.cookies.get(COOKIE), time.time())
    if session is None:
        return None
    return None if await signed_out(app[keys.POOL], session.session_id) else session


def signed_in(page: Page, scope: str | None = LOOKUPS_READ) -> Handler:
    """A console page: without a session, GET goes to the sign-in page; a POST needs the session's
    CSRF token in its form, else 403 (checked before anything else, so that no session means 403).
    A signed-in actor without the page's scope gets 403 `forbidden` (`None`: any session, sign-out)."""
    async def handler(request: web.Request) -> web.StreamResponse:
        session = await current_session(request)
        if request.method == "POST":
            token = single(await form(request), "csrf")
            if session is None or not request.app[keys.CONSOLE].csrf_ok(session.session_id, token):
                raise Forbidden("this form's CSRF token is missing or not valid: reload the page and send it again",
                                code="csrf")
        elif session is None:
            return redirect(f"{PATH}login?next={quote(request.path_qs, safe='/')}")
        if scope is not None and not session.actor().may(scope):
            raise Forbidden(f"your roles do not allow this ({scope})")
        return await page(request, session)
    return handler


def render(request: web.Request, session: Session | None, template: str, status: int = 200,
           **context: Any) -> web.Response:
    csrf = request.app[keys.CONSOLE].csrf(session.session_id) if session else context.pop("csrf", "")
    # The header names who is signed in: an agent by their name, the admin key as such.
    actor = session.actor() if session else None
    who = "" if actor is None else "admin key" if actor.kind == "admin" else actor.name
    return aiohttp_jinja2.render_template(template, request, {
        "csrf": csrf, "signed_in": session is not None, "who": who,
        "scopes": actor.scopes if actor else frozenset(), **context}, status=status)


@cache
def _static(name: str) -> bytes:
    return resources.files("tracker").joinpath("static", name).read_bytes()


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC:
        raise web.HTTPNotFound()
    return web.Response(body=_static(name), content_type=STATIC[name],
                        headers={"Cache-Control": "public, max-age=3600"})
