"""The audit trail: every read of one user's or one click's data and every change, through the API
and the console, recorded with who, what, whose, when and from where; GET /v1/audit pages it newest
first; the console's user page shows who looked; rows cannot be changed; maintain prunes old ones."""
from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest

from .conftest import ADMIN, cli
from .test_console import sign_in
from .test_keys import agent_cookie, bearer, create_key
from .test_postbacks import activate, admitad


async def audit_of(client, **params: str) -> dict[str, Any]:  # noqa: ANN003
    resp = await client.get("/v1/audit", params=params, headers=ADMIN)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def test_api_reads_and_changes_are_recorded_with_the_actor_subject_and_address(client, settings, tokens):
    key = create_key(settings, "support-desk", "lookups:read", "orphans:write")
    cid = await activate(client, tokens, "audited-user")
    assert (await client.get("/postback/admitad", params=admitad(cid, "AUD-1"))).status == 200
    assert (await client.get(f"/v1/clicks/{cid}", headers=bearer(key))).status == 200
    assert (await client.get("/v1/users/audited-user/clicks", headers=bearer(key))).status == 200
    assert (await client.get("/v1/conversions", params={"order_id": "AUD-1"}, headers=bearer(key))).status == 200
    assert (await client.post("/v1/postbacks/orphans/reconcile", headers=bearer(key))).status == 200
    assert (await client.get("/v1/conversions", params={"order_id": "AUD-none"}, headers=bearer(key))).status == 200
    # A refused request reads nothing and records nothing.
    assert (await client.get(f"/v1/clicks/{cid}", headers=bearer("tk_" + "B" * 43))).status == 401
    mine = await audit_of(client, actor="support-desk")
    got = [(e["action"], e["user_id"], e["click_id"], e["order_id"]) for e in mine["entries"]]
    assert got == [("order.read", None, None, "AUD-none"), ("orphans.reconcile", None, None, None),
                   ("order.read", "audited-user", cid, "AUD-1"), ("user.read", "audited-user", None, None),
                   ("click.read", "audited-user", cid, None)]
    assert all(e["actor"] == "support-desk" and e["address"] == "127.0.0.1" and e["at"].endswith("Z")
               for e in mine["entries"])
    # Reading a click or an order counts as reading its user.
    theirs = await audit_of(client, user_id="audited-user")
    assert {e["action"] for e in theirs["entries"]} == {"click.read", "user.read", "order.read", "audit.read"}


async def test_the_trail_pages_newest_first_and_filters(client, settings):
    for i in range(5):
        assert (await client.get(f"/v1/users/pager-{i % 2}/clicks", headers=ADMIN)).status == 200
    first = await audit_of(client, user_id="pager-0", limit="2")
    assert len(first["entries"]) == 2 and first["next"] is not None
    second = await audit_of(client, user_id="pager-0", limit="2", before=first["next"])
    # Three reads of the user and the first page's own read of the trail (the second's is newer than `before`).
    assert len(second["entries"]) == 2 and second["next"] is None
    both = first["entries"] + second["entries"]
    assert [e["action"] for e in both] == ["audit.read", "user.read", "user.read", "user.read"]
    assert [e["at"] for e in both] == sorted((e["at"] for e in both), reverse=True)
    assert all(e["user_id"] == "pager-0" and e["actor"] == "admin" for e in both)
    assert (await audit_of(client, user_id="pager-0", actor="someone-else")) == {"entries": [], "next": None}
    # Reading the trail is recorded too.
    reads = await audit_of(client, actor="admin", limit="200")
    assert any(e["action"] == "audit.read" and e["user_id"] == "pager-0" for e in reads["entries"])


async def test_the_trail_needs_audit_read_and_refuses_bad_parameters(client, settings):
    lookups = create_key(settings, "no-audit", "lookups:read")
    resp = await client.get("/v1/audit", headers=bearer(lookups))
    assert resp.status == 403 and (await resp.json())["error"] == "forbidden"
    assert (await client.get("/v1/audit")).status == 401
    auditor = create_key(settings, "auditor", "audit:read")
    assert (await client.get("/v1/audit", headers=bearer(auditor))).status == 200
    for query in ("user_id=bad%20id", "user_id=" + "x" * 65, "before=abc", "before=-1", "limit=0", "limit=201",
                  "actor=" + "a" * 201, "actor=a%00b", "user_id=a&user_id=b", "before=" + "9" * 19):
        resp = await client.get(f"/v1/audit?{query}", headers=ADMIN)
        assert resp.status == 400, query
        assert (await resp.json())["error"] in ("bad_request", "duplicate_parameter")


async def test_rows_cannot_be_changed(client, db):
    assert (await client.get("/v1/users/fixed-user/clicks", headers=ADMIN)).status == 200
    with pytest.raises(asyncpg.RaiseError, match="cannot be changed"):
        await db.execute("UPDATE audit_log SET user_id = 'someone-else' WHERE user_id = 'fixed-user'")
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE user_id = 'fixed-user'") == 1


async def test_console_reads_are_recorded_and_the_user_page_shows_who_looked(client, tokens):
    cid = await activate(client, tokens, "looked-at")
    assert (await sign_in(client)).status == 303
    assert (await client.get(f"/support/clicks/{cid}")).status == 200
    page = await client.get("/support/users/looked-at")
    text = await page.text()
    assert "Who looked at this user" in text and "click.read" in text and "user.read" in text
    entries = (await audit_of(client, user_id="looked-at"))["entries"]
    assert [e["action"] for e in entries[-2:]] == ["user.read", "click.read"]
    assert entries[-1]["click_id"] == cid and entries[-1]["actor"] == "admin"
    # An agent reads the user (recorded under their name) but without audit:read sees no trail.
    client.session.cookie_jar.clear()
    client.session.cookie_jar.update_cookies({"tracker_console": agent_cookie(client.app, "ann@example.com",
                                                                              "support")})
    text = await (await client.get("/support/users/looked-at")).text()
    assert "Who looked at this user" not in text
    latest = (await audit_of(client, user_id="looked-at"))["entries"]  # [0]: this read of the trail, by admin
    assert (latest[1]["actor"], latest[1]["action"]) == ("ann@example.com", "user.read")


async def test_maintain_prunes_entries_past_the_audit_retention(client, settings, db):
    assert (await client.get("/v1/users/old-news/clicks", headers=ADMIN)).status == 200
    await db.execute("INSERT INTO audit_log (at, actor, action, user_id) "
                     "VALUES (now() - interval '401 days', 'admin', 'user.read', 'old-news')")
    out = cli(settings, "maintain")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["pruned"]["audit_log"] == 1
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE user_id = 'old-news'") == 1
    out = cli(settings, "maintain", TRACKER_AUDIT_RETENTION_DAYS="1")
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE user_id = 'old-news'") == 1  # today's stays
