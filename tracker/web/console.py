"""The support console at /support/: search, a user's activations, an order, orphan postbacks.
The click page and the overview are in console_views.py, sign-in in console_auth.py."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator

import aiohttp_jinja2
import asyncpg
import jinja2
from aiohttp import web

from .. import keys
from ..domain.access import AUDIT_READ, ORPHANS_WRITE, USERS_ERASE
from ..domain.clickid import is_click_id
from ..domain.console_session import ConsoleKeys, Session
from ..domain.openid import CALLBACK_PATH, FlowKeys
from ..domain.rows import OrderRow, OrphanRow
from ..domain.text import has_control
from ..domain.tokens import USER_ID
from ..errors import BadRequest, NotFound
from ..store import audit
from ..store import lookups as store
from ..store.openid import Provider
from ..store.support import get_click
from . import console_auth, console_erasure, console_openid, console_views, lookups
from .audit import audited
from .common import one
from .console_guard import PATH, redirect, render, signed_in, static
from .console_views import filters

MAX_QUERY = 256


async def _home(request: web.Request, session: Session) -> web.StreamResponse:
    raw = one(request, "q")
    if raw is None:
        return render(request, session, "search.html", q="", searched=False)
    q = raw.strip()
    if not q or len(q) > MAX_QUERY or has_control(q):  # no id holds a control character (nor can be stored)
        raise BadRequest(f"search for a click id, a user id or an order id (1 to {MAX_QUERY} characters)")
    async def search(pool: asyncpg.Pool) -> tuple[bool, bool, list[OrderRow], list[OrphanRow]]:
        if is_click_id(q) and await get_click(pool, q) is not None:
            return True, False, [], []
        is_user = bool(USER_ID.fullmatch(q)) and await store.has_clicks(pool, q)
        return False, is_user, await store.orders(pool, q), await store.orphans_of_order(pool, q)

    (is_click, is_user, orders, orphans), origin = await request.app[keys.READS].read(
        search, lag=True, users=lambda found: [q, *(r["user_id"] for r in found[2])])
    if is_click:
        return redirect(f"{PATH}clicks/{q}")
    waiting = [o for o in orphans if o["reconciled_at"] is None]  # reconciled ones are in `orders` now
    if is_user and not orders and not orphans:
        return redirect(f"{PATH}users/{q}")
    if len(orders) == 1 and not is_user and not waiting:
        return redirect(f"{PATH}clicks/{orders[0]['click_id']}")
    # Nothing, or several kinds of match (an order number that is also a user id): let the agent choose.
    if orders:
        await audited(request, session.actor(), "order.read", lookups.order_subjects(q, orders))
    return render(request, session, "search.html", q=q, is_user=is_user, orders=orders, orphans=orphans,
                  searched=True, origin=origin)


async def _user(request: web.Request, session: Session) -> web.StreamResponse:
    user_id = request.match_info["user_id"]
    if not USER_ID.fullmatch(user_id):
        raise NotFound("no such user")
    before = one(request, "before")
    if before is not None and not is_click_id(before):
        raise BadRequest("before must be a click id")
    await audited(request, session.actor(), "user.read", [(user_id, None, None)])
    items, nxt, origin = await lookups.user_page(request.app, user_id, 50, before, lag=True)
    names = {slug: m.name for slug, m in request.app[keys.MERCHANTS].merchants.items()}
    # Who looked at this user: for those allowed to read the audit trail (a read of it, recorded too).
    # Once the user is erased, which clicks and orders were read is left out: each would lead to
    # its click's page under the pseudonym and undo it (GET /v1/audit keeps the whole record).
    looked, erased = None, False
    if session.actor().may(AUDIT_READ):
        pool = request.app[keys.POOL]
        looked = await audit.page(pool, user_id=user_id, actor=None, before=None, limit=20)
        erased = bool(await pool.fetchval("SELECT EXISTS (SELECT 1 FROM erasures WHERE user_id = $1)", user_id))
    return render(request, session, "user.html", user_id=user_id, clicks=items, next=nxt, names=names,
                  first_page=before is None, looked=looked, erased=erased, origin=origin)


async def _order(request: web.Request, session: Session) -> web.StreamResponse:
    order_id, network = lookups.order_query(request)
    async def order(pool: asyncpg.Pool) -> tuple[list[OrderRow], list[OrphanRow]]:
        return await store.orders(pool, order_id, network), await store.orphans_of_order(pool, order_id)

    (rows, orphans), origin = await request.app[keys.READS].read(
        order, lag=True, users=lambda found: [r["user_id"] for r in found[0]])
    await audited(request, session.actor(), "order.read", lookups.order_subjects(order_id, rows))
    orders = [lookups.conversion_item(r) for r in rows]
    return render(request, session, "order.html", order_id=order_id, orders=orders, orphans=orphans,
                  origin=origin)


async def _orphans(request: web.Request, session: Session) -> web.StreamResponse:
    rows, nxt, origin = await lookups.orphan_page(request.app, 50, lookups.before_id(request), lag=True)
    return render(request, session, "orphans.html", orphans=rows, next=nxt, done=_reconciled(request),
                  first_page="before" not in request.query, origin=origin)


def _reconciled(request: web.Request) -> dict[str, int] | None:
    """The notice a reconcile's redirect asks for (`?attached=N&still=M`): both counts in ASCII digits,
    or no notice (the list is the same without it; a count alone or a `²` once made the page a 500)."""
    attached, still = one(request, "attached"), one(request, "still")
    if attached is None or still is None:
        return None
    if not all(c.isascii() and c.isdigit() and len(c) <= 9 for c in (attached, still)):
        return None
    return {"attached": int(attached), "still": int(still)}


async def _reconcile(request: web.Request, session: Session) -> web.StreamResponse:
    await audited(request, session.actor(), "orphans.reconcile")
    result = await lookups.reconcile_orphans(request.app)
    return redirect(f"{PATH}orphans?attached={result['attached']}&still={result['still_orphaned']}")


async def _to_console(request: web.Request) -> web.StreamResponse:
    return redirect(PATH)


async def _openid(app: web.Application) -> AsyncIterator[None]:
    """The company's OpenID Connect provider: its discovery document read in the background at start
    (an issuer that cannot be reached is logged; the console starts anyway, a sign-in tries again)."""
    settings = app[keys.SETTINGS].oidc
    assert settings is not None
    provider = Provider(settings)
    app[keys.OPENID] = provider
    probe = asyncio.create_task(provider.probe())
    yield
    probe.cancel()
    await asyncio.gather(probe, return_exceptions=True)
    await provider.close()


def setup_console(app: web.Application) -> None:
    """Templates (autoescaped, package data), the session keys and the console's routes."""
    settings = app[keys.SETTINGS]
    env = aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(Path(__file__).parents[1] / "templates"),
                               autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters.update(filters())
    app[keys.CONSOLE] = ConsoleKeys(settings.secret, settings.admin_key, settings.console_session)
    r = app.router
    r.add_get("/support", _to_console, name="console_root", allow_head=False)
    r.add_get(PATH, signed_in(_home), name="console_home", allow_head=False)
    r.add_get(PATH + "login", console_auth.login_page, name="console_login_page", allow_head=False)
    r.add_post(PATH + "login", console_auth.login, name="console_login")
    r.add_post(PATH + "logout", console_auth.logout, name="console_logout")
    r.add_get(console_openid.FLOW_PATH + "start", console_openid.start, name="console_auth_start",
              allow_head=False)
    r.add_get(CALLBACK_PATH, console_openid.callback, name="console_auth_callback", allow_head=False)
    if settings.oidc is not None:
        app[keys.OPENID_FLOWS] = FlowKeys(settings.secret)
        app.cleanup_ctx.append(_openid)
    r.add_get(PATH + "users/{user_id}", signed_in(_user), name="console_user", allow_head=False)
    r.add_post(PATH + "users/{user_id}/erase", signed_in(console_erasure.erase_page, USERS_ERASE),
               name="console_erase")
    r.add_get(PATH + "clicks/{click_id}", signed_in(console_views.click_page), name="console_click",
              allow_head=False)
    r.add_get(PATH + "orders", signed_in(_order), name="console_order", allow_head=False)
    r.add_get(PATH + "orphans", signed_in(_orphans), name="console_orphans", allow_head=False)
    r.add_post(PATH + "orphans/reconcile", signed_in(_reconcile, ORPHANS_WRITE), name="console_reconcile")
    r.add_get(PATH + "overview", signed_in(console_views.overview_page), name="console_overview",
              allow_head=False)
    r.add_get(PATH + "static/{name}", static, name="console_static", allow_head=False)
