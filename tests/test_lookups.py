"""Support lookups (admin key): a user's clicks with keyset paging, orders by id, orphans listed and
reconciled over HTTP; the plans use the indexes."""
from __future__ import annotations

import re

import pytest

from tracker.domain.clickid import click_time, new_click_id
from tracker.domain.times import iso

from .conftest import ADMIN
from .test_postbacks import activate, admitad

# Also behind PgBouncer in transaction mode (conftest.py)
pytestmark = pytest.mark.pooled


async def test_lookups_need_the_admin_key(client):
    for method, path in (("GET", "/v1/users/someone/clicks"), ("GET", "/v1/conversions?order_id=1"),
                         ("GET", "/v1/postbacks/orphans"), ("POST", "/v1/postbacks/orphans/reconcile")):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            resp = await client.request(method, path, headers=headers)
            assert resp.status == 401, (method, path)
            assert (await resp.json())["error"] == "unauthorized"


async def test_a_users_clicks_newest_first_with_paging(client, tokens):
    # Clicks minted within one millisecond have no order between them but the one the listing
    # defines (the random part of their ids breaks the tie): the test asks for newest first by
    # time and for pages that agree with the whole list, never for the minting order.
    ids = [await activate(client, tokens, "pager", merchant) for merchant in ("aliexpress", "nike") * 3]
    await activate(client, tokens, "someone-else")
    whole = await (await client.get("/v1/users/pager/clicks", params={"limit": "6"}, headers=ADMIN)).json()
    listed = [c["click_id"] for c in whole["clicks"]]
    assert sorted(listed) == sorted(ids) and whole["next"] is None
    times = [click_time(c) for c in listed]
    assert times == sorted(times, reverse=True)
    assert [c["created_at"] for c in whole["clicks"]] == [iso(t) for t in times]
    resp = await client.get("/v1/users/pager/clicks", params={"limit": "4"}, headers=ADMIN)
    assert resp.status == 200
    first = await resp.json()
    assert [c["click_id"] for c in first["clicks"]] == listed[:4]
    assert first["next"] == listed[3]
    item = first["clicks"][0]
    merchant = {cid: m for cid, m in zip(ids, ("aliexpress", "nike") * 3)}[listed[0]]
    assert item == {"click_id": listed[0], "merchant": merchant, "source": "web", "created_at": item["created_at"],
                    "bot": False, "state": "active", "conversions": []}
    second = await (await client.get("/v1/users/pager/clicks", params={"limit": "4", "before": first["next"]},
                                     headers=ADMIN)).json()
    assert [c["click_id"] for c in second["clicks"]] == listed[4:]
    assert second["next"] is None
    empty = await (await client.get("/v1/users/nobody-at-all/clicks", headers=ADMIN)).json()
    assert empty == {"clicks": [], "next": None}


async def test_paging_keeps_clicks_of_one_millisecond_together(client, db):
    """Many clicks of one user in the same millisecond: every page continues exactly where the last
    stopped, whatever order their random bits put them in (PostgreSQL's own text order)."""
    from tracker.store.db import ensure_near_partitions

    await ensure_near_partitions(db)
    now_ms = new_click_id()[1]
    ids = [new_click_id(now_ms)[0] for _ in range(7)]
    await db.executemany("INSERT INTO clicks (click_id, created_at, user_id, merchant, source, target) "
                         "VALUES ($1, $2, 'same-ms', 'nike', 'web', 'https://www.nike.com/')",
                         [(cid, click_time(cid)) for cid in ids])
    whole = await (await client.get("/v1/users/same-ms/clicks", params={"limit": "7"}, headers=ADMIN)).json()
    listed = [c["click_id"] for c in whole["clicks"]]
    assert sorted(listed) == sorted(ids)
    paged, before = [], None
    while True:
        params = {"limit": "2", **({"before": before} if before else {})}
        page = await (await client.get("/v1/users/same-ms/clicks", params=params, headers=ADMIN)).json()
        paged += [c["click_id"] for c in page["clicks"]]
        before = page["next"]
        if before is None:
            break
    assert paged == listed
async def test_user_clicks_show_state_and_conversions(client, tokens):
    cid = await activate(client, tokens, "converted-user")
    assert (await client.get("/postback/admitad", params=admitad(cid, "LK-1", "approved", "12.34"))).status == 200
    body = await (await client.get("/v1/users/converted-user/clicks", headers=ADMIN)).json()
    assert body["clicks"][0]["state"] == "converted"
    assert body["clicks"][0]["conversions"] == [
        {"network": "admitad", "order_id": "LK-1", "status": "approved", "cashback": "6.17", "currency": "RUB"}]


