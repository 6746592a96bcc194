"""POST /v1/observe and the live stream, over HTTP with real PostgreSQL and Redis (standalone, and a
Redis Cluster)."""
import asyncio
from typing import Any

import orjson
import pytest

from tracker.app import create_app
from tracker.domain.clickid import new_click_id
from tracker.store.redis_keys import channel, session_key, state_key

from .conftest import ADMIN, BROWSER, one_minute, redis_client, redis_value, subscribers
from .waiting import stored, until

pytestmark = pytest.mark.clustered


async def activate(client, tokens, user, merchant="aliexpress", device="dev-1"):
    resp = await client.get(f"/go/{merchant}", params={"u": tokens.mint(user), "device": device},
                            allow_redirects=False, headers=BROWSER)
    assert resp.status == 302
    return resp.headers["X-Click-Id"], resp.headers["Location"]


def auth(tokens, user):
    return {"Authorization": f"Bearer {tokens.mint(user)}"}


async def subscribed(settings, cid):
    """Whether a live stream of the click listens on its Redis channel."""
    admin = redis_client(settings)
    try:
        return (await subscribers(admin, channel(settings.redis_prefix, cid)))[0] > 0
    finally:
        await admin.aclose()


async def observe(client, tokens, user, cid, events):
    return await client.post("/v1/observe", json={"click_id": cid, "events": events}, headers=auth(tokens, user))


def overwritten_by_another_admitad_publisher(body: dict[str, Any]) -> None:
    """An observe's answer: the click overwritten by another publisher's Admitad link."""
    assert body["state"] == "overwritten" and body["action"] == "reactivate"
    [signal] = body["signals"]
    assert (signal["kind"], signal["network"]) == ("foreign_affiliate_param", "admitad")
    assert signal["evidence"]["same_network"] is True


async def test_overwrite_is_detected_stored_and_explained(client, tokens, db, settings):
    cid, location = await activate(client, tokens, "o-user-1")
    chain = [{"type": "navigation", "url": location},
             {"type": "navigation", "url": "https://aliexpress.ru/item/1.html?admitad_uid=ours0000000000000001"}]
    resp = await observe(client, tokens, "o-user-1", cid, chain)
    assert resp.status == 200
    body = await resp.json()
    assert (body["click_id"], body["state"], body["action"], body["signals"]) == (cid, "active", "none", [])
    resp = await observe(client, tokens, "o-user-1", cid, [
        {"type": "navigation", "url": "https://aliexpress.ru/item/1.html?admitad_uid=theirs000000000000002"}])
    overwritten_by_another_admitad_publisher(await resp.json())
    # A later clean page does not undo it.
    resp = await observe(client, tokens, "o-user-1", cid, [{"type": "navigation", "url": "https://aliexpress.ru/"}])
    assert (await resp.json())["state"] == "overwritten"
    assert await stored(db, "SELECT kind FROM signals WHERE click_id = $1", cid) == "foreign_affiliate_param"
    await stored(db, "SELECT 1 FROM click_states WHERE click_id = $1 AND state = 'overwritten'", cid)
    view = await (await client.get(f"/v1/clicks/{cid}", headers=ADMIN)).json()
    assert view["state"] == "overwritten" and view["action"] == "reactivate"
    assert view["signals"][0]["kind"] == "foreign_affiliate_param"
    text = view["diagnosis"][0]["text"]
    assert view["diagnosis"][0]["code"] == "overwritten" and text.startswith("Admitad link of another publisher")
    metrics = await (await client.get("/metrics")).text()
    assert 'tracker_signals_total{kind="foreign_affiliate_param",merchant="aliexpress",network="admitad"}' in metrics


