import asyncio
import hashlib
import hmac
import json
from datetime import datetime, timezone
from decimal import Decimal

import orjson
import pytest

from tracker.domain.clickid import click_time, new_click_id
from tracker.domain.conversions import MalformedPostback, cashback, parse_money, read_postback, transition
from tracker.domain.profiles import profiles
from tracker.store.redis_keys import state_key

from .conftest import ADMIN, BROWSER, cli, redis_client, redis_value

# Also behind PgBouncer in transaction mode (conftest.py)
pytestmark = [pytest.mark.pooled, pytest.mark.clustered]

ADMITAD = "test-admitad-token"
IMPACT_SECRET = b"test-impact-hmac-secret"


async def activate(client, tokens, user="buyer", merchant="aliexpress"):
    resp = await client.get(f"/go/{merchant}", params={"u": tokens.mint(user)}, allow_redirects=False,
                            headers=BROWSER)
    assert resp.status == 302
    return resp.headers["X-Click-Id"]


def admitad(cid, order, status="pending", payment="10.00", order_sum="100.00", **extra):
    return {"token": ADMITAD, "subid": cid, "order_id": order, "status": status, "payment_sum": payment,
            "order_sum": order_sum, "currency": "RUB", "time": "1795660800", **extra}


async def conversion(db, network, order):
    return await db.fetchrow("SELECT * FROM conversions WHERE network = $1 AND order_id = $2", network, order)


async def history(db, network, order):
    return await db.fetch("SELECT * FROM postback_history WHERE network = $1 AND order_id = $2 ORDER BY id",
                          network, order)


# -- pure rules --------------------------------------------------------------------------------
@pytest.mark.parametrize("commission,share,currency,status,expected", [
    ("0.01", "0.5", "RUB", "approved", "0.01"),        # 0.005 rounds half-up
    ("0.009", "0.5", "RUB", "approved", "0.00"),       # 0.0045 rounds down
    ("100", "0.333333", "USD", "pending", "33.33"),
    ("999999999999.99", "1", "USD", "approved", "999999999999.99"),
    ("1005", "0.5", "JPY", "approved", "503"),         # no minor unit: 502.5 -> 503
    ("1.0005", "1", "KWD", "approved", "1.001"),       # three-digit minor unit
    ("10", "0.5", "RUB", "declined", "0.00"),
    ("10", "0.5", "RUB", "reversed", "0.00"),
    ("0", "0.5", "CNY", "approved", "0.00"),
])
def test_cashback_is_decimal_half_up(commission, share, currency, status, expected):
    assert str(cashback(Decimal(commission), Decimal(share), currency, status)) == expected


@pytest.mark.parametrize("current,new,move", [
    ("pending", "approved", "forward"), ("pending", "declined", "forward"), ("approved", "reversed", "forward"),
    ("pending", "pending", "same"), ("approved", "pending", "ignored"), ("declined", "approved", "ignored"),
    ("reversed", "approved", "ignored"), ("approved", "declined", "ignored"), ("pending", "reversed", "ignored"),
    ("declined", "pending", "ignored"),
])
def test_status_machine(current, new, move):
    assert transition(current, new) == move


@pytest.mark.parametrize("raw", ["abc", "-1", "NaN", "Infinity", "1e5", "1,5", "", "1" * 14, "0x10",
                                 "10.123456789"])
def test_bad_money(raw):
    with pytest.raises(MalformedPostback):
        parse_money(raw, "commission")


def test_profiles_read_real_payloads():
    p = profiles()
    pb = read_postback({"subid": "X", "order_id": "A-1", "payment_sum": "12.5", "order_sum": "250",
                        "currency": "rub", "status": "approved", "time": "1795660800"}, p["admitad"])
    assert (pb.order_id, pb.status, pb.commission, pb.amount, pb.currency) == (
        "A-1", "approved", Decimal("12.5"), Decimal("250"), "RUB")
    assert pb.order_time == datetime.fromtimestamp(1795660800, tz=timezone.utc)
    pb = read_postback({"click_id": "X", "order_number": "E-9", "order_status": "waiting",
                        "revenue": "30.00", "commission_fee": "1.20", "currency": "USD"}, p["epn"])
    assert (pb.status, pb.status_word, pb.commission) == ("pending", "waiting", Decimal("1.20"))
    pb = read_postback({"subid1": "X", "actionid": "1000.5821.3", "status": "REVERSED", "payout": "4.10",
                        "amount": "41.00", "currency": "EUR", "eventdate": "2026-11-20T10:00:00-05:00"},
                       p["impact"])
    assert pb.status == "reversed" and pb.order_time is not None and pb.order_time.utcoffset() is not None
    pb = read_postback({"clickref": "X", "transactionid": "777", "status": "declined", "commission": "3",
                        "amount": "30", "currency": "GBP"}, p["awin"])
    assert pb.status == "declined"


