"""GET /v1/clicks/{click_id}: the support view of one click (admin key)."""
from __future__ import annotations

from datetime import datetime, timezone

from aiohttp import web

from .. import keys
from ..domain.clickid import is_click_id
from ..errors import NotFound
from ..store.support import get_click
from .common import json_response, require_admin


async def click_view(request: web.Request) -> web.Response:
    app = request.app
    require_admin(request, app[keys.SETTINGS].admin_key)
    click_id = request.match_info["click_id"]
    if not is_click_id(click_id):
        raise NotFound("no such click")
    click = await get_click(app[keys.POOL], click_id)
    if click is None:
        raise NotFound("no such click")
    merchant = app[keys.CATALOG].merchants.get(click["merchant"])
    created: datetime = click["created_at"]
    ttl = merchant.session_ttl if merchant else 7200
    expired = (datetime.now(timezone.utc) - created).total_seconds() > ttl
    click["created_at"] = created.isoformat().replace("+00:00", "Z")
    return json_response({
        "click": click,
        "state": "expired" if expired else "active",
        "signals": [],
        "conversions": [],
        "diagnosis": [],
    })
