"""Activation sessions and rate limits in Redis, batched: one script call every few milliseconds
carries every session write and rate-limit count gathered meanwhile, so no request waits for Redis
(rate limits: ratelimit.py; only a user at the edge of a limit waits for one round trip).

Redis trouble never blocks a redirect: while Redis is down rate limits hold per worker only and
session writes are dropped (counted in tracker_redis_fail_open_total, logged once per outage), and a
probe brings it back. The overwrite detector falls back to PostgreSQL for the session then.

On a Redis Cluster (redis_client.py) the same calls go to the master of their slot: a click's
session and state share one (redis_keys.py); the batch's session writes go as a pipeline that
redis-py's RedisCluster splits by node, beside one script call for the rate limits (their keys share
one slot). A master that fails makes the batch fail: Redis counts as down (fail-open, as above)
until the probe finds every master answering and the cluster healthy again, its slots moved to the
replica.

A slow Redis is not a down one: the batch call may take up to SYNC_TIMEOUT (nothing waits for it but
the next batch, which gathers meanwhile, up to MAX_PENDING sessions). Measured: on a saturated 2-core
machine an EVAL of 1,000 sessions, ~3 ms when idle, took up to 1.6 s (Redis's own slowlog); with the
0.5 s timeout of the request-path calls, such a stall dropped every session for a second or more.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from typing import Awaitable, Callable, Sequence, TypeVar, cast

import orjson
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import MaxConnectionsError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .. import metrics
from ..domain.states import PROGRESS, ActivationSession, StoredState
from .ratelimit import COUNTS_LUA, EDGE, Check, RateLimits, Sent, Verdict
from .redis_client import AnyRedis
from .redis_keys import channel, limits_prefix, session_key, state_key
from .tasks import cancel_and_wait, supervised

log = structlog.get_logger("tracker.redis")
SYNC_TIMEOUT = 5.0
HEARTBEAT = 20.0  # seconds between calls of an idle worker (it counts in W for LIVE_FOR = 60 s)
MAX_PENDING = 100_000
# Refuses, unless forced, a state that would move the click back (domain/states.PROGRESS, as a Lua
# table: ARGV[4] is the new state's word): reads the stored state's `state` field, not its bytes (a
# trail entry could carry the same key). ARGV[5]: PUBLISH, or SPUBLISH on a cluster (the channel is
# in the state's slot).
_SAVE_STATE = """
local current = redis.call('GET', KEYS[1])
if ARGV[3] == '0' and current then
  local ok, doc = pcall(cjson.decode, current)
  local progress = {""" + ", ".join(f"['{state}'] = {n}" for state, n in PROGRESS.items()) + """}
  if ok and type(doc) == 'table' and type(doc.state) == 'string' then
    local was, now = progress[doc.state], progress[ARGV[4]]
    if was and now and now < was then
      return 0
    end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call(ARGV[5], KEYS[2], ARGV[1])
return 1
"""
# One call per interval: every session write, then every rate-limit line (ratelimit.COUNTS_LUA).
_SYNC = r"""
for key, ttl, value in string.gmatch(ARGV[1], '([^\t\n]+)\t(%d+)\t([^\n]*)') do
  redis.call('SET', key, value, 'EX', ttl)