# -- the endpoint -------------------------------------------------------------------------------
async def test_admitad_postback_creates_a_conversion_and_is_idempotent(client, tokens, db, settings):
    cid = await activate(client, tokens, "p-user-1")
    resp = await client.get("/postback/admitad", params=admitad(cid, "ORD-1"))
    assert resp.status == 200 and await resp.text() == "OK"
    conv = await conversion(db, "admitad", "ORD-1")
    assert (conv["click_id"], conv["user_id"], conv["merchant"], conv["status"]) == (
        cid, "p-user-1", "aliexpress", "pending")
    assert conv["commission"] == Decimal("10") and conv["cashback"] == Decimal("5")
    assert conv["order_time"] == datetime.fromtimestamp(1795660800, tz=timezone.utc)
    resp = await client.get("/postback/admitad", params=admitad(cid, "ORD-1"))
    assert resp.status == 200
    rows = await history(db, "admitad", "ORD-1")
    assert [r["outcome"] for r in rows] == ["accepted", "duplicate"]
    assert "token" not in rows[0]["raw"]  # secrets are not stored
    assert rows[0]["raw"]["order_id"] == "ORD-1"
    assert await db.fetchval("SELECT count(*) FROM conversions WHERE order_id = 'ORD-1'") == 1
    assert await db.fetchval("SELECT state FROM click_states WHERE click_id = $1", cid) == "converted"
    r = redis_client(settings)
    try:
        assert orjson.loads(await redis_value(r, state_key(settings.redis_prefix, cid)))["state"] == "converted"
    finally:
        await r.aclose()
    view = await (await client.get(f"/v1/clicks/{cid}", headers=ADMIN)).json()
    assert view["state"] == "converted"
    [c] = view["conversions"]
    assert (c["network"], c["order_id"], c["status"], c["amount"], c["commission"], c["currency"],
            c["cashback"]) == ("admitad", "ORD-1", "pending", "100.00", "10.00", "RUB", "5.00")
    assert [h["outcome"] for h in c["history"]] == ["accepted", "duplicate"]
    assert any(d["code"] == "order_pending" for d in view["diagnosis"])


async def test_status_paths_forward_only(client, tokens, db):
    cid = await activate(client, tokens, "p-user-2")
    steps = [("pending", "10.00", "pending"), ("approved", "12.00", "approved"),  # corrected amount
             ("pending", "12.00", "approved"),    # late pending: history only
             ("declined", "12.00", "approved"),   # approved cannot be declined
             ("reversed", "12.00", "reversed"), ("approved", "12.00", "reversed")]
    for status, payment, expected in steps:
        resp = await client.get("/postback/admitad", params=admitad(cid, "ORD-2", status, payment))
        assert resp.status == 200
        conv = await conversion(db, "admitad", "ORD-2")
        assert conv["status"] == expected, (status, conv["status"])
    assert conv["commission"] == Decimal("12") and conv["cashback"] == Decimal("0")
    assert [r["outcome"] for r in await history(db, "admitad", "ORD-2")] == [
        "accepted", "accepted", "duplicate", "duplicate", "accepted", "duplicate"]
    cid = await activate(client, tokens, "p-user-2")
    for status in ("pending", "declined", "approved", "pending"):
        await client.get("/postback/admitad", params=admitad(cid, "ORD-3", status))
    assert (await conversion(db, "admitad", "ORD-3"))["status"] == "declined"


