"""The state feed: one Redis pub/sub connection per worker, shared by every live event stream.

A stream used to subscribe on a connection of its own, taken from the pool that the session batcher
and observe use: 100 streams emptied that pool and the redirects' sessions were dropped.
Now a stream listens here. The first listener of a click's channel SUBSCRIBEs it, the last one to
leave UNSUBSCRIBEs it, and one reader task hands each message to that channel's listeners through a
small queue: a client that does not read loses older changes (each message is the whole state, so
the newest is all it needs) and never grows memory.

Whenever Redis confirms a channel (a stream joined, or the feed reconnected) its listeners get LIVE
and read the state once: that covers whatever was published before the subscription took. When the
connection fails they get LOST and poll until LIVE comes again; the feed reconnects (0.5 s after a
failure at first, backing off to 5 s).
Commands go out only from the reader task, between reads, so nothing races on the connection.
"""
from __future__ import annotations

import asyncio
import contextlib
import enum
from typing import Any, Awaitable, Callable, Iterator, cast

import redis.asyncio as aioredis
import structlog
from redis.asyncio.client import PubSub

from ..domain.backoff import Backoff
from .tasks import cancel_and_wait, supervised

log = structlog.get_logger("tracker.feed")
QUEUE_SIZE = 8  # per listener; past it the oldest item goes
READ_WAIT = 0.1  # a new channel is subscribed within this (plus a round trip)
PING_AFTER = 5.0  # seconds of silence before the feed asks Redis for a PONG ...
ANSWER_WAIT = 3.0  # ... and how long it waits for it before taking the connection for dead
# Streams read the state (once after LIVE, and every poll while the feed is away) through a
# semaphore of this size, so that however many are open they take at most this many of the worker's
# Redis connections, or of its PostgreSQL pool while Redis is down; a burst of them waits its turn
# outside the read's deadline instead of queueing inside it.
STREAM_READS = 4


class Link(enum.Enum):
    LIVE = "live"  # the channel is subscribed: read the state once, then wait for messages
    LOST = "lost"  # the connection failed: poll the state until LIVE



class Listener:
    """One stream's place on a channel: the messages (the published state, as bytes), LIVE and LOST."""

    __slots__ = ("_queue",)

    def __init__(self) -> None:
        self._queue: asyncio.Queue[bytes | Link] = asyncio.Queue(QUEUE_SIZE)

    def put(self, item: bytes | Link) -> None:
        if self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(item)

    async def next(self, timeout: float) -> bytes | Link | None:
        """The next item, or None after `timeout` seconds without one."""
        try:
            async with asyncio.timeout(timeout):
                return await self._queue.get()
        except TimeoutError:
            return None


