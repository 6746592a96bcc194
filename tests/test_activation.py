import asyncio
import dataclasses
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest

from tracker import keys
from tracker.app import create_app
from tracker.domain.clickid import click_time_ms, is_click_id
from tracker.store.redis_keys import session_key

from .conftest import BROWSER, one_minute, redis_client, redis_value
from .waiting import until

# Also behind PgBouncer in transaction mode (conftest.py)
pytestmark = [pytest.mark.pooled, pytest.mark.clustered]


async def rows_for(db, user):
    return await db.fetch("SELECT * FROM clicks WHERE user_id = $1 ORDER BY click_id", user)


async def test_redirects_to_partner_url_with_click_id_and_commits_first(client, tokens, db):
    resp = await client.get("/go/aliexpress", allow_redirects=False, headers=BROWSER, params={
        "u": tokens.mint("alice"), "to": "https://aliexpress.ru/item/1005001.html?sku=2", "device": "d-1"})
    assert resp.status == 302
    assert resp.headers["Cache-Control"] == "no-store"
    cid = resp.headers["X-Click-Id"]
    assert is_click_id(cid)
    location = urlsplit(resp.headers["Location"])
    assert (location.scheme, location.netloc, location.path) == ("https", "ad.admitad.com", "/g/1e8d114494/")
    query = parse_qs(location.query)
    assert query["subid"] == [cid]
    assert query["ulp"] == ["https://aliexpress.ru/item/1005001.html?sku=2"]
    # commit mode: the row is there the moment the 302 is.
    rows = await rows_for(db, "alice")
    assert len(rows) == 1
    row = rows[0]
    assert (row["click_id"], row["merchant"], row["source"], row["device"], row["bot"]) == (
        cid, "aliexpress", "web", "d-1", False)
    assert int(row["created_at"].timestamp() * 1000) == click_time_ms(cid)
    assert row["client_ip"] == "127.0.0.1"


async def test_default_target_and_app_source(client, tokens, db):
    resp = await client.get("/go/aliexpress", params={"u": tokens.mint("bob"), "src": "app"},
                            allow_redirects=False, headers=BROWSER)
    assert resp.status == 302
    location = resp.headers["Location"]
    assert location.startswith("aliexpress://redirect?subid=" + resp.headers["X-Click-Id"])
    assert "url=https%3A%2F%2Faliexpress.ru%2F" in location
    resp = await client.get("/go/nike", params={"u": tokens.mint("bob"), "src": "app"},
                            allow_redirects=False, headers=BROWSER)
    assert resp.headers["Location"].startswith("https://nike.sjv.io/")  # no app_url: partner URL
    assert [r["source"] for r in await rows_for(db, "bob")] == ["app", "app"]


@pytest.mark.parametrize("params,status,code", [
    ({}, 401, "unauthorized"),
    ({"u": "carol.AAAAAAAAAAAAAAAAAAAAAA"}, 401, "unauthorized"),
    ({"u": "x" * 5000}, 401, "unauthorized"),
    ({"src": "tv"}, 400, "bad_source"),
    ({"to": "https://evil.com/"}, 400, "bad_target"),
    ({"to": "//evil.com"}, 400, "bad_target"),
    ({"to": "https://aliexpress.ru@evil.com/"}, 400, "bad_target"),
    ({"to": "javascript:alert(1)"}, 400, "bad_target"),
    ({"to": "https://aliexpress.ru/" + "a" * 3000}, 400, "bad_target"),
    ({"device": "x" * 500}, 400, "bad_device"),
    ({"device": "bad\ndevice"}, 400, "bad_device"),
])
async def test_refusals_store_nothing(client, tokens, db, params, status, code):
    query = {"u": tokens.mint("carol"), **params} if "u" not in params and status != 401 else params
    resp = await client.get("/go/aliexpress", params=query, allow_redirects=False, headers=BROWSER)
    assert resp.status == status
    body = await resp.json()
    assert body["error"] == code and body["message"]
    assert await rows_for(db, "carol") == []


async def test_unknown_merchant_and_duplicate_parameters(client, tokens, db):
    resp = await client.get("/go/nosuchshop", params={"u": tokens.mint("dave")}, allow_redirects=False)
    assert resp.status == 404 and (await resp.json())["error"] == "not_found"
    token = tokens.mint("dave")
    resp = await client.get(f"/go/aliexpress?u={token}&to=https://aliexpress.ru/&to=https://evil.com/",
                            allow_redirects=False)
    assert resp.status == 400
    assert await rows_for(db, "dave") == []


