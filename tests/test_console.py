"""The support console over plain HTTP: sign-in and its cookie, CSRF, security headers, search.
Real-browser tests are in test_console_browser.py."""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import cast

from aiohttp import web
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

from tracker.app import create_app
from tracker.domain.console_session import ConsoleKeys
from tracker.domain.timeline import Moment, url_parts
from tracker.domain.timeline_svg import layout

from .conftest import ADMIN_KEY
from .test_postbacks import activate, admitad
from .waiting import stored

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


async def sign_in(client: TestClient[web.Request, web.Application], key: str = ADMIN_KEY, **headers: str):  # noqa: ANN201
    page = await client.get("/support/login", headers=headers)
    token = CSRF.findall(await page.text())[0]
    return await client.post("/support/login", data={"csrf": token, "key": key, "next": "/support/"},
                             allow_redirects=False, headers=headers)


async def csrf_of(client: TestClient[web.Request, web.Application], path: str = "/support/orphans") -> str:
    return CSRF.findall(await (await client.get(path)).text())[0]


def assert_hardened(resp) -> None:  # noqa: ANN001
    csp = resp.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
    assert "script-src" not in csp or "'unsafe-inline'" not in csp  # scripts fall back to default-src 'none'
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


async def test_without_a_session_every_page_goes_to_sign_in(client):
    for path in ("/support/", "/support/?q=x", "/support/users/u1", "/support/clicks/abc", "/support/overview",
                 "/support/orphans", "/support/orders?order_id=1"):
        resp = await client.get(path, allow_redirects=False)
        assert resp.status == 303, path
        assert resp.headers["Location"].startswith("/support/login?next=/support/")
        assert_hardened(resp)
    for resp in (await client.get("/support/login"), await client.get("/support/nope"),
                 await client.get("/support/static/console.css"), await client.get("/support", allow_redirects=False)):
        assert_hardened(resp)
    assert (await client.get("/support/nope")).status == 404


async def test_sign_in_sets_a_hardened_expiring_cookie_and_sign_out_ends_it(client):
    resp = await sign_in(client)
    assert resp.status == 303 and resp.headers["Location"] == "/support/"
    cookie = next(v for v in resp.headers.getall("Set-Cookie") if v.startswith("tracker_console="))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/support/" in cookie
    assert "Max-Age=28800" in cookie and "Secure" not in cookie  # plain HTTP, no trusted proxy
    home = await client.get("/support/")
    assert home.status == 200 and "Find the click behind a complaint" in await home.text()
    assert home.headers["Cache-Control"] == "no-store"
    value = client.session.cookie_jar.filter_cookies(client.make_url("/support/"))["tracker_console"].value
    out = await client.post("/support/logout", data={"csrf": await csrf_of(client)}, allow_redirects=False)
    assert out.status == 303 and out.headers["Location"] == "/support/login"
    # A copy of the cookie kept from before the sign-out no longer opens anything.
    client.session.cookie_jar.update_cookies({"tracker_console": value}, client.make_url("/support/"))
    assert (await client.get("/support/", allow_redirects=False)).status == 303


async def test_every_changing_post_needs_its_csrf_token(client):
    assert (await sign_in(client)).status == 303
    for data in ({}, {"csrf": "forged"}, {"csrf": ""}):
        resp = await client.post("/support/orphans/reconcile", data=data, allow_redirects=False)
        assert resp.status == 403 and (await resp.json())["error"] == "csrf"
        assert_hardened(resp)
        assert (await client.post("/support/logout", data=data, allow_redirects=False)).status == 403
    good = await client.post("/support/orphans/reconcile", data={"csrf": await csrf_of(client)}, allow_redirects=False)
    assert good.status == 303 and good.headers["Location"].startswith("/support/orphans?attached=")
    # The sign-in form too: without the sign-in page's token (and its cookie) a POST is refused.
    client.session.cookie_jar.clear()
    resp = await client.post("/support/login", data={"key": ADMIN_KEY}, allow_redirects=False)
    assert resp.status == 403


async def test_a_wrong_key_is_refused_and_logged_without_the_key(client):
    # The throttle that follows ten of them: test_admin_guard.py.
    with capture_logs() as logs:
        resp = await sign_in(client, key="guess-ABCDEF-0123")
    assert resp.status == 401 and (await resp.json())["error"] == "unauthorized"
    refused = [e for e in logs if e["event"] == "admin_key_refused"]
    assert refused and refused[0]["route"] == "console_login" and "guess-ABCDEF-0123" not in repr(logs)


