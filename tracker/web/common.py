"""What every handler shares: the error middleware, JSON responses, client addresses, query parameters."""
from __future__ import annotations

import asyncio
import ipaddress
import time
from typing import Any, Awaitable, Callable

import orjson
import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from .. import internals, keys, metrics
from ..domain import addresses
from ..errors import BadRequest, DomainError, RequestTimeout, TooLarge
from ..settings import IPNetwork
from ..store.unreachable import DEPENDENCY_DOWN

log = structlog.get_logger("tracker.web")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json",
                        headers=headers)


def error_response(code: str, message: str, status: int, headers: dict[str, str] | None = None) -> web.Response:
    return json_response({"error": code, "message": message}, status, headers)


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 408: "timeout", 413: "too_large", 414: "too_large", 429: "rate_limited",
               431: "too_large"}


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    return await answer(request.app, request, request.match_info.route.name or "unmatched", handler(request))


async def answer(app: web.Application, request: web.BaseRequest, route: str,
                 handling: Awaitable[web.StreamResponse]) -> web.StreamResponse:
    """Await a handler's answer and turn whatever it raises into the API's JSON error."""
    started = time.perf_counter()
    try:
        response = await handling
    except DomainError as exc:
        metrics.REFUSALS.labels(route, exc.code).inc()
        response = error_response(exc.code, exc.message, exc.status, exc.headers)
        if exc.status == 429:
            await _hold(app)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "error")
        metrics.REFUSALS.labels(route, code).inc()
        allow = exc.headers.get("Allow")  # a 405 names the methods that are allowed
        response = error_response(code, exc.reason, exc.status, {"Allow": allow} if allow else None)
    except DEPENDENCY_DOWN as exc:
        # PostgreSQL or Redis is away (not a client's doing): 503 so that networks retry and load
        # balancers notice; the outage itself is logged by the parts that watch it.
        log.warning("dependency_unavailable", route=route, error=repr(exc)[:200])
        response = error_response("unavailable", "a backing service is unavailable, retry later", 503,
                                  {"Retry-After": "5"})
    except Exception:  # noqa: BLE001 - the one place unexpected errors are logged and hidden
        log.exception("unhandled_error", route=route, method=request.method)
        response = error_response("internal", "internal error", 500)
    metrics.tally.count(metrics.http_requests(route, str(response.status)))
    if route != "go":  # the redirect has its own histogram (tracker_redirect_duration_seconds)
        metrics.http_seconds(route).observe(time.perf_counter() - started)
    return response


_PROTOCOL_MESSAGES = {400: "the request could not be parsed: a malformed or oversized request line or header",
                      413: "the request is too large", 431: "the request headers are too large"}


def _protocol_error(self: RequestHandler, request: web.BaseRequest, status: int = 500,
                    exc: BaseException | None = None, message: str | None = None) -> web.StreamResponse:
    """aiohttp answers what its HTTP parser refuses (an oversized request line, a garbled header)
    itself, before any middleware, as text with the request's bytes in the message and an ERROR
    log line that would carry them too (user tokens ride in /go's query). This answers with the
    API's JSON error instead and logs only the status and the kind of error."""
    if request.writer.output_size > 0:
        raise ConnectionError("the response is already being sent")
    if status >= 500:  # not a parse error: an unexpected failure, logged with its traceback
        log.error("http_server_error", status=status, exc_info=exc)
        response = error_response("internal", "internal error", status)
    else:
        log.info("http_protocol_error", status=status, error=type(exc).__name__ if exc else None)
        response = error_response(_HTTP_CODES.get(status, "bad_request"),
                                  _PROTOCOL_MESSAGES.get(status, "the request could not be parsed"), status)
    response.force_close()
    metrics.tally.count(metrics.http_requests("unparsed", str(status)))
    return response


def answer_protocol_errors_as_json() -> None:
    """Install `_protocol_error` as aiohttp's handler for requests its parser refuses (idempotent)."""
    internals.replace_protocol_error_handler(_protocol_error)