async def test_the_detector_state_outlives_redis_losing_the_click(client, tokens, db, settings):
    """Redis loses the click (its session and state gone: evicted, flushed, a new Redis): the next
    observe reads the detector state PostgreSQL keeps (click_states.detector), so the value bound as
    ours still tells another publisher's apart, and the state stored next keeps it."""
    cid, location = await activate(client, tokens, "o-user-lost")
    ours = "ours0000000000000003"
    resp = await observe(client, tokens, "o-user-lost", cid, [
        {"type": "navigation", "url": location},
        {"type": "navigation", "url": f"https://aliexpress.ru/item/1.html?admitad_uid={ours}"}])
    assert (await resp.json())["state"] == "active"
    bound = "SELECT detector->'bound'->>'admitad:admitad_uid' FROM click_states WHERE click_id = $1"
    assert await stored(db, bound, cid) == ours
    admin = redis_client(settings)
    try:
        keys = [session_key(settings.redis_prefix, cid), state_key(settings.redis_prefix, cid)]
        await redis_value(admin, keys[0])  # the session's batched write done: nothing recreates it
        assert await admin.delete(*keys) == 2
    finally:
        await admin.aclose()
    resp = await observe(client, tokens, "o-user-lost", cid, [
        {"type": "navigation", "url": "https://aliexpress.ru/item/1.html?admitad_uid=theirs000000000000004"}])
    overwritten_by_another_admitad_publisher(await resp.json())
    await stored(db, "SELECT 1 FROM click_states WHERE click_id = $1 AND state = 'overwritten'", cid)
    assert await db.fetchval(bound, cid) == ours


async def test_a_conversion_outlives_redis_losing_the_click(client, tokens, db, settings):
    """A postback writes `converted` to the row of click_states alone (its detector JSON stays as
    the last observe saved it, `active`): with Redis's copy gone, observe still answers converted."""
    cid, location = await activate(client, tokens, "o-user-lost-2")
    await observe(client, tokens, "o-user-lost-2", cid, [{"type": "navigation", "url": location}])
    await stored(db, "SELECT 1 FROM click_states WHERE click_id = $1 AND detector->>'state' = 'active'", cid)
    resp = await client.get("/postback/admitad", params={
        "token": "test-admitad-token", "subid": cid, "order_id": "OBS-LOST-2", "status": "pending",
        "payment_sum": "5", "currency": "RUB"})
    assert resp.status == 200
    assert await db.fetchval("SELECT detector->>'state' FROM click_states WHERE click_id = $1 "
                             "AND state = 'converted'", cid) == "active"
    admin = redis_client(settings)
    try:
        keys = [session_key(settings.redis_prefix, cid), state_key(settings.redis_prefix, cid)]
        await redis_value(admin, keys[0])
        await admin.delete(*keys)
    finally:
        await admin.aclose()
    body = await (await observe(client, tokens, "o-user-lost-2", cid, [{"type": "promo_code", "code": "X1"}])).json()
    assert (body["state"], body["action"]) == ("converted", "none")
    assert body["signals"][0]["late"] is True


async def test_promo_code_and_converted_then_late(client, tokens, db):
    cid, location = await activate(client, tokens, "o-user-2")
    body = await (await observe(client, tokens, "o-user-2", cid, [
        {"type": "navigation", "url": location}, {"type": "promo_code", "code": "Mega5 "}])).json()
    assert body["state"] == "active" and body["signals"] == []
    await client.get("/postback/admitad", params={
        "token": "test-admitad-token", "subid": cid, "order_id": "OBS-1", "status": "pending",
        "payment_sum": "5", "currency": "RUB"})
    async def converted() -> dict[str, Any] | None:
        body = await (await observe(client, tokens, "o-user-2", cid, [
            {"type": "promo_code", "code": "SAVE10"}])).json()
        return body if body["state"] == "converted" else None
    body = await until(converted, "observe answering converted after the postback")
    assert body["action"] == "none"
    assert body["signals"][0]["kind"] == "foreign_promo_code" and body["signals"][0]["late"] is True


async def test_only_the_clicks_own_user_may_observe(client, tokens):
    cid, _ = await activate(client, tokens, "o-user-3")
    resp = await client.post("/v1/observe", json={"click_id": cid, "events": []})
    assert resp.status == 401
    resp = await client.post("/v1/observe", json={"click_id": cid, "events": []},
                             headers={"Authorization": "Bearer o-user-3.forgedforgedforgedforge"})
    assert resp.status == 401
    resp = await observe(client, tokens, "someone-else", cid, [])
    assert resp.status == 404 and (await resp.json())["error"] == "not_found"
    resp = await observe(client, tokens, "o-user-3", new_click_id()[0], [])
    assert resp.status == 404
    resp = await observe(client, tokens, "o-user-3", "garbage", [])
    assert resp.status == 404


