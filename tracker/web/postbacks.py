"""GET|POST /postback/{network}: authenticate, read through the network's profile, record."""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Any
from urllib.parse import parse_qsl

import structlog
from aiohttp import web

from .. import keys, metrics
from ..domain.conversions import MalformedPostback, Postback, read_postback
from ..domain.networks import Network
from ..domain.profiles import profiles
from ..errors import BadRequest, DomainError, Forbidden, NotFound
from ..store.conversions import record_postback
from .common import client_ip, json_object, read_body

log = structlog.get_logger("tracker.postbacks")
MAX_BODY = 64 * 1024
MAX_FIELDS = 100
MAX_VALUE = 2048
SECRET_PARAMS = frozenset(("token",))
CONVERTED_STATE_TTL = 120 * 86400


def _pairs(text: str) -> list[tuple[str, str]]:
    try:
        return parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FIELDS)
    except ValueError:  # more fields than MAX_FIELDS
        raise BadRequest("too many parameters", code="malformed") from None


async def _params(request: web.Request) -> tuple[dict[str, str], bytes]:
    """All parameters (query, then form or JSON body) and the raw bytes a signature covers."""
    raw_query = request.rel_url.raw_query_string.encode()
    pairs = _pairs(request.rel_url.raw_query_string) if raw_query else []
    signed = raw_query
    if request.method == "POST":
        body = await read_body(request, MAX_BODY)
        signed = body
        if request.content_type == "application/json":
            doc = json_object(body)
            for key, value in doc.items():
                if isinstance(value, (dict, list)):
                    raise BadRequest(f"{key[:40]}: nested values are not allowed", code="malformed")
                pairs.append((key, "" if value is None else str(value).lower() if isinstance(value, bool)
                              else str(value)))
        elif body:
            try:
                pairs += _pairs(body.decode("utf-8"))
            except UnicodeDecodeError:
                raise BadRequest("the body is not UTF-8", code="malformed") from None
    if len(pairs) > MAX_FIELDS:
        raise BadRequest("too many parameters", code="malformed")
    params: dict[str, str] = {}
    for key, value in pairs:
        if len(key) > 64 or len(value) > MAX_VALUE or "\x00" in key or "\x00" in value:
            raise BadRequest(f"parameter {key[:40]!r} is oversized or has NUL bytes", code="malformed")
        params.setdefault(key, value)
    return params, signed


def _authenticate(request: web.Request, network: Network, params: dict[str, str], signed: bytes) -> None:
    if network.allow_ips:
        peer = client_ip(request, request.app[keys.SETTINGS].trusted_proxies)
        try:
            addr = ipaddress.ip_address(peer)
        except ValueError:
            raise Forbidden("the sender's address is not allowed") from None
        if not any(addr in ipaddress.ip_network(cidr) for cidr in network.allow_ips):
            raise Forbidden("the sender's address is not allowed")
    if network.token is not None:
        given = params.get("token", "")
        if not hmac.compare_digest(given.encode(), network.token.encode()):
            raise Forbidden("the token is missing or wrong")
    if network.hmac_secret is not None:
        given = request.headers.get("X-Signature", "").strip().lower()
        given = given.removeprefix("sha256=")
        expected = hmac.new(network.hmac_secret.encode(), signed, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise Forbidden("the X-Signature header is missing or does not match")


def read_raw(network: Network, raw: dict[str, Any]) -> Postback | None:
    """Re-read a stored raw postback (reconciliation); None if it no longer reads."""
    try:
        return read_postback({k.lower(): str(v) for k, v in raw.items()}, profiles()[network.profile])
    except (MalformedPostback, KeyError):
        return None


async def postback(request: web.Request) -> web.Response:
    app = request.app
    name = request.match_info["network"]
    network = app[keys.CATALOG].networks.get(name)
    if network is None:
        raise NotFound("no such network")
    try:
        params, signed = await _params(request)
        _authenticate(request, network, params, signed)
    except Forbidden:
        metrics.postbacks(name, "rejected_auth").inc()
        log.warning("postback_refused", network=name, outcome="rejected_auth")
        raise
    except DomainError:
        metrics.postbacks(name, "malformed").inc()
        raise
    raw = {k: v for k, v in params.items() if k.lower() not in SECRET_PARAMS}
    try:
        pb = read_postback({k.lower(): v for k, v in params.items()}, profiles()[network.profile])
    except MalformedPostback as exc:
        metrics.postbacks(name, "malformed").inc()
        log.info("postback_malformed", network=name, reason=str(exc))
        raise BadRequest(str(exc), code="malformed") from None
    catalog = app[keys.CATALOG]
    async with app[keys.POOL].acquire() as conn:
        result = await record_postback(conn, name, pb, raw, catalog.merchants.get)
    metrics.postbacks(name, result.outcome).inc()
    if result.status_changed and result.merchant:
        metrics.conversions(result.merchant, result.status or "").inc()
    if result.click_id and result.conversion_id is not None:
        await app[keys.SESSIONS].save_state(result.click_id, {"state": "converted", "status": result.status},
                                            CONVERTED_STATE_TTL, force=True)
    log.info("postback", network=name, outcome=result.outcome, click_id=pb.click_id, order_id=pb.order_id,
             status=pb.status, status_word=pb.status_word, conversion_status=result.status,
             reason=result.reason)
    return web.Response(text="OK")
