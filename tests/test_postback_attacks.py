"""Postbacks as an attacker sends them: what is signed must be what is used, one meaning per
parameter, a network speaks only for its own merchants' clicks, times and money within range, and
what an approved order is owed never grows without a status move."""
import hashlib
import hmac
import json
from decimal import Decimal

import pytest
from yarl import URL

from tracker.domain.conversions import Postback, Terms, read_raw, settle
from tracker.store.conversions import reconcile
from tracker.store.merchants import load

from .conftest import ADMIN
from .test_events import head, new_events
from .test_postbacks import IMPACT_SECRET, activate, admitad, conversion, history

GENERIC = "test-generic-token"


def sign(message: bytes) -> str:
    return hmac.new(IMPACT_SECRET, message, hashlib.sha256).hexdigest()


def impact_form(cid: str, order: str, status: str = "PENDING", payout: str = "4.10") -> bytes:
    return f"SubId1={cid}&ActionId={order}&Status={status}&Payout={payout}&Amount=41.00&Currency=USD".encode()


async def orphans(db, order):
    return await db.fetch("SELECT reason, reconciled_at FROM orphan_postbacks WHERE order_id = $1", order)


# -- 1. a signature covers exactly what is read --------------------------------------------------
async def test_a_captured_signed_body_does_not_authenticate_a_query(client, tokens, db):
    mine = await activate(client, tokens, "atk-user-1", "nike")
    victim = await activate(client, tokens, "atk-victim-1", "nike")
    body = impact_form(mine, "SIG-1")
    form = {"X-Signature": sign(body), "Content-Type": "application/x-www-form-urlencoded"}
    assert (await client.post("/postback/impact", data=body, headers=form)).status == 200
    forged = f"SubId1={victim}&ActionId=FORGED-1&Status=APPROVED&Payout=12345"
    resp = await client.post(f"/postback/impact?{forged}", data=body, headers=form)
    assert resp.status == 403 and (await resp.json())["error"] == "forbidden"
    # The same with a JSON body, and moving the existing order from pending to approved.
    doc = json.dumps({"SubId1": mine, "ActionId": "SIG-2", "Status": "PENDING", "Payout": "4.10"}).encode()
    signed_json = {"X-Signature": sign(doc), "Content-Type": "application/json"}
    assert (await client.post("/postback/impact", data=doc, headers=signed_json)).status == 200
    for query in (forged, "Status=APPROVED&Payout=999", "ActionId=SIG-2&Status=APPROVED&Payout=999"):
        resp = await client.post(f"/postback/impact?{query}", data=doc, headers=signed_json)
        assert resp.status == 403
        resp = await client.post(f"/postback/impact?{query}", data=body, headers=form)
        assert resp.status == 403
    assert await conversion(db, "impact", "FORGED-1") is None
    assert await db.fetchval("SELECT count(*) FROM conversions WHERE click_id = $1", victim) == 0
    assert (await conversion(db, "impact", "SIG-2"))["status"] == "pending"
    assert (await conversion(db, "impact", "SIG-1"))["commission"] == Decimal("4.10")
    assert len(await history(db, "impact", "SIG-2")) == 1


async def test_an_empty_message_never_authenticates(client, tokens, db):
    victim = await activate(client, tokens, "atk-victim-2", "nike")
    empty = {"X-Signature": sign(b"")}
    query = f"SubId1={victim}&ActionId=EMPTY-1&Status=APPROVED&Payout=500"
    assert (await client.post(f"/postback/impact?{query}", data=b"", headers=empty)).status == 403
    assert (await client.post("/postback/impact", data=b"", headers=empty)).status == 403
    assert (await client.get("/postback/impact", headers=empty)).status == 403
    assert (await client.get("/postback/impact?", headers=empty)).status == 403
    assert await conversion(db, "impact", "EMPTY-1") is None


