"""Abuse and secrets: secret rotation, unguessable click ids, per-user limits on reports, slow
clients, and a full run's logs that never show a secret."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import time
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson
import pytest
from aiohttp import web

from tracker import keys
from tracker import settings as settings_module
from tracker.app import create_app
from tracker.domain.clickid import LENGTH, click_time_ms, new_click_id
from tracker.domain.tokens import UserTokens
from tracker.serve import server_options

from .conftest import BROWSER, SECRET, one_minute, serve_process
from .waiting import until

OLD_SECRET = "the-old-secret-0123456789"


# -- secret rotation ------------------------------------------------------------------------------
def test_tokens_of_the_previous_secret_pass_only_during_the_grace_period():
    old = UserTokens(OLD_SECRET).mint("rotating-user")
    rotated = UserTokens(SECRET, previous=OLD_SECRET, previous_until=time.time() + 60)
    assert rotated.verify(old) == "rotating-user"
    assert rotated.verify(old) == "rotating-user"  # asked again: still checked against the period
    fresh = rotated.mint("rotating-user")
    assert fresh != old and UserTokens(SECRET).verify(fresh) == "rotating-user"
    assert UserTokens(OLD_SECRET).verify(fresh) is None  # new tokens are signed with the new secret
    ended = UserTokens(SECRET, previous=OLD_SECRET, previous_until=time.time() - 1)
    assert ended.verify(old) is None and ended.verify(fresh) == "rotating-user"
    assert UserTokens(SECRET).verify(old) is None  # the previous secret removed: refused
    forged = old[:-1] + ("A" if old[-1] != "A" else "B")
    assert rotated.verify(forged) is None


def test_rotation_settings_are_read_and_checked(tmp_path):
    env = {"TRACKER_DATA_DIR": str(tmp_path), "TRACKER_SECRET": SECRET, "TRACKER_SECRET_PREVIOUS": OLD_SECRET,
           "TRACKER_SECRET_PREVIOUS_UNTIL": "2026-12-01T00:00:00Z"}
    loaded = settings_module.load(env)
    assert loaded.secret_previous == OLD_SECRET and loaded.secret_previous_until == 1796083200.0
    assert settings_module.load({**env, "TRACKER_SECRET_PREVIOUS_UNTIL": "2026-12-01"}).secret_previous_until \
        == 1796083200.0
    for bad in ({"TRACKER_SECRET_PREVIOUS_UNTIL": "next week"}, {"TRACKER_SECRET_PREVIOUS": "short"}):
        with pytest.raises(settings_module.SettingsError):
            settings_module.load({**env, **bad})


async def test_the_service_accepts_a_previous_secrets_token_while_rotating(aiohttp_client, settings):
    app = create_app(dataclasses.replace(settings, secret_previous=OLD_SECRET,
                                         secret_previous_until=time.time() + 3600))
    client = await aiohttp_client(app)
    old = UserTokens(OLD_SECRET).mint("rot-user")
    resp = await client.get("/go/nike", params={"u": old}, allow_redirects=False, headers=BROWSER)
    assert resp.status == 302
    stranger = UserTokens("some-other-secret-entirely").mint("rot-user")
    resp = await client.get("/go/nike", params={"u": stranger}, allow_redirects=False, headers=BROWSER)
    assert resp.status == 401


# -- click ids ------------------------------------------------------------------------------------
def _random_part(click_id: str) -> int:
    import base64

    from tracker.domain.clickid import _FROM_SORTED

    raw = base64.urlsafe_b64decode(click_id.encode().translate(_FROM_SORTED) + b"==")
    return int.from_bytes(raw[6:], "big")


def test_click_ids_minted_together_share_nothing_but_their_time():
    ids = [new_click_id(1_795_000_000_000)[0] for _ in range(20_000)]
    assert len(set(ids)) == len(ids) and all(len(i) == LENGTH for i in ids)
    assert {click_time_ms(i) for i in ids} == {1_795_000_000_000}
    parts = [_random_part(i) for i in ids]
    # Every one of the 80 random bits takes both values, about half the time each.
    for bit in range(80):
        ones = sum((p >> bit) & 1 for p in parts)
        assert 9_000 < ones < 11_000, (bit, ones)
    # Neighbours are not related by a small step (a counter would be guessable from one id).
    assert sum(abs(b - a) < 2**40 for a, b in zip(parts, parts[1:])) < 5


def test_a_forked_worker_does_not_repeat_the_parents_ids():
    new_click_id()  # the parent has a random pool before forking
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.write(write, orjson.dumps([new_click_id(1)[0] for _ in range(100)]))
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        child = set(orjson.loads(fh.read()))
    os.waitpid(pid, 0)
    parent = {new_click_id(1)[0] for _ in range(100)}
    assert len(child) == 100 and not child & parent


async def test_another_users_click_id_shows_nothing(client, tokens):
    resp = await client.get("/go/nike", params={"u": tokens.mint("owner")}, allow_redirects=False,
                            headers=BROWSER)
    cid = resp.headers["X-Click-Id"]
    stranger = {"Authorization": f"Bearer {tokens.mint('stranger')}"}
    resp = await client.post("/v1/observe", json={"click_id": cid, "events": []}, headers=stranger)
    assert resp.status == 404
    resp = await client.get(f"/v1/clicks/{cid}/events", headers=stranger)
    assert resp.status == 404
    resp = await client.get(f"/v1/clicks/{cid}", headers=stranger)  # a user token is not the admin key
    assert resp.status == 401


# -- rate limits on reports -------------------------------------------------------------------------
async def test_observe_rate_limit_per_user(aiohttp_client, settings, tokens):
    client = await aiohttp_client(create_app(dataclasses.replace(settings, rate_limit_observe_user=2)))
    one_minute(client.server.app)
    resp = await client.get("/go/nike", params={"u": tokens.mint("chatty")}, allow_redirects=False,
                            headers=BROWSER)
    cid = resp.headers["X-Click-Id"]
    auth = {"Authorization": f"Bearer {tokens.mint('chatty')}"}
    statuses = []
    for _ in range(3):
        resp = await client.post("/v1/observe", json={"click_id": cid, "events": []}, headers=auth)
        statuses.append(resp.status)
    assert statuses == [200, 200, 429]
    assert int(resp.headers["Retry-After"]) >= 1 and (await resp.json())["error"] == "rate_limited"
    # Another user on the same address is not held back by the first one's reports.
    other = {"Authorization": f"Bearer {tokens.mint('quiet')}"}
    resp = await client.post("/v1/observe", json={"click_id": cid, "events": []}, headers=other)
    assert resp.status == 404  # not 429: it is simply not their click


async def test_a_report_counts_for_each_ten_of_its_events_against_the_users_limit(aiohttp_client, settings, tokens):
    """One account sending 100-event reports gets a tenth of the reports a shopper's small ones get:
    the detector's work per account per minute is bounded, not only its requests. (Counts are compared
    with room for the limiter's own rounding: it decides in memory and settles with Redis after.)"""
    client = await aiohttp_client(create_app(dataclasses.replace(settings, rate_limit_observe_user=30)))
    one_minute(client.server.app)

    async def admitted(user: str, events: int) -> int:
        resp = await client.get("/go/aliexpress", params={"u": tokens.mint(user)}, allow_redirects=False,
                                headers=BROWSER)
        body = {"click_id": resp.headers["X-Click-Id"],
                "events": [{"type": "navigation", "url": f"https://aliexpress.ru/item/{i}.html"} for i in range(events)]}
        auth = {"Authorization": f"Bearer {tokens.mint(user)}"}
        for n in range(40):
            resp = await client.post("/v1/observe", json=body, headers=auth)
            if resp.status == 429:
                assert (await resp.json())["error"] == "rate_limited" and int(resp.headers["Retry-After"]) >= 1
                return n
            assert resp.status == 200, await resp.text()
        return 40

    big, small = await admitted("flooder", 100), await admitted("shopper", 10)
    assert 2 <= big <= 4 and small >= 28, (big, small)  # 100 events count 10, 10 events count 1


