"""GET /go/{merchant}: the activation click. Validate, mint the click id, hand the click to the writer,
write the session to Redis without waiting, redirect."""
from __future__ import annotations

import time
from urllib.parse import unquote

import structlog
from aiohttp import web

from .. import keys, metrics
from ..domain.bots import is_bot
from ..domain.clickid import new_click_id
from ..domain.targets import BadTarget, check_target
from ..domain.text import without_control
from ..errors import BadRequest, NotFound, RateLimited, Unauthorized
from ..store.click import Click
from ..store.ratelimit import EDGE
from .common import client_ip

log = structlog.get_logger("tracker.activation")
SOURCES = frozenset(("web", "app", "ext"))
MAX_DEVICE = 128
MAX_UA = 512


# %XX escapes of ASCII characters, the common case (a deep link's ':', '/', '?', '=', '&'), decoded by a
# dict lookup; anything else (UTF-8 sequences, malformed escapes) goes through urllib's unquote.
_ASCII_ESCAPES = {f"{c:02{case}}": chr(c) for c in range(128) for case in "xX"}


def _unquote(value: str) -> str:
    """urllib.parse.unquote(value), about three times as fast for ASCII escapes, and three times
    as fast again for a deep link whose escapes are all a URL's own delimiters (:/?=&), as a
    browser's encodeURIComponent writes it: str.replace for each of those (a replacement makes no
    '%', and a '%XX' cannot overlap another's hex digits, so if no '%' is left every escape was one
    of them and was decoded exactly once). 5,800 instead of 17,200 instructions for a 60-character
    deep link (callgrind, docs/performance.md)."""
    decoded = (value.replace("%3A", ":").replace("%2F", "/").replace("%3F", "?").replace("%3D", "=")
               .replace("%26", "&"))
    if "%" not in decoded:
        return decoded
    head, *rest = value.split("%")
    parts = [head]
    for part in rest:
        char = _ASCII_ESCAPES.get(part[:2])
        if char is None:
            return unquote(value)
        parts.append(char)
        parts.append(part[2:])
    return "".join(parts)


def parse_query(query_string: str) -> tuple[dict[str, str], set[str] | None]:
    """Each name's first value, decoded as aiohttp's `request.query` decodes them (yarl: the same as
    parse_qsl with blank values kept), and the names given more than once (None: none). Without
    the MultiDict and the proxy around it, and only fields with escapes are unescaped;
    tests/test_properties.py checks it agrees with yarl."""
    values: dict[str, str] = {}
    repeated: set[str] | None = None
    for field in query_string.replace("+", " ").split("&") if "+" in query_string else query_string.split("&"):
        if not field:
            continue
        name, _, value = field.partition("=")
        if "%" in field:
            if "%" in name:
                name = _unquote(name)
            if "%" in value:
                value = _unquote(value)
        if name in values:
            if repeated is None:
                repeated = set()
            repeated.add(name)
        else:
            values[name] = value
    return values, repeated


def _printable(value: str) -> bool:
    return value.isprintable() and value.isascii()


async def activate(request: web.Request) -> web.Response:
    return await activate_in(request.app, request, request.match_info["merchant"])


async def activate_in(app: web.Application, request: web.BaseRequest, slug: str) -> web.Response:
    started = time.perf_counter()
    query, repeated = parse_query(request.rel_url.raw_query_string)
    user_id = app[keys.TOKENS].verify(query.get("u"))
    if user_id is None:
        raise Unauthorized("a valid signed user token is required in 'u'")
    merchant = app[keys.MERCHANTS].merchants.get(slug)
    if merchant is None or not merchant.active:
        raise NotFound("no such merchant")
    source = query.get("src", "web")
    if source not in SOURCES:
        raise BadRequest("src must be web, app or ext", code="bad_source")
    raw_target = query.get("to")
    if raw_target is None:
        target = merchant.default_target
    else:
        try:
            target = check_target(raw_target, merchant.allowed_hosts)
        except BadTarget as exc:
            raise BadRequest(f"to: {exc}", code="bad_target") from None
    device = query.get("device")
    if device is not None and (len(device) > MAX_DEVICE or not device or not _printable(device)):
        raise BadRequest(f"device: at most {MAX_DEVICE} printable ASCII characters", code="bad_device")
    if repeated is not None:  # some name repeats: is it one of ours?
        for name in ("u", "src", "to", "device"):
            if name in repeated:
                raise BadRequest(f"{name} is given more than once", code="duplicate_parameter")

    settings = app[keys.SETTINGS]
    ip = client_ip(request, settings.trusted_proxies)
    sessions = app[keys.SESSIONS]
    checks = (("ip", ip, settings.rate_limit_ip), ("user", user_id, settings.rate_limit_user))
    over = sessions.limits.check(checks, edge=True)  # decided in memory
    if over is not None:
        if over is EDGE:  # a limit nearly reached: Redis decides, one round trip
            over = await sessions.over_limit_exact(checks)
        if over is not None:
            raise RateLimited(f"too many activations per {over[0]}, retry later", over[1])

    user_agent = request.headers.get("User-Agent", "")
    bot = request.method == "HEAD" or is_bot(user_agent)
    click_id, created_ms = new_click_id()
    location = merchant.partner_link(click_id, target, app=source == "app")
    ua = user_agent[:MAX_UA]
    # The HTTP parser lets no control character but HTAB into a header, but a header's bytes that
    # are not UTF-8 arrive as lone surrogates, which PostgreSQL cannot store: replaced here (an
    # ASCII check is 20 ns; the full scan only for the rare header that is not ASCII).
    if not ua.isascii() or "\x00" in ua:
        ua = without_control(ua)
    await app[keys.WRITER].write(Click(click_id, created_ms, user_id, merchant.slug, source, target, device,
                                       ip, ua, bot, request.method))
    if not bot:
        sessions.put_session(click_id, {"u": user_id, "m": merchant.slug, "t": created_ms,
                                        "src": source, "dev": device}, merchant.session_ttl)
    tally = metrics.tally
    tally.count(metrics.clicks(merchant.slug, source, "true" if bot else "false"))
    tally.observe(time.perf_counter() - started)
    return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store",
                                             "X-Click-Id": click_id})
