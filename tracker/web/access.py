"""The one credential check of the admin API: who is acting (the admin key, or a machine key from
api_keys) and whether they hold the endpoint's scope. 401 for no key, a malformed, unknown or
revoked one; 403 `forbidden` for a key without the scope. A key never reaches a log line."""
from __future__ import annotations

import structlog
from aiohttp import web

from .. import keys
from ..domain.access import ADMIN_ACTOR, KEY_FORM, Actor
from ..domain.tokens import same_secret
from ..errors import Forbidden, Unauthorized
from ..store import api_keys
from .common import bearer

log = structlog.get_logger("tracker.access")


async def authorize(request: web.Request, scope: str) -> Actor:
    """The actor behind the request's `Authorization: Bearer <key>`, allowed `scope`, or 401/403."""
    app = request.app
    key = bearer(request)
    if key is None:
        raise Unauthorized("a key is required: Authorization: Bearer <key>")
    actor = await identify(app, key)
    if actor is None:
        raise Unauthorized("the key is not valid")
    if not actor.may(scope):
        raise Forbidden(f"this key does not hold the {scope} scope")
    return actor


async def identify(app: web.Application, key: str) -> Actor | None:
    """The admin key, or a live machine key (looked up by its hash on the primary), or None."""
    if same_secret(key, app[keys.SETTINGS].admin_key):
        return ADMIN_ACTOR
    if not KEY_FORM.fullmatch(key):  # malformed: no database round trip for it
        return None
    found = await api_keys.find(app[keys.POOL], key)
    return None if found is None else Actor(found.name, "key", found.scopes)