async def test_amount_corrections_update_the_conversion(client, tokens, db):
    cid = await activate(client, tokens, "p-user-3")
    await client.get("/postback/admitad", params=admitad(cid, "ORD-4", payment="10.00", order_sum="100"))
    await client.get("/postback/admitad", params=admitad(cid, "ORD-4", payment="8.00", order_sum="80"))
    conv = await conversion(db, "admitad", "ORD-4")
    assert (conv["commission"], conv["amount"], conv["cashback"]) == (Decimal("8"), Decimal("80"), Decimal("4"))


async def test_30_concurrent_identical_postbacks(client, tokens, db):
    cid = await activate(client, tokens, "p-user-4")
    resps = await asyncio.gather(*(client.get("/postback/admitad", params=admitad(cid, "ORD-5", "approved"))
                                   for _ in range(30)))
    assert [r.status for r in resps] == [200] * 30
    assert await db.fetchval("SELECT count(*) FROM conversions WHERE order_id = 'ORD-5'") == 1
    outcomes = [r["outcome"] for r in await history(db, "admitad", "ORD-5")]
    assert outcomes.count("accepted") == 1 and outcomes.count("duplicate") == 29
    assert (await conversion(db, "admitad", "ORD-5"))["status"] == "approved"


async def test_racing_pending_and_approved_end_approved(client, tokens, db):
    for n in range(5):
        cid = await activate(client, tokens, "p-user-5")
        order = f"ORD-RACE-{n}"
        await asyncio.gather(*(client.get("/postback/admitad", params=admitad(cid, order, status))
                               for status in ["pending", "approved"] * 5))
        assert (await conversion(db, "admitad", order))["status"] == "approved"


async def test_epn_form_post_and_awin_get_and_generic(client, tokens, db):
    cid = await activate(client, tokens, "p-user-6", "aliexpress-epn")
    resp = await client.post("/postback/epn", data={
        "token": "test-epn-token", "click_id": cid, "order_number": "EPN-1", "order_status": "completed",
        "revenue": "20.00", "commission_fee": "2.00", "currency": "USD"})
    assert resp.status == 200
    assert (await conversion(db, "epn", "EPN-1"))["status"] == "approved"
    cid2 = await activate(client, tokens, "p-user-6", "asos")
    resp = await client.get("/postback/awin", params={
        "token": "test-awin-token", "clickRef": cid2, "transactionId": "AW-1", "status": "pending",
        "commission": "3.00", "amount": "30.00", "currency": "GBP", "transactionDate": "2026-11-25 10:00:00"})
    assert resp.status == 200
    conv = await conversion(db, "awin", "AW-1")
    assert conv["cashback"] == Decimal("1.00") and conv["merchant"] == "asos"  # 3 x 0.333333 = 0.999999
    cid3 = await activate(client, tokens, "p-user-6", "shop")
    resp = await client.post("/postback/generic", json={
        "token": "test-generic-token", "subid": cid3, "order_id": 12345, "status": "approved",
        "amount": "50", "commission": "5", "currency": "EUR", "order_time": "2026-11-26T10:00:00Z"})
    assert resp.status == 200
    assert (await conversion(db, "generic", "12345"))["cashback"] == Decimal("5.00")


def sign(body: bytes) -> str:
    return hmac.new(IMPACT_SECRET, body, hashlib.sha256).hexdigest()