async def test_secure_cookie_only_over_tls_or_a_trusted_proxy_saying_so(aiohttp_client, settings):
    from dataclasses import replace
    from ipaddress import ip_network

    proxied = await aiohttp_client(create_app(replace(settings, trusted_proxies=(ip_network("127.0.0.0/8"),))))
    https = {"X-Forwarded-Proto": "https"}
    page = await proxied.get("/support/login", headers=https)
    nonce = page.cookies["tracker_console_signin"]
    assert nonce["secure"] and nonce["httponly"] and nonce["samesite"] == "Strict"
    # The client's jar keeps a Secure cookie off plain HTTP; the proxy would have passed it on.
    resp = await proxied.post("/support/login", data={"csrf": CSRF.findall(await page.text())[0],
                                                      "key": ADMIN_KEY},
                              headers={**https, "Cookie": f"tracker_console_signin={nonce.value}"},
                              allow_redirects=False)
    assert resp.status == 303
    assert "Secure" in next(v for v in resp.headers.getall("Set-Cookie") if v.startswith("tracker_console="))
    plain = await aiohttp_client(create_app(settings))
    resp = await sign_in(plain, **{"X-Forwarded-Proto": "https"})  # nobody trusted says so
    assert "Secure" not in next(v for v in resp.headers.getall("Set-Cookie") if v.startswith("tracker_console="))


def test_session_cookies_are_signed_expire_and_die_with_a_new_admin_key():
    keys = ConsoleKeys("s" * 32, "admin-1", ttl=3600)
    cookie, session = keys.issue(1000.0)
    assert keys.read(cookie, 1000.0 + 3599) == session
    assert keys.read(cookie, 1000.0 + 3600) is None  # expired
    head, ident, expires, who, roles, mac = cookie.split(".")
    assert keys.read(f"{head}.{ident}.{int(expires) + 9999}.{who}.{roles}.{mac}", 1000.0) is None  # tampered expiry
    assert session.actor().name == "admin" and len(session.actor().scopes) == 5  # the admin key: every scope
    agent_cookie, agent_session = keys.issue(1000.0, "ann@example.com", ("support",))
    assert keys.read(agent_cookie, 1000.0) == agent_session and agent_session.actor().scopes == {"lookups:read"}
    head, ident, expires, who, roles, mac = agent_cookie.split(".")
    assert keys.read(f"{head}.{ident}.{expires}.{who}.admin.{mac}", 1000.0) is None  # a role added by hand
    assert ConsoleKeys("s" * 32, "admin-2", ttl=3600).read(cookie, 1000.0) is None  # admin key rotated
    assert ConsoleKeys("t" * 32, "admin-1", ttl=3600).read(cookie, 1000.0) is None  # secret rotated
    assert keys.csrf_ok(session.session_id, keys.csrf(session.session_id))
    assert not keys.csrf_ok(session.session_id, keys.csrf("another-session"))
    assert keys.read_nonce(cookie, 1000.0) is None  # a session is not a sign-in nonce, and back
    assert keys.read(keys.issue_nonce(1000.0)[0], 1000.0) is None


async def test_search_by_each_kind_of_id(client, tokens):
    assert (await sign_in(client)).status == 303
    cid = await activate(client, tokens, "search-user")
    assert (await client.get("/postback/admitad", params=admitad(cid, "8101234567"))).status == 200
    for q, where in ((cid, f"/support/clicks/{cid}"), ("search-user", "/support/users/search-user"),
                     ("8101234567", f"/support/clicks/{cid}"), (f"  {cid} ", f"/support/clicks/{cid}")):
        resp = await client.get("/support/", params={"q": q}, allow_redirects=False)
        assert resp.status == 303 and resp.headers["Location"] == where, q
    nothing = await client.get("/support/", params={"q": "<b>no such thing</b>"})
    text = await nothing.text()
    assert nothing.status == 200 and "Nothing found" in text and "&lt;b&gt;no such thing&lt;/b&gt;" in text
    for bad in ("x" * 300, "81\x0012"):  # too long; a NUL no id can hold (PostgreSQL could not even compare it)
        assert (await client.get("/support/", params={"q": bad})).status == 400
    for path in (f"/support/clicks/{cid}", "/support/users/search-user", "/support/orders?order_id=8101234567",
                 "/support/overview", "/support/orphans"):
        resp = await client.get(path)
        assert resp.status == 200, path
    assert (await client.get("/support/clicks/AAAAAAAAAAAAAAAAAAAAAA")).status == 404