async def test_bounded_and_malformed_bodies(client, tokens):
    cid, _ = await activate(client, tokens, "o-user-4")
    headers = {**auth(tokens, "o-user-4"), "Content-Type": "application/json"}
    big = orjson.dumps({"click_id": cid, "events": [{"type": "navigation", "url": "https://a.ru/" + "x" * 70_000}]})
    assert (await client.post("/v1/observe", data=big, headers=headers)).status == 413
    many = {"click_id": cid, "events": [{"type": "navigation", "url": "https://aliexpress.ru/"}] * 101}
    resp = await client.post("/v1/observe", json=many, headers=headers)
    assert resp.status == 400 and (await resp.json())["error"] == "too_many_events"
    for raw in (b"{", b"[]", b'{"click_id": 5, "events": []}', b'{"click_id": "x", "events": {}}',
                b'{"click_id": "x", "events": [1, 2]}', b"\xff\xfe"):
        resp = await client.post("/v1/observe", data=raw, headers=headers)
        assert resp.status == 400, raw
    resp = await observe(client, tokens, "o-user-4", cid, [{"type": "teleport"}])
    assert resp.status == 400 and (await resp.json())["error"] == "bad_event"
    hostile = [{"type": "navigation", "url": u} for u in
               ("javascript:alert(1)", "http://[::1", "", "https://%zz", "https://" + "a" * 5000, "\x00\x01")]
    resp = await observe(client, tokens, "o-user-4", cid, hostile + [{"type": "navigation", "url": 42, "at": "junk"}])
    assert resp.status == 200 and (await resp.json())["state"] == "active"


async def read_events(resp, count, timeout=10):
    events: list[tuple[str, Any]] = []
    buf = b""
    async def pump():
        nonlocal buf
        while len(events) < count:
            chunk = await resp.content.readany()
            if not chunk:
                return
            buf += chunk
            while b"\n\n" in buf:
                block, buf = buf.split(b"\n\n", 1)
                lines = dict(line.split(b": ", 1) for line in block.split(b"\n") if b": " in line and not line.startswith(b":"))
                if b"event" in lines:
                    events.append((lines[b"event"].decode(), orjson.loads(lines[b"data"])))
    await asyncio.wait_for(pump(), timeout)
    return events


async def test_event_stream_delivers_a_change_made_through_another_worker(aiohttp_client, settings, tokens):
    worker_a = await aiohttp_client(create_app(settings))
    worker_b = await aiohttp_client(create_app(settings))
    cid, location = await activate(worker_a, tokens, "o-user-5")
    assert (await worker_a.get(f"/v1/clicks/{cid}/events")).status == 401
    assert (await worker_a.get(f"/v1/clicks/{cid}/events", params={"u": tokens.mint("other")})).status == 404
    stream = await worker_a.get(f"/v1/clicks/{cid}/events", params={"u": tokens.mint("o-user-5"), "heartbeat": "0.5"})
    assert stream.status == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
    [first] = await read_events(stream, 1)
    assert first == ("state", {"click_id": cid, "state": "active", "action": "none"})
    await until(lambda: subscribed(settings, cid), "the stream's channel subscribed")
    await observe(worker_b, tokens, "o-user-5", cid, [
        {"type": "navigation", "url": location},
        {"type": "navigation", "url": "https://aliexpress.ru/"},
        {"type": "navigation", "url": "https://aliexpress.ru/?cjevent=abc1234567890"}])
    [change] = await read_events(stream, 1)
    assert change == ("state", {"click_id": cid, "state": "overwritten", "action": "reactivate"})
    stream.close()


async def test_observe_rate_limit_per_address(aiohttp_client, settings, tokens):
    import dataclasses

    client = await aiohttp_client(create_app(dataclasses.replace(settings, rate_limit_ip=3)))
    one_minute(client.server.app)
    cid, _ = await activate(client, tokens, "o-user-6")  # the activation counts too
    statuses = [(await observe(client, tokens, "o-user-6", cid, [])).status for _ in range(3)]
    assert statuses == [200, 200, 429]


async def test_a_landing_url_with_hundreds_of_parameters_is_handled(client, tokens):
    cid, location = await activate(client, tokens, "o-user-7")
    resp = await observe(client, tokens, "o-user-7", cid, [
        {"type": "navigation", "url": location},
        {"type": "navigation", "url": "https://aliexpress.ru/?" + "a=1&" * 600},
        {"type": "navigation", "url": "https://aliexpress.ru/store/1102345?" + "b=2&" * 600}])
    assert resp.status == 200
    assert [s["kind"] for s in (await resp.json())["signals"]] == ["excluded_store"]