# -- slow clients -----------------------------------------------------------------------------------
async def test_a_body_that_does_not_arrive_gets_408_and_the_connection_is_closed(settings, tokens):
    slow = dataclasses.replace(settings, body_timeout=1)
    runner = web.AppRunner(create_app(slow), **server_options(slow))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
        token = tokens.mint("slow-body")
        writer.write(b"POST /v1/observe HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + token.encode() + b"\r\nContent-Length: 500\r\n\r\n{\"click_id\":")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 408 ")
        await asyncio.wait_for(reader.read(), 6)  # closed after the short lingering, not held open
        writer.close()
    finally:
        await runner.cleanup()


async def test_a_connection_that_trickles_its_request_head_is_closed(settings):
    app = create_app(dataclasses.replace(settings, idle_timeout=1))
    runner = web.AppRunner(app, **server_options(dataclasses.replace(settings, idle_timeout=1)))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /go/nike HTTP/1.1\r\nHost: x\r\n")  # and never the end of the head
        await writer.drain()
        closed = await asyncio.wait_for(reader.read(), 10)  # EOF once the server gives up
        assert closed == b""
        writer.close()
        # A prompt client on the same server is served.
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200
    finally:
        await runner.cleanup()


# -- secrets never reach the logs ---------------------------------------------------------------------
@pytest.mark.fault
async def test_a_full_run_logs_no_secret(settings, tokens, tmp_path):
    password = "dsn-password-8d1c"  # trust auth ignores it; it must still never be printed
    parts = urlsplit(settings.database_url)
    dsn = urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}:{password}@{parts.hostname}:{parts.port}"))
    admin_key = "admin-key-for-the-log-test-5f2e-0123"
    output = tmp_path / "run.log"
    run_settings = dataclasses.replace(settings, database_url=dsn)
    token = tokens.mint("log-user")
    async with serve_process(run_settings, env={"TRACKER_ADMIN_KEY": admin_key, "TRACKER_LOG_FORMAT": "json",
                                                "TRACKER_SECRET_PREVIOUS": OLD_SECRET},
                             output=output) as (proc, base):
        async with aiohttp.ClientSession() as session:
            async with session.get(base + "/go/nike", params={"u": token}, allow_redirects=False,
                                   headers=BROWSER) as resp:
                assert resp.status == 302
                cid = resp.headers["X-Click-Id"]
            async with session.get(base + "/go/nike", params={"u": token + "x"}, allow_redirects=False) as resp:
                assert resp.status == 401
            async with session.post(base + "/v1/observe", headers={"Authorization": f"Bearer {token}"},
                                    json={"click_id": cid, "events": [
                                        {"type": "navigation", "url": "https://www.nike.com/?awc=1_2_3"}]}) as resp:
                assert resp.status == 200
            for key in (admin_key, "wrong-" + admin_key):
                async with session.get(f"{base}/v1/clicks/{cid}", headers={"Authorization": f"Bearer {key}"}) as resp:
                    assert resp.status == (200 if key == admin_key else 401)
            params = {"subid": cid, "order_id": "LOG-1", "status": "pending", "amount": "10", "commission": "1",
                      "token": "test-generic-token"}
            async with session.get(base + "/postback/generic", params=params) as resp:
                assert resp.status == 200
            async with session.get(base + "/postback/generic", params={**params, "token": "wrong-token-77"}) as resp:
                assert resp.status == 403
            async with session.get(base + "/readyz") as resp:
                assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    text = output.read_text()
    assert "postgres_ready" in text and "***" in text  # the run did log, and the DSN was censored
    for secret in (SECRET, OLD_SECRET, admin_key, "wrong-" + admin_key, token, token.split(".")[1], password,
                   "test-generic-token", "wrong-token-77"):
        assert secret not in text, secret


