"""Keys for machines: created, listed and revoked from the command line, checked on every admin
endpoint (401 unknown, revoked or malformed; 403 for a missing scope), revoked at once on every
worker; console actions checked against the signed-in actor's scopes (an agent's roles)."""
from __future__ import annotations

import json
import time
from dataclasses import replace
from ipaddress import ip_network

from aiohttp import web
from aiohttp.test_utils import TestClient

from tracker import keys
from tracker.app import create_app
from tracker.domain.access import SCOPES, agent
from tracker.domain.console_session import ConsoleKeys

from .conftest import ADMIN, cli
from .test_console import CSRF

ENDPOINTS = {  # (method, path) -> the scope it needs
    ("GET", "/v1/users/someone/clicks"): "lookups:read",
    ("GET", "/v1/conversions?order_id=1"): "lookups:read",
    ("GET", "/v1/postbacks/orphans"): "lookups:read",
    ("GET", "/v1/clicks/0000000000000000000000"): "lookups:read",
    ("POST", "/v1/postbacks/orphans/reconcile"): "orphans:write",
    ("GET", "/v1/events"): "events:read",
}


def create_key(settings, name: str, *scopes: str) -> str:  # noqa: ANN001
    out = cli(settings, "keys", "create", name, *(a for s in scopes for a in ("--scope", s)))
    assert out.returncode == 0, out.stderr
    made = json.loads(out.stdout)
    assert made["name"] == name and made["scopes"] == [s for s in SCOPES if s in scopes]
    return made["key"]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_a_key_opens_only_the_endpoints_of_its_scopes(client, settings):
    key = create_key(settings, "ledger-feed", "events:read")
    for (method, path), scope in ENDPOINTS.items():
        resp = await client.request(method, path, headers=bearer(key))
        body = await resp.json()
        if scope == "events:read":
            assert resp.status == 200, (path, body)
        else:
            assert (resp.status, body["error"]) == (403, "forbidden"), path
            assert scope in body["message"]
    support = create_key(settings, "support-bot", "lookups:read", "lookups:read")
    for (method, path), scope in ENDPOINTS.items():
        resp = await client.request(method, path, headers=bearer(support))
        assert resp.status == (403 if scope != "lookups:read" else resp.status), path
        assert resp.status in ((200, 404) if scope == "lookups:read" else (403,)), path


async def test_unknown_revoked_and_malformed_keys_are_401_everywhere(aiohttp_client, settings):
    # Each wrong key from its own address: ten from one are the wrong-key throttle's (test_admin_guard.py).
    client = await aiohttp_client(create_app(replace(settings, trusted_proxies=(ip_network("127.0.0.0/8"),))))
    key = create_key(settings, "to-revoke", *SCOPES)
    unknown = "tk_" + "A" * 43
    for i, headers in enumerate(({}, bearer("wrong"), bearer(unknown), bearer(key[:-1]), bearer(key + "x"),
                                 {"Authorization": f"Basic {key}"}, bearer("tk_\udcff" + "A" * 42))):
        for j, (method, path) in enumerate(ENDPOINTS):
            resp = await client.request(method, path, headers={**headers, "X-Forwarded-For": f"198.18.{i}.{j}"})
            assert resp.status == 401, (path, headers)
            assert (await resp.json())["error"] == "unauthorized"
    assert (await client.get("/v1/events", headers=bearer(key))).status == 200
    out = cli(settings, "keys", "revoke", "to-revoke")
    assert out.returncode == 0 and json.loads(out.stdout) == {"revoked": "to-revoke"}
    assert (await client.get("/v1/events", headers=bearer(key))).status == 401
    assert cli(settings, "keys", "revoke", "to-revoke").returncode == 1  # no live key of that name now


async def test_a_revoked_key_is_refused_at_once_by_every_worker(aiohttp_client, settings):
    workers = [await aiohttp_client(create_app(settings)) for _ in range(2)]
    key = create_key(settings, "two-workers", "lookups:read")
    for w in workers:
        assert (await w.get("/v1/users/x/clicks", headers=bearer(key))).status == 200
    assert cli(settings, "keys", "revoke", "two-workers").returncode == 0
    for w in workers:
        assert (await w.get("/v1/users/x/clicks", headers=bearer(key))).status == 401
    # The name is free again; the new key is another secret, the old one stays refused.
    again = create_key(settings, "two-workers", "lookups:read")
    assert again != key
    assert (await workers[0].get("/v1/users/x/clicks", headers=bearer(again))).status == 200
    assert (await workers[1].get("/v1/users/x/clicks", headers=bearer(key))).status == 401