async def test_event_stream_clamps_a_heartbeat_and_refuses_one_that_is_not_a_number(client, tokens):
    cid, _ = await activate(client, tokens, "o-user-8")
    for heartbeat in ("-5", "1e9"):
        stream = await client.get(f"/v1/clicks/{cid}/events", params={"u": tokens.mint("o-user-8"),
                                                                      "heartbeat": heartbeat})
        assert stream.status == 200
        [first] = await read_events(stream, 1)
        assert first[1]["state"] == "active"
        stream.close()
    for heartbeat in ("nan", "inf", "abc"):
        resp = await client.get(f"/v1/clicks/{cid}/events", params={"u": tokens.mint("o-user-8"),
                                                                    "heartbeat": heartbeat})
        assert resp.status == 400 and (await resp.json())["error"] == "malformed"


async def test_a_nul_in_a_promo_code_is_refused_and_stops_nobody(client, tokens, db):
    attacker, _ = await activate(client, tokens, "nul-attacker")
    resp = await observe(client, tokens, "nul-attacker", attacker, [{"type": "promo_code", "code": "X\u0000Y"}])
    assert resp.status == 400 and (await resp.json())["error"] == "bad_event"
    for field, event in (("device", {"type": "checkout", "device": "d\u0000"}),
                         ("store_id", {"type": "checkout", "store_id": "1\u001b2"}),
                         ("code", {"type": "promo_code", "code": "SAVE\u000710"})):
        resp = await observe(client, tokens, "nul-attacker", attacker, [event])
        assert resp.status == 400 and field in (await resp.json())["message"]
    # Another shopper's overwrite is still stored, signal and state.
    victim, _ = await activate(client, tokens, "nul-victim")
    resp = await observe(client, tokens, "nul-victim", victim, [{"type": "promo_code", "code": "COUPONSITE"}])
    assert (await resp.json())["state"] == "overwritten"
    assert await stored(db, "SELECT kind FROM signals WHERE click_id = $1", victim) == "foreign_promo_code"
    assert await stored(db, "SELECT state FROM click_states WHERE click_id = $1", victim) == "overwritten"
    assert await db.fetchval("SELECT count(*) FROM signals WHERE click_id = $1", attacker) == 0


async def test_control_characters_decoded_from_a_url_are_kept_as_evidence_without_them(client, tokens, db):
    cid, location = await activate(client, tokens, "nul-user-2")
    resp = await observe(client, tokens, "nul-user-2", cid, [
        {"type": "navigation", "url": location},
        {"type": "navigation", "url": "https://aliexpress.ru/item/1.html?admitad_uid=ours%00%01"},
        {"type": "navigation", "url": "https://aliexpress.ru/?cjevent=th%00eirs&ulp=https%3A%2F%2Fx.com%2F%00"}])
    assert resp.status == 200
    body = await resp.json()
    assert body["state"] == "overwritten"
    [signal] = [s for s in body["signals"] if s["network"] == "cj"]
    assert signal["evidence"]["value"] == "th\ufffdeirs"
    evidence = await stored(db, "SELECT evidence::text FROM signals WHERE click_id = $1 AND network = 'cj'", cid)
    assert evidence is not None and "\\u0000" not in evidence
    detector = await stored(db, "SELECT detector::text FROM click_states WHERE click_id = $1", cid)
    assert detector is not None and "ours\ufffd\ufffd" in detector
    # A URL with raw control characters is garbled: it cannot be searched, so it is a risk, not clean.
    resp = await observe(client, tokens, "nul-user-2", cid, [
        {"type": "navigation", "url": "https://aliexpress.ru/?awc=1\u0000"}])
    assert resp.status == 200
    [unreadable] = (await resp.json())["signals"]
    assert unreadable["kind"] == "unreadable_url" and unreadable["evidence"]["url"] == "https://aliexpress.ru/?awc=1\ufffd"


async def test_deeply_nested_values_are_a_400(client, tokens):
    cid, _ = await activate(client, tokens, "deep-user")
    for depth in (20, 990, 1100):
        body = b'{"click_id": "%s", "events": [{"type": %s}]}' % (cid.encode(), b"[" * depth + b"]" * depth)
        resp = await client.post("/v1/observe", data=body, headers={**auth(tokens, "deep-user"),
                                                                     "Content-Type": "application/json"})
        assert resp.status == 400 and (await resp.json())["error"] == "malformed", depth
    for kind in (["navigation"], {"a": 1}, 7, None, "nav\u0000"):
        resp = await observe(client, tokens, "deep-user", cid, [{"type": kind, "url": "https://aliexpress.ru/"}])
        assert resp.status == 400 and (await resp.json())["error"] == "bad_event", kind