MAX_HELD = 10_000


async def _hold(app: web.Application) -> None:
    """Hold a rate-limited answer for TRACKER_RATE_LIMIT_DELAY_MS: a client that retries at once
    (a script, a runaway extension) then sends one request per delay per connection instead of
    thousands, and the CPU goes to everyone else. A held request is a sleeping coroutine; past
    MAX_HELD at once, answers go out at once rather than pile up."""
    delay = app[keys.SETTINGS].rate_limit_delay_ms
    held = app[keys.HELD]
    if delay <= 0 or held.count >= MAX_HELD:
        return
    held.count += 1
    try:
        await asyncio.sleep(delay / 1000)
    finally:
        held.count -= 1


def client_ip(request: web.BaseRequest, trusted: tuple[IPNetwork, ...]) -> str:
    """The peer address; behind a trusted proxy, the nearest X-Forwarded-For hop that is not one.
    An IPv4 client is its IPv4 address also where it reaches us as IPv4-mapped IPv6 (a dual-stack
    listener on `::` reports `::ffff:a.b.c.d`): stored mapped, it truncated as IPv6, to `::/48`
    for every such client, and a trusted IPv4 proxy so reported was not found trusted."""
    peer = request.remote or ""
    # /go's hot path: one slice and compare for an ordinary peer, no parsing (the socket's own
    # text, always written in lower case and dotted).
    if peer[:7] == "::ffff:" and "." in peer:
        peer = peer[7:]
    if not trusted:
        return peer
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return peer
    if not any(addr in net for net in trusted):
        return peer
    hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
    for hop in reversed(hops):
        hop_addr = addresses.address(hop)  # an IPv4-mapped one as the IPv4 address it carries
        if hop_addr is None:
            return peer  # a forged or garbled header: believe only the peer
        if not any(hop_addr in net for net in trusted):
            return str(hop_addr)
    return peer


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes (declared or actually sent), and with
    408 when it has not all arrived within the body timeout (a slow or stalled client)."""
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"the body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(request.app[keys.SETTINGS].body_timeout):
            while chunk := await request.content.read(limit + 1 - size):
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    raise TooLarge(f"the body is larger than {limit} bytes")
    except TimeoutError:
        raise RequestTimeout("the request body did not arrive in time") from None
    except RequestPayloadError:  # a Content-Encoding the body is not in, a broken chunked framing
        raise BadRequest("the request body could not be decoded", code="malformed") from None
    except ConnectionError:  # the client went away mid-body: its doing, not a backing service's
        raise BadRequest("the connection closed before the body arrived", code="malformed") from None
    return b"".join(chunks)


MAX_JSON_DEPTH = 16  # our bodies nest three levels; a client's deep nesting is an attack on recursion


def json_object(body: bytes) -> dict[str, Any]:
    """A JSON object from a body, or the API's JSON 400 (also for one nested deeper than
    MAX_JSON_DEPTH: whatever later walks or prints it recursively stays far from the stack's end)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON", code="malformed") from None
    if not isinstance(doc, dict):
        raise BadRequest("the body must be a JSON object", code="malformed")
    if json_depth(doc) > MAX_JSON_DEPTH:
        raise BadRequest(f"the body nests deeper than {MAX_JSON_DEPTH} levels", code="malformed")
    return doc


def json_depth(doc: Any) -> int:
    """How deep a parsed JSON value nests (a scalar is 0), without recursion."""
    deepest = 0
    level: list[Any] = [doc]
    while level:
        containers = [v for v in level if isinstance(v, (dict, list))]
        if not containers:
            break
        deepest += 1
        level = [child for c in containers for child in (c.values() if isinstance(c, dict) else c)]
    return deepest


def one(request: web.Request, name: str) -> str | None:
    """A query parameter given at most once (twice is a 400: one meaning per parameter)."""
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise BadRequest(f"{name} is given more than once", code="duplicate_parameter")
    return values[0] if values else None


def bearer(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None
