"""Activation sessions and rate limits in Redis, batched: requests add commands to one pipeline per
loop turn, so a thousand concurrent redirects cost a handful of Redis round trips, not a thousand.

Redis trouble never blocks a redirect: while Redis is down every rate limit passes and session writes
are dropped (counted in tracker_redis_fail_open_total, logged once per outage), and a probe brings it
back. The overwrite detector falls back to PostgreSQL for the session then.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import redis.asyncio as aioredis
import structlog

from .. import metrics
from .tasks import cancel_and_wait

log = structlog.get_logger("tracker.redis")
_Op = tuple[str, tuple[Any, ...], "asyncio.Future[Any] | None"]


class SessionStore:
    def __init__(self, client: aioredis.Redis, prefix: str, timeout: float = 0.5) -> None:
        self.client, self.prefix, self.timeout = client, prefix, timeout
        self.ok = True
        self._ops: list[_Op] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None

    # -- public -------------------------------------------------------------------------------
    def session_key(self, click_id: str) -> str:
        return f"{self.prefix}s:{click_id}"

    def put_session(self, click_id: str, session: dict[str, Any], ttl: int) -> None:
        """Write the activation session without waiting for it."""
        if not self.ok:
            metrics.REDIS_FAIL_OPEN.labels("session").inc()
            return
        self._ops.append(("set", (self.session_key(click_id), orjson.dumps(session), ttl), None))
        self._wake.set()

    async def over_limit(self, checks: list[tuple[str, str, int]]) -> tuple[str, int] | None:
        """Count one hit for each (scope, key, limit-per-minute); the first scope over its limit and
        the seconds until its window ends, or None. Fails open."""
        checks = [c for c in checks if c[2] > 0]
        if not checks:
            return None
        if not self.ok:
            metrics.REDIS_FAIL_OPEN.labels("rate_limit").inc()
            return None
        now = time.time()
        window = int(now // 60)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        keys = [f"{self.prefix}rl:{scope}:{key}:{window}" for scope, key, _ in checks]
        self._ops.append(("rate", tuple(keys), fut))
        self._wake.set()
        counts = await fut
        if counts is None:
            return None
        for (scope, _, limit), count in zip(checks, counts):
            if count > limit:
                metrics.RATE_LIMITED.labels(scope).inc()
                return scope, int(60 - now % 60) + 1
        return None

    async def get_session(self, click_id: str) -> dict[str, Any] | None:
        if not self.ok:
            return None
        try:
            raw = await asyncio.wait_for(self.client.get(self.session_key(click_id)), self.timeout)
        except Exception as exc:  # noqa: BLE001 - fail open
            self._down(exc)
            return None
        return orjson.loads(raw) if raw else None

    async def ping(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.client.ping(), self.timeout))
        except Exception:  # noqa: BLE001 - any failure means not ready
            return False

    # -- the batch loop -----------------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="redis-batcher")

    async def stop(self) -> None:
        await cancel_and_wait([self._task, self._probe])
        self._fail_pending()

    async def _run(self) -> None:
        while True:
            if not self._ops:
                self._wake.clear()
                await self._wake.wait()
            ops, self._ops = self._ops, []
            pipe = self.client.pipeline(transaction=False)
            for kind, args, _ in ops:
                if kind == "set":
                    pipe.set(args[0], args[1], ex=args[2])
                else:
                    for key in args:
                        pipe.incr(key)
                        pipe.expire(key, 61)
            try:
                results = await asyncio.wait_for(pipe.execute(raise_on_error=False), self.timeout)
            except asyncio.CancelledError:
                self._resolve(ops, None)
                raise
            except Exception as exc:  # noqa: BLE001 - fail open
                self._down(exc)
                self._resolve(ops, None)
                continue
            self._resolve(ops, results)

    @staticmethod
    def _resolve(ops: list[_Op], results: list[Any] | None) -> None:
        pos = 0
        for kind, args, fut in ops:
            if kind == "set":
                pos += 1
                continue
            n = len(args)
            if fut is not None and not fut.done():
                if results is None:
                    fut.set_result(None)
                else:
                    counts = results[pos:pos + 2 * n:2]
                    fut.set_result(None if any(isinstance(c, Exception) for c in counts) else counts)
            pos += 2 * n

    def _fail_pending(self) -> None:
        ops, self._ops = self._ops, []
        self._resolve(ops, None)

    def _down(self, exc: BaseException) -> None:
        if self.ok:
            self.ok = False
            log.error("redis_unreachable", error=repr(exc)[:300])
            metrics.DEPENDENCY_UP.labels("redis").set(0)
            self._fail_pending()
            self._probe = asyncio.create_task(self._probe_until_up(), name="redis-probe")

    async def _probe_until_up(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if await self.ping():
                self.ok = True
                metrics.DEPENDENCY_UP.labels("redis").set(1)
                log.info("redis_back")
                return
