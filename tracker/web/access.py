"""The one credential check of the admin API and of the console's admin-key sign-in: who is acting
(the admin key, or a machine key from api_keys) and whether they hold the endpoint's scope. 401 for
no key, a malformed, unknown or revoked one; 403 `forbidden` for a key without the scope. A key never
reaches a log line (a typo of the real key is nearly the real key).

Behind the wrong-key throttle (store/key_guard.py): a client with GUESSES wrong keys within the
window gets 429 with `Retry-After` for every admin request and sign-in, whatever key it sends, until
the window passes; a right key answered 200 during a guessing run would tell the guesser it found
it. A held client costs one Redis call and no database lookup. A request without a key is not a
guess (401, not counted)."""
from __future__ import annotations

import math
from typing import Awaitable, Callable

import structlog
from aiohttp import web

from .. import keys, metrics
from ..domain.access import ADMIN_ACTOR, KEY_FORM, Actor
from ..domain.key_guesses import guesser
from ..domain.tokens import same_secret
from ..errors import Forbidden, RateLimited, Unauthorized
from ..store import api_keys
from .common import bearer, client_ip

log = structlog.get_logger("tracker.access")
Identify = Callable[[web.Application, str], Awaitable[Actor | None]]


async def authorize(request: web.Request, scope: str) -> Actor:
    """The actor behind the request's `Authorization: Bearer <key>`, allowed `scope`, or 401/403/429."""
    actor = await authenticate(request, bearer(request), identify,
                               "a key is required: Authorization: Bearer <key>", "the key is not valid")
    if not actor.may(scope):
        raise Forbidden(f"this key does not hold the {scope} scope")
    return actor


async def authenticate(request: web.Request, key: str | None, who: Identify, missing: str, wrong: str) -> Actor:
    """The actor `who` finds for `key`, behind the throttle: 429 for a held client, 401 `missing`
    without a key, 401 `wrong` for a key `who` does not know (counted against the client)."""
    app = request.app
    guard, address = app[keys.KEY_GUARD], client_ip(request, app[keys.SETTINGS].trusted_proxies)
    client = guesser(address)
    refuse_if_held(await guard.wait(client))
    if not key:
        raise Unauthorized(missing)
    actor = await who(app, key)
    if actor is None:
        # Counted and decided in one step: of concurrent guesses only those within the allowance get 401.
        refuse_if_held(await guard.wrong(client))
        log.warning("admin_key_refused", client_ip=address, route=request.match_info.route.name)
        raise Unauthorized(wrong)
    return actor


def refuse_if_held(wait: float) -> None:
    if wait > 0:
        metrics.RATE_LIMITED.labels("admin_key").inc()
        raise RateLimited("too many wrong keys from this address: wait before trying again", math.ceil(wait))


async def identify(app: web.Application, key: str) -> Actor | None:
    """The admin key, or a live machine key (looked up by its hash on the primary), or None."""
    if same_secret(key, app[keys.SETTINGS].admin_key):
        return ADMIN_ACTOR
    if not KEY_FORM.fullmatch(key):  # malformed: no database round trip for it
        return None
    found = await api_keys.find(app[keys.POOL], key)
    return None if found is None else Actor(found.name, "key", found.scopes)


async def admin_key_only(app: web.Application, key: str) -> Actor | None:
    """The console's sign-in: the admin key alone (machine keys do not open the console)."""
    return ADMIN_ACTOR if same_secret(key, app[keys.SETTINGS].admin_key) else None