async def test_user_clicks_refuse_bad_parameters(client):
    for params in ({"limit": "0"}, {"limit": "201"}, {"limit": "ten"}, {"limit": "٣"}, {"before": "not-a-click"},
                   [("limit", "5"), ("limit", "6")]):
        resp = await client.get("/v1/users/pager/clicks", params=params, headers=ADMIN)
        assert resp.status == 400, params
        assert set(await resp.json()) == {"error", "message"}
    assert (await client.get("/v1/users/a%20b/clicks", headers=ADMIN)).status == 404


async def test_conversion_by_order_id_and_network(client, tokens):
    cid = await activate(client, tokens, "order-user")
    assert (await client.get("/postback/admitad", params=admitad(cid, "8101234567"))).status == 200
    body = await (await client.get("/v1/conversions", params={"order_id": "8101234567"}, headers=ADMIN)).json()
    [conv] = body["conversions"]
    assert (conv["network"], conv["order_id"], conv["click_id"], conv["user_id"], conv["status"],
            conv["commission"], conv["currency"], conv["cashback"]) == (
        "admitad", "8101234567", cid, "order-user", "pending", "10.00", "RUB", "5.00")
    other = await client.get("/v1/conversions", params={"order_id": "8101234567", "network": "epn"}, headers=ADMIN)
    assert (await other.json()) == {"conversions": []}
    none = await client.get("/v1/conversions", params={"order_id": "no-such-order"}, headers=ADMIN)
    assert (await none.json()) == {"conversions": []}
    for params in ({}, {"order_id": ""}, {"order_id": "x" * 257}, {"order_id": "1", "network": ""},
                   {"order_id": "81\x0012"}, {"order_id": "1", "network": "a\x00"}):
        assert (await client.get("/v1/conversions", params=params, headers=ADMIN)).status == 400


async def test_orphans_listed_paged_and_reconciled(client, db):
    waiting = new_click_id()[0]  # its click arrives later (a spool replay)
    never = new_click_id()[0]
    for cid, order in ((waiting, "ORPH-1"), (never, "ORPH-2"), (never, "ORPH-3")):
        assert (await client.get("/postback/admitad", params=admitad(cid, order))).status == 200
    page = await (await client.get("/v1/postbacks/orphans", params={"limit": "2"}, headers=ADMIN)).json()
    orders = [o["order_id"] for o in page["orphans"]]
    assert orders == ["ORPH-3", "ORPH-2"] and isinstance(page["next"], int)
    assert set(page["orphans"][0]) == {"id", "network", "order_id", "click_id", "reason", "received_at"}
    rest = await (await client.get("/v1/postbacks/orphans", params={"before": str(page["next"])},
                                   headers=ADMIN)).json()
    assert "ORPH-1" in [o["order_id"] for o in rest["orphans"]] and "ORPH-2" not in str(rest)
    assert (await client.get("/v1/postbacks/orphans", params={"before": "x"}, headers=ADMIN)).status == 400

    await db.execute("INSERT INTO clicks (click_id, created_at, user_id, merchant, source, target) "
                     "VALUES ($1, $2, 'late-user', 'aliexpress', 'web', 'https://aliexpress.ru/')",
                     waiting, click_time(waiting))
    resp = await client.post("/v1/postbacks/orphans/reconcile", headers=ADMIN)
    assert resp.status == 200
    result = await resp.json()
    assert result["attached"] == 1 and result["still_orphaned"] >= 2
    body = await (await client.get("/v1/conversions", params={"order_id": "ORPH-1"}, headers=ADMIN)).json()
    assert body["conversions"][0]["user_id"] == "late-user"
    again = await (await client.post("/v1/postbacks/orphans/reconcile", headers=ADMIN)).json()
    assert again["attached"] == 0 and again["still_orphaned"] == result["still_orphaned"]


async def test_the_lookups_use_their_indexes(db):
    await db.execute("SET enable_seqscan = off")  # a small table: make the planner show what it would use
    try:
        plans = {}
        for name, sql in (("order", "SELECT * FROM conversions WHERE order_id = '1'"),
                          ("orphans", "SELECT * FROM orphan_postbacks WHERE reconciled_at IS NULL ORDER BY id DESC LIMIT 5"),
                          ("user", "SELECT * FROM clicks WHERE user_id = 'u' ORDER BY created_at DESC, click_id DESC LIMIT 50")):
            plans[name] = "\n".join(r[0] for r in await db.fetch("EXPLAIN " + sql))
    finally:
        await db.execute("RESET enable_seqscan")
    assert "conversions_order_idx" in plans["order"], plans["order"]
    assert "orphan_postbacks_open_id_idx" in plans["orphans"], plans["orphans"]
    assert re.search(r"Index Scan Backward using clicks_p\d{8}_user_id_created_at_idx", plans["user"]), plans["user"]
