"""CORS: the shopper endpoints answer the pages of TRACKER_CORS_ORIGINS (preflight included, never
with credentials), nothing else answers any page cross-origin, and TRACKER_CORS_ORIGINS is checked."""
from __future__ import annotations

import dataclasses

import pytest

from tracker import settings as settings_module
from tracker.app import create_app
from tracker.settings import SettingsError

from .conftest import ADMIN
from .test_observe import activate, auth

APP = "https://app.example.com"
EVIL = "https://evil.example.net"


@pytest.fixture
async def cors_client(aiohttp_client, settings):  # noqa: ANN001, ANN201
    allowed = dataclasses.replace(settings, cors_origins=frozenset({APP, "http://localhost:3000"}))
    return await aiohttp_client(create_app(allowed))


def no_cors(headers) -> bool:  # noqa: ANN001
    return not any(name.lower().startswith("access-control-") for name in headers)


@pytest.mark.parametrize(("path", "method"), [("/v1/observe", "POST"), ("/v1/clicks/FP7nipaOl86qYW93w2uKh-/events", "GET")])
async def test_preflight_of_an_allowed_origin_is_answered_without_credentials(cors_client, path, method):
    resp = await cors_client.options(path, headers={"Origin": APP, "Access-Control-Request-Method": method,
                                                    "Access-Control-Request-Headers": "authorization,content-type"})
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == APP
    assert resp.headers["Access-Control-Allow-Methods"] == method
    allowed = {h.strip().lower() for h in resp.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed
    assert "Access-Control-Allow-Credentials" not in resp.headers
    assert "Origin" in resp.headers["Vary"]


@pytest.mark.parametrize("origin", [EVIL, "https://app.example.com.evil.net", "http://app.example.com", "null"])
async def test_preflight_of_another_origin_gets_no_cors_headers(cors_client, origin):
    for path in ("/v1/observe", "/v1/clicks/FP7nipaOl86qYW93w2uKh-/events"):
        resp = await cors_client.options(path, headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
        assert resp.status == 204 and no_cors(resp.headers)


async def test_answers_and_refusals_carry_the_origin_only_when_allowed(cors_client, tokens):
    cid, _ = await activate(cors_client, tokens, "cors-user-1")
    body = {"click_id": cid, "events": [{"type": "navigation", "url": "https://aliexpress.ru/"}]}
    resp = await cors_client.post("/v1/observe", json=body, headers={**auth(tokens, "cors-user-1"), "Origin": APP})
    assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == APP
    assert "Retry-After" in resp.headers["Access-Control-Expose-Headers"]
    assert "Access-Control-Allow-Credentials" not in resp.headers
    # A refusal is readable by the page too (the client decides on its status).
    resp = await cors_client.post("/v1/observe", json=body, headers={"Origin": APP})
    assert resp.status == 401 and resp.headers["Access-Control-Allow-Origin"] == APP
    resp = await cors_client.post("/v1/observe", json=body, headers={**auth(tokens, "cors-user-1"), "Origin": EVIL})
    assert resp.status == 200 and no_cors(resp.headers)  # the browser withholds it from the page
    resp = await cors_client.post("/v1/observe", json=body, headers=auth(tokens, "cors-user-1"))
    assert resp.status == 200 and no_cors(resp.headers)


async def test_the_event_stream_carries_the_origin(cors_client, tokens):
    cid, _ = await activate(cors_client, tokens, "cors-user-2")
    token = tokens.mint("cors-user-2")
    resp = await cors_client.get(f"/v1/clicks/{cid}/events", params={"u": token, "heartbeat": "0.2"},
                                 headers={"Origin": APP})
    assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == APP
    assert b"event: state" in await resp.content.readuntil(b"\n\n")
    resp.close()
    resp = await cors_client.get(f"/v1/clicks/{cid}/events", params={"u": token}, headers={"Origin": EVIL})
    assert resp.status == 200 and no_cors(resp.headers)
    resp.close()


async def test_admin_and_other_endpoints_never_answer_cross_origin(cors_client, tokens):
    cid, _ = await activate(cors_client, tokens, "cors-user-3")
    for path in (f"/v1/clicks/{cid}", "/v1/events", "/v1/users/cors-user-3/clicks", "/v1/conversions?order_id=1",
                 "/v1/postbacks/orphans", "/metrics", "/healthz", "/support/login", "/openapi.json"):
        resp = await cors_client.get(path, headers={**ADMIN, "Origin": APP})
        assert resp.status < 500 and no_cors(resp.headers), path
        resp = await cors_client.options(path, headers={"Origin": APP, "Access-Control-Request-Method": "GET",
                                                        "Access-Control-Request-Headers": "authorization"})
        assert no_cors(resp.headers), path
    resp = await cors_client.post("/v1/postbacks/orphans/reconcile", headers={**ADMIN, "Origin": APP})
    assert no_cors(resp.headers)
    resp = await cors_client.get("/go/aliexpress", params={"u": tokens.mint("cors-user-3")}, headers={"Origin": APP},
                                 allow_redirects=False)
    assert resp.status == 302 and no_cors(resp.headers)


async def test_without_the_setting_no_origin_is_allowed(client, tokens):
    resp = await client.options("/v1/observe", headers={"Origin": APP, "Access-Control-Request-Method": "POST"})
    assert resp.status == 204 and no_cors(resp.headers)


BASE = {"TRACKER_SECRET": "s" * 32, "TRACKER_ADMIN_KEY": "a" * 32}


def test_the_setting_reads_origins_as_browsers_send_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loaded = settings_module.load({**BASE, "TRACKER_CORS_ORIGINS":
                                   " https://App.Example.com/ ,http://localhost:3000,https://shop.example:443,"})
    assert loaded.cors_origins == {"https://app.example.com", "http://localhost:3000", "https://shop.example"}
    assert settings_module.load(BASE).cors_origins == frozenset()


@pytest.mark.parametrize("bad", ["*", "https://*.example.com", "app.example.com", "https://app.example.com/path",
                                 "ftp://app.example.com", "https://user@app.example.com", "https://a.example:99999"])
def test_the_setting_refuses_what_is_not_an_origin(bad, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError, match="TRACKER_CORS_ORIGINS"):
        settings_module.load({**BASE, "TRACKER_CORS_ORIGINS": bad})