async def test_a_signed_get_is_read_from_the_bytes_that_were_signed(client, tokens, db):
    cid = await activate(client, tokens, "atk-user-3", "nike")
    base = str(client.make_url("/postback/impact"))

    def get(query, signature):  # the query exactly as written: not re-quoted by the client
        return client.session.get(URL(f"{base}?{query}", encoded=True), headers={"X-Signature": signature})

    raw = f"SubId1={cid}&ActionId=RAW%2D1&Status=PENDING&Payout=1.50&Currency=USD"
    assert (await get(raw, sign(raw.encode()))).status == 200
    assert (await conversion(db, "impact", "RAW-1"))["commission"] == Decimal("1.50")
    # A signature over the decoded form is not a signature over what was sent.
    sent = raw.replace("RAW%2D1", "RAW%2D2")
    resp = await get(sent, sign(sent.replace("%2D", "-").encode()))
    assert resp.status == 403 and await conversion(db, "impact", "RAW-2") is None


# -- 6. one meaning per parameter ----------------------------------------------------------------
@pytest.mark.parametrize("query", [
    "status=pending&STATUS=approved&Commission=999",
    "status=pending&status=approved",
    "commission=1&Commission=999&status=pending",
    "Order_ID=OTHER&status=pending",
])
async def test_a_parameter_given_twice_in_any_case_is_refused(client, tokens, db, query):
    cid = await activate(client, tokens, "atk-user-4", "shop")
    resp = await client.get(f"/postback/generic?token={GENERIC}&subid={cid}&order_id=DUP-1&{query}")
    assert resp.status == 400 and (await resp.json())["error"] == "duplicate_parameter"
    assert await conversion(db, "generic", "DUP-1") is None and await history(db, "generic", "DUP-1") == []


