"""Activation sessions and rate limits in Redis, batched: one pipeline every few milliseconds
carries every session write and rate-limit count gathered meanwhile, so no request waits for Redis.

Redis trouble never blocks a redirect: while Redis is down rate limits hold per worker only and
session writes are dropped (counted in tracker_redis_fail_open_total, logged once per outage), and a
probe brings it back. The overwrite detector falls back to PostgreSQL for the session then.

A slow Redis is not a down one: the batch call may take up to SYNC_TIMEOUT (nothing waits for it but
the next batch, which gathers meanwhile, up to MAX_PENDING sessions). Measured: on a saturated 2-core
machine an EVAL of 1,000 sessions, ~3 ms when idle, took up to 1.6 s (Redis's own slowlog); with the
0.5 s timeout of the request-path calls, such a stall dropped every session for a second or more.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import redis.asyncio as aioredis
import structlog
from redis.exceptions import ResponseError

from .. import metrics
from .tasks import cancel_and_wait

log = structlog.get_logger("tracker.redis")
SYNC_TIMEOUT = 5.0
MAX_PENDING = 100_000
_SAVE_STATE = """
local current = redis.call('GET', KEYS[1])
if ARGV[3] == '0' and current and string.find(current, '"state":"converted"', 1, true) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('PUBLISH', KEYS[2], ARGV[1])
return 1
"""
_SYNC = r"""
for key, ttl, value in string.gmatch(ARGV[1], '([^\t\n]+)\t(%d+)\t([^\n]*)') do
  redis.call('SET', key, value, 'EX', ttl)
