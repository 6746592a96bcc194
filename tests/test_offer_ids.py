"""The sub-id swap between merchants of one network: a shopper puts a high-share merchant's click id
into a low-share merchant's partner link. The network reports the order with the click id it was
given and the offer it belongs to; an order of an offer the click's merchant does not list is an
orphan `wrong_offer`, never attributed, never reconciled."""
import asyncio
import copy
import dataclasses
from decimal import Decimal

import asyncpg
import pytest
import yaml

from tracker.domain.clickid import click_time, new_click_id
from tracker.domain.conversions import orphan_reason, read_raw
from tracker.domain.merchants import parse_merchants_file
from tracker.domain.profiles import profile_names
from tracker.store.conversions import reconcile
from tracker.store.merchants import load, sync

from .conftest import ADMIN, HERE
from .test_events import head, new_events
from .test_postbacks import activate, admitad, conversion

HIGH, LOW = "6115", "7001"  # offers of two merchants that both report through admitad


def two_merchants_on_admitad(doc):
    doc = copy.deepcopy(doc)
    ali = next(m for m in doc["merchants"] if m["slug"] == "aliexpress")
    high = {**ali, "slug": "gold-shop", "name": "Gold Shop", "user_share": "0.9", "network_offer_ids": [HIGH]}
    low = {**ali, "slug": "tin-shop", "name": "Tin Shop", "user_share": "0.1", "network_offer_ids": [LOW, 7002]}
    doc["merchants"] += [high, low]
    return doc


@pytest.fixture(scope="module", autouse=True)
def offers_synced(database):
    """This module's database also has two admitad merchants that list their offers."""
    async def apply():
        conn = await asyncpg.connect(database)
        try:
            doc = two_merchants_on_admitad(yaml.safe_load((HERE / "merchants.yaml").read_text()))
            await sync(conn, parse_merchants_file(doc, profile_names()))
        finally:
            await conn.close()
    asyncio.run(apply())


def test_the_check_and_when_it_is_skipped():
    offers, c = frozenset({HIGH}), new_click_id()[0]
    assert orphan_reason(c, True, False, "admitad", "admitad", LOW, offers) == "wrong_offer"
    assert orphan_reason(c, True, False, "admitad", "admitad", HIGH, offers) is None
    assert orphan_reason(c, True, False, "admitad", "admitad", None, offers) is None  # the postback names none
    assert orphan_reason(c, True, False, "admitad", "admitad", LOW, frozenset()) is None  # the merchant lists none
    assert orphan_reason(c, True, False, "epn", "admitad", LOW, offers) == "wrong_network"


async def test_a_high_share_click_id_in_a_low_share_merchants_order_is_an_orphan(client, tokens, db):
    gold = await activate(client, tokens, "swap-user-1", "gold-shop")
    start = await head(client)
    # The shopper bought through Tin Shop's link carrying Gold Shop's click id: admitad reports
    # Tin Shop's offer with that click id.
    resp = await client.get("/postback/admitad", params=admitad(gold, "SWAP-1", "approved", offer_id=LOW))
    assert resp.status == 200 and await resp.text() == "OK"
    assert await conversion(db, "admitad", "SWAP-1") is None
    assert await db.fetchval("SELECT count(*) FROM conversions WHERE click_id = $1", gold) == 0
    [orphan] = await db.fetch("SELECT reason, reconciled_at FROM orphan_postbacks WHERE order_id = 'SWAP-1'")
    assert (orphan["reason"], orphan["reconciled_at"]) == ("wrong_offer", None)
    assert [(e["type"], e["data"]) for e in await new_events(client, start)] == [
        ("postback.orphaned", {"network": "admitad", "order_id": "SWAP-1", "click_id": gold,
                               "reason": "wrong_offer"})]
    listed = await (await client.get("/v1/postbacks/orphans", headers=ADMIN)).json()
    assert [o["reason"] for o in listed["orphans"] if o["order_id"] == "SWAP-1"] == ["wrong_offer"]
    # Reconcile never attaches it: not through the API, not directly, not after the merchants file
    # lists the offer for the click's merchant after all.
    resp = await client.post("/v1/postbacks/orphans/reconcile", headers=ADMIN)
    assert resp.status == 200 and (await resp.json())["still_orphaned"] >= 1
    merchants, networks = await load(db)
    widened = {**merchants, "gold-shop": dataclasses.replace(merchants["gold-shop"],
                                                             network_offer_ids=frozenset({HIGH, LOW}))}
    attached = await reconcile(db, lambda net, raw: read_raw(networks[net], raw), widened.get)
    assert [a for a in attached if a["order_id"] == "SWAP-1"] == []
    assert await conversion(db, "admitad", "SWAP-1") is None
    assert await db.fetchval("SELECT reconciled_at FROM orphan_postbacks WHERE order_id = 'SWAP-1'") is None


async def test_the_merchants_own_offers_and_the_skipped_checks_convert(client, tokens, db):
    gold = await activate(client, tokens, "swap-user-2", "gold-shop")
    tin = await activate(client, tokens, "swap-user-2", "tin-shop")
    plain = await activate(client, tokens, "swap-user-2", "aliexpress")  # lists no offers
    for cid, order, offer in ((gold, "OWN-1", HIGH), (tin, "OWN-2", "7002"), (gold, "OWN-3", None),
                              (plain, "OWN-4", LOW)):
        extra = {"offer_id": offer} if offer else {}
        resp = await client.get("/postback/admitad", params=admitad(cid, order, "approved", payment="10.00", **extra))
        assert resp.status == 200
    assert (await conversion(db, "admitad", "OWN-1"))["cashback"] == Decimal("9.00")
    assert (await conversion(db, "admitad", "OWN-2"))["cashback"] == Decimal("1.00")
    assert (await conversion(db, "admitad", "OWN-3"))["merchant"] == "gold-shop"
    assert (await conversion(db, "admitad", "OWN-4"))["merchant"] == "aliexpress"
    assert await db.fetchval("SELECT count(*) FROM orphan_postbacks WHERE order_id LIKE 'OWN-%'") == 0


async def test_a_late_click_of_another_offer_stays_orphaned(client, tokens, db, settings):
    """An order that arrived before its click (unknown_click) is checked again when reconcile finds
    the click: another offer's order is still not attached."""
    late, _ = new_click_id()
    await client.get("/postback/admitad", params=admitad(late, "LATE-1", "approved", offer_id=LOW))
    await db.execute("INSERT INTO clicks (click_id, created_at, user_id, merchant, source, target, bot) "
                     "VALUES ($1, $2, 'swap-user-3', 'gold-shop', 'web', 'https://aliexpress.ru/', false)",
                     late, click_time(late))
    resp = await client.post("/v1/postbacks/orphans/reconcile", headers=ADMIN)
    assert resp.status == 200
    assert await conversion(db, "admitad", "LATE-1") is None
    assert await db.fetchval("SELECT reconciled_at FROM orphan_postbacks WHERE order_id = 'LATE-1'") is None


@pytest.mark.parametrize("offer", ["x" * 129, "\u200b6115"])
async def test_an_offer_id_that_is_no_id_is_a_400(client, tokens, db, offer):
    gold = await activate(client, tokens, "swap-user-4", "gold-shop")
    resp = await client.get("/postback/admitad", params=admitad(gold, "BADOFFER-1", offer_id=offer))
    assert resp.status == 400 and (await resp.json())["error"] == "malformed"
    assert await conversion(db, "admitad", "BADOFFER-1") is None