async def test_list_shows_scopes_and_last_use_never_the_key_and_notes_use_once_a_minute(client, settings, db):
    key = create_key(settings, "listed", "audit:read", "events:read")
    listed = {k["name"]: k for k in json.loads(cli(settings, "keys", "list").stdout)}
    assert listed["listed"]["scopes"] == ["events:read", "audit:read"]
    assert listed["listed"]["last_used_at"] is None and listed["listed"]["created_at"].endswith("Z")
    assert set(listed["listed"]) == {"name", "scopes", "created_at", "last_used_at"}
    assert key not in cli(settings, "keys", "list").stdout
    assert (await client.get("/v1/events", headers=bearer(key))).status == 200
    first = await db.fetchval("SELECT last_used_at FROM api_keys WHERE name = 'listed' AND revoked_at IS NULL")
    assert first is not None
    assert json.loads(cli(settings, "keys", "list").stdout)  # still no key in it
    # Within the minute no write; once the last use is a minute old, the next use writes it.
    await db.execute("UPDATE api_keys SET last_used_at = now() - interval '30 seconds' WHERE name = 'listed'")
    noted = await db.fetchval("SELECT last_used_at FROM api_keys WHERE name = 'listed'")
    assert (await client.get("/v1/events", headers=bearer(key))).status == 200
    assert await db.fetchval("SELECT last_used_at FROM api_keys WHERE name = 'listed'") == noted
    await db.execute("UPDATE api_keys SET last_used_at = now() - interval '61 seconds' WHERE name = 'listed'")
    assert (await client.get("/v1/events", headers=bearer(key))).status == 200
    assert await db.fetchval("SELECT last_used_at FROM api_keys WHERE name = 'listed'") > noted
    # Only the hash is stored.
    stored = await db.fetch("SELECT * FROM api_keys WHERE name = 'listed'")
    assert all(key.encode() not in bytes(str(dict(r)), "utf-8") for r in stored)


def test_keys_refuses_bad_names_unknown_scopes_and_taken_names(settings):
    for args in (["bad name", "--scope", "events:read"], ["admin", "--scope", "events:read"],
                 ["Upper", "--scope", "events:read"], ["agent@example.com", "--scope", "events:read"],
                 ["ok-name"], ["ok-name", "--scope", "everything"], ["ok-name", "--scope", "events:write"]):
        out = cli(settings, "keys", "create", *args)
        assert out.returncode == 2, args
        assert out.stdout == "" and "Traceback" not in out.stderr
    create_key(settings, "taken", "events:read")
    out = cli(settings, "keys", "create", "taken", "--scope", "events:read")
    assert out.returncode == 1 and "taken" in out.stderr and out.stdout == ""
    assert "ok-name" not in cli(settings, "keys", "list").stdout


def agent_cookie(app, who: str, *roles: str) -> str:  # noqa: ANN001
    console: ConsoleKeys = app[keys.CONSOLE]
    cookie, _ = console.issue(time.time(), who, roles)
    return cookie


async def test_console_actions_follow_the_agents_roles(client: TestClient[web.Request, web.Application]):
    assert agent("a", ["support"]).scopes == {"lookups:read"}
    assert agent("a", ["operator"]).scopes == {"lookups:read", "orphans:write"}
    assert agent("a", ["admin"]).scopes == {"lookups:read", "orphans:write", "users:erase", "audit:read"}
    assert agent("a", ["janitor"]).scopes == frozenset()
    for roles, can_read, can_reconcile in ((("support",), True, False), (("operator",), True, True),
                                           (("admin",), True, True), ((), False, False)):
        client.session.cookie_jar.clear()
        client.session.cookie_jar.update_cookies({"tracker_console": agent_cookie(client.app, "ann@example.com",
                                                                                  *roles)})
        page = await client.get("/support/orphans", allow_redirects=False)
        assert page.status == (200 if can_read else 403), roles
        for path in ("/support/overview", "/support/users/u1", "/support/?q=u1"):
            assert (await client.get(path, allow_redirects=False)).status in ((200, 303) if can_read else (403,))
        console = client.app[keys.CONSOLE].read(
            client.session.cookie_jar.filter_cookies(client.make_url("/support/"))["tracker_console"].value,
            time.time())
        assert console is not None
        token = client.app[keys.CONSOLE].csrf(console.session_id)
        done = await client.post("/support/orphans/reconcile", data={"csrf": token}, allow_redirects=False)
        assert done.status == (303 if can_reconcile else 403), roles
    assert CSRF  # the console's forms carry the token the test reads above


async def test_the_admin_key_holds_every_scope(client):
    for method, path in ENDPOINTS:
        resp = await client.request(method, path, headers=ADMIN)
        assert resp.status in (200, 404), path
