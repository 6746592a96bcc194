"""A real webhook subscriber for the tests: an aiohttp server on a free local port that checks every
request's signature with the Standard Webhooks reference library (PyPI `standardwebhooks`, not our
code) and answers as the test tells it (a status, a redirect, or never)."""
from __future__ import annotations

import asyncio
import base64
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable

import orjson
from aiohttp import web
from standardwebhooks.webhooks import Webhook as Verifier
from standardwebhooks.webhooks import WebhookVerificationError

from .waiting import until


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class Hit:
    webhook_id: str
    timestamp: int
    payload: dict[str, Any]
    verified: bool
    at: float


class Receiver:
    """`answer(hit)` decides each answer: an int status, "hang" (never answers), or "redirect"."""

    def __init__(self, secret: str, answer: Callable[[Hit], Any] = lambda hit: 204) -> None:
        self.secret = secret
        self.answer = answer
        self.hits: list[Hit] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items()}
        try:
            payload = Verifier(self.secret).verify(body, headers)
            verified = True
        except WebhookVerificationError:
            payload, verified = orjson.loads(body), False
        hit = Hit(headers.get("webhook-id", ""), int(headers.get("webhook-timestamp", "0")), payload, verified,
                  time.monotonic())
        self.hits.append(hit)
        action = self.answer(hit)
        if action == "hang":
            await asyncio.sleep(3600)  # the behaviour asked for: a subscriber that never answers
        if action == "redirect":
            return web.Response(status=307, headers={"Location": self.url + "/elsewhere"})
        return web.Response(status=int(action))

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/hooks", self._handle)
        app.router.add_post("/hooks/elsewhere", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/hooks"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait(self, done: Callable[[], bool], timeout: float = 20.0) -> None:
        """Until `done()` holds."""
        try:
            await until(done, "the subscriber's awaited requests", timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; {len(self.hits)} requests so far") from None

    def ids(self, *, verified_only: bool = True) -> list[str]:
        return [h.webhook_id for h in self.hits if h.verified or not verified_only]