async def test_impact_hmac_json(client, tokens, db):
    cid = await activate(client, tokens, "p-user-7", "nike")
    body = json.dumps({"SubId1": cid, "ActionId": "IMP-1", "Status": "PENDING", "Payout": "4.10",
                       "Amount": "41.00", "Currency": "USD", "EventDate": "2026-11-26T10:00:00Z"}).encode()
    headers = {"Content-Type": "application/json", "X-Signature": sign(body)}
    assert (await client.post("/postback/impact", data=body, headers=headers)).status == 200
    assert (await conversion(db, "impact", "IMP-1"))["cashback"] == Decimal("2.87")
    # The same signature over other parameters: refused, nothing stored.
    forged = body.replace(b"PENDING", b"APPROVED")
    resp = await client.post("/postback/impact", data=forged, headers=headers)
    assert resp.status == 403 and (await resp.json())["error"] == "forbidden"
    resp = await client.post("/postback/impact", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 403
    assert (await conversion(db, "impact", "IMP-1"))["status"] == "pending"
    assert len(await history(db, "impact", "IMP-1")) == 1
    query = f"SubId1={cid}&ActionId=IMP-2&Status=APPROVED&Payout=1&Amount=10&Currency=USD"
    resp = await client.get(f"/postback/impact?{query}", headers={"X-Signature": sign(query.encode())})
    assert resp.status == 200


async def test_ip_allow_list_behind_a_trusted_proxy(aiohttp_client, settings, tokens, db):
    import dataclasses
    import ipaddress

    from tracker.app import create_app

    app = create_app(dataclasses.replace(settings, trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),)))
    client = await aiohttp_client(app)
    cid = await activate(client, tokens, "p-user-8", "nike")
    query = f"SubId1={cid}&ActionId=IMP-3&Status=PENDING&Payout=1&Currency=USD"
    headers = {"X-Signature": sign(query.encode()), "X-Forwarded-For": "198.51.100.9"}
    resp = await client.get(f"/postback/impact?{query}", headers=headers)
    assert resp.status == 403
    headers["X-Forwarded-For"] = "127.0.0.5"  # the network's allowed range (loopback in the test file)
    resp = await client.get(f"/postback/impact?{query}", headers=headers)
    assert resp.status == 200


async def test_wrong_token_and_unknown_network(client, tokens, db):
    cid = await activate(client, tokens, "p-user-9")
    resp = await client.get("/postback/admitad", params={**admitad(cid, "ORD-6"), "token": "wrong"})
    assert resp.status == 403
    params = admitad(cid, "ORD-6")
    del params["token"]
    assert (await client.get("/postback/admitad", params=params)).status == 403
    assert (await client.get("/postback/nosuchnet", params=admitad(cid, "ORD-6"))).status == 404
    assert await conversion(db, "admitad", "ORD-6") is None
    assert await history(db, "admitad", "ORD-6") == []


@pytest.mark.parametrize("change,reason", [
    ({"order_id": ""}, "order id"), ({"payment_sum": "abc"}, "commission"), ({"payment_sum": "-5"}, "commission"),
    ({"payment_sum": "NaN"}, "commission"), ({"payment_sum": "1e30"}, "commission"),
    ({"order_sum": "99999999999999"}, "amount"), ({"status": "weird"}, "status"), ({"status": ""}, "status"),
    ({"currency": "RUBLES"}, "currency"), ({"time": "yesterday"}, "order_time"),
    # Three letters are not a currency: only ISO 4217's (ZZZ is none, BTC is not one, XTS is its
    # code for tests and XAU an ounce of gold: neither is money a network pays in).
    ({"currency": "ZZZ"}, "currency"), ({"currency": "BTC"}, "currency"), ({"currency": "xts"}, "currency"),
    ({"currency": "XAU"}, "currency"), ({"currency": "RUR"}, "currency"),
    ({"order_id": "x" * 500}, "order id"),
])
async def test_malformed_postbacks_are_refused_and_not_stored(client, tokens, db, change, reason):
    cid = await activate(client, tokens, "p-user-10")
    resp = await client.get("/postback/admitad", params={**admitad(cid, "ORD-BAD"), **change})
    assert resp.status == 400
    body = await resp.json()
    assert body["error"] == "malformed" and reason in body["message"]
    assert await db.fetchval("SELECT count(*) FROM postback_history WHERE click_id = $1", cid) == 0
    assert await db.fetchval("SELECT count(*) FROM orphan_postbacks WHERE click_id = $1", cid) == 0


