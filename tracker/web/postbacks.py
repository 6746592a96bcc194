"""GET|POST /postback/{network}: authenticate, read through the network's profile, record.

What authenticates a postback is exactly what is read from it: a signed GET is read from the raw
query string it was signed over, a signed POST from its body only (a query beside it is refused),
and a message that is empty is never taken as signed. Every parameter has one meaning: a name given
twice, in any case or in both the query and the body, is refused rather than resolved.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from urllib.parse import parse_qsl

import structlog
from aiohttp import web

from .. import keys, metrics
from ..domain.conversions import MalformedPostback, fold, read_postback
from ..domain.networks import Network
from ..domain.profiles import profiles
from ..domain.states import CONVERTED_STATE_TTL, ClickState, StoredState
from ..domain.text import has_control
from ..domain.tokens import same_secret
from ..errors import BadRequest, DomainError, Forbidden, NotFound
from ..store.conversions import record_postback
from .common import client_ip, json_object, read_body

log = structlog.get_logger("tracker.postbacks")
MAX_BODY = 64 * 1024
MAX_FIELDS = 100
MAX_VALUE = 2048
SECRET_PARAMS = frozenset(("token",))


def _pairs(text: str) -> list[tuple[str, str]]:
    try:
        # Strict UTF-8: replacing bad escapes would make `o1%FF` and `o1%FE` the same order id.
        return parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FIELDS, errors="strict")
    except UnicodeDecodeError:
        raise BadRequest("a parameter is not UTF-8", code="malformed") from None
    except ValueError:  # more fields than MAX_FIELDS
        raise BadRequest("too many parameters", code="malformed") from None


def _body_pairs(request: web.Request, body: bytes) -> list[tuple[str, str]]:
    if request.content_type == "application/json":
        json_object(body)  # valid JSON (orjson's strict reading), an object, not nested deep
        # Read again keeping every member (a name given twice is refused, not silently resolved to
        # its last value as a dict would) and every number as its text: 1E3 is not money, and
        # 1234567890.12345678 must not go through a float.
        pairs = []
        for key, value in json.loads(body, object_pairs_hook=list, parse_float=str, parse_int=str):
            if isinstance(value, (dict, list)):
                raise BadRequest(f"{key[:40]}: nested values are not allowed", code="malformed")
            pairs.append((key, "" if value is None else str(value).lower() if isinstance(value, bool)
                          else str(value)))
        return pairs
    if not body:
        return []
    if body.lstrip()[:1] in (b"{", b"["):
        # A signature covers the bytes, not how they are read: a JSON body read as a form would let
        # a value the network passed through (a sub-id) carry `&name=value` pairs of its own.
        raise BadRequest("a JSON body must be sent as application/json", code="malformed")
    try:
        return _pairs(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest("the body is not UTF-8", code="malformed") from None


async def _message(request: web.Request, network: Network) -> tuple[str, bytes | None]:
    """The raw query string and, for a POST, the body: what a signature covers and what the
    parameters are read from."""
    # The request target as it came off the wire, not a re-quoted form of it: the signature was
    # computed over these bytes, and the parameters are read from the same bytes.
    query = request.raw_path.partition("?")[2]
    if request.method != "POST":
        return query, None
    body = await read_body(request, MAX_BODY)
    if network.hmac_secret is not None and query:
        raise Forbidden("a signed postback carries its parameters in the signed body, not in the query")
    return query, body


def _one_meaning(pairs: list[tuple[str, str]]) -> tuple[dict[str, str], dict[str, str]]:
    """(parameters by lower-cased name, parameters as sent): each name once, whatever its case."""
    if len(pairs) > MAX_FIELDS:
        raise BadRequest("too many parameters", code="malformed")
    params: dict[str, str] = {}
    sent: dict[str, str] = {}
    for key, value in pairs:
        if len(key) > 64 or len(value) > MAX_VALUE:
            raise BadRequest(f"parameter {key[:40]!r} is oversized", code="malformed")
        if has_control(key) or has_control(value):
            raise BadRequest(f"parameter {key[:40]!r} has control characters", code="malformed")
        name = fold(key)
        if name in params:
            raise BadRequest(f"parameter {key[:40]!r} is given more than once", code="duplicate_parameter")
        params[name] = value
        sent[key] = value
    return params, sent


def _authenticate(request: web.Request, network: Network, signed: bytes,
                  pairs: list[tuple[str, str]]) -> None:
    if network.allow_ips:
        peer = client_ip(request, request.app[keys.SETTINGS].trusted_proxies)
        try:
            addr = ipaddress.ip_address(peer)
        except ValueError:
            raise Forbidden("the sender's address is not allowed") from None
        if not any(addr in ipaddress.ip_network(cidr) for cidr in network.allow_ips):
            raise Forbidden("the sender's address is not allowed")
    if network.hmac_secret is not None:
        if not signed:
            raise Forbidden("an empty postback is not signed")
        headers = request.headers.getall("X-Signature", [])
        given = headers[0].strip().lower().removeprefix("sha256=") if len(headers) == 1 else ""
        expected = hmac.new(network.hmac_secret.encode(), signed, hashlib.sha256).hexdigest()
        if not same_secret(given, expected):
            raise Forbidden("the X-Signature header is missing, given more than once or does not match")
    if network.token is not None:
        given_tokens = [value for key, value in pairs if fold(key) in SECRET_PARAMS]
        if len(given_tokens) != 1 or not same_secret(given_tokens[0], network.token):
            raise Forbidden("the token is missing, wrong or given more than once")


async def postback(request: web.Request) -> web.Response:
    app = request.app
    name = request.match_info["network"]
    network = app[keys.MERCHANTS].networks.get(name)
    if network is None:
        raise NotFound("no such network")
    try:
        query, body = await _message(request, network)
        signed = query.encode() if body is None else body
        pairs = _pairs(query) if query else []
        if body is not None:
            pairs += _body_pairs(request, body)
        _authenticate(request, network, signed, pairs)
        params, sent = _one_meaning(pairs)
    except Forbidden:
        metrics.postbacks(name, "rejected_auth").inc()
        log.warning("postback_refused", network=name, outcome="rejected_auth")
        raise
    except DomainError:
        metrics.postbacks(name, "malformed").inc()
        raise
    raw = {k: v for k, v in sent.items() if fold(k) not in SECRET_PARAMS}
    try:
        pb = read_postback(params, profiles()[network.profile])
    except MalformedPostback as exc:
        metrics.postbacks(name, "malformed").inc()
        log.info("postback_malformed", network=name, reason=str(exc))
        raise BadRequest(str(exc), code="malformed") from None
    cache = app[keys.MERCHANTS]
    async with app[keys.POOL].acquire() as conn:
        result = await record_postback(conn, name, pb, raw, cache.merchants.get)
    metrics.postbacks(name, result.outcome).inc()
    if result.status_changed and result.merchant:
        metrics.conversions(result.merchant, result.status or "").inc()
    if result.event:
        metrics.events(result.event).inc()
    if result.click_id and result.conversion_id is not None:
        converted: StoredState = {"state": ClickState.CONVERTED, "status": result.status}
        await app[keys.SESSIONS].save_state(result.click_id, converted, CONVERTED_STATE_TTL, force=True)
    log.info("postback", network=name, outcome=result.outcome, click_id=pb.click_id, order_id=pb.order_id,
             status=pb.status, status_word=pb.status_word, conversion_status=result.status,
             reason=result.reason)
    return web.Response(text="OK")