async def test_a_rate_limited_answer_is_held_so_a_retry_loop_cannot_spin(aiohttp_client, settings, tokens):
    # Held 2 s: the other user's one redirect must be answered within that, a wide margin even on
    # a loaded machine (the held answer's own wait is a lower bound, which load only lengthens).
    held = dataclasses.replace(settings, rate_limit_user=1, rate_limit_delay_ms=2000)
    client = await aiohttp_client(create_app(held))
    one_minute(client.server.app)
    params = {"u": tokens.mint("spinner")}
    assert (await client.get("/go/nike", params=params, allow_redirects=False, headers=BROWSER)).status == 302
    finished: dict[str, float] = {}
    started = time.monotonic()

    async def go(user_params: dict[str, str], name: str) -> aiohttp.ClientResponse:
        resp = await client.get("/go/nike", params=user_params, allow_redirects=False, headers=BROWSER)
        finished[name] = time.monotonic()
        return resp

    held_resp, other = await asyncio.gather(go(params, "held"), go({"u": tokens.mint("patient")}, "other"))
    assert held_resp.status == 429 and "Retry-After" in held_resp.headers
    assert finished["held"] - started >= 1.95  # held for the configured delay, not answered at once
    # Meanwhile another user was answered without waiting behind the held request.
    assert other.status == 302 and finished["other"] < finished["held"]