async def test_a_parameter_in_both_the_query_and_the_body_is_refused(client, tokens, db):
    cid = await activate(client, tokens, "atk-user-5", "shop")
    body = f"token={GENERIC}&subid={cid}&order_id=DUP-2&status=pending&commission=1"
    resp = await client.post("/postback/generic?commission=999", data=body.encode(),
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status == 400
    resp = await client.post("/postback/generic?Commission=999", json={
        "token": GENERIC, "subid": cid, "order_id": "DUP-2", "status": "pending", "commission": "1"})
    assert resp.status == 400
    assert await conversion(db, "generic", "DUP-2") is None


async def test_a_token_given_twice_does_not_authenticate(client, tokens, db):
    cid = await activate(client, tokens, "atk-user-6", "shop")
    resp = await client.get(f"/postback/generic?token=wrong&TOKEN={GENERIC}&subid={cid}&order_id=DUP-3&status=pending")
    assert resp.status == 403
    assert await conversion(db, "generic", "DUP-3") is None


@pytest.mark.parametrize("money", ["١٢", "１２", "12\u00a0", "+12", "1.2.3", "12e0", "٫5"])
async def test_money_is_ascii_digits_with_one_dot(client, tokens, db, money):
    cid = await activate(client, tokens, "atk-user-7", "shop")
    resp = await client.get("/postback/generic", params={"token": GENERIC, "subid": cid, "order_id": f"MONEY-{money}",
                                                         "status": "approved", "commission": money})
    assert resp.status == 400 and (await resp.json())["error"] == "malformed"
    assert await conversion(db, "generic", f"MONEY-{money}") is None


# -- 3. a network's credentials speak for its own merchants' clicks only ------------------------
async def test_another_networks_token_cannot_convert_a_click(client, tokens, db):
    cid = await activate(client, tokens, "atk-user-8", "aliexpress")  # reports through admitad
    for network, params in (
            ("generic", {"token": GENERIC, "subid": cid, "order_id": "NET-1", "status": "approved",
                         "commission": "10"}),
            ("epn", {"token": "test-epn-token", "click_id": cid, "order_number": "NET-1",
                     "order_status": "completed", "commission_fee": "10"})):
        resp = await client.get(f"/postback/{network}", params=params)
        assert resp.status == 200  # kept for reconciliation, as every orphan is
        assert await conversion(db, network, "NET-1") is None
    assert [r["reason"] for r in await orphans(db, "NET-1")] == ["wrong_network", "wrong_network"]
    assert (await client.get("/postback/admitad", params=admitad(cid, "NET-1", "approved"))).status == 200
    assert await db.fetchval("SELECT count(*) FROM conversions WHERE order_id = 'NET-1'") == 1
    assert await db.fetchval("SELECT count(*) FROM conversions WHERE click_id = $1", cid) == 1
    # Reconciliation leaves them open: the click exists, but it still is not theirs.
    merchants, networks = await load(db)
    attached = await reconcile(db, lambda net, raw: read_raw(networks[net], raw), merchants.get)
    assert [a for a in attached if a["order_id"] == "NET-1"] == []
    rows = await orphans(db, "NET-1")
    assert [(r["reason"], r["reconciled_at"]) for r in rows] == [("wrong_network", None)] * 2


# -- 5. times within range -----------------------------------------------------------------------
@pytest.mark.parametrize("when", ["9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00", "1999-12-31T23:59:59Z",
                                  "2100-01-01T00:00:00Z", "9999999999999", "２０２６-11-26T10:00:00Z"])
async def test_an_order_time_out_of_range_is_a_400(client, tokens, db, when):
    cid = await activate(client, tokens, "atk-user-9", "shop")
    resp = await client.get("/postback/generic", params={"token": GENERIC, "subid": cid, "order_id": "TIME-1",
                                                         "status": "pending", "order_time": when})
    assert resp.status == 400 and (await resp.json())["error"] == "malformed"
    assert await conversion(db, "generic", "TIME-1") is None and await history(db, "generic", "TIME-1") == []


# -- 8. what an approved order is owed never grows without a status move -----------------------
def pb(status, commission, amount=None, currency="RUB"):
    return Postback(click_id=None, order_id="X", status=status, status_word=status, currency=currency,
                    commission=Decimal(commission), amount=None if amount is None else Decimal(amount),
                    order_time=None)


@pytest.mark.parametrize("current,new,effect", [
    (("pending", "100", "10"), pb("pending", "12", "120"), "corrected"),
    (("pending", "100", "10"), pb("pending", "99999"), "corrected"),
    (("pending", "100", "10"), pb("approved", "99999"), "moved"),
    (("pending", "100", "10"), pb("pending", "10"), "duplicate"),
    (("approved", "100", "10"), pb("approved", "10", "100"), "duplicate"),
    (("approved", "100", "10"), pb("approved", "4", "40"), "adjusted"),
    (("approved", "100", "10"), pb("approved", "10.01"), "refused"),
    (("approved", "100", "10"), pb("approved", "10", "101"), "refused"),
    (("approved", "100", "10"), pb("approved", "10", currency="USD"), "refused"),
    (("approved", "100", "10"), pb("pending", "99999"), "ignored"),
    (("approved", "100", "10"), pb("reversed", "10"), "moved"),
    (("declined", "100", "10"), pb("declined", "5"), "refused"),
    (("reversed", "100", "10"), pb("approved", "10"), "ignored"),
])
def test_settle_rules(current, new, effect):
    status, amount, commission = current
    assert settle(Terms(status, Decimal(amount), Decimal(commission), "RUB"), new) == effect


async def test_an_approved_commission_only_goes_down_and_every_change_is_kept(client, tokens, db):
    cid = await activate(client, tokens, "atk-user-10", "aliexpress")
    refused = 'tracker_postbacks_total{network="admitad",outcome="adjustment_refused"}'

    async def refused_so_far():  # the counter is process-wide: other tests' postbacks count too
        text = await (await client.get("/metrics")).text()
        lines = [line for line in text.splitlines() if line.startswith(refused + " ")]
        return float(lines[0].split()[-1]) if lines else 0.0

    before = await refused_so_far()

    async def send(status, payment, order_sum="100.00"):
        resp = await client.get("/postback/admitad", params=admitad(cid, "ADJ-1", status, payment, order_sum))
        assert resp.status == 200

    await send("pending", "10.00")
    await send("pending", "12.00")           # corrected before approval
    await send("approved", "10.00")          # the status move sets the approved commission
    await send("approved", "99999.00")       # refused: the owed amount would grow
    conv = await conversion(db, "admitad", "ADJ-1")
    assert (conv["status"], conv["commission"], conv["cashback"]) == ("approved", Decimal("10"), Decimal("5"))
    await send("approved", "4.00", "40.00")  # a partial return
    conv = await conversion(db, "admitad", "ADJ-1")
    assert (conv["commission"], conv["amount"], conv["cashback"]) == (Decimal("4"), Decimal("40"), Decimal("2"))
    await send("approved", "10.00")          # and back up: refused
    assert (await conversion(db, "admitad", "ADJ-1"))["commission"] == Decimal("4")
    rows = await history(db, "admitad", "ADJ-1")
    assert [(r["outcome"], r["previous_status"], r["previous_commission"], r["commission"]) for r in rows] == [
        ("accepted", None, None, Decimal("10")),
        ("accepted", "pending", Decimal("10"), Decimal("12")),
        ("accepted", "pending", Decimal("12"), Decimal("10")),
        ("adjustment_refused", "approved", Decimal("10"), Decimal("99999")),
        ("accepted", "approved", Decimal("10"), Decimal("4")),
        ("adjustment_refused", "approved", Decimal("4"), Decimal("10")),
    ]
    view = await (await client.get(f"/v1/clicks/{cid}", headers=ADMIN)).json()
    [entry] = view["conversions"]
    assert entry["history"][3]["outcome"] == "adjustment_refused"
    assert entry["history"][3]["previous"] == {"status": "approved", "amount": "100.00", "commission": "10.00",
                                               "currency": "RUB"}
    assert await refused_so_far() == before + 2


async def test_a_json_member_given_twice_is_refused(client, tokens, db):
    cid = await activate(client, tokens, "atk-user-11", "shop")
    body = ('{"token": "%s", "subid": "%s", "order_id": "DUP-J", "status": "pending", "status": "approved",'
            ' "commission": "1"}' % (GENERIC, cid)).encode()
    resp = await client.post("/postback/generic", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400 and (await resp.json())["error"] == "duplicate_parameter"
    assert await conversion(db, "generic", "DUP-J") is None


# -- found by repeating the attack pass ----------------------------------------------------------
async def test_a_signed_json_body_sent_as_a_form_is_refused(client, tokens, db):
    """A signature covers the bytes, not how they are read: a sub-id the shopper shaped, passed
    through by the network inside a JSON body, must not become form parameters of its own."""
    cid = await activate(client, tokens, "atk-user-12", "nike")
    injected = f"x&SubId1={cid}&ActionId=FORGED-CT&Status=APPROVED&Payout=9999.00&Currency=USD&z="
    body = json.dumps({"SubId1": injected, "ActionId": "REAL-CT", "Status": "PENDING", "Payout": "1.00"}).encode()
    for ctype in ("application/x-www-form-urlencoded", "text/plain", ""):
        resp = await client.post("/postback/impact", data=body, headers={"X-Signature": sign(body),
                                                                          "Content-Type": ctype})
        assert resp.status == 400, ctype
    assert await conversion(db, "impact", "FORGED-CT") is None
    resp = await client.post("/postback/impact", data=body, headers={"X-Signature": sign(body),
                                                                      "Content-Type": "application/json"})
    assert resp.status == 200  # read as the JSON it is: the odd sub-id names no click, an orphan
    assert await conversion(db, "impact", "FORGED-CT") is None


async def test_a_signature_header_given_twice_does_not_authenticate(client, tokens, db):
    cid = await activate(client, tokens, "atk-user-13", "nike")
    query = f"SubId1={cid}&ActionId=TWO-SIG&Status=PENDING&Payout=1"
    for pair in ((sign(query.encode()), "0" * 64), ("0" * 64, sign(query.encode()))):
        resp = await client.get(f"/postback/impact?{query}", headers=[("X-Signature", pair[0]), ("X-Signature", pair[1])])
        assert resp.status == 403
    assert await conversion(db, "impact", "TWO-SIG") is None


async def test_two_names_of_one_field_with_different_values_are_refused(client, tokens, db):
    cid = await activate(client, tokens, "atk-user-14", "asos")
    base = {"token": "test-awin-token", "clickRef": cid, "transactionId": "ALIAS-1", "commission": "5"}
    resp = await client.get("/postback/awin", params={**base, "status": "approved", "commissionStatus": "declined"})
    assert resp.status == 400 and (await resp.json())["error"] == "malformed"
    assert await conversion(db, "awin", "ALIAS-1") is None
    resp = await client.get("/postback/awin", params={**base, "status": "approved", "commissionStatus": "approved"})
    assert resp.status == 200  # the same value under both names is one meaning
    assert (await conversion(db, "awin", "ALIAS-1"))["status"] == "approved"


async def test_json_numbers_are_read_as_their_text(client, tokens, db):
    cid = await activate(client, tokens, "atk-user-15", "shop")
    base = '{"token": "%s", "subid": "%s", "status": "pending", "order_id": "%s", "commission": %s}'
    for order, number in (("NUM-1", "1E3"), ("NUM-2", "1.5e2"), ("NUM-3", "-0"), ("NUM-4", "1e-400")):
        resp = await client.post("/postback/generic", data=(base % (GENERIC, cid, order, number)).encode(),
                                 headers={"Content-Type": "application/json"})
        assert resp.status == 400, number
        assert await conversion(db, "generic", order) is None
    resp = await client.post("/postback/generic", data=(base % (GENERIC, cid, "NUM-5", "1234567890.12345678")).encode(),
                             headers={"Content-Type": "application/json"})
    assert resp.status == 200
    assert (await conversion(db, "generic", "NUM-5"))["commission"] == Decimal("1234567890.12345678")


@pytest.mark.parametrize("params,status", [
    ({"status": "chargebac\u212a"}, 400),  # a Kelvin sign lower-cases to "k"
    ({"currency": "\ufb00x"}, 400),          # "ﬀx" upper-cases to "FFX"
    ({"order_id": "O1%FF"}, 400),           # not UTF-8: would collapse with O1%FE into O1\ufffd
])
async def test_no_unicode_folding_or_replacement_makes_two_values_one(client, tokens, db, params, status):
    cid = await activate(client, tokens, "atk-user-16", "shop")
    query = {"token": GENERIC, "subid": cid, "order_id": "FOLD-1", "status": "pending", **params}
    text = "&".join(f"{k}={v}" for k, v in query.items())  # O1%FF is sent as it is written
    resp = await client.session.get(URL(f"{client.make_url('/postback/generic')}?{text}", encoded=False))
    assert resp.status == status
    assert await db.fetchval("SELECT count(*) FROM conversions WHERE click_id = $1", cid) == 0


async def test_a_kelvin_sign_token_name_is_not_the_token(client, tokens, db):
    cid = await activate(client, tokens, "atk-user-17", "shop")
    resp = await client.get("/postback/generic", params={"to\u212aen": GENERIC, "subid": cid, "order_id": "KELVIN-1",
                                                         "status": "pending"})
    assert resp.status == 403


async def test_what_a_postback_leaves_out_stays_as_it_was(client, tokens, db):
    cid = await activate(client, tokens, "atk-user-18", "shop")

    async def send(**params):
        resp = await client.get("/postback/generic", params={"token": GENERIC, "subid": cid, "order_id": "KEEP-1",
                                                             **params})
        assert resp.status == 200

    await send(status="pending", commission="7.50", currency="EUR", amount="75")
    await send(status="approved")  # no commission, no currency, no amount: the order keeps them
    conv = await conversion(db, "generic", "KEEP-1")
    assert (conv["status"], conv["commission"], conv["currency"], conv["amount"], conv["cashback"]) == (
        "approved", Decimal("7.5"), "EUR", Decimal("75"), Decimal("7.50"))
    await send(status="approved")  # the same again: a duplicate, not a lowering to 0 in USD
    rows = await history(db, "generic", "KEEP-1")
    assert [r["outcome"] for r in rows] == ["accepted", "accepted", "duplicate"]
    assert (await conversion(db, "generic", "KEEP-1"))["commission"] == Decimal("7.5")


# -- a signed postback carries no time: a replay changes nothing -----------------------------------
def impact_signed(cid: str, order: str, status: str, payout: str) -> tuple[bytes, dict[str, str]]:
    body = impact_form(cid, order, status, payout)
    return body, {"X-Signature": sign(body), "Content-Type": "application/x-www-form-urlencoded"}


async def test_a_captured_signed_postback_replayed_later_changes_nothing(client, tokens, db):
    cid = await activate(client, tokens, "atk-replay-1", "nike")
    captured = impact_signed(cid, "REPLAY-1", "PENDING", "9.00")  # the network's first report
    assert (await client.post("/postback/impact", data=captured[0], headers=captured[1])).status == 200
    later = impact_signed(cid, "REPLAY-1", "PENDING", "3.00")  # its correction before approval
    assert (await client.post("/postback/impact", data=later[0], headers=later[1])).status == 200
    before = await conversion(db, "impact", "REPLAY-1")
    assert before["commission"] == Decimal("3.00")
    start = await head(client)
    for _ in range(2):
        resp = await client.post("/postback/impact", data=captured[0], headers=captured[1])
        assert resp.status == 200 and await resp.text() == "OK"  # answered as any duplicate
    after = await conversion(db, "impact", "REPLAY-1")
    assert (after["status"], after["commission"], after["cashback"], after["updated_at"]) == (
        before["status"], before["commission"], before["cashback"], before["updated_at"])
    assert await new_events(client, start) == []
    assert [r["outcome"] for r in await history(db, "impact", "REPLAY-1")] == [
        "accepted", "accepted", "duplicate", "duplicate"]


async def test_a_replayed_signed_get_or_an_early_reversal_changes_nothing(client, tokens, db):
    """A signed GET replays the same way; and a reversal that met a pending order (not a move
    from pending) cannot be replayed once the order is approved."""
    cid = await activate(client, tokens, "atk-replay-2", "nike")
    base = str(client.make_url("/postback/impact"))

    def get(query: str):  # the query exactly as signed
        return client.session.get(URL(f"{base}?{query}", encoded=True), headers={"X-Signature": sign(query.encode())})

    first = impact_form(cid, "REPLAY-2", "PENDING", "8.00").decode()
    reversal = impact_form(cid, "REPLAY-2", "REVERSED", "8.00").decode()
    for query in (first, reversal, impact_form(cid, "REPLAY-2", "PENDING", "6.00").decode(),
                  impact_form(cid, "REPLAY-2", "APPROVED", "6.00").decode()):
        assert (await get(query)).status == 200
    start = await head(client)
    for query in (first, reversal):
        assert (await get(query)).status == 200
    conv = await conversion(db, "impact", "REPLAY-2")
    assert (conv["status"], conv["commission"], conv["cashback"]) == ("approved", Decimal("6.00"), Decimal("4.20"))
    assert await new_events(client, start) == []


@pytest.mark.parametrize("since", ["erased", "truncated"])
async def test_a_captured_postback_replayed_after_its_address_went_is_still_a_duplicate(client, tokens, db, since):
    """The replay check finds an earlier postback by its parameters as stored. An erasure removes the
    address a network passed on (action_ip) and address retention truncates it: the replay, sent
    as captured, met no row then and its old values came back. It is compared in those forms too."""
    user = f"atk-replay-address-{since}"
    cid = await activate(client, tokens, user)
    captured = admitad(cid, f"REPLAY-IP-{since}", payment="9.00", action_ip="198.51.100.123")
    assert (await client.get("/postback/admitad", params=captured)).status == 200
    correction = {**captured, "payment_sum": "3.00"}
    assert (await client.get("/postback/admitad", params=correction)).status == 200
    if since == "erased":
        assert (await client.delete(f"/v1/users/{user}", headers=ADMIN)).status == 200
    else:  # as `tracker maintain` leaves a row received before TRACKER_IP_RETENTION_DAYS
        await db.execute("UPDATE postback_history SET raw = jsonb_set(raw, '{action_ip}', '\"198.51.100.0/24\"') "
                         "WHERE order_id = $1", captured["order_id"])
    stored = [r["raw"].get("action_ip") for r in await history(db, "admitad", captured["order_id"])]
    assert stored == ([None, None] if since == "erased" else ["198.51.100.0/24"] * 2)
    before = await conversion(db, "admitad", captured["order_id"])
    assert before["commission"] == Decimal("3.00")
    start = await head(client)
    resp = await client.get("/postback/admitad", params=captured)
    assert resp.status == 200 and await resp.text() == "OK"
    after = await conversion(db, "admitad", captured["order_id"])
    assert (after["commission"], after["cashback"], after["updated_at"]) == (
        before["commission"], before["cashback"], before["updated_at"])
    assert await new_events(client, start) == []
    assert [r["outcome"] for r in await history(db, "admitad", captured["order_id"])] == [
        "accepted", "accepted", "duplicate"]
