"""POST /v1/observe: what the extension or in-app browser saw after activation."""
from __future__ import annotations

import time
from typing import Any

import structlog
from aiohttp import web

from .. import keys, metrics
from ..domain.clickid import is_click_id
from ..domain.detection import BadEvent, ClickContext, SessionState
from ..domain.signals import Sighting, admit, tally
from ..domain.states import ClickState, action, state_ttl
from ..domain.times import iso_ms
from ..errors import BadRequest, NotFound, RateLimited, Unauthorized
from ..store.support import load_click
from .common import bearer, client_ip, json_object, json_response, read_body

log = structlog.get_logger("tracker.observe")
MAX_BODY = 64 * 1024
MAX_EVENTS = 100


EVENTS_PER_REPORT = 10  # the events one report counts for against TRACKER_RATE_LIMIT_OBSERVE_USER


async def _body(request: web.Request) -> dict[str, Any]:
    doc = json_object(await read_body(request, MAX_BODY))
    events = doc.get("events")
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise BadRequest("events must be a list of objects", code="malformed")
    if len(events) > MAX_EVENTS:
        raise BadRequest(f"at most {MAX_EVENTS} events per request", code="too_many_events")
    if not isinstance(doc.get("click_id"), str):
        raise BadRequest("click_id is required", code="malformed")
    return doc


async def observe(request: web.Request) -> web.Response:
    app = request.app
    user_id = app[keys.TOKENS].verify(bearer(request))
    if user_id is None:
        raise Unauthorized("a valid user token is required: Authorization: Bearer <token>")
    settings = app[keys.SETTINGS]
    over = app[keys.SESSIONS].over_limit([("ip", client_ip(request, settings.trusted_proxies),
                                           settings.rate_limit_ip),
                                          ("observer", user_id, settings.rate_limit_observe_user)])
    if over is not None:
        raise RateLimited(f"too many reports per {'address' if over[0] == 'ip' else 'user'}, retry later",
                          over[1])
    doc = await _body(request)
    # A report's cost grows with its events: past the first EVENTS_PER_REPORT, each further
    # EVENTS_PER_REPORT (or part) counts as one more report against the user's limit, so that one
    # account sending 100-event reports gets a tenth of the reports, and of the detector's time.
    extra = (len(doc["events"]) - 1) // EVENTS_PER_REPORT
    if extra > 0 and settings.rate_limit_observe_user > 0:
        over = app[keys.SESSIONS].over_limit([("observer", user_id, settings.rate_limit_observe_user)] * extra)
        if over is not None:
            raise RateLimited("too many reported events per user, retry later", over[1])
    click_id = doc["click_id"]
    if not is_click_id(click_id):
        raise NotFound("no such click")
    session, raw_state = await load_click(app[keys.SESSIONS], app[keys.POOL], click_id)
    # A bot's or a HEAD's click has no shopping tab behind it: nothing to observe, as if unknown.
    if session is None or session.get("u") != user_id or session.get("bot"):
        raise NotFound("no such click")
    merchant = app[keys.MERCHANTS].merchants.get(session["m"])
    if merchant is None:
        raise NotFound("no such click")
    network = app[keys.MERCHANTS].networks.get(merchant.network)
    detector = app[keys.DETECTOR]
    our = network.profile if network and network.profile in detector.catalog.networks else merchant.network
    state = SessionState.load(raw_state)
    before = state.dump()
    ctx = ClickContext(click_id=click_id, created_ms=session["t"], device=session.get("dev"),
                       merchant=merchant, our_network=our, converted=state.state == ClickState.CONVERTED)
    now_ms = time.time_ns() // 1_000_000
    try:
        found = detector.observe(ctx, state, doc["events"], now_ms)
    except BadEvent as exc:
        raise BadRequest(str(exc), code="bad_event") from None
    for event in doc["events"]:
        metrics.OBSERVE_EVENTS.labels(str(event.get("type"))[:16]).inc()
    # One signal per click, kind, network and evidence key: this request's sightings folded
    # together, then split into what is new to the click (answered, at most 100 a click) and what
    # it has (counted). The writer gets at most one row per signal, however repetitive the report.
    admitted = admit(tally(found), state.seen)
    after = state.dump()
    changed = after != before
    if changed:
        await app[keys.SESSIONS].save_state(click_id, after, state_ttl(state.state, merchant.session_ttl))
    if admitted.added or admitted.repeated or changed:
        app[keys.SIGNALS].add(click_id, merchant.slug, user_id, [*admitted.added, *admitted.repeated],
                              after if changed else None)
    for seen in admitted.added:
        metrics.signals(merchant.slug, seen.signal.kind, seen.signal.network or "none").inc()
    if admitted.dropped or state.over_cap:
        metrics.SIGNALS_OVER_CAP.inc(admitted.dropped + state.over_cap)
    if before["state"] != after["state"]:
        log.info("click_state", click_id=click_id, merchant=merchant.slug, state=after["state"],
                 previous=before["state"])
    return json_response({"click_id": click_id, "state": state.state, "action": action(state.state),
                          "signals": [_answered(seen) for seen in admitted.added]})


def _answered(seen: Sighting) -> dict[str, Any]:
    s = seen.signal
    return {"kind": s.kind, "network": s.network, "evidence": s.evidence, "at": iso_ms(s.at),
            "late": s.late, "count": seen.count, "last_at": iso_ms(seen.last_at)}