end
""" + COUNTS_LUA
# On a cluster: the rate-limit lines alone (the same arguments; ARGV[1] unused), KEYS[1] the live
# workers' set, so that the call goes to the master of the rate limits' slot.
_COUNT = COUNTS_LUA
T = TypeVar("T")
Reconnect = Callable[[], Awaitable["AnyRedis | None"]]


class SessionStore:
    def __init__(self, client: AnyRedis, prefix: str, timeout: float = 0.5,
                 sync_timeout: float = SYNC_TIMEOUT, reconnect: Reconnect | None = None,
                 max_calls: int = 32, pod_workers: int = 1) -> None:
        self.client, self.prefix, self.timeout, self.sync_timeout = client, prefix, timeout, sync_timeout
        self.cluster = isinstance(client, RedisCluster)
        # Redis did not say at start whether it is a cluster: the probe asks again, and this gives the
        # client for what it turned out to be (None: the one in use is right).
        self._reconnect = reconnect
        self._limits_prefix = limits_prefix(prefix)
        # A cluster client's pools do not wait for a free connection (past max_connections a call
        # fails at once: 150 event streams opening together took the batch call's and marked Redis
        # down), so on a cluster at most `max_calls` calls are in flight, the others waiting their
        # turn within their own deadline, as a standalone client's blocking pool makes them.
        self._calls = asyncio.Semaphore(max_calls)
        self._ops: list[tuple[str, bytes, int]] = []  # session writes: key, JSON, TTL
        self._wake = asyncio.Event()
        self.limits = RateLimits(self._wake, pod_workers=pod_workers)  # pod_workers: W's floor
        self.ok = True
        # This worker in Redis's set of live workers (W of the rate limits): unique across pods.
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._task: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None
        self._went_down = asyncio.Event()  # set while Redis is down: the probe looks for it back
        self._slow_logged = -1e9  # monotonic time of the last redis_slow line
        self._after_pass: list[asyncio.Future[None]] = []  # settle(): resolved when a batch call ends

    @property
    def ok(self) -> bool:
        return self.limits.up

    @ok.setter
    def ok(self, up: bool) -> None:
        self.limits.up = up

    # -- public -------------------------------------------------------------------------------
    def state_key(self, click_id: str) -> str:
        return state_key(self.prefix, click_id)

    def channel(self, click_id: str) -> str:
        return channel(self.prefix, click_id)

    async def save_state(self, click_id: str, state: StoredState, ttl: int, force: bool = False) -> bool:
        """Write a click's detector state and tell its live streams, waiting for Redis (so the next
        observe, on any worker, reads it). A state that would move the click back (a `converted`
        one above all: a postback's word beats a late observation) is left in place unless `force`.
        False when Redis could not be asked."""
        if not self.ok:
            metrics.REDIS_FAIL_OPEN.labels("state").inc()
            return False
        try:
            await asyncio.wait_for(self._call(lambda: self.client.eval(
                _SAVE_STATE, 2, self.state_key(click_id), self.channel(click_id), orjson.dumps(state), ttl,
                1 if force else 0, state.get("state", ""), "SPUBLISH" if self.cluster else "PUBLISH")),
                self.timeout)
        except Exception as exc:  # noqa: BLE001 - fail open; PostgreSQL has the state too
            self._request_failed(exc)
            return False
        return True

    async def get_session_and_state(
            self, click_id: str) -> tuple[ActivationSession | None, StoredState | None, bool]:
        """The activation session and the detector state in one round trip; the last item is False
        when Redis could not answer (the caller falls back to PostgreSQL)."""
        if not self.ok:
            return None, None, False
        try:
            raw = await asyncio.wait_for(
                self._call(lambda: self.client.mget(self.session_key(click_id), self.state_key(click_id))), self.timeout)
        except Exception as exc:  # noqa: BLE001 - fail open
            self._request_failed(exc)
            return None, None, False
        # The JSON put_session and save_state wrote: read back as those types, unchecked.
        return (cast(ActivationSession, orjson.loads(raw[0])) if raw[0] else None,
                cast(StoredState, orjson.loads(raw[1])) if raw[1] else None, True)

    def session_key(self, click_id: str) -> str:
        return session_key(self.prefix, click_id)

    def put_session(self, click_id: str, session: ActivationSession, ttl: int) -> None:
        """Write the activation session without waiting for it."""
        if not self.ok or len(self._ops) >= MAX_PENDING:
            metrics.REDIS_FAIL_OPEN.labels("session").inc()
            return
        self._ops.append((self.session_key(click_id), orjson.dumps(session), ttl))
        self._wake.set()

    def over_limit(self, checks: Sequence[Check]) -> Verdict:
        """Count one hit for each (scope, key, limit-per-minute); the first scope over its limit and
        the seconds to wait, or None. Decided in memory (ratelimit.py), without waiting; at the edge
        of a limit from this worker's view alone (over_limit_exact holds the bound across workers)."""
        return self.limits.check(checks)

    async def over_limit_exact(self, checks: Sequence[Check]) -> Verdict:
        """over_limit with the bound across workers: decided in memory, except for a key at the edge
        of its limit, which Redis decides (one atomic script call: only a user at the edge waits
        for a round trip). /go calls `limits.check(checks, edge=True)` itself first and
        this only for EDGE. Every key at its edge goes in one call that counts the hit for all of
        them or none, after the others are found not full: a request one key refuses is not
        counted against another."""
        limits, pending = self.limits, list(checks)
        for _ in range(len(pending)):
            verdict = limits.check(pending, edge=True)
            if verdict is not EDGE:
                return verdict
            edge, verdict = limits.at_edge(pending)
            if verdict is not None:
                return verdict
            prepared = limits.edge_lines([f"{scope}:{key}" for scope, key, _ in edge])
            answer = await self._count(*prepared) if prepared else None
            if answer is None:  # no answer in time: this worker's view decides
                return limits.check(pending)
            for (scope, _, limit), (room, counted) in zip(edge, answer):
                if not room:  # until the minute ends, or a second when others hold the rest
                    metrics.RATE_LIMITED.labels(scope).inc()
                    return scope, (int(60 - limits.clock() % 60) + 1) if counted >= limit else 1
            pending = [check for check in pending if check not in edge]
        return limits.check(pending)

    async def _count(self, line: str, sent: Sent, window: int) -> list[tuple[bool, int]] | None:
        """One edge call: per line, room or not and the count (the hit is admitted when every line
        had room), None if Redis did not answer. Its failure does not mark Redis down (the batch
        call finds that out, with its longer deadline)."""
        try:
            reply = await asyncio.wait_for(self._counts(b"", line), self.timeout)
        except asyncio.CancelledError:
            self.limits.settle(sent, None, window)
            raise
        except Exception:  # noqa: BLE001 - fail open: decided per worker
            self.limits.settle(sent, None, window)
            metrics.REDIS_FAIL_OPEN.labels("rate_limit").inc()
            return None
        self.limits.settle_edge(sent, reply, window)
        return [(bool(reply[4 + 4 * i]), int(reply[1 + 4 * i])) for i in range(len(sent))]

    async def _counts(self, sessions: bytes, counts: str) -> list[int]:
        """The batch script's call: on a standalone Redis the sessions too, on a cluster the rate-limit
        lines alone (the sessions go by _write_sessions)."""
        args = (counts, self._limits_prefix, self.worker_id, int(time.time()))
        if self.cluster:
            reply = await self._call(lambda: self.client.eval(_COUNT, 1, self._limits_prefix + "rl-workers", b"", *args))
        else:
            reply = await self.client.eval(_SYNC, 0, sessions, *args)
        return cast(list[int], reply)

    async def _call(self, command: Callable[[], Awaitable[T]]) -> T:
        """A command, within the cluster's bound of calls in flight (the standalone pool's own wait)."""
        if not self.cluster:
            return await command()
        async with self._calls:
            return await command()

    async def _write_sessions(self, ops: list[tuple[str, bytes, int]]) -> None:
        """A cluster's session writes: one pipeline, split by node (each SET to its slot's master)."""
        if not ops:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for key, body, ttl in ops:
                pipe.set(key, body, ex=ttl)
            await self._call(pipe.execute)

    async def settle(self) -> None:
        """Return once the session writes queued before this call have been sent to Redis (or
        dropped, Redis being down): the next batch call carries them."""
        if not self.ok:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._after_pass.append(waiter)
        self._wake.set()
        try:
            await asyncio.wait_for(waiter, self.sync_timeout + 1)
        except TimeoutError:
            pass  # the batch call's own deadline passed: Redis is being found down

    async def forget(self, click_ids: list[str]) -> int:
        """Delete the clicks' sessions and detector states (an erasure); how many sessions there were."""
        deleted = 0
        for start in range(0, len(click_ids), 500):
            async with self.client.pipeline(transaction=False) as pipe:
                for click_id in click_ids[start:start + 500]:
                    pipe.delete(self.session_key(click_id))
                    pipe.delete(self.state_key(click_id))
                replies = await pipe.execute()
            deleted += sum(int(r) for r in replies[0::2])
        return deleted

    async def forget_states(self, click_ids: list[str]) -> int:
        """Delete the clicks' detector states only (what an observe writes back); how many there were."""
        deleted = 0
        for start in range(0, len(click_ids), 500):
            async with self.client.pipeline(transaction=False) as pipe:  # a key at a time: any slot
                for click_id in click_ids[start:start + 500]:
                    pipe.delete(self.state_key(click_id))
                deleted += sum(int(r) for r in await pipe.execute())
        return deleted

    async def ping(self) -> bool:
        """Redis answers; on a cluster, every master it knows answers and the cluster says it is
        healthy (cluster_state:ok: every slot served), so a master that failed is not taken for back
        before its replica has its slots."""
        try:
            if isinstance(self.client, RedisCluster):
                client = self.client
                async def healthy() -> bool:
                    await client.ping(target_nodes=RedisCluster.PRIMARIES)
                    return (await client.cluster_info()).get("cluster_state") == "ok"
                return await asyncio.wait_for(healthy(), self.timeout)
            return bool(await asyncio.wait_for(self.client.ping(), self.timeout))
        except Exception:  # noqa: BLE001 - any failure means not ready
            return False

    # -- the batch loop -----------------------------------------------------------------------
    async def start(self) -> None:
        self._task = supervised("redis-batcher", self._run)
        self._probe = supervised("redis-probe", self._probe_forever)

    async def stop(self) -> None:
        await cancel_and_wait([self._task, self._probe])
        if self.ok and (self._ops or self.limits.active):  # the last interval's writes, reservations back
            await self._sync_once(self.timeout, final=True)
        self._fail_pending()

    async def _run(self, sync_interval: float = 0.05) -> None:
        while True:
            # The first call, and one after HEARTBEAT seconds with nothing to send, only tell Redis
            # that this worker is alive: the rate limits' shares are per live worker.
            if self.ok:
                await self._sync_once(self.sync_timeout)
            else:
                self._fail_pending()
            # Gather a little before the next round trip: one call per interval, not per request.
            await asyncio.sleep(sync_interval)
            if not self._ops and not self.limits.active and not self._after_pass:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), HEARTBEAT)
                except TimeoutError:
                    pass

    async def _sync_once(self, timeout: float, final: bool = False) -> None:
        settled, self._after_pass = self._after_pass, []
        try:
            await self._sync(timeout, final)
        finally:
            for waiter in settled:
                if not waiter.done():
                    waiter.set_result(None)

    async def _sync(self, timeout: float, final: bool = False) -> None:
        ops, self._ops = self._ops, []
        counts, sent, window = self.limits.batch(final)
        # One script call carries the whole interval: every session write and every rate-limit
        # line, each packed into one argument, so there is one string to build, one command to
        # pack and one reply to parse instead of two or three per click. (On a cluster: a
        # pipeline of the sessions beside the script call of the counts.)
        reply: list[int] | None = None
        try:
            if self.cluster:
                reply, failure = await asyncio.wait_for(self._sync_cluster(ops, counts), timeout)
                if failure is not None:
                    raise failure
            else:
                sessions = b"\n".join(b"%s\t%d\t%s" % (key.encode(), ttl, body) for key, body, ttl in ops)
                reply = await asyncio.wait_for(self._counts(sessions, counts), timeout)
        except asyncio.CancelledError:
            # Stopping mid-call: the sessions go back for stop()'s last call (writing one twice is
            # harmless); the counts are not sent again, so no hit is counted twice.
            self._ops[:0] = ops
            self.limits.settle(sent, None, window)
            raise
        except ResponseError as exc:
            log.error("redis_sync_failed", error=str(exc)[:200], sessions=len(ops), counters=len(sent))
            metrics.REDIS_FAIL_OPEN.labels("session").inc(len(ops))
            self.limits.settle(sent, reply, window)
            return
        except Exception as exc:  # noqa: BLE001 - fail open
            metrics.REDIS_FAIL_OPEN.labels("session").inc(len(ops))
            self.limits.settle(sent, reply, window)
            self._down(exc)
            return
        self.limits.settle(sent, reply, window)

    async def _sync_cluster(self, ops: list[tuple[str, bytes, int]],
                            counts: str) -> tuple[list[int] | None, BaseException | None]:
        """The batch on a cluster: the sessions' pipeline and the rate limits' script call at once.
        The counts' answer, and the failure of either call. Counts that Redis answered are settled
        with that answer whatever became of the sessions (hits counted in Redis are not dropped)."""
        written, reply = await asyncio.gather(self._write_sessions(ops), self._counts(b"", counts),
                                              return_exceptions=True)
        if isinstance(reply, BaseException):
            return None, reply
        return reply, written if isinstance(written, BaseException) else None

    def _fail_pending(self) -> None:
        if self._ops:
            metrics.REDIS_FAIL_OPEN.labels("session").inc(len(self._ops))
            self._ops.clear()

    def _request_failed(self, exc: BaseException) -> None:
        """A call a request waited for failed. A connection error means Redis is away: fail open
        until the probe brings it back. A call that only outlived its deadline (a worker too busy to
        read the answer in time, a Redis slow for a moment) fails open for that request alone:
        seen with 1,900 event streams opened at once, one such timeout marked Redis down for the
        whole worker and dropped every pending session. So does a cluster node's connections all in
        use (a burst). A Redis that stays silent is still found down, by the batch call's longer
        deadline."""
        if isinstance(exc, (TimeoutError, RedisTimeoutError, MaxConnectionsError)):
            metrics.REDIS_FAIL_OPEN.labels("state").inc()
            now = time.monotonic()
            if now - self._slow_logged >= 10:  # a line per burst, not one per request
                self._slow_logged = now
                log.warning("redis_slow", error=type(exc).__name__, timeout_s=self.timeout)
            return
        self._down(exc)

    def _down(self, exc: BaseException) -> None:
        if self.ok:
            self.ok = False
            log.error("redis_unreachable", error=repr(exc)[:300])
            metrics.DEPENDENCY_UP.labels("redis").set(0)
            self._fail_pending()
            self._went_down.set()
            if self._probe is None:  # a store that was not started (a command-line tool's)
                self._probe = supervised("redis-probe", self._probe_forever)

    async def _probe_forever(self) -> None:
        """Waits for Redis to be found down, then pings it every second until it answers. (A loop
        that never returns, as a supervised task must: a probe that returned once Redis was back was
        taken for a dead task and restarted, logging task_stopped every second from then on.)"""
        while True:
            await self._went_down.wait()
            await self._probe_until_up()
            self._went_down.clear()

    async def _probe_until_up(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self._reconnect is not None:  # what Redis is, unknown since the start
                client = await self._reconnect()
                if client is None:
                    continue
                self._reconnect = None
                if isinstance(client, RedisCluster) != self.cluster:
                    log.info("redis_reconnected", cluster=isinstance(client, RedisCluster))
                    self.client, self.cluster = client, isinstance(client, RedisCluster)
            if await self.ping():
                self.ok = True
                metrics.DEPENDENCY_UP.labels("redis").set(1)
                log.info("redis_back")
                return
