"""The count of wrong admin keys per client across every worker and pod, in Redis, with each
worker's own count beside it (domain/key_guesses.py) for when Redis is away.

One sorted set per client, `<prefix>guesses:{<client>}`: the client inside one hash tag, so that on a
Redis Cluster the whole count lives in one slot and one script call decides it atomically. Members
are the wrong keys' times (Redis's clock, so that pods with skewed clocks agree), at most GUESSES of
them, and the key expires with the window. A wrong key is counted and answered in one call: among
concurrent guesses, only those the script found within the allowance get 401; the others get 429,
so a burst of thousands of requests still learns the answer for at most GUESSES keys a window.

Admin requests are few (support agents, the ledger's feed reads): each waits for one Redis round
trip here, never the click redirect. `client` gives the Redis client in use (SessionStore's, which
may change once: redis_client.py)."""
from __future__ import annotations

import asyncio
import secrets
import time
from typing import Callable

from .. import metrics
from ..domain.key_guesses import GUESSES, WINDOW, Guesses
from .redis_client import AnyRedis

# KEYS[1]: a client's wrong-key times (ms). ARGV[1]: the window (ms), ARGV[2]: the allowance,
# ARGV[3]: a member to add as a wrong key now ('' only reads). Counted only within the allowance.
# Replies the milliseconds until the client may try again, as it was before this call (0: now).
_GUESS = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.max(1, tonumber(oldest[2]) + window - now)
end
if ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
end
return 0
"""


class KeyGuard:
    def __init__(self, client: Callable[[], AnyRedis], prefix: str, up: Callable[[], bool] = lambda: True,
                 window: float = WINDOW, limit: int = GUESSES, timeout: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client, self.prefix, self.up, self.timeout, self.clock = client, prefix, up, timeout, clock
        self.window_ms = int(window * 1000)
        self.local = Guesses(limit, window)
        self._member = secrets.token_hex(4)  # this worker's wrong keys, unique across workers
        self._seq = 0

    def key(self, client: str) -> str:
        return f"{self.prefix}guesses:{{{client}}}"

    async def wait(self, client: str) -> float:
        """Seconds until `client` may present a key again (0: now), by the larger of the shared
        count and this worker's own (which alone decides while Redis is away)."""
        local = self.local.wait(client, self.clock())
        return max(local, await self._shared(client, ""))

    async def wrong(self, client: str) -> float:
        """Count a wrong key of `client`; the wait it was under before (0: the key was within the
        allowance and gets its 401; more: it is answered 429 like every other key now)."""
        local = self.local.wrong(client, self.clock())
        if local > 0:  # refused here already: not a guess that gets an answer, so not counted there
            return local
        self._seq += 1
        return await self._shared(client, f"{self._member}:{self._seq}")

    async def _shared(self, client: str, member: str) -> float:
        if not self.up():
            return 0.0
        try:
            waited = await asyncio.wait_for(self.client().eval(
                _GUESS, 1, self.key(client), self.window_ms, self.local.limit, member), self.timeout)
        except Exception:  # noqa: BLE001 - Redis away or slow: this worker's count decides
            metrics.REDIS_FAIL_OPEN.labels("key_guard").inc()
            return 0.0
        return int(waited) / 1000