class StateFeed:
    def __init__(self, url: str, name: str, socket_timeout: float = 2.0) -> None:
        self.url, self.name, self.socket_timeout = url, name, socket_timeout
        self.up: bool | None = None  # None until the first connection
        self._listeners: dict[str, set[Listener]] = {}
        self._live: set[str] = set()  # channels Redis confirmed on the current connection
        self._changed: set[str] = set()  # channels whose first listener came or last one left
        self._task: asyncio.Task[None] | None = None
        self.reads = asyncio.Semaphore(STREAM_READS)
        self._reconnect = Backoff(first=0.5, cap=5.0)

    @contextlib.contextmanager
    def listen(self, channel: str) -> Iterator[Listener]:
        listener = Listener()
        group = self._listeners.get(channel)
        if group is None:
            group = self._listeners[channel] = set()
            self._changed.add(channel)
        group.add(listener)
        if channel in self._live:
            listener.put(Link.LIVE)
        try:
            yield listener
        finally:
            group.discard(listener)
            if not group and self._listeners.get(channel) is group:
                del self._listeners[channel]  # the reader UNSUBSCRIBEs it
                self._changed.add(channel)

    def wake_listeners(self) -> None:
        """Every listener gets LOST now (shutdown: streams look at the closing flag at once)."""
        for group in self._listeners.values():
            for listener in group:
                listener.put(Link.LOST)

    async def start(self) -> None:
        self._task = supervised("state-feed", self._run)

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        self.wake_listeners()

    # -- the reader ---------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            # A new client each time: no state of a failed connection (redis-py's resubscription
            # bookkeeping, its pool's counts) survives into the next one. One connection at most.
            client = aioredis.Redis.from_url(self.url, max_connections=1, client_name=self.name,
                                             socket_timeout=self.socket_timeout, socket_connect_timeout=1.0)
            pubsub = client.pubsub()
            try:
                await self._follow(pubsub)
            except Exception as exc:  # noqa: BLE001 - any failure: tell the streams, reconnect
                self._lose(exc)
            finally:
                for close in (pubsub.aclose, client.aclose):
                    try:
                        await asyncio.wait_for(close(), 1.0)
                    except Exception:  # noqa: BLE001 - closing a broken connection
                        pass
            await asyncio.sleep(self._reconnect.next())

    async def _follow(self, pubsub: PubSub) -> None:
        # redis-py leaves PubSub.connect unannotated: its type, as the library defines it.
        connect = cast(Callable[[], Awaitable[None]], pubsub.connect)
        await connect()
        if not self.up:
            log.info("state_feed_connected", channels=len(self._listeners))
        self.up = True
        self._reconnect.reset()
        loop = asyncio.get_running_loop()
        subscribed: set[str] = set()
        unconfirmed: dict[str, int] = {}  # SUBSCRIBEs sent per channel and not yet confirmed
        heard, pinged = loop.time(), False
        self._changed = set(self._listeners)  # a new connection: every channel wanted now
        while True:
            if self._changed:
                changed, self._changed = self._changed, set()
                new = [c for c in changed if c in self._listeners and c not in subscribed]
                gone = [c for c in changed if c not in self._listeners and c in subscribed]
                if new:
                    await pubsub.subscribe(*new)
                    subscribed.update(new)
                    for channel in new:
                        unconfirmed[channel] = unconfirmed.get(channel, 0) + 1
                if gone:
                    await pubsub.unsubscribe(*gone)
                    subscribed.difference_update(gone)
                    self._live.difference_update(gone)
            msg = await pubsub.get_message(timeout=READ_WAIT)
            now = loop.time()
            if msg is None:
                # A connection that died without a FIN reads as silence: ask, and give up on it
                # when no answer comes (redis-py's own pub/sub health check never gives up).
                if now - heard > PING_AFTER + ANSWER_WAIT:
                    raise ConnectionError(f"no answer from Redis for {now - heard:.1f} s")
                if now - heard > PING_AFTER and not pinged:
                    await pubsub.ping()
                    pinged = True
                continue
            heard, pinged = now, False
            self._dispatch(msg, subscribed, unconfirmed)

    def _dispatch(self, msg: dict[str, Any], subscribed: set[str], unconfirmed: dict[str, int]) -> None:
        kind, raw = msg["type"], msg["channel"]
        channel = raw.decode() if isinstance(raw, bytes) else raw
        if kind == "message":
            for listener in self._listeners.get(channel, ()):
                listener.put(msg["data"])
        elif kind == "subscribe":
            # Confirmations come in order: only the one answering the latest SUBSCRIBE of a channel
            # still wanted makes it live (an earlier one may predate an UNSUBSCRIBE sent since).
            left = unconfirmed.get(channel, 1) - 1
            if left > 0:
                unconfirmed[channel] = left
                return
            unconfirmed.pop(channel, None)
            if channel in subscribed:
                self._live.add(channel)
                for listener in self._listeners.get(channel, ()):
                    listener.put(Link.LIVE)

    def _lose(self, exc: BaseException) -> None:
        if self.up is not False:
            log.warning("state_feed_lost", error=repr(exc)[:300], channels=len(self._listeners))
        self.up = False
        self._live.clear()
        self.wake_listeners()