# -- oversized requests get the API's JSON error, and their bytes are not logged ------------------------
async def _raw(client, request: bytes) -> tuple[bytes, bytes]:
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(request)
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return head, body


@pytest.mark.parametrize("request_bytes", [
    b"GET /go/nike?u=secret-token-in-a-long-line&to=" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20_000 + b"\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(300)) + b"\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 TLS hello\r\n\r\n",
], ids=["long-request-line", "long-header", "300-headers", "bad-content-length", "tls-on-plain-port"])
async def test_requests_the_http_parser_refuses_get_json_400(client, request_bytes, capsys):
    head, body = await _raw(client, request_bytes)
    assert re.match(rb"HTTP/1\.[01] 400 ", head), head[:100]
    assert b"application/json" in head
    doc = orjson.loads(body)
    assert doc["error"] == "bad_request" and doc["message"]
    captured = capsys.readouterr()
    assert b"secret-token-in-a-long-line" not in (captured.out + captured.err).encode()


def test_library_log_records_become_redacted_json_lines_on_stdout():
    """asyncpg, redis, aiohttp and asyncio log through the standard library: their records come out
    as the same JSON lines as ours, on stdout, and nothing on stderr."""
    import subprocess
    import sys

    code = ("import logging\nfrom tracker import logs\nlogs.configure('json')\n"
            "logging.getLogger('asyncpg.pool').warning('connection lost: %s', 'boom')\n"
            "logging.getLogger('redis').info('below the threshold')\n"
            "logging.getLogger('aiohttp.server').error('failed', extra={'token': 'tok-123'})\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stderr == ""
    lines = [orjson.loads(line) for line in out.stdout.splitlines()]
    assert [(r["logger"], r["level"], r["event"]) for r in lines] == [
        ("asyncpg.pool", "warning", "connection lost: boom"), ("aiohttp.server", "error", "failed")]
    assert "tok-123" not in out.stdout


async def test_open_event_streams_are_bounded_per_user(client, tokens, monkeypatch):
    """Every open stream holds a task and a place in the worker's fan-out: past the per-user bound a new
    one gets 429, and a closed stream frees its place."""
    from tracker.web import events

    monkeypatch.setattr(events, "MAX_STREAMS_PER_USER", 2)
    token = tokens.mint("streamer")
    cids = []
    for _ in range(3):
        resp = await client.get("/go/nike", params={"u": token}, allow_redirects=False, headers=BROWSER)
        cids.append(resp.headers["X-Click-Id"])
    streams = [await client.get(f"/v1/clicks/{cid}/events", params={"u": token, "heartbeat": "0.5"})
               for cid in cids[:2]]
    assert [s.status for s in streams] == [200, 200]
    third = await client.get(f"/v1/clicks/{cids[2]}/events", params={"u": token})
    assert third.status == 429 and int(third.headers["Retry-After"]) >= 1
    other = await client.get("/go/nike", params={"u": tokens.mint("calm")}, allow_redirects=False, headers=BROWSER)
    calm = await client.get(f"/v1/clicks/{other.headers['X-Click-Id']}/events",
                            params={"u": tokens.mint("calm"), "heartbeat": "0.5"})
    assert calm.status == 200  # another user is not held back
    calm.close()
    streams[0].close()
    # The server notices the closed stream at its next write (heartbeat 0.5 s).
    await until(lambda: client.app[keys.STREAMS].per_user.get("streamer", 0) < 2, "the closed stream uncounted")
    again = await client.get(f"/v1/clicks/{cids[2]}/events", params={"u": token, "heartbeat": "0.5"})
    assert again.status == 200
    again.close()
    streams[1].close()


# -- hostile bytes where a secret is compared, and bodies that do not decode -----------------------
async def raw_request(port: int, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send bytes exactly as given (a client library would re-encode them) and read the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + b"Host: t\r\nConnection: close\r\n" + (b"Content-Length: %d\r\n" % len(body) if body else b"")
                 + b"\r\n" + body)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return int(answer.split(b" ", 2)[1]), answer.split(b"\r\n\r\n", 1)[-1]


async def test_a_token_with_non_ascii_characters_is_a_401_everywhere(client, tokens):
    fake = "alice." + "é" * 22  # the signature's length, but not ASCII: compare_digest refuses such str
    resp = await client.get("/go/nike", params={"u": fake}, allow_redirects=False, headers=BROWSER)
    assert resp.status == 401
    resp = await client.post("/v1/observe", json={"click_id": "x", "events": []},
                             headers={"Authorization": f"Bearer {fake}"})
    assert resp.status == 401
    resp = await client.get(f"/v1/clicks/{new_click_id()[0]}/events", params={"u": fake})
    assert resp.status == 401
    resp = await client.get(f"/v1/clicks/{new_click_id()[0]}", headers={"Authorization": "Bearer é" * 3})
    assert resp.status == 401


@pytest.mark.parametrize("path,header,status", [
    (b"/postback/impact?a=1", b"X-Signature: \xff\xfe", 403),
    (b"/v1/clicks/%s" % new_click_id()[0].encode(), b"Authorization: Bearer \xff\xfe", 401),
    (b"/v1/observe", b"Authorization: Bearer alice.\xff\xfe", 401),
])
async def test_secrets_in_bytes_that_are_not_utf8_are_refused_not_a_500(client, path, header, status):
    method = b"POST" if path == b"/v1/observe" else b"GET"
    got, body = await raw_request(client.port, method + b" " + path + b" HTTP/1.1\r\n" + header + b"\r\n", b"{}")
    assert got == status, body


@pytest.mark.parametrize("path", ["/postback/generic", "/v1/observe"])
@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
async def test_a_body_that_is_not_in_its_content_encoding_is_a_400(client, tokens, path, encoding):
    headers = {"Content-Encoding": encoding, "Content-Type": "application/json",
               "Authorization": f"Bearer {tokens.mint('enc-user')}"}
    resp = await client.post(path, data=b'{"not": "compressed"}', headers=headers)
    # (aiohttp itself refuses an encoding it does not support at all, with its own 400, as JSON here)
    assert resp.status == 400 and (await resp.json())["error"] in ("malformed", "bad_request")