async def test_oversized_and_hostile_bodies(client, tokens):
    resp = await client.post("/postback/admitad", data=b"a=" + b"x" * 70_000,
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status == 413
    for body, ctype in ((b"{not json", "application/json"), (b"[1,2]", "application/json"),
                        (b'{"a": {"b": 1}}', "application/json"), (b"\xff\xfe=\x00", "application/x-www-form-urlencoded")):
        resp = await client.post("/postback/admitad", data=body, headers={"Content-Type": ctype})
        assert resp.status in (400, 403), body


async def test_orphans_are_kept_and_reconciled_when_the_click_arrives(client, tokens, db, settings):
    resp = await client.get("/postback/admitad", params=admitad("not-a-click-id", "ORD-O1"))
    assert resp.status == 200
    late_cid, ms = new_click_id()
    resp = await client.get("/postback/admitad", params=admitad(late_cid, "ORD-O2", "approved"))
    assert resp.status == 200
    orphans = {r["order_id"]: r for r in await db.fetch("SELECT * FROM orphan_postbacks")}
    assert orphans["ORD-O1"]["reason"] == "malformed_click_id"
    assert orphans["ORD-O2"]["reason"] == "unknown_click"
    assert await conversion(db, "admitad", "ORD-O2") is None
    listed = await asyncio.to_thread(cli, settings, "postbacks", "orphans")
    assert listed.returncode == 0 and "ORD-O2" in listed.stdout and ADMITAD not in listed.stdout
    # The click shows up later (a spool replay writes it with its original time).
    await db.execute("INSERT INTO clicks (click_id, created_at, user_id, merchant, source, target, bot) "
                     "VALUES ($1, $2, 'late-user', 'aliexpress', 'web', 'https://aliexpress.ru/', false)",
                     late_cid, click_time(late_cid))
    done = await asyncio.to_thread(cli, settings, "postbacks", "reconcile")
    assert done.returncode == 0, done.stderr
    assert '"reconciled": 1' in done.stdout
    conv = await conversion(db, "admitad", "ORD-O2")
    assert (conv["user_id"], conv["status"], conv["cashback"]) == ("late-user", "approved", Decimal("5"))
    assert await db.fetchval("SELECT reconciled_at IS NOT NULL FROM orphan_postbacks WHERE order_id = 'ORD-O2'")
    again = await asyncio.to_thread(cli, settings, "postbacks", "reconcile")
    assert '"reconciled": 0' in again.stdout


async def test_zero_commission_and_metrics(client, tokens, db):
    cid = await activate(client, tokens, "p-user-11")
    await client.get("/postback/admitad", params=admitad(cid, "ORD-Z", "approved", payment="0"))
    view = await (await client.get(f"/v1/clicks/{cid}", headers=ADMIN)).json()
    assert view["conversions"][0]["cashback"] == "0.00"
    assert any(d["code"] == "zero_commission" for d in view["diagnosis"])
    text = await (await client.get("/metrics")).text()
    assert 'tracker_postbacks_total{network="admitad",outcome="accepted"}' in text
    assert 'tracker_postbacks_total{network="admitad",outcome="malformed"}' in text
    assert 'tracker_conversions_total{merchant="aliexpress",status="approved"}' in text


async def test_bot_clicks_are_never_attributed(client, tokens, db):
    resp = await client.get("/go/aliexpress", params={"u": tokens.mint("p-user-12")}, allow_redirects=False,
                            headers={"User-Agent": "Twitterbot/1.0"})
    cid = resp.headers["X-Click-Id"]
    assert (await client.get("/postback/admitad", params=admitad(cid, "ORD-BOT"))).status == 200
    assert await conversion(db, "admitad", "ORD-BOT") is None
    assert await db.fetchval("SELECT reason FROM orphan_postbacks WHERE order_id = 'ORD-BOT'") == "bot_click"


async def test_generic_postback_without_commission_is_zero_then_corrected(client, tokens, db):
    cid = await activate(client, tokens, "p-user-13", "shop")
    resp = await client.get("/postback/generic", params={"token": "test-generic-token", "subid": cid,
                                                         "order_id": "G-1", "status": "lead", "amount": "40"})
    assert resp.status == 200
    conv = await conversion(db, "generic", "G-1")
    assert (conv["status"], conv["commission"], conv["currency"]) == ("pending", Decimal(0), "USD")
    await client.get("/postback/generic", params={"token": "test-generic-token", "subid": cid, "order_id": "G-1",
                                                  "status": "sale", "amount": "40", "commission": "4"})
    conv = await conversion(db, "generic", "G-1")
    assert (conv["status"], conv["status_word"], conv["cashback"]) == ("approved", "sale", Decimal("4.00"))


async def test_too_many_parameters_is_a_clear_400(client):
    many = "&".join(f"p{i}=1" for i in range(300))
    resp = await client.get(f"/postback/admitad?{many}")
    assert resp.status == 400 and (await resp.json())["error"] == "malformed"
    resp = await client.post("/postback/admitad", data=many.encode(),
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status == 400
