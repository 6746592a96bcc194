"""GET /v1/clicks/{click_id}: the support view of one click (scope lookups:read)."""
from __future__ import annotations

from typing import Any

from aiohttp import web

from .. import keys
from ..domain.access import LOOKUPS_READ
from ..domain.clickid import is_click_id
from ..domain.conversions import conversion_json, money
from ..domain.diagnosis import diagnose
from ..domain.rows import ConversionRow
from ..domain.states import action
from ..domain.times import iso as _iso
from ..errors import NotFound
from ..store.cases import click_case
from .access import authorize
from .audit import audited
from .common import json_response


def _conversion(row: ConversionRow) -> dict[str, Any]:
    cur = row["currency"]
    return {
        **conversion_json(row),
        "history": [{
            "outcome": h["outcome"], "status": h["status"], "status_word": h["status_word"],
            "amount": money(h["amount"], cur), "commission": money(h["commission"], cur),
            "currency": h["currency"] or None, "order_time": _iso(h["order_time"]),
            "received_at": _iso(h["received_at"]),
            "previous": None if h["previous_status"] is None else {
                "status": h["previous_status"], "amount": money(h["previous_amount"], cur),
                "commission": money(h["previous_commission"], cur),
                "currency": h["previous_currency"] or None},
            "raw": h["raw"],
        } for h in row["history"]],
    }


async def click_view(request: web.Request) -> web.Response:
    app = request.app
    actor = await authorize(request, LOOKUPS_READ)
    click_id = request.match_info["click_id"]
    if not is_click_id(click_id):
        raise NotFound("no such click")
    case, _ = await app[keys.READS].read(lambda pool: click_case(pool, app[keys.MERCHANTS].merchants.get, click_id),
                                         users=lambda found: [found.click["user_id"]] if found else [])
    if case is None:
        raise NotFound("no such click")
    click, conversions, signals, facts = case.click, case.conversions, case.signals, case.facts
    await audited(request, actor, "click.read", [(click["user_id"], click_id, None)])
    body_click = {k: v for k, v in click.items()}
    body_click["created_at"] = _iso(click["created_at"])
    body_click["client_ip_truncated_at"] = _iso(click["client_ip_truncated_at"])
    return json_response({
        "click": body_click,
        "state": facts.state,
        "action": action(facts.state),
        "signals": [{"kind": s["kind"], "network": s["network"], "evidence": s["evidence"],
                     "at": _iso(s["at"]), "late": s["late"], "count": s["count"],
                     "last_at": _iso(s["last_at"])} for s in signals],
        "conversions": [_conversion(c) for c in conversions],
        "diagnosis": [{"code": d.code, "text": d.text} for d in diagnose(facts)],
    })
