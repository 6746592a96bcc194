"""CORS for the two shopper endpoints a web page calls: POST /v1/observe and the click's event
stream, from the origins in TRACKER_CORS_ORIGINS only.

The headers are added in `on_response_prepare`, so that they ride on every answer of those routes
(errors included, which a page must be able to read, and the event stream, whose headers leave
before its handler returns). The direct /go path has no match info and never reaches the hook.
No credentials are ever allowed (the user token is sent as a header or `?u=`), the origin is echoed
only when it is listed (never `*`), and no other route, admin endpoints above all, answers
cross-origin."""
from __future__ import annotations

import re

from aiohttp import web

from .. import keys
from .common import Handler

# route name -> the method a page may use on it
ROUTES = {"observe": "POST", "click_events": "GET"}
_PREFLIGHT = re.compile(r"^/v1/(observe|clicks/[^/]+/events)$")
ALLOW_HEADERS = "Authorization, Content-Type"
EXPOSE_HEADERS = "Retry-After"  # the client honours it after a 429 or 503
MAX_AGE = "600"


def _allowed(request: web.Request) -> str | None:
    origin = request.headers.get("Origin")
    if origin is None or origin not in request.app[keys.SETTINGS].cors_origins:
        return None
    return origin


async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the CORS headers of an allowed origin's request to a shopper route."""
    if request.match_info.route.name not in ROUTES:
        return
    response.headers.add("Vary", "Origin")  # caches must not hand one origin's answer to another
    origin = _allowed(request)
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS


@web.middleware
async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer OPTIONS on the shopper routes (the router has no OPTIONS routes: it would 405).
    Another origin's preflight gets a 204 without CORS headers, which the browser refuses."""
    if request.method != "OPTIONS":
        return await handler(request)
    found = _PREFLIGHT.match(request.path)
    if found is None:
        return await handler(request)
    method = "POST" if found[1] == "observe" else "GET"
    response = web.Response(status=204, headers={"Allow": f"{method}, OPTIONS", "Vary": "Origin"})
    origin = _allowed(request)
    if origin is not None:
        response.headers.update({"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Methods": method,
                                 "Access-Control-Allow-Headers": ALLOW_HEADERS, "Access-Control-Max-Age": MAX_AGE})
    return response


def setup_cors(app: web.Application) -> None:
    app.on_response_prepare.append(add_headers)