async def test_bots_and_head_get_the_redirect_flagged_and_no_session(client, tokens, db, settings):
    token = tokens.mint("erin")
    head = await client.head("/go/aliexpress", params={"u": token}, allow_redirects=False, headers=BROWSER)
    bot = await client.get("/go/aliexpress", params={"u": token}, allow_redirects=False,
                           headers={"User-Agent": "TelegramBot (like TwitterBot)"})
    human = await client.get("/go/aliexpress", params={"u": token}, allow_redirects=False, headers=BROWSER)
    assert head.status == bot.status == human.status == 302
    rows = {r["click_id"]: r for r in await rows_for(db, "erin")}
    assert rows[head.headers["X-Click-Id"]]["bot"] and rows[head.headers["X-Click-Id"]]["method"] == "HEAD"
    assert rows[bot.headers["X-Click-Id"]]["bot"]
    assert not rows[human.headers["X-Click-Id"]]["bot"]
    r = redis_client(settings)
    try:
        session = orjson.loads(await redis_value(r, session_key(settings.redis_prefix, human.headers["X-Click-Id"])))
        assert session["u"] == "erin" and session["m"] == "aliexpress"
        ttl = await r.ttl(session_key(settings.redis_prefix, human.headers["X-Click-Id"]))
        assert 7000 < ttl <= 7200  # the merchant's session_ttl (2h)
        assert await r.get(session_key(settings.redis_prefix, bot.headers["X-Click-Id"])) is None
    finally:
        await r.aclose()


async def test_400_concurrent_activations(client, tokens, db):
    token = tokens.mint("frank")
    resps = await asyncio.gather(*(client.get("/go/nike", params={"u": token}, allow_redirects=False,
                                              headers=BROWSER) for _ in range(400)))
    assert [r.status for r in resps] == [302] * 400
    ids = {r.headers["X-Click-Id"] for r in resps}
    assert len(ids) == 400
    rows = await rows_for(db, "frank")
    assert {r["click_id"] for r in rows} == ids


async def test_rate_limits_per_user_and_per_ip(aiohttp_client, settings, tokens, db):
    app = create_app(dataclasses.replace(settings, rate_limit_user=3, rate_limit_ip=5))
    client = await aiohttp_client(app)
    one_minute(app)
    limits = app[keys.SESSIONS].limits

    async def synced() -> None:
        # A shopper's clicks are seconds apart: each one's hit has reached Redis before the next.
        # (Back to back, a hit still in flight counts against the limit at its edge, and a request
        # under the limit may be told to retry in a second: ratelimit.py, the early refusal.)
        await until(lambda: all(st.blind == 0 for st in limits.counts.values()), "the hits counted in Redis")

    statuses = []
    for _ in range(4):
        resp = await client.get("/go/asos", params={"u": tokens.mint("gina")}, allow_redirects=False,
                                headers=BROWSER)
        statuses.append(resp.status)
        await synced()
    assert statuses == [302, 302, 302, 429]
    assert 1 <= int(resp.headers["Retry-After"]) <= 61
    assert (await resp.json())["error"] == "rate_limited"
    assert len(await rows_for(db, "gina")) == 3
    # Other users from the same address: the address limit (5 admitted per minute) is reached next;
    # gina's refused request spent none of it (ratelimit.py: one call decides every key at its edge).
    more = []
    for i in range(3):
        more.append(await client.get("/go/asos", params={"u": tokens.mint(f"h{i}")}, allow_redirects=False,
                                     headers=BROWSER))
        await synced()
    assert [r.status for r in more] == [302, 302, 429]
    assert len(await rows_for(db, "h2")) == 0


async def test_async_durability_does_not_wait_but_stores(aiohttp_client, settings, tokens, db):
    client = await aiohttp_client(create_app(dataclasses.replace(settings, durability="async")))
    resps = [await client.get("/go/shop", params={"u": tokens.mint("ivan")}, allow_redirects=False,
                              headers=BROWSER) for _ in range(20)]
    assert all(r.status == 302 for r in resps)
    async def stored() -> bool:
        return len(await rows_for(db, "ivan")) == 20
    await until(stored, "ivan's 20 clicks stored")


async def test_forwarded_for_is_believed_only_from_trusted_proxies(aiohttp_client, settings, tokens, db):
    import ipaddress

    trusted = dataclasses.replace(settings, trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),))
    client = await aiohttp_client(create_app(trusted))
    await client.get("/go/shop", params={"u": tokens.mint("judy")}, allow_redirects=False,
                     headers={**BROWSER, "X-Forwarded-For": "198.51.100.7, 10.0.0.1, 127.0.0.1"})
    await client.get("/go/shop", params={"u": tokens.mint("judy")}, allow_redirects=False,
                     headers={**BROWSER, "X-Forwarded-For": "garbage"})
    rows = await rows_for(db, "judy")
    assert sorted(r["client_ip"] for r in rows) == ["10.0.0.1", "127.0.0.1"]


async def test_rate_limit_is_shared_between_workers_through_redis(aiohttp_client, settings, tokens):
    limited = dataclasses.replace(settings, rate_limit_user=4, rate_limit_ip=0)
    first = await aiohttp_client(create_app(limited))
    second = await aiohttp_client(create_app(limited))
    token = tokens.mint("shared-limit")
    one_minute(first.server.app, second.server.app)

    def knows(client, total: int) -> bool:  # noqa: ANN001
        """The worker's last answer from Redis counted `total` hits of the user (its sync ran)."""
        return any(st.counted >= total for name, st in client.server.app[keys.SESSIONS].limits.counts.items()
                   if name.startswith("user:"))

    for _ in range(3):
        resp = await first.get("/go/asos", params={"u": token}, allow_redirects=False, headers=BROWSER)
        assert resp.status == 302
    await until(lambda: knows(first, 3), "the first worker's three hits counted in Redis")
    statuses = []
    resp = await second.get("/go/asos", params={"u": token}, allow_redirects=False, headers=BROWSER)
    statuses.append(resp.status)
    # The second worker had no traffic, hence nothing to sync, before its first request: that request
    # starts its sync, whose answer gives it every worker's total for its next decision.
    await until(lambda: knows(second, 4), "the second worker told of all four hits")
    resp = await second.get("/go/asos", params={"u": token}, allow_redirects=False, headers=BROWSER)
    statuses.append(resp.status)
    assert statuses == [302, 429]