def test_timeline_is_to_scale_with_a_break_for_what_comes_days_later():
    start = datetime(2026, 11, 26, 10, tzinfo=timezone.utc)
    story = [Moment(start + timedelta(seconds=s), "ours", str(s)) for s in (0, 600, 3600, 7200, 5 * 86400)]
    drawing = layout(story, start, 7200, None)
    xs = [cast(float, m["x"]) for m in drawing.markers]
    assert len(drawing.segments) == 2 and drawing.break_x is not None
    session = drawing.segments[0]
    assert abs((xs[1] - xs[0]) * 6 - (xs[2] - xs[0])) < 1  # 10 min vs 60 min: linear within the session
    assert abs(xs[3] - session.x1) < 0.1 and xs[4] > session.x1 + 10
    short = layout(story[:4], start, 7200, start + timedelta(seconds=600))
    assert len(short.segments) == 1 and [b[2] for b in short.bands] == ["band-session", "band-lost"]
    assert url_parts("https://x.example/?a=1&AWC=9&b=2", "awc=9") == [
        ("https://x.example/?a=1&", False), ("AWC=9", True), ("&b=2", False)]


async def test_the_click_page_shows_the_tabs_redirect_chain_landing_codes_and_checkout(client, tokens, db):
    assert (await sign_in(client)).status == 303
    resp = await client.get("/go/aliexpress", params={"u": tokens.mint("tab-user")}, allow_redirects=False,
                            headers={"User-Agent": "Mozilla/5.0 Chrome/130.0"})
    cid, location = resp.headers["X-Click-Id"], resp.headers["Location"]
    events = [{"type": "navigation", "url": location},
              {"type": "navigation", "url": "https://aliexpress.ru/item/1005001.html"},
              {"type": "navigation", "url": "https://aliexpress.ru/item/2.html"},  # browsing: not recorded
              *({"type": "promo_code", "code": "MEGA5"} for _ in range(12)),
              {"type": "checkout", "device": "dev-1", "basket_items_before_activation": 0}]
    resp = await client.post("/v1/observe", json={"click_id": cid, "events": events},
                             headers={"Authorization": f"Bearer {tokens.mint('tab-user')}"})
    assert resp.status == 200
    await stored(db, "SELECT detector FROM click_states WHERE click_id = $1", cid)  # the signal writer's flush
    text = await (await client.get(f"/support/clicks/{cid}")).text()
    assert "Redirect through ad.admitad.com" in text and "Landed on the store (aliexpress.ru)" in text
    assert "item/2.html" not in text and "Checkout" in text
    assert text.count(">Our promo code MEGA5 entered<") == 8  # each kind keeps its first few


async def test_odd_input_on_every_page_is_never_a_server_error(client):
    assert (await sign_in(client)).status == 303
    odd = ["", " ", "x" * 5000, "<script>", "٣", "a\x00b", "%00", "../../etc", "😀", "\u202e", "1e9", "-1",
           "FP7nipaOl86qYW93w2uKh-", "9" * 30]
    for value in odd:
        for path, params in (("/support/", {"q": value}), ("/support/orphans", {"before": value}),
                             ("/support/orders", {"order_id": value}), ("/support/orders", {"order_id": "1", "network": value}),
                             ("/support/users/u1", {"before": value})):
            resp = await client.get(path, params=params, allow_redirects=False)
            assert resp.status < 500, (path, value, resp.status)
        for path in (f"/support/users/{value}", f"/support/clicks/{value}"):
            resp = await client.get(path, allow_redirects=False)
            assert resp.status < 500, (path, resp.status)
    form = await client.post("/support/login", data=b"\xff\xfe=%%%", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status < 500


async def test_without_an_openid_issuer_the_console_signs_in_with_the_admin_key_alone(client):
    page = await client.get("/support/login")
    text = await page.text()
    assert 'name="key"' in text and "company account" not in text and "/support/auth/start" not in text
    for path in ("/support/auth/start", "/support/auth/callback?state=x&code=y"):
        resp = await client.get(path, allow_redirects=False)
        assert resp.status == 404 and (await resp.json())["error"] == "not_found"
