"""The console's client of the OpenID Connect provider (store/openid.py) against real local HTTP
servers that misbehave the ways a provider or the network can: one that never answers, met by
many sign-ins at once, and one whose documents arrive in pieces. The sign-in itself, end to end
against the real provider, is in test_console_openid.py."""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import orjson
import pytest
from aiohttp import web

from tracker.domain.openid import OpenIDSettings
from tracker.store.openid import Provider, ProviderUnavailable

from .conftest import free_port


class Local:
    """An aiohttp server on a free port: `handler` answers every request; `hits` counts them."""

    def __init__(self, handler: Any) -> None:
        self.handler = handler
        self.hits = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        return await self.handler(self, request)

    async def __aenter__(self) -> "Local":
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._answer)
        self._runner = web.AppRunner(app, shutdown_timeout=0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()


def _discovery(issuer: str) -> bytes:
    return orjson.dumps({"issuer": issuer, "authorization_endpoint": issuer + "/auth",
                         "token_endpoint": issuer + "/token", "jwks_uri": issuer + "/jwks",
                         "padding": "x" * 3000})


@pytest.fixture
async def never_answers() -> AsyncIterator[tuple[Local, asyncio.Event]]:
    release = asyncio.Event()

    async def hang(server: Local, request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(status=503)

    async with Local(hang) as server:
        yield server, release
        release.set()


async def test_sign_ins_at_once_against_a_provider_that_never_answers_share_one_attempt(never_answers):
    """Every sign-in that needs the discovery document while the provider does not answer waits for
    the same single attempt (not each for its own, one after the other: the last of N would wait N
    timeouts), and one right after it is answered at once from that failure, without a request."""
    server, _ = never_answers
    provider = Provider(OpenIDSettings(server.url, "c", "s"), timeout=0.5, failure_pause=3600)
    try:
        outcomes = await asyncio.gather(*(provider.metadata() for _ in range(6)), return_exceptions=True)
        assert all(isinstance(o, ProviderUnavailable) for o in outcomes), outcomes
        assert server.hits == 1
        with pytest.raises(ProviderUnavailable, match="cannot be reached"):
            await provider.metadata()
        assert server.hits == 1
    finally:
        await provider.close()


async def test_after_the_pause_a_sign_in_tries_the_provider_again(never_answers):
    server, release = never_answers
    provider = Provider(OpenIDSettings(server.url, "c", "s"), timeout=0.5, failure_pause=0)
    try:
        for expected in (1, 2):
            with pytest.raises(ProviderUnavailable):
                await provider.metadata()
            assert server.hits == expected
    finally:
        await provider.close()


async def test_documents_that_arrive_in_pieces_are_read_whole():
    """A discovery document, a key set or a token answer sent in several chunks (as any provider
    behind a proxy may) is read to its end, not cut at the first chunk and then 'not JSON'."""
    async def in_pieces(server: Local, request: web.Request) -> web.StreamResponse:
        if request.path == "/token":
            body = orjson.dumps({"id_token": "a.b.c", "token_type": "Bearer", "padding": "y" * 3000})
        elif request.path == "/jwks":
            body = orjson.dumps({"keys": [{"kty": "oct", "k": "AAAA", "kid": "x", "padding": "z" * 3000}]})
        else:
            body = _discovery(server.url)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for start in range(0, len(body), 1000):
            await response.write(body[start:start + 1000])
            await asyncio.sleep(0.02)  # each piece its own packet (the test passes either way once fixed)
        await response.write_eof()
        return response

    async with Local(in_pieces) as server:
        provider = Provider(OpenIDSettings(server.url, "c", "s"), timeout=10)
        try:
            assert (await provider.metadata())["issuer"] == server.url
            assert await provider.exchange("code", "http://127.0.0.1/cb", "v" * 43) == "a.b.c"
        finally:
            await provider.close()