@pytest.mark.parametrize("query", [
    "u=%ff%fe&to=%ff", "u={token}&to=%ff%fe", "u={token}&to=https%3A%2F%2Faliexpress.ru%2F%ff",
    "u={token}&src=%00", "u={token}&device=%00", "u={token}&to=" + "%41" * 5000,
    "u={token}&to=https://aliexpress.ru/\u0000", "u=\u202e{token}", "u={token}&to=https://xn--80ak6aa92e.com/",
    "u={token}&to=https://aliexpress.ru/%2e%2e/%2e%2e/", "u={token}&&&&===&to", "u[]={token}",
    "u={token}&to=http://aliexpress.ru:0/", "u={token}&to=https://aliexpress.ru:/x",
])
async def test_hostile_queries_never_answer_5xx(client, tokens, db, query):
    token = tokens.mint("hostile")
    resp = await client.get("/go/aliexpress?" + query.replace("{token}", token), allow_redirects=False,
                            headers=BROWSER)
    assert resp.status in (302, 400, 401), await resp.text()
    if resp.status == 302:
        location = resp.headers["Location"]
        assert location.startswith("https://ad.admitad.com/g/1e8d114494/?subid=")
    else:
        assert (await resp.json())["error"]


async def test_oversized_request_line_is_refused_without_5xx(client, tokens):
    resp = await client.get("/go/aliexpress?u=" + tokens.mint("big") + "&to=" + "a" * 20000, allow_redirects=False)
    assert 400 <= resp.status < 500


async def test_the_direct_go_path_answers_as_the_routed_one(aiohttp_client, settings, tokens, db):
    """/go/<slug> skips aiohttp's router and middleware (create_app's direct_go): every kind of
    request gets the same status, error code and headers both ways."""
    direct = await aiohttp_client(create_app(settings))
    routed = await aiohttp_client(create_app(settings, direct_go=False))
    assert direct.app._handle.__qualname__.startswith("_route_go_directly")  # the server calls this one
    token = tokens.mint("direct-user")
    cases = [
        ("GET", "/go/nike", {"u": token}), ("HEAD", "/go/nike", {"u": token}),
        ("GET", "/go/n%69ke", {"u": token}), ("GET", "/go/nike", {"u": token, "src": "tv"}),
        ("GET", "/go/nike", {"u": token, "to": "https://evil.example/"}), ("GET", "/go/nike", {}),
        ("GET", "/go/nike", {"u": token + "x"}), ("GET", "/go/unknown-shop", {"u": token}),
        ("GET", "/go/nike/", {"u": token}), ("GET", "/go/", {"u": token}), ("POST", "/go/nike", {"u": token}),
        ("GET", "/go/nike", {"u": token, "device": "d\x01"}),
    ]
    for method, path, params in cases:
        answers = []
        for client in (direct, routed):
            resp = await client.request(method, path, params=params, allow_redirects=False, headers=BROWSER)
            body = await resp.read()
            code = orjson.loads(body).get("error") if body and resp.content_type == "application/json" else None
            answers.append((resp.status, code, resp.headers.get("Allow"), resp.headers.get("Cache-Control"),
                            "X-Click-Id" in resp.headers))
        assert answers[0] == answers[1], (method, path, params, answers)


async def test_a_user_agent_that_is_not_utf8_is_stored_not_quarantined(client, tokens, db):
    """A header's bytes that are not UTF-8 reach the handler as lone surrogates, which PostgreSQL
    cannot store: the click must still land in `clicks`, with the bytes replaced."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    token = tokens.mint("ua-bytes-user")
    writer.write(b"GET /go/aliexpress?u=" + token.encode() + b" HTTP/1.1\r\nHost: t\r\n"
                 b"User-Agent: Mozilla/5.0 \xff\xed\xa0\x80 Chrome/130\r\nConnection: close\r\n\r\n")
    await writer.drain()
    head = (await reader.read()).split(b"\r\n\r\n")[0].decode()
    writer.close()
    assert head.startswith("HTTP/1.1 302"), head
    [click_id] = [line.split(": ", 1)[1] for line in head.split("\r\n") if line.lower().startswith("x-click-id")]
    ua = await db.fetchval("SELECT user_agent FROM clicks WHERE click_id = $1", click_id)
    assert ua == "Mozilla/5.0 \ufffd\ufffd\ufffd\ufffd Chrome/130"
    assert await db.fetchval("SELECT count(*) FROM clicks_quarantine WHERE click_id = $1", click_id) == 0