end
local totals = {}
for key, delta in string.gmatch(ARGV[2], '([^\t\n]+)\t(%d+)') do
  local total = redis.call('INCRBY', key, delta)
  if total == tonumber(delta) then
    redis.call('EXPIRE', key, 61)  -- a new window's key: give it its end
  end
  totals[#totals + 1] = total
end
return totals
"""


class SessionStore:
    def __init__(self, client: aioredis.Redis, prefix: str, timeout: float = 0.5,
                 sync_timeout: float = SYNC_TIMEOUT) -> None:
        self.client, self.prefix, self.timeout, self.sync_timeout = client, prefix, timeout, sync_timeout
        self.ok = True
        self._ops: list[tuple[str, bytes, int]] = []  # session writes: key, JSON, TTL
        self._window = 0
        self._known: dict[str, int] = {}  # rate-limit key -> all workers' count at the last sync
        self._local: dict[str, int] = {}  # rate-limit key -> this worker's hits since the last sync
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None

    # -- public -------------------------------------------------------------------------------
    def state_key(self, click_id: str) -> str:
        return f"{self.prefix}st:{click_id}"

    def channel(self, click_id: str) -> str:
        return f"{self.prefix}ev:{click_id}"

    async def save_state(self, click_id: str, state: dict[str, Any], ttl: int, force: bool = False) -> bool:
        """Write a click's detector state and tell its live streams, waiting for Redis (so the next
        observe, on any worker, reads it). A `converted` state is never replaced unless `force`:
        a postback's word beats a late observation. False when Redis did not take it."""
        if not self.ok:
            metrics.REDIS_FAIL_OPEN.labels("state").inc()
            return False
        try:
            await asyncio.wait_for(self.client.eval(
                _SAVE_STATE, 2, self.state_key(click_id), self.channel(click_id), orjson.dumps(state), ttl,
                1 if force else 0), self.timeout)
        except Exception as exc:  # noqa: BLE001 - fail open; PostgreSQL has the state too
            self._down(exc)
            return False
        return True

    async def get_session_and_state(self, click_id: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None, bool]:
        """The activation session and the detector state in one round trip; the last item is False
        when Redis could not answer (the caller falls back to PostgreSQL)."""
        if not self.ok:
            return None, None, False
        try:
            raw = await asyncio.wait_for(
                self.client.mget(self.session_key(click_id), self.state_key(click_id)), self.timeout)
        except Exception as exc:  # noqa: BLE001 - fail open
            self._down(exc)
            return None, None, False
        return (orjson.loads(raw[0]) if raw[0] else None, orjson.loads(raw[1]) if raw[1] else None, True)

    def session_key(self, click_id: str) -> str:
        return f"{self.prefix}s:{click_id}"

    def put_session(self, click_id: str, session: dict[str, Any], ttl: int) -> None:
        """Write the activation session without waiting for it."""
        if not self.ok or len(self._ops) >= MAX_PENDING:
            metrics.REDIS_FAIL_OPEN.labels("session").inc()
            return
        self._ops.append((self.session_key(click_id), orjson.dumps(session), ttl))
        self._wake.set()

    def over_limit(self, checks: list[tuple[str, str, int]]) -> tuple[str, int] | None:
        """Count one hit for each (scope, key, limit-per-minute); the first scope over its limit and
        the seconds until its window ends, or None.

        Decided locally, without a Redis round trip: the count is the total all workers had reached
        at the last sync plus this worker's hits since. A sync every `sync_interval` adds the local
        hits to Redis (INCRBY) and reads the new totals, so across workers a limit can be overshot by
        at most what the other workers admit within one interval. While Redis is down the limits
        still hold per worker."""
        now = time.time()
        window = int(now // 60)
        if window != self._window:
            self._window, self._known, self._local = window, {}, {}
        keys = []
        for scope, key, limit in checks:
            if limit <= 0:
                continue
            name = f"{scope}:{key}"
            if self._known.get(name, 0) + self._local.get(name, 0) >= limit:
                metrics.RATE_LIMITED.labels(scope).inc()
                return scope, int(60 - now % 60) + 1
            keys.append(name)
        for name in keys:
            self._local[name] = self._local.get(name, 0) + 1
        if keys:
            self._wake.set()
        return None

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
        if self.ok and (self._ops or self._local):  # the last interval's writes, if Redis takes them now
            await self._sync_once(self.timeout)
        self._fail_pending()

    async def _run(self, sync_interval: float = 0.05) -> None:
        while True:
            if not self._ops and not self._local:
                self._wake.clear()
                await self._wake.wait()
            if not self.ok:
                self._fail_pending()
                await asyncio.sleep(sync_interval)
                continue
            await self._sync_once(self.sync_timeout)
            # Gather a little before the next round trip: one pipeline per interval, not per request.
            await asyncio.sleep(sync_interval)

    async def _sync_once(self, timeout: float) -> None:
        ops, self._ops = self._ops, []
        window, deltas, self._local = self._window, self._local, {}
        # One script call carries the whole interval: every session write and every rate-limit
        # count, each packed into one argument, so there is one string to build, one command to
        # pack and one reply to parse instead of two or three per click.
        sessions = b"\n".join(b"%s\t%d\t%s" % (key.encode(), ttl, body) for key, body, ttl in ops)
        names = list(deltas)
        counts = "\n".join(f"{self.prefix}rl:{name}:{window}\t{deltas[name]}" for name in names)
        try:
            totals = await asyncio.wait_for(self.client.eval(_SYNC, 0, sessions, counts), timeout)
        except asyncio.CancelledError:
            # Stopping mid-call: the sessions go back for stop()'s last call (writing one twice is
            # harmless); the counts are not sent again, so no hit is counted twice.
            self._ops[:0] = ops
            raise
        except ResponseError as exc:
            log.error("redis_sync_failed", error=str(exc)[:200], sessions=len(ops), counters=len(names))
            metrics.REDIS_FAIL_OPEN.labels("session").inc(len(ops))
            return
        except Exception as exc:  # noqa: BLE001 - fail open
            metrics.REDIS_FAIL_OPEN.labels("session").inc(len(ops))
            self._down(exc)
            return
        if window == self._window:
            for name, total in zip(names, totals):
                if isinstance(total, int):
                    self._known[name] = total

    def _fail_pending(self) -> None:
        if self._ops:
            metrics.REDIS_FAIL_OPEN.labels("session").inc(len(self._ops))
            self._ops.clear()

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
